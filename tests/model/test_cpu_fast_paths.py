"""The CPU fast paths against the plain PyTorch ones: the paged decode attention kernel, oneDNN
packed linears, the in-place complex rotary, and the per-step metadata built once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chatglm_serve.kernels import cpu_decode
from chatglm_serve.kernels.build import KernelUnavailable
from chatglm_serve.model import attention
from chatglm_serve.model.attention import AttentionMetadata
from chatglm_serve.model.chatglm import ChatGLMForCausalLM, RotaryEmbedding, apply_rotary_
from chatglm_serve.model.cpu_linear import (
    Bf16Linear,
    PackedLinear,
    PanelLinear,
    SmallBatchLinear,
    can_pack,
    optimize_linears,
)
from tests.conftest import tiny_config
from tests.isa_cap import run_capped
from tests.paged import PagedRunner


def _kernel():
    try:
        return cpu_decode.load_decode_kernels()
    except KernelUnavailable as e:
        pytest.skip(f"CPU attention kernel cannot be built here: {e}")


def _reference_decode(q, k_cache, v_cache, tables, lens, scale):
    """Dense attention of each sequence's query over its own first `len` cached positions."""
    outs = []
    bs = k_cache.shape[1]
    for b in range(q.shape[0]):
        L = int(lens[b])
        blocks = tables[b, : (L + bs - 1) // bs]
        k = k_cache[blocks].flatten(0, 1)[:L].transpose(0, 1).float()  # [Hkv, L, D]
        v = v_cache[blocks].flatten(0, 1)[:L].transpose(0, 1).float()
        o = F.scaled_dot_product_attention(
            q[b].float().unsqueeze(1), k, v, scale=scale, enable_gqa=True
        )
        outs.append(o.squeeze(1))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("hq", "hkv", "d"), [(8, 2, 128), (32, 2, 128), (12, 2, 64), (4, 4, 24), (6, 2, 40)]
)
def test_decode_kernel_matches_dense_attention(dtype, hq, hkv, d):
    ext = _kernel()
    g = torch.Generator().manual_seed(hq * 100 + d)
    bs, lens = 16, torch.tensor([1, 16, 17, 70, 33])
    nb = 40
    cache = torch.randn(2, nb, bs, hkv, d, generator=g).to(dtype)
    # scattered, non-monotonic block ids, padded with 0 past each length
    perm = torch.randperm(nb, generator=g)
    tables = torch.zeros(len(lens), 6, dtype=torch.int64)
    used = 0
    for b, L in enumerate(lens.tolist()):
        n = (L + bs - 1) // bs
        tables[b, :n] = perm[used : used + n]
        used += n
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    scale = 1 / math.sqrt(d)
    got = ext.paged_decode_attention(q, cache[0], cache[1], tables, lens, scale)
    want = _reference_decode(q, cache[0], cache[1], tables, lens, scale)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("cap", ["avx2", "scalar"])
def test_decode_kernel_lower_isas(cap):
    """The attention's AVX2 passes and its generic loops, forced by CHATGLM_SERVE_CPU_ISA in a
    child process, against the same dense reference (on an AVX2-only CPU "avx2" is its default)."""
    _kernel()
    if cap == "avx2" and "avx2" not in cpu_decode.allowed_isas():
        pytest.skip("this CPU has no AVX2")
    summary = run_capped(cap, __file__, "decode_kernel_matches_dense")
    assert "10 passed" in summary, summary


def test_decode_kernel_refuses_bad_input():
    ext = _kernel()
    cache = torch.zeros(2, 4, 16, 2, 8)
    q = torch.zeros(1, 4, 8)
    with pytest.raises(RuntimeError, match="exceeds its block table"):
        ext.paged_decode_attention(
            q, cache[0], cache[1], torch.zeros(1, 2, dtype=torch.int64), torch.tensor([33]), 1.0
        )
    with pytest.raises(RuntimeError, match="block id out of range"):
        ext.paged_decode_attention(
            q, cache[0], cache[1], torch.tensor([[9]]), torch.tensor([3]), 1.0
        )
    with pytest.raises(RuntimeError, match="one dtype"):
        ext.paged_decode_attention(
            q.double(), cache[0], cache[1], torch.tensor([[0]]), torch.tensor([3]), 1.0
        )


