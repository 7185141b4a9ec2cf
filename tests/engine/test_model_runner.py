"""KV cache sizing from each kind of budget, and the runner's step inputs."""

from __future__ import annotations

import torch

from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.engine.model_runner import ModelRunner, plan_kv_cache
from chatglm_serve.engine.scheduler import ScheduledSeq
from chatglm_serve.engine.sequence import Request, Sequence
from chatglm_serve.engine.types import SamplingParams


def per_block(model, bs=16, dtype=torch.float32) -> int:
    return model.kv_bytes_per_token(dtype) * bs


def test_budget_sources(model):
    pb = per_block(model)
    assert plan_kv_cache(model, EngineConfig(num_blocks=7)).num_blocks == 7
    plan = plan_kv_cache(model, EngineConfig(kv_cache_tokens=100))
    assert plan.num_blocks == 7 and plan.num_tokens == 112  # rounded up to whole blocks
    assert plan_kv_cache(model, EngineConfig(kv_cache_bytes=pb * 5 + 1)).num_blocks == 5
    half = plan_kv_cache(model, EngineConfig(num_blocks=4, kv_cache_dtype="float16"))
    assert half.dtype == torch.float16 and half.bytes_total == 4 * per_block(
        model, dtype=torch.float16
    )


def test_cpu_default_is_capped_at_what_can_be_used(model):
    cfg = EngineConfig(max_num_seqs=3)
    plan = plan_kv_cache(model, cfg)
    # 3 sequences at the model's full 512-token context never need more
    assert plan.num_blocks == 3 * 512 // 16
    assert plan.source == "host memory budget"


def test_gpu_budget_is_a_fraction_of_free_memory_per_device(model, monkeypatch):
    """No GPU here: pretend the layers live on two GPUs to check the arithmetic."""
    from chatglm_serve.engine.model_runner import _activation_reserve

    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]  # one layer each
    monkeypatch.setattr(model, "layer_devices", lambda: devices)
    cfg = EngineConfig(gpu_memory_utilization=0.5)
    reserve = _activation_reserve(model, cfg, 512)
    layer_block = per_block(model) // model.config.num_layers
    # the second GPU is the tighter one: half its free memory, less the reserve, = 1000 blocks
    free = {0: 4 * (reserve + 1000 * layer_block), 1: 2 * (reserve + 1000 * layer_block)}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[d.index], 80 << 30))
    plan = plan_kv_cache(model, cfg)
    assert plan.num_blocks == 1000 < 64 * 512 // 16
    assert "free GPU memory" in plan.source


def make_seq(ids, computed=0, table=None) -> Sequence:
    seq = Sequence(0, Request("r", ids, SamplingParams(), 10), 0, None, None)
    seq.num_computed_tokens = computed
    seq.block_table = table or []
    return seq


def test_runner_logits_only_for_rows_that_sample(model):
    cfg = EngineConfig(num_blocks=8, max_num_seqs=4, max_num_batched_tokens=64)
    runner = ModelRunner(model, cfg, plan_kv_cache(model, cfg), max_model_len=128)
    a = make_seq(list(range(3, 23)), table=[5, 2])  # 20-token prompt, first chunk of 12
    b = make_seq(list(range(30, 36)), table=[7])  # 6-token prompt, whole
    logits = runner.execute([ScheduledSeq(a, 12), ScheduledSeq(b, 6)])
    assert logits.shape == (1, model.config.padded_vocab_size)  # only b finished its prompt
    a.num_computed_tokens, b.num_computed_tokens = 12, 6
    b.token_ids.append(40)
    logits = runner.execute([ScheduledSeq(a, 8), ScheduledSeq(b, 1)])
    assert logits.shape[0] == 2
    # a's K/V went to blocks 5 then 2 in order: slot = block * 16 + offset
    k0 = runner.kv_caches[0][0]
    assert k0[5].abs().sum(-1).sum(-1).ne(0).all()  # tokens 0..15 fill block 5
    assert k0[2, :4].abs().sum() > 0 and k0[2, 4:].abs().sum() == 0  # tokens 16..19
    assert k0[7, :7].abs().sum() > 0 and k0[7, 7:].abs().sum() == 0  # b: 6 prompt + 1
