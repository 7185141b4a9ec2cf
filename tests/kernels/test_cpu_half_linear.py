"""The bf16 linear kernels without AMX (kernels/csrc/cpu/half_linear.cpp): every implementation this
machine can run, against a float64 reference, for the row counts a decode step and a small
prefill chunk use and for shapes that need padding; and the ISA cap that lets CI force the
lower paths on any host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatglm_serve.kernels import cpu_decode
from chatglm_serve.kernels.build import KernelUnavailable

ROOT = Path(__file__).resolve().parents[2]


def _ext():
    try:
        return cpu_decode.load_decode_kernels()
    except KernelUnavailable as e:
        pytest.skip(f"CPU decode kernels cannot be built here: {e}")


def _impls() -> list[str]:
    try:
        return cpu_decode.bf16_impls()
    except KernelUnavailable:
        return []


# (N, K): the medium model's qkv and down projections, N not a multiple of the 16-row tile,
# K not a multiple of the 32-channel chunk (and odd), a single partial tile
SHAPES = [(1280, 1024), (64, 2816), (40, 96), (48, 70), (33, 37), (7, 5)]


@pytest.mark.parametrize("impl", _impls() or ["(extension unavailable)"])
@pytest.mark.parametrize("rows", [1, 4, 16, 7])
def test_each_bf16_path_matches_the_reference(impl, rows):
    _ext()
    if impl not in _impls():
        pytest.skip("the CPU decode extension did not build here")
    g = torch.Generator().manual_seed(rows)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(rows, k, generator=g).bfloat16()
        packed = cpu_decode.bf16_pack(w)
        assert torch.equal(cpu_decode.bf16_unpack(packed, n, k), w)
        for bias in (None, torch.randn(n, generator=g)):
            if impl == "amx" and (n % 16 or k % 32):
                continue  # bf16_linear runs padded shapes on AVX-512 BF16 there
            got = cpu_decode.bf16_linear(x, packed, n, bias, impl)
            want = x.double() @ w.double().t() + (0 if bias is None else bias.double())
            assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
            # fp32 accumulation in any order, then one rounding to bf16 (2^-8 relative)
            tol = 2e-5 * k**0.5 * want.abs().max().item() + 2**-8 * want.abs()
            assert ((got.double() - want).abs() <= tol + 1e-6).all(), (impl, n, k, bias is None)


def test_the_paths_agree_with_each_other():
    """Every path sums the same fp32 products: they differ by accumulation order only."""
    _ext()
    w = torch.randn(96, 512).bfloat16()
    x = torch.randn(5, 512).bfloat16()
    packed = cpu_decode.bf16_pack(w)
    outs = {i: cpu_decode.bf16_linear(x, packed, 96, None, i).float() for i in _impls()}
    ref = outs["scalar"]
    for impl, y in outs.items():
        torch.testing.assert_close(y, ref, atol=0.05, rtol=0.02, msg=impl)


def test_zero_rows_and_bad_input():
    _ext()
    w = torch.randn(32, 64).bfloat16()
    packed = cpu_decode.bf16_pack(w)
    assert cpu_decode.bf16_linear(torch.zeros(0, 64).bfloat16(), packed, 32, None).shape == (0, 32)
    with pytest.raises(RuntimeError, match="another shape"):
        cpu_decode.bf16_linear(torch.zeros(1, 128).bfloat16(), packed, 32, None)
    with pytest.raises(RuntimeError, match="bf16"):
        cpu_decode.bf16_linear(torch.zeros(1, 64), packed, 32, None)
    missing = [i for i in cpu_decode.BF16_IMPLS if i != "auto" and i not in _impls()]
    for impl in missing:  # a path this CPU lacks is an error, not a silent fallback
        with pytest.raises(RuntimeError, match="does not allow"):
            cpu_decode.bf16_linear(torch.zeros(1, 64).bfloat16(), packed, 32, None, impl)


def test_best_path_is_chosen_by_default():
    _ext()
    assert cpu_decode.bf16_linear_path() == _impls()[-1]


PROBE = """
import json, torch
from chatglm_serve.kernels import cpu_decode, ops
w = torch.randn(40, 70).bfloat16(); x = torch.randn(3, 70).bfloat16()
y = cpu_decode.bf16_linear(x, cpu_decode.bf16_pack(w), 40, None)
err = (y.double() - x.double() @ w.double().t()).abs().max().item()
print(json.dumps({"isas": list(cpu_decode.allowed_isas()), "bf16": cpu_decode.bf16_linear_path(),
                  "quant": ops.cpu_impls(), "err": err}))
"""


@pytest.mark.parametrize("cap", ["scalar", "avx2"])
def test_isa_cap_forces_the_lower_paths(cap):
    """CHATGLM_SERVE_CPU_ISA caps every kernel's dispatch (what CI uses to check the AVX2 and
    portable paths on an AVX-512 or AMX host); the kernels still answer correctly."""
    _ext()
    from chatglm_serve.kernels.ops import cpu_impls

    if cap not in _impls():
        pytest.skip(f"this CPU has no {cap}")
    env = {**os.environ, "CHATGLM_SERVE_CPU_ISA": cap, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ladder = ["scalar", "avx2"]
    assert got["isas"] == ladder[: ladder.index(cap) + 1]
    assert got["bf16"] == cap
    assert got["quant"] == [i for i in cpu_impls() if i in ladder[: ladder.index(cap) + 1]]
    assert got["err"] < 0.5
