"""Drive a synchronous LLMEngine in tests: staged submissions, collected outputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.engine.llm_engine import LLMEngine
from chatglm_serve.engine.types import FinishReason, RequestOutput, SamplingParams
from chatglm_serve.model.attention import AttentionMetadata
from chatglm_serve.model.chatglm import ChatGLMForCausalLM


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    chunks: list[str] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    first_step: int | None = None
    finish_step: int | None = None
    outputs: list[RequestOutput] = field(default_factory=list)


INJECTED_FAILURE = "injected device failure"


def fail_step(runner, at: int, delay: float = 0.0) -> None:
    """Make the runner's `at`-th step raise RuntimeError(INJECTED_FAILURE): a fault injected on
    purpose, since the real model cannot be made to fail on demand. `delay` seconds before every
    step slow the steps down (for a browser to see a stream start)."""
    real, calls = runner.execute, [0]

    def execute(batch):
        calls[0] += 1
        if delay:
            time.sleep(delay)
        if calls[0] == at:
            raise RuntimeError(INJECTED_FAILURE)
        return real(batch)

    runner.execute = execute


def make_engine(model, tokenizer, **kw) -> LLMEngine:
    kw.setdefault("num_blocks", 128)
    kw.setdefault("max_num_seqs", 16)
    kw.setdefault("max_num_batched_tokens", 256)
    return LLMEngine(model, tokenizer, EngineConfig(**kw))


def run(
    engine: LLMEngine,
    requests: list[tuple[str, list[int], SamplingParams]],
    stagger: int = 0,
    max_steps: int = 10_000,
) -> dict[tuple[str, int], Result]:
    """Submit request i at step i * stagger, step until idle; results by (request id, index)."""
    results: dict[tuple[str, int], Result] = {}
    queue = list(requests)
    step = 0
    while queue or engine.has_unfinished():
        while queue and step >= (len(requests) - len(queue)) * stagger:
            rid, ids, params = queue.pop(0)
            engine.add_request(rid, ids, params)
        for out in engine.step():
            r = results.setdefault((out.request_id, out.index), Result())
            assert r.finish_reason is None, "output after the final one"
            if out.token_ids and r.first_step is None:
                r.first_step = step
            r.token_ids += out.token_ids
            r.text += out.text
            r.chunks.append(out.text)
            r.outputs.append(out)
            if out.finished:
                r.finish_reason = out.finish_reason
                r.finish_step = step
        step += 1
        assert step < max_steps, "engine did not finish"
    return results


def assert_idle(engine: LLMEngine) -> None:
    bm = engine.block_manager
    bm.check_consistency()
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    assert all(r == 0 for r in bm.ref_counts)
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    stats = engine.get_stats()
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0


@torch.inference_mode()
def naive_greedy(model: ChatGLMForCausalLM, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding that recomputes the whole context every token (no cache reuse)."""
    ids = list(prompt)
    out = []
    for _ in range(steps):
        n = len(ids)
        bs = 16
        nb = (n + bs - 1) // bs
        cache = [torch.zeros(model.kv_cache_shape(nb, bs)) for _ in model.layer_devices()]
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n),
            query_start_loc=[0, n],
            seq_lens=[n],
            block_tables=torch.arange(nb)[None, :],
            num_prefills=1,
            block_size=bs,
        )
        hidden = model(torch.tensor(ids), torch.arange(n), cache, meta)
        t = int(model.compute_logits(hidden[-1:]).argmax(-1))
        out.append(t)
        ids.append(t)
    return out
