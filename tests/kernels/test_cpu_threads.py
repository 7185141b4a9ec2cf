"""The CPU linears split their output columns between threads (cpu_common.h: parallel_shares for
the fp32 panels and bf16 tiles, an even split for int4/int8): every column must be computed once
whatever the thread count, including more threads than columns' groups and a count that does not
divide them, so the result is the one-thread result bit for bit."""

from __future__ import annotations

import pytest
import torch

from chatglm_serve.kernels import cpu_decode, ops
from chatglm_serve.kernels.build import KernelUnavailable

THREADS = [2, 3, 5, 64]  # 64: more threads than the linear has groups of columns


def _ext():
    try:
        return cpu_decode.load_decode_kernels()
    except KernelUnavailable as e:
        pytest.skip(f"CPU decode kernels cannot be built here: {e}")


def _per_thread_count(fn) -> list[torch.Tensor]:
    before = torch.get_num_threads()
    try:
        out = []
        for t in [1, *THREADS]:
            torch.set_num_threads(t)
            out.append(fn())
        return out
    finally:
        torch.set_num_threads(before)


def _assert_all_equal(results: list[torch.Tensor]) -> None:
    for t, r in zip(THREADS, results[1:], strict=True):
        assert torch.equal(r, results[0]), f"{t} threads differ from one"


@pytest.mark.parametrize("rows", [1, 5])
def test_fp32_panels_give_the_same_bits_on_any_thread_count(rows):
    _ext()
    if "avx2" not in cpu_decode.allowed_isas():
        pytest.skip("the fp32 panel kernel needs AVX2 or better")
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(1296, 96, generator=g), torch.randn(1296, generator=g)  # 81 panels
    x = torch.randn(rows, 96, generator=g)
    packed = cpu_decode.panel_pack(w)
    results = _per_thread_count(lambda: cpu_decode.panel_linear(x, packed, b))
    _assert_all_equal(results)
    torch.testing.assert_close(results[0], x @ w.t() + b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 5])
def test_bf16_tiles_give_the_same_bits_on_any_thread_count(rows):
    _ext()
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(1296, 64, generator=g).bfloat16()  # 81 tiles, 21 groups of 4
    x = torch.randn(rows, 64, generator=g).bfloat16()
    packed = cpu_decode.bf16_pack(w)
    results = _per_thread_count(lambda: cpu_decode.bf16_linear(x, packed, 1296, None))
    _assert_all_equal(results)
    want = (x.double() @ w.double().t()).bfloat16()
    torch.testing.assert_close(results[0], want, atol=0.05, rtol=2**-7)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linears_give_the_same_bits_on_any_thread_count(bits):
    try:
        ops.load_cpu_kernels()
    except KernelUnavailable as e:
        pytest.skip(f"CPU quantized matmul cannot be built here: {e}")
    g = torch.Generator().manual_seed(bits)
    n, k, group = 1296, 1024, 32  # 81 tiles of 8 or 16 KiB: past the one-thread threshold
    lo, hi = (-8, 8) if bits == 4 else (-127, 128)
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) + 0.01
    packed, sw = ops.pack_cpu(q, scale, bits)
    x = torch.randn(3, k, generator=g)
    results = _per_thread_count(lambda: ops.cpu_qmm(x, packed, sw, bits, group, n))
    _assert_all_equal(results)
    w = (q.float().unflatten(1, (-1, group)) * scale[..., None]).flatten(1)
    want = x @ w.t()
    assert (results[0] - want).abs().max() < 0.02 * want.abs().max()  # int8 activations
