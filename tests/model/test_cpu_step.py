"""The one-call CPU decode step (model/cpu_step.py, kernels/csrc/cpu/decode_stack.cpp) against
the layer-by-layer forward it replaces."""

from __future__ import annotations

import pytest
import torch

from chatglm_serve.kernels import cpu_decode
from chatglm_serve.kernels.build import KernelUnavailable
from chatglm_serve.model import cpu_step
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.cpu_linear import Bf16Linear, PanelLinear, SmallBatchLinear
from chatglm_serve.model.quantize import QuantLinear, QuantSpec, quantize_model
from tests.conftest import tiny_config
from tests.isa_cap import run_capped
from tests.paged import PagedRunner

PROMPTS = [list(range(3, 40)), list(range(50, 55)), list(range(7, 24))]  # 37, 5 and 17 tokens


def _needs(dtype: torch.dtype) -> None:
    try:
        cpu_decode.load_decode_kernels()
    except KernelUnavailable as e:
        pytest.skip(f"CPU decode kernels cannot be built here: {e}")
    if dtype == torch.float32 and "avx2" not in cpu_decode.allowed_isas():
        pytest.skip("fp32 linears join the step on panels: AVX2 or better")
    if dtype == torch.bfloat16 and "avx2" not in cpu_decode.allowed_isas():
        pytest.skip("bf16 linears join the step on AVX2 or better")


def _model(dtype: torch.dtype, quant: QuantSpec | None = None, **cfg) -> ChatGLMForCausalLM:
    model = ChatGLMForCausalLM.random(tiny_config(**cfg), dtype=dtype, seed=11, std=0.1)
    if quant is not None:
        quantize_model(model, quant)
    model.optimize_for_cpu()
    return model


def _decode_logits(
    model: ChatGLMForCausalLM, stack: bool, steps: int = 3, prompts: list[list[int]] = PROMPTS
) -> list[torch.Tensor]:
    """Prefill sequences of different lengths, then decode them together `steps` times."""
    model.use_decode_stack = stack
    runner = PagedRunner(model)
    for seq, ids in enumerate(prompts):
        runner.step([(seq, ids)])
    out, nxt = [], [[9 + seq] for seq in range(len(prompts))]
    for _ in range(steps):
        logits = runner.step([(seq, nxt[seq]) for seq in range(len(prompts))])
        out.append(logits)
        nxt = [[int(t)] for t in logits.argmax(-1)]
    return out


def _count_stack_calls(monkeypatch) -> list[int]:
    """The row count of every one-call step taken from now on (the step still runs)."""
    calls: list[int] = []
    real = cpu_decode.decode_stack

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(cpu_step.cpu_decode, "decode_stack", counting)
    return calls


@pytest.mark.parametrize("cfg", [{}, {"add_qkv_bias": False}, {"num_layers": 3, "rope_ratio": 4.0}])
def test_fp32_step_matches_layers(cfg):
    _needs(torch.float32)
    model = _model(torch.float32, **cfg)
    assert isinstance(model.layers[0].mlp.dense_h_to_4h, PanelLinear)
    want = _decode_logits(model, stack=False)
    got = _decode_logits(model, stack=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [3, 5])