def test_model_decode_same_with_and_without_kernel(tiny_model, monkeypatch):
    """The whole model: decodes through the kernel equal decodes through gather + SDPA."""
    _kernel()
    prompts = [[5, 9, 11, 40, 7], list(range(3, 40)), [8, 8]]

    def run() -> torch.Tensor:
        r = PagedRunner(tiny_model)
        r.step([(i, p) for i, p in enumerate(prompts)])
        outs = [r.step([(i, [20 + i]) for i in range(3)]) for _ in range(5)]
        return torch.cat(outs)

    with_kernel = run()
    monkeypatch.setattr(attention.cpu_decode, "attention_supports", lambda q, kv: False)
    without = run()
    torch.testing.assert_close(with_kernel, without, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not can_pack(torch.zeros(1, dtype=torch.bfloat16)), reason="no oneDNN bf16")
def test_packed_linear_matches_linear_and_round_trips():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g))
    packed = PackedLinear.from_linear(lin)
    for rows in (1, 5, 3 * 7):
        x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
        torch.testing.assert_close(packed(x).float(), lin(x).float(), atol=0.1, rtol=0.02)
    x3 = torch.randn(2, 3, 64, generator=g).to(torch.bfloat16)
    assert packed(x3).shape == (2, 3, 48)
    state = packed.state_dict()
    assert torch.equal(state["weight"], lin.weight) and torch.equal(state["bias"], lin.bias)
    other = PackedLinear(torch.zeros(48, 64, dtype=torch.bfloat16), torch.zeros(48).bfloat16())
    other.load_state_dict(state)
    torch.testing.assert_close(other(x3), packed(x3))


