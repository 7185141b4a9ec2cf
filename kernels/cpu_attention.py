"""Decode attention straight from the paged KV cache on a CPU (kernels/csrc/cpu/paged_attention.cpp).

Built on first use like the quantized-matmul extension (kernels/build.py: cached on disk, keyed
by the source), and optional the same way: where it cannot be built, `decode_attention` returns
None once logged and the model keeps its PyTorch path (gather + SDPA).
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
from torch import Tensor

from kernels.build import CSRC, KernelUnavailable, _check_toolchain, _load

log = logging.getLogger(__name__)

SOURCES = [CSRC / "cpu" / "paged_attention.cpp"]
DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def load_attention_kernel(verbose: bool = False) -> ModuleType:
    _check_toolchain()
    return _load(
        "chatglm_paged_attention_cpu",
        SOURCES,
        [],
        verbose,
        extra_cflags=["-O3", "-fopenmp"],  # -fopenmp: at::parallel_for's threads
        extra_ldflags=["-fopenmp"],
    )


@functools.cache
def attention_kernel_or_none() -> ModuleType | None:
    try:
        return load_attention_kernel()
    except KernelUnavailable as e:
        log.warning("CPU paged attention kernel unavailable, using gather + SDPA: %s", e)
        return None


def supports(q: Tensor, kv_cache: Tensor) -> bool:
    """Whether the kernel takes this step's decode (CPU, fp32/bf16, one dtype for both)."""
    return (
        q.device.type == "cpu"
        and kv_cache.device.type == "cpu"
        and q.dtype in DTYPES
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
    ext = attention_kernel_or_none()
    if ext is None:
        return None
    return ext.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
