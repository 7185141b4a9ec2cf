"""/metrics: the standard process metrics, and GPU memory in use where the model is on a GPU."""

from __future__ import annotations

import pytest
import torch

from chatglm_serve.engine.types import EngineStats
from chatglm_serve.server.metrics import Metrics


def _value(text: str, name: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return float(line.split()[-1])


@pytest.mark.asyncio(loop_scope="session")
async def test_process_metrics_on_the_daemons_registry(client):
    text = (await client.get("/metrics")).text
    assert _value(text, "process_resident_memory_bytes") > 10 << 20  # torch alone is more
    assert _value(text, "process_cpu_seconds_total") > 0
    assert _value(text, "process_open_fds") > 0
    assert "chatglm_gpu_memory_allocated_bytes" not in text  # the test model is on the CPU


def test_gpu_memory_gauge_comes_from_the_engine_stats():
    stats = EngineStats(kv_blocks_total=4, gpu_memory_allocated_bytes=123456789)
    text = Metrics(lambda: stats).render()[0].decode()
    assert _value(text, "chatglm_gpu_memory_allocated_bytes") == 123456789
    assert (
        "chatglm_gpu_memory_allocated_bytes"
        not in Metrics(lambda: EngineStats(kv_blocks_total=4)).render()[0].decode()
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_on_a_gpu_reports_its_memory(model_and_tokenizer):
    from chatglm_serve.engine.config import EngineConfig
    from chatglm_serve.engine.llm_engine import LLMEngine
    from chatglm_serve.model.loader import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(None, dtype="float32", device="cuda")
    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_tokens=1024, max_model_len=256))
    used = engine.get_stats().gpu_memory_allocated_bytes
    assert used is not None and used >= torch.cuda.memory_allocated() > 0
