"""Every CUDA entry point rejects bad arguments with a ValueError before launching anything.

The C++ checks (kernels/csrc/cuda/arg_checks.h, what bindings.cpp runs) are built into a CPU
extension (tests/kernels/arg_checks_module.cpp) and exercised with CPU tensors, so they are
tested on machines without a GPU; the Python wrappers (kernels/ops.py) check again before the
extension is even loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatglm_serve.kernels import build, ops

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    cuda_inc = build.cuda_include_dir() if build.nvcc_path() else None
    if cuda_inc is None:
        pytest.skip("the CUDA toolkit's headers (cuda_runtime.h) are not installed")
    try:
        build._check_toolchain()
    except build.KernelUnavailable as e:
        pytest.skip(str(e))
    from torch.utils.cpp_extension import load

    return load(
        name="chatglm_arg_checks",
        sources=[str(HERE / "arg_checks_module.cpp")],
        extra_include_paths=[str(build.CSRC / "cuda"), str(cuda_inc)],
        extra_cflags=["-O0"],
        build_directory=str(tmp_path_factory.mktemp("arg_checks")),
    )


def _quant(rows=4, k=128, n=16, bits=4, group=64, dtype=torch.float16):
    x = torch.randn(rows, k).to(dtype)
    words = ops.pack_cuda(torch.randint(-8, 8, (n, k), dtype=torch.int8), bits)
    scale = torch.rand(n, k // group)
    return x, words, scale, bits, group


def _misaligned(rows, k, dtype=torch.float16):
    return torch.zeros(rows * k + 1, dtype=dtype)[1:].view(rows, k)  # 2 bytes off


GEMV_BAD = [
    ("9 rows", lambda a: (torch.randn(9, 128).half(), *a[1:]), r"gemv takes 1\.\.8 rows, got 9"),
    ("0 rows", lambda a: (torch.randn(0, 128).half(), *a[1:]), r"1\.\.8 rows, got 0"),
    ("fp32 x", lambda a: (a[0].float(), *a[1:]), "float16 or bfloat16"),
    ("1-D x", lambda a: (a[0][0], *a[1:]), r"contiguous \[rows, K\]"),
    ("strided x", lambda a: (torch.randn(4, 256).half()[:, ::2], *a[1:]), "not contiguous"),
    ("misaligned x", lambda a: (_misaligned(4, 128), *a[1:]), "16-byte aligned"),
    ("K mismatch", lambda a: (torch.randn(4, 96).half(), *a[1:]), "multiple of 32|words per row"),
    ("bits 5", lambda a: (*a[:3], 5, a[4]), "bits must be 4 or 8"),
    ("group 48", lambda a: (*a[:4], 48), "group 48 must be a multiple of 32"),
    ("group > K", lambda a: (*a[:4], 256), "dividing K"),
    (
        "fp16 scale",
        lambda a: (a[0], a[1], a[2].half(), *a[3:]),
        "scale must be a contiguous float32",
    ),
    ("scale shape", lambda a: (a[0], a[1], a[2][:, :1], *a[3:]), "scale must be"),
    ("uint8 w", lambda a: (a[0], a[1].view(torch.uint8), *a[2:]), "w must be a contiguous int32"),
    ("strided w", lambda a: (a[0], a[1].t().contiguous().t(), *a[2:]), "not contiguous|int32"),
]


@pytest.mark.parametrize("case,mutate,match", GEMV_BAD, ids=[c[0] for c in GEMV_BAD])
def test_gemv_checks_reject(checks, case, mutate, match):
    args = mutate(_quant())
    with pytest.raises(ValueError, match=match):
        checks.gemv(*args, False)


def test_valid_calls_pass_and_cpu_tensors_are_not_cuda(checks):
    for bits in (4, 8):
        for dtype in (torch.float16, torch.bfloat16):
            checks.gemv(*_quant(rows=8, bits=bits, dtype=dtype), False)
            checks.gemm(*_quant(rows=64, bits=bits, dtype=dtype), False)
            checks.gemm(*_quant(rows=9, bits=bits, dtype=dtype), False)
            x, w, s, b, g = _quant(bits=bits)
            checks.dequantize(w, s, b, g, False)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        checks.gemv(*_quant(), True)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        checks.dequantize(*_quant()[1:], True)


def test_gemm_checks_reject(checks):
    with pytest.raises(ValueError, match=r"gemm takes 1\.\.64 rows, got 65"):
        checks.gemm(*_quant(rows=65), False)
    x, w, s, b, g = _quant(k=96, group=32)
    with pytest.raises(ValueError, match="K a multiple of 64"):
        checks.gemm(x, w, s, b, g, False)
    x, w, s, b, g = _quant()
    with pytest.raises(ValueError, match="words per row"):
        checks.gemm(torch.randn(4, 64).half(), w, s, b, g, False)


def test_dequantize_checks_reject(checks):
    _, w, s, b, g = _quant()
    with pytest.raises(ValueError, match="2-D"):
        checks.dequantize(w.view(-1), s, b, g, False)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        checks.dequantize(w, s, 3, g, False)
    with pytest.raises(ValueError, match="scale must be"):
        checks.dequantize(w, s[:8], b, g, False)


def _attention(b=3, hq=8, hkv=2, d=64, bs=16, nb=10, dtype=torch.float16):
    q = torch.randn(b, hq, d).to(dtype)
    cache = torch.randn(2, nb, bs, hkv, d).to(dtype)
    tables = torch.zeros(b, 4, dtype=torch.int64)
    lens = torch.full((b,), 5, dtype=torch.int64)
    return q, cache[0], cache[1], tables, lens


ATTN_BAD = [
    ("head dim 96", lambda: _attention(d=96), "head_dim must be 64 or 128"),
    ("Hq % Hkv", lambda: _attention(hq=6, hkv=4), "multiple of Hkv"),
    ("2-D q", lambda: (_attention()[0][0], *_attention()[1:]), r"q must be \[B, Hq, D\]"),
    ("int32 tables", lambda: (*_attention()[:3], _attention()[3].int(), _attention()[4]), "int64"),
    ("lens of 2", lambda: (*_attention()[:4], _attention()[4][:2]), r"seq_lens \[B\]"),
    ("dtypes", lambda: (_attention()[0].float(), *_attention()[1:]), "one dtype"),
    ("int8 cache", lambda: _attention(dtype=torch.int8), "float32, float16 or bfloat16"),
    ("shapes", lambda: (*_attention()[:2], _attention(nb=11)[2], *_attention()[3:]), "one shape"),
    (
        "strided D",
        lambda: (torch.randn(3, 8, 128).half()[..., ::2], *_attention()[1:]),
        "head_dim axis must be contiguous",
    ),
]


@pytest.mark.parametrize("case,make,match", ATTN_BAD, ids=[c[0] for c in ATTN_BAD])
def test_attention_checks_reject(checks, case, make, match):
    with pytest.raises(ValueError, match=match):
        checks.attention(*make(), False)


def test_attention_valid_and_not_cuda(checks):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        checks.attention(*_attention(dtype=dtype), False)
    checks.attention(*_attention(d=128, hq=32, hkv=2), False)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        checks.attention(*_attention(), True)


# ---------------------------------------------------------------- the Python wrappers (no build)
def test_python_wrappers_reject_before_loading_the_extension(monkeypatch):
    def must_not_load():
        raise AssertionError("the extension was loaded for a bad call")

    monkeypatch.setattr(ops, "load_cuda_kernels", must_not_load)
    x, w, s, b, g = _quant()
    with pytest.raises(ValueError, match=r"gemv takes 1\.\.8 rows"):
        ops.cuda_gemv(torch.randn(9, 128).half(), w, s, b, g)
    with pytest.raises(ValueError, match=r"gemm takes 1\.\.64 rows"):
        ops.cuda_gemm(torch.randn(65, 128).half(), w, s, b, g)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        ops.cuda_gemm(x.float(), w, s, b, g)
    with pytest.raises(ValueError, match="words per row"):
        ops.cuda_gemv(torch.randn(2, 64).half(), w, s, b, g)
    with pytest.raises(ValueError, match="K a multiple of 64"):
        x96, w96, s96, _, _ = _quant(k=96, group=32)
        ops.cuda_gemm(x96, w96, s96, 4, 32)
    with pytest.raises(ValueError, match="CUDA device"):
        ops.cuda_gemv(x, w, s, b, g)  # CPU tensors
    with pytest.raises(ValueError, match="CUDA device"):
        ops.cuda_dequantize(w, s, b, g, torch.float16)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        ops.cuda_dequantize(w, s, b, g, torch.float32)