@pytest.mark.skipif(not can_pack(torch.zeros(1, dtype=torch.bfloat16)), reason="no oneDNN bf16")
def test_pack_for_cpu_keeps_logits_and_state_dict(tiny_cfg):
    model = ChatGLMForCausalLM.random(tiny_cfg, dtype=torch.bfloat16, seed=3, std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = list(range(3, 30))
    want = PagedRunner(model).greedy(0, ids, steps=4)
    logits_want = PagedRunner(model).step([(0, ids)])
    names = model.optimize_for_cpu()
    assert len(names) == 4 * tiny_cfg.num_layers + 1  # every linear, the output layer too
    got = PagedRunner(model).step([(0, ids)])
    cos = F.cosine_similarity(got, logits_want, dim=-1)
    assert cos.min() > 0.999
    assert PagedRunner(model).greedy(0, ids, steps=4) == want
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_fp32_linears_keep_their_weights_and_match(tiny_cfg):
    if "avx2" not in cpu_decode.allowed_isas():
        pytest.skip("the fp32 panel kernel needs AVX2 or better")
    _kernel()
    model = ChatGLMForCausalLM.random(tiny_cfg, seed=5, std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = list(range(3, 30))
    want = PagedRunner(model).step([(0, ids)])
    want_decode = [PagedRunner(model).step([(i, ids[: 5 + i]) for i in range(3)])]
    assert not can_pack(model.transformer.output_layer.weight)
    names = model.optimize_for_cpu()
    assert len(names) == 4 * tiny_cfg.num_layers + 1
    # every tiny-config weight has N % 16 == 0: all in panels
    assert all(isinstance(model.get_submodule(n), PanelLinear) for n in names)
    torch.testing.assert_close(PagedRunner(model).step([(0, ids)]), want, atol=1e-5, rtol=1e-5)
    got_decode = [PagedRunner(model).step([(i, ids[: 5 + i]) for i in range(3)])]
    torch.testing.assert_close(got_decode, want_decode, atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize(("n", "k"), [(48, 64), (37, 40), (8, 7)])
def test_small_linear_kernel_matches_f_linear(rows, n, k):
    if not cpu_decode.has_avx512():
        pytest.skip("the small-batch fp32 kernel needs AVX-512")
    ext = _kernel()
    g = torch.Generator().manual_seed(rows * 1000 + n * 10 + k)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    torch.testing.assert_close(ext.small_linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ext.small_linear(x, w, None), F.linear(x, w), atol=1e-5, rtol=1e-5)
    if n % 16 == 0:
        return  # such weights go into panels (test_panel_linear_matches_linear_and_round_trips)
    lin = torch.nn.Linear(k, n)
    assert optimize_linears(torch.nn.Sequential(lin)) == ["0"]
    assert isinstance(lin, SmallBatchLinear)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    y = lin(x)  # under autograd: plain F.linear, so gradients still flow
    y.sum().backward()
    assert lin.weight.grad is not None


def test_complex_rotary_equals_pairwise_formula():
    rot = RotaryEmbedding(dim=16, max_positions=64)
    pos = torch.tensor([0, 3, 17, 63])
    x = torch.randn(4, 5, 32)
    # the seed's formula on channel pairs (2i, 2i+1) of the first 16 channels
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    ang = pos[:, None].float() * inv[None]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x0, x1 = x[..., 0:16:2], x[..., 1:16:2]
    want = x.clone()
    want[..., 0:16:2] = x0 * cos - x1 * sin
    want[..., 1:16:2] = x1 * cos + x0 * sin
    for dtype in (torch.float32, torch.bfloat16):
        got = x.to(dtype, copy=True)  # rotated in place
        apply_rotary_(got, rot.rotation(pos))
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_step_tensors_built_once_per_step():
    cfg = tiny_config()
    model = ChatGLMForCausalLM.random(cfg, seed=1)
    bs = 16
    caches = [torch.zeros(model.kv_cache_shape(8, bs)) for _ in model.layers]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([10, 16 + 4]),
        query_start_loc=[0, 1, 2],
        seq_lens=[11, 21],
        block_tables=torch.tensor([[0, 0], [1, 2]]),
        num_prefills=0,
        block_size=bs,
    )
    plan = meta.decode_plan(torch.float32)
    assert meta.decode_plan(torch.float32) is plan  # the first layer builds, the rest reuse
    assert plan.keys == 21 and plan.mask is not None and plan.mask.shape == (2, 1, 1, 21)
    assert torch.isinf(plan.mask[0, 0, 0, 11:]).all() and (plan.mask[0, 0, 0, :11] == 0).all()
    assert meta.decode_lens().tolist() == [11, 21]
    with torch.inference_mode():
        model(torch.tensor([3, 4]), torch.tensor([10, 20]), caches, meta)
    assert meta.to(torch.device("cpu"))._decode is None  # derived tensors do not travel


def _bf16_impls() -> list[str]:
    try:
        return cpu_decode.bf16_impls()
    except KernelUnavailable:
        return []


@pytest.mark.parametrize("impl", _bf16_impls() or ["(extension unavailable)"])
@pytest.mark.parametrize("rows", [1, 5, 16, 37])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_matches_linear_and_round_trips(impl, rows, bias):
    if impl not in _bf16_impls():
        pytest.skip("the CPU decode kernels did not build here")
    g = torch.Generator().manual_seed(rows)
    n, k = 80, 96  # 5 output tiles (a group of 4 and a remainder), 3 k-chunks
    lin = torch.nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
    packed = Bf16Linear.from_linear(lin)
    packed.impl = impl
    assert torch.equal(cpu_decode.amx_bf16_unpack(packed.packed), lin.weight)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    want = x.float() @ lin.weight.float().t() + (lin.bias.float() if bias else 0)
    got = packed(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # fp32 accumulation, one rounding to bf16 at the end
    torch.testing.assert_close(got.float(), want, atol=0.02 * want.abs().max().item(), rtol=0.01)
    assert torch.equal(packed(x[:1]), got[:1])  # a row's result does not depend on the batch
    state = packed.state_dict()
    assert torch.equal(state["weight"], lin.weight)
    other = Bf16Linear(torch.zeros(n, k, dtype=torch.bfloat16), lin.bias)
    other.impl = impl
    other.load_state_dict(state)
    assert torch.equal(other(x), got)


def test_bf16_linears_take_every_shape():
    if "avx2" not in _bf16_impls():
        pytest.skip("our bf16 linears need AVX2 or better")
    fits = torch.nn.Linear(64, 48).to(torch.bfloat16)
    odd = torch.nn.Linear(40, 36).to(torch.bfloat16)  # K % 32, N % 16 != 0: padded tiles
    model = torch.nn.Sequential(fits, odd)
    assert optimize_linears(model) == ["0", "1"]
    assert type(model[0]) is Bf16Linear and type(model[1]) is Bf16Linear
    x = torch.randn(3, 40).bfloat16()
    assert torch.equal(model[1].weight, odd.weight)
    torch.testing.assert_close(model[1](x).float(), odd(x).float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 11, 16, 37])
@pytest.mark.parametrize(("n", "k"), [(80, 96), (16, 7), (48, 130)])
def test_panel_linear_matches_linear_and_round_trips(rows, n, k):
    if "avx2" not in cpu_decode.allowed_isas():
        pytest.skip("the fp32 panel kernel needs AVX2 or better")
    _kernel()
    g = torch.Generator().manual_seed(rows * 100 + n + k)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        lin.bias.copy_(torch.randn(n, generator=g))
    panel = PanelLinear.from_linear(lin)
    assert torch.equal(cpu_decode.panel_unpack(panel.packed), lin.weight)
    x = torch.randn(rows, k, generator=g)
    with torch.no_grad():
        want = F.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(panel(x), want, atol=1e-4, rtol=1e-5)
    assert torch.equal(panel(x[:1]), panel(x)[:1])  # a row's result does not depend on the batch
    state = panel.state_dict()
    assert torch.equal(state["weight"], lin.weight) and torch.equal(state["bias"], lin.bias)
    other = PanelLinear(torch.zeros(n, k), torch.zeros(n))
    other.load_state_dict(state)
    assert torch.equal(other(x), panel(x))


def test_fp32_linears_of_other_shapes_stay_plain():
    if not cpu_decode.has_avx512():
        pytest.skip("the fp32 kernels need AVX-512")
    _kernel()
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 40))
    assert optimize_linears(model) == ["0", "1"]
    assert type(model[0]) is PanelLinear and type(model[1]) is SmallBatchLinear


def test_fp32_panels_without_avx512():
    """An AVX2-only CPU (here forced by CHATGLM_SERVE_CPU_ISA) packs fp32 weights into panels for
    the AVX2 kernel; only the N % 16 != 0 ones stay plain nn.Linear (their kernel is AVX-512)."""
    _kernel()
    if "avx2" not in cpu_decode.allowed_isas():
        pytest.skip("this CPU has no AVX2")
    before = """
import torch
from chatglm_serve.kernels import cpu_decode
from chatglm_serve.model.cpu_linear import PanelLinear, optimize_linears
assert cpu_decode.allowed_isas() == ("scalar", "avx2"), cpu_decode.allowed_isas()
model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 40))
assert optimize_linears(model) == ["0"]
assert type(model[0]) is PanelLinear and type(model[1]) is torch.nn.Linear
"""
    tests = "panel_linear_matches or fp32_linears_keep or other_shapes_stay"
    summary = run_capped("avx2", __file__, tests, before)
    # the 24 panel cases and the model test run; "other shapes" needs AVX-512 (skipped)
    assert "25 passed, 1 skipped" in summary, summary
