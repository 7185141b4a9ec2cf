"""The CPU kernel extension: its weight layout, every ISA path against exact integer math, the
build cache and the message when it cannot be built."""

from __future__ import annotations

import pytest
import torch

from chatglm_serve.kernels import build, ops


def _q(bits: int, n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if bits == 4 else (-127, 128)
    return torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_layout_round_trip_and_placement(bits):
    q = _q(bits, 21, 64, 0)  # 21 rows: padded to two 16-row tiles
    scale = torch.rand(21, 2)
    packed, sw = ops.pack_cpu(q, scale, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 32 * 64 * bits // 8
    assert sw.shape == (2, 32) and torch.equal(sw[:, :21], scale.t()) and not sw[:, 21:].any()
    q2, s2 = ops.unpack_cpu(packed, sw, bits, 21, 64)
    assert torch.equal(q2, q) and torch.equal(s2, scale)
    # spot-check the documented byte: tile 1, chunk 2, row r=3 (global row 19), j=1
    if bits == 4:
        byte = packed.view(2, 64 // 8, 16, 4)[1, 2, 3, 1].item()
        assert byte & 0x0F == q[19, 8 * 2 + 1] + 8 and byte >> 4 == q[19, 8 * 2 + 4 + 1] + 8
    else:
        byte = packed.view(2, 64 // 4, 16, 4)[1, 2, 3, 1].item()
        assert byte == q[19, 4 * 2 + 1] + 128


@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_layout_round_trip(bits):
    q = _q(bits, 5, 96, 1)
    words = ops.pack_cuda(q, bits)
    assert words.dtype == torch.int32 and words.shape == (5, 96 // (8 if bits == 4 else 4))
    assert torch.equal(ops.unpack_cuda(words, bits), q)


def _exact(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    xq, xs = ops.quantize_activations_reference(x, block)
    b, k = x.shape
    xd = (xq.double().view(b, -1, block) * xs.double()[..., None]).view(b, k)
    n, g = scale.shape
    wd = (q.double().view(n, g, -1) * scale.double()[..., None]).view(n, k)
    return xd @ wd.t()


@pytest.mark.parametrize("impl", ops.cpu_impls() or ["(extension unavailable)"])
@pytest.mark.parametrize("bits", [4, 8])
def test_each_isa_path_is_exact_on_layer_like_shapes(impl, bits):
    if impl not in ops.cpu_impls():
        pytest.skip("the CPU extension did not build here")
    # K = 2816 (the medium model's ffn), N with a partial tile, groups of 128 and per row, and
    # every activation block width the kernel takes (32-channel tiles and 64-channel AMX tiles)
    cases = [
        (40, 2816, 128, (32, 64, 128), (1, 7, 16)),
        (33, 1024, 1024, (32, 256, 1024), (2, 9, 17)),
        (16, 96, 96, (32, 96), (3, 20)),
    ]
    for n, k, group, blocks, batches in cases:
        q = _q(bits, n, k, n)
        scale = torch.rand(n, k // group) * 0.01
        packed, sw = ops.pack_cpu(q, scale, bits)
        for block in blocks:
            for batch in batches:
                x = torch.randn(batch, k) * 3
                for xin in (x, x.bfloat16()):
                    y = ops.cpu_qmm(xin, packed, sw, bits, group, n, impl, act_block=block)
                    want = _exact(xin.float(), q, scale, block)
                    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)


def test_activation_blocks():
    assert ops.activation_block(8, 4096) == 32
    assert ops.activation_block(4, 4096) == 128 and ops.activation_block(4, 32) == 32
    assert ops.activation_block(4, 2816) == 128 and ops.activation_block(4, 96) == 96
    assert ops.activation_block(4, 160) == 32  # the widest multiple of 32 dividing the group


def test_kernel_rejects_bad_shapes():
    if not ops.cpu_impls():
        pytest.skip("the CPU extension did not build here")
    q = _q(4, 16, 64, 2)
    packed, sw = ops.pack_cpu(q, torch.ones(16, 2), 4)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.cpu_qmm(torch.randn(1, 48), packed, sw, 4, 32, 16)
    with pytest.raises(RuntimeError, match="groups"):
        ops.cpu_qmm(torch.randn(1, 64), packed, sw, 4, 64, 16)  # scales are for group 32
    with pytest.raises(RuntimeError, match="activation block"):
        ops.cpu_qmm(torch.randn(1, 64), packed, sw, 4, 32, 16, act_block=64)  # wider than a group
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.pack_cpu(torch.zeros(4, 40, dtype=torch.int8), torch.ones(4, 1), 4)
    assert not ops.cpu_kernel_supports(48, 48) and ops.cpu_kernel_supports(4096, 128)


def test_zero_rows_and_empty_batch():
    if not ops.cpu_impls():
        pytest.skip("the CPU extension did not build here")
    q = _q(4, 16, 64, 3)
    packed, sw = ops.pack_cpu(q, torch.ones(16, 1), 4)
    assert ops.cpu_qmm(torch.zeros(3, 64), packed, sw, 4, 64, 16).abs().max().item() == 0
    assert ops.cpu_qmm(torch.zeros(0, 64), packed, sw, 4, 64, 16).shape == (0, 16)


def test_extension_builds_where_a_toolchain_exists():
    """Every other kernel test skips without the extension: this one makes a broken build fail."""
    try:
        build._check_toolchain()
    except build.KernelUnavailable as e:
        pytest.skip(f"no toolchain here: {e}")
    build.load_cpu_kernels()  # raises KernelUnavailable with the compiler's output
    assert "scalar" in ops.cpu_impls()
    if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2"):
        assert "avx2" in ops.cpu_impls()


def test_build_is_cached_on_disk():
    if not ops.cpu_impls():
        pytest.skip("the CPU extension did not build here")
    mod = build.load_cpu_kernels()
    so = mod.__file__
    assert so.startswith(str(build.cache_root())), so
    assert build.load_cpu_kernels() is mod  # one load per process


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(build, "cxx_compiler", lambda: None)
    with pytest.raises(build.KernelUnavailable, match="no C..? compiler"):
        build._check_toolchain()
    monkeypatch.setattr("torch.utils.cpp_extension.is_ninja_available", lambda: False)
    monkeypatch.setattr(build, "cxx_compiler", lambda: "/usr/bin/c++")
    with pytest.raises(build.KernelUnavailable, match="ninja"):
        build._check_toolchain()
