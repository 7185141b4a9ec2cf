"""The CPU decode fast paths (kernels/csrc/cpu): attention straight from the paged KV cache, fp32
linears for a few rows, bf16 linears on packed weights (AMX, AVX-512 BF16, AVX-512 or AVX2, picked
at run time), and a whole decode step's layers in one call (float or int4/int8 linears).

Built on first use like the quantized-matmul extension (kernels/build.py: cached on disk, keyed
by the sources), and optional the same way: where it cannot be built (no compiler, no AVX-512
for the linear), the callers keep their PyTorch paths (gather + SDPA; F.linear).
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
from torch import Tensor

from chatglm_serve.kernels.build import (
    _CPU_CFLAGS,
    _CPU_LDFLAGS,
    CPU_HEADERS,
    CSRC,
    KernelUnavailable,
    _load,
)

log = logging.getLogger(__name__)

SOURCES = [
    CSRC / "cpu" / "paged_attention.cpp",
    CSRC / "cpu" / "small_gemm.cpp",
    CSRC / "cpu" / "panel_linear.cpp",
    CSRC / "cpu" / "amx_linear.cpp",
    CSRC / "cpu" / "half_linear.cpp",
    CSRC / "cpu" / "quant_matmul.cpp",  # also here: the decode step calls the quantized linears
    CSRC / "cpu" / "decode_stack.cpp",
    CSRC / "cpu" / "decode_bindings.cpp",
]
HEADERS = [*CPU_HEADERS, CSRC / "cpu" / "decode_ops.h", CSRC / "cpu" / "decode_loops.h"]
ATTENTION_DTYPES = (torch.float32, torch.bfloat16)
SMALL_LINEAR_MAX_ROWS = 16  # = kMaxM in small_gemm.cpp


@functools.cache
def load_decode_kernels(verbose: bool = False) -> ModuleType:
    # no _check_toolchain() here: _load imports a prebuilt build without one, checks otherwise
    return _load(
        "chatglm_cpu_decode",
        SOURCES,
        HEADERS,
        verbose,
        extra_cflags=_CPU_CFLAGS,  # the quantized matmul's flags (build.py says why each)
        extra_ldflags=_CPU_LDFLAGS,
    )


@functools.cache
def decode_kernels_or_none() -> ModuleType | None:
    try:
        return load_decode_kernels()
    except KernelUnavailable as e:
        log.warning("CPU decode kernels unavailable, using the PyTorch paths: %s", e)
        return None


@functools.cache
def allowed_isas() -> tuple[str, ...]:
    """The instruction sets the kernels may use here, lowest first (kernels/csrc/cpu/cpu_common.h:
    this CPU's features, capped by CHATGLM_SERVE_CPU_ISA); () where the kernels are unavailable."""
    ext = decode_kernels_or_none()
    return tuple(ext.allowed_isas()) if ext is not None else ()


def cpu_has_avx2() -> bool:
    """Whether this CPU runs our AVX2 (or better) kernels, whether or not they are built yet:
    a decision made while loading must not wait for, nor depend on, the background build."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def has_avx512() -> bool:
    """Whether the AVX-512 kernels may run here (small_gemm.cpp's fp32 linears need them)."""
    return "avx512" in allowed_isas()


def attention_supports(q: Tensor, kv_cache: Tensor) -> bool:
    """Whether the kernel takes this step's decode (CPU, fp32/bf16, one dtype for both)."""
    return (
        q.device.type == "cpu"
        and kv_cache.device.type == "cpu"
        and q.dtype in ATTENTION_DTYPES
        and kv_cache.dtype == q.dtype
    )


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
) -> Tensor | None:
    """q [B, Hq, D]; caches [blocks, block_size, Hkv, D]; block_tables [B, nb] int64; seq_lens
    [B] int64 -> [B, Hq, D], or None where the kernel is unavailable."""
    ext = decode_kernels_or_none()
    if ext is None:
        return None
    return ext.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


def small_linear_supports(x: Tensor, weight: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and 1 <= x.shape[0] <= SMALL_LINEAR_MAX_ROWS
        and weight.is_contiguous()
        and has_avx512()
    )


def small_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """x [M <= 16, K] fp32 @ weight [N, K]^T + bias, or None where the kernel is unavailable."""
    ext = decode_kernels_or_none()
    if ext is None:
        return None
    return ext.small_linear(x, weight, bias)


# The packed linears below exist only where the kernels loaded (model/cpu_linear.py checks
# before packing), so they call the loaded module directly.


def panel_pack(weight: Tensor) -> Tensor:
    """fp32 W [N, K] (N % 16 == 0) -> panels [N/16, K, 16] for panel_linear."""
    return load_decode_kernels().panel_pack(weight)


def panel_unpack(packed: Tensor) -> Tensor:
    """The inverse of panel_pack (a dense copy)."""
    p, k, j = packed.shape
    return packed.transpose(1, 2).reshape(p * j, k)


def panel_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x [M, K] fp32 @ W^T + bias, W in panels (panel_pack)."""
    return load_decode_kernels().panel_linear(x, packed, bias)


@functools.cache
def amx_bf16_available() -> bool:
    """Whether the AMX bf16 linear runs here (CPU bits, the OS's tile permission, the kernels)."""
    ext = decode_kernels_or_none()
    return ext is not None and bool(ext.amx_bf16_usable())


def amx_bf16_pack(weight: Tensor) -> Tensor:
    """bf16 W [N, K] (N % 16 == 0, K % 32 == 0) -> the AMX kernel's packed tiles."""
    return load_decode_kernels().amx_bf16_pack(weight)


def amx_bf16_unpack(packed: Tensor) -> Tensor:
    """The inverse of amx_bf16_pack: [N/16, K/32, 16, 16, 2] -> W [N, K] (a dense copy)."""
    t, c, r, n, p = packed.shape
    return packed.permute(0, 3, 1, 2, 4).reshape(t * n, c * r * p)


def amx_bf16_linear(x: Tensor, packed: Tensor, out_features: int, bias: Tensor | None) -> Tensor:
    """x [M, K] bf16 @ W^T + bias, W packed by amx_bf16_pack."""
    return load_decode_kernels().amx_bf16_linear(x, packed, out_features, bias)


# bf16_linear's implementations (= HalfImpl in half_linear.cpp); "auto": the best that runs here
BF16_IMPLS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "avx512_bf16": 4, "amx": 5}


def bf16_impls() -> list[str]:
    """The bf16 linear implementations this machine may run, lowest first."""
    isas = allowed_isas()
    out = [name for name in BF16_IMPLS if name != "auto" and name in isas]
    if "amx" in out and not amx_bf16_available():
        out.remove("amx")  # the CPU has it, the OS did not grant the tile state
    return out


def bf16_linear_path() -> str:
    """Which implementation a bf16 linear runs here ("amx", "avx512_bf16", ...)."""
    impl = load_decode_kernels().bf16_linear_impl(0)
    return next(name for name, i in BF16_IMPLS.items() if i == impl)


def bf16_pack(weight: Tensor) -> Tensor:
    """bf16 W [N, K] -> bf16_linear's tiles (amx_bf16_pack's layout; N and K zero-padded to
    multiples of 16 and 32)."""
    return load_decode_kernels().bf16_pack(weight)


def bf16_unpack(packed: Tensor, n: int, k: int) -> Tensor:
    """The inverse of bf16_pack for W [n, k] (a dense copy)."""
    return amx_bf16_unpack(packed)[:n, :k].contiguous()


def bf16_linear(
    x: Tensor, packed: Tensor, out_features: int, bias: Tensor | None, impl: str = "auto"
) -> Tensor:
    """x [M, K] bf16 @ W^T + bias -> bf16 [M, N], W packed by bf16_pack."""
    return load_decode_kernels().bf16_linear(x, packed, out_features, bias, BF16_IMPLS[impl])


def decode_stack(
    x: Tensor,
    weights: list[Tensor],
    kv_caches: list[Tensor],
    final_norm: Tensor | None,
    rotation: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    heads: tuple[int, int, int],
    eps: float,
    scale: float,
) -> Tensor | None:
    """Every layer of a decode step for single-token rows (kernels/csrc/cpu/decode_stack.cpp):
    x [B, H] embeddings -> final hidden states [B, H]; None where the kernels are unavailable.
    weights: 7 per layer, 12 for int4/int8 linears (see the C++ file); heads: (query heads, KV heads, head_dim)."""
    ext = decode_kernels_or_none()
    if ext is None:
        return None
    hq, hkv, d = heads
    return ext.decode_stack(
        x,
        weights,
        kv_caches,
        final_norm,
        rotation,
        slot_mapping,
        block_tables,
        seq_lens,
        hq,
        hkv,
        d,
        eps,
        scale,
    )