def test_a_wide_ffn_step_matches_layers(rows):
    # SwiGLU over more than decode_stack.cpp's kSerialSilu values is split between threads: by
    # columns below 4 rows, by rows from 4 (a narrow one runs on the calling thread)
    _needs(torch.float32)
    model = _model(torch.float32, ffn_hidden_size=2816)
    prompts = [list(range(3 + r, 12 + 3 * r)) for r in range(rows)]
    want = _decode_logits(model, stack=False, prompts=prompts)
    got = _decode_logits(model, stack=True, prompts=prompts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_step_matches_layers():
    _needs(torch.bfloat16)
    model = _model(torch.bfloat16)
    assert isinstance(model.layers[0].self_attention.query_key_value, Bf16Linear)
    want = _decode_logits(model, stack=False)
    got = _decode_logits(model, stack=True)
    for g, w in zip(got, want, strict=True):
        # same kernels for the matmuls; bf16 rounding of the small ops may differ in the last bit
        torch.testing.assert_close(g, w, atol=0.05, rtol=0.02)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bits", "group"), [(4, 32), (4, None), (8, None)])
def test_quantized_step_matches_layers(monkeypatch, bits, group, dtype):
    """int4/int8 linears (the CPU kernel) run inside the one-call step, with the same result,
    under fp32 or bf16 activations (a half-precision checkpoint quantized on load)."""
    _needs(None)
    model = _model(dtype, QuantSpec(bits=bits, group_size=group))
    qkv = model.layers[0].self_attention.query_key_value
    assert isinstance(qkv, QuantLinear) and qkv.path == "cpu_kernel" and qkv.bias is not None
    want = _decode_logits(model, stack=False)
    calls = _count_stack_calls(monkeypatch)
    got = _decode_logits(model, stack=True)
    assert calls == [3, 3, 3]
    for g, w in zip(got, want, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        else:  # same kernels; the small ops' bf16 rounding may differ in the last bit
            torch.testing.assert_close(g, w, atol=0.05, rtol=0.02)
            assert torch.equal(g.argmax(-1), w.argmax(-1))
    qkv.cpu_impl = "scalar"  # a pinned ISA is the layer-by-layer path's business
    _decode_logits(model, stack=True, steps=1)
    assert calls == [3, 3, 3]


@pytest.mark.parametrize("cap", ["avx2", "scalar"])
def test_lower_isas_take_the_step(cap):
    """The same binary on an AVX2-only (or older) CPU: CHATGLM_SERVE_CPU_ISA caps every kernel
    and the step's own loops, and the fp32, bf16 and int4/int8 steps still match the layers."""
    _needs(None)
    if cap == "avx2" and "avx2" not in cpu_decode.allowed_isas():
        pytest.skip("this CPU has no AVX2")
    summary = run_capped(cap, __file__, "fp32_step or bf16_step or quantized_step")
    # panels and bf16 linears need AVX2: under "scalar" those tests skip, the int4/int8 ones run
    want = 10 if cap == "avx2" else 6
    assert f"{want} passed" in summary and "failed" not in summary, summary


def test_step_is_taken_only_where_it_applies(monkeypatch):
    _needs(torch.float32)
    calls = _count_stack_calls(monkeypatch)
    model = _model(torch.float32)
    runner = PagedRunner(model, max_seqs=20)
    runner.step([(0, PROMPTS[0])])  # a prefill: layer by layer
    assert calls == []
    runner.step([(0, [5])])
    assert calls == [1]
    for seq in range(1, 17):
        runner.step([(seq, [4, 5])])
    calls.clear()
    runner.step([(seq, [6]) for seq in range(17)])  # 17 rows: panels take any count
    assert calls == [17]
    model.use_decode_stack = False
    runner.step([(0, [7])])
    assert calls == [17]


def test_plain_fp32_linears_take_at_most_16_rows(monkeypatch):
    """SmallBatchLinear (weights it cannot pack) runs up to 16 rows: beyond, layer by layer."""
    _needs(torch.float32)
    if not cpu_decode.has_avx512():
        pytest.skip("SmallBatchLinear's kernel (small_gemm.cpp) is AVX-512 only")
    model = _model(torch.float32)
    for layer in model.layers:  # as if no weight could be packed
        mlp = layer.mlp
        for name in ("dense_h_to_4h", "dense_4h_to_h"):
            panel = getattr(mlp, name)
            plain = torch.nn.Linear(panel.in_features, panel.out_features, bias=False)
            with torch.no_grad():
                plain.weight.copy_(panel.weight)
            plain.__class__ = SmallBatchLinear
            setattr(mlp, name, plain)
    calls = _count_stack_calls(monkeypatch)
    runner = PagedRunner(model, max_seqs=20)
    for seq in range(17):
        runner.step([(seq, [4, 5])])
    runner.step([(seq, [6]) for seq in range(16)])
    runner.step([(seq, [7]) for seq in range(17)])
    assert calls == [16]


def test_plain_linears_fall_back(monkeypatch):
    """Without optimize_for_cpu (plain nn.Linear) the layers run as before."""
    _needs(torch.float32)
    calls = []
    monkeypatch.setattr(cpu_step.cpu_decode, "decode_stack", lambda *a, **k: calls.append(1))
    model = ChatGLMForCausalLM.random(tiny_config(), seed=11, std=0.1)
    runner = PagedRunner(model)
    runner.step([(0, PROMPTS[0])])
    logits = runner.step([(0, [3])])
    assert calls == [] and logits.shape == (1, 320) and torch.isfinite(logits).all()


def test_weights_are_gathered_once_and_again_after_a_change(monkeypatch):
    """The step's weight list is made once (walking the modules every step cost ~0.6 ms), and
    made again when a weight is replaced: here a state-dict load repacks every linear."""
    _needs(torch.float32)
    made = []
    real = cpu_step._make_plan
    monkeypatch.setattr(cpu_step, "_make_plan", lambda *a: made.append(1) or real(*a))
    calls = _count_stack_calls(monkeypatch)
    model = _model(torch.float32)
    other = _model(torch.float32)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    runner = PagedRunner(model)
    runner.step([(0, PROMPTS[0])])
    for tok in (5, 6, 7):
        before = runner.step([(0, [tok])])
    assert len(made) == 1 and calls == [1, 1, 1]

    model.load_state_dict(other.state_dict())  # PanelLinear repacks: new `packed` tensors
    saved = [c.clone() for c in runner.caches]
    got = runner.step([(0, [8])])
    assert len(made) == 2 and calls == [1, 1, 1, 1]
    runner.caches, runner.lens[0] = saved, runner.lens[0] - 1
    model.use_decode_stack = False
    want = runner.step([(0, [8])])
    assert not torch.allclose(want, before)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_modules_are_compared_again_only_after_an_assignment(monkeypatch):
    """Steps with nothing assigned in between reuse the plan without walking the modules; a
    parameter assignment (torch's registration hook, model/changes.py) makes the next step
    compare them, and the new weight is used."""
    _needs(torch.float32)
    walks = []
    real = cpu_step._state_key
    monkeypatch.setattr(cpu_step, "_state_key", lambda m: walks.append(1) or real(m))
    calls = _count_stack_calls(monkeypatch)
    model = _model(torch.float32)
    runner = PagedRunner(model)
    runner.step([(0, PROMPTS[0])])
    runner.step([(0, [5])])
    walked = len(walks)
    for tok in (6, 7, 8):
        runner.step([(0, [tok])])
    assert len(walks) == walked and len(calls) == 4

    norm = model.transformer.encoder.layers[0].input_layernorm
    saved = [c.clone() for c in runner.caches]
    norm.weight = torch.nn.Parameter(norm.weight.detach() * 2)
    got = runner.step([(0, [9])])
    assert len(walks) == walked + 1 and len(calls) == 5
    runner.caches, runner.lens[0] = saved, runner.lens[0] - 1
    model.use_decode_stack = False
    want = runner.step([(0, [9])])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_dropped_runner_s_caches_are_freed():
    """The model keeps its step plan, but not the KV caches of an engine that is gone."""
    import gc
    import weakref

    _needs(torch.float32)
    model = _model(torch.float32)
    runner = PagedRunner(model)
    runner.step([(0, PROMPTS[0])])
    runner.step([(0, [5])])
    assert "_cpu_step_plan" in model.__dict__
    cache = weakref.ref(runner.caches[0])
    del runner
    gc.collect()
    assert cache() is None
    runner = PagedRunner(model)  # a new engine on the same model: a plan for its caches
    runner.step([(0, PROMPTS[1])])
    assert runner.step([(0, [5])]).shape == (1, 320)
