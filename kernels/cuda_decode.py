"""The CUDA decode attention kernel (kernels/csrc/cuda/paged_attention.cu): each decoding
sequence's query reads its keys and values in place from the paged KV cache, up to its own
length, instead of the gather-to-the-longest + SDPA path in model/attention.py.

Part of the CUDA extension (kernels/build.py, built on first use or ahead of time with
`python -m chatglm_serve.kernels.build --cuda`), and optional the same way: where the extension cannot be
loaded (CPU-only torch, no GPU, no nvcc and nothing prebuilt), `decode_attention` returns None
and the caller keeps its PyTorch path. Written without a GPU: unverified and untimed on one.
`CHATGLM_CUDA_DECODE_ATTENTION=0` turns it off (for A/B measurements against gather + SDPA).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from chatglm_serve.kernels.build import cuda_kernels_or_none

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 128)  # = head_dim_supported() in paged_attention.h


@functools.cache
def enabled() -> bool:
    return os.environ.get("CHATGLM_CUDA_DECODE_ATTENTION", "1").lower() not in ("0", "false", "no")


def _rows_aligned(t: Tensor) -> bool:
    """Unit last stride and every row 16-byte aligned (the kernel's vector loads)."""
    per = 16 // t.element_size()
    return (
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % per == 0 for s in t.stride()[:-1])
    )


def attention_supports(q: Tensor, kv_cache: Tensor) -> bool:
    """Whether the kernel takes this step's decode: q [B, Hq, D] and the cache
    [2, num_blocks, block_size, Hkv, D] on one CUDA device, one dtype of fp16/bf16/fp32,
    D of 64 or 128, aligned rows."""
    return (
        q.device.type == "cuda"
        and kv_cache.device == q.device
        and q.dtype in ATTENTION_DTYPES
        and kv_cache.dtype == q.dtype
        and q.dim() == 3
        and kv_cache.dim() == 5
        and q.shape[-1] in HEAD_DIMS
        and kv_cache.shape[-1] == q.shape[-1]
        and q.shape[1] % kv_cache.shape[3] == 0
        and _rows_aligned(q)
        and _rows_aligned(kv_cache)
        and enabled()
    )


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    partition: int = 0,
) -> Tensor | None:
    """q [B, Hq, D]; caches [blocks, block_size, Hkv, D]; block_tables [B, nb] int64; seq_lens
    [B] int64 (all on q's GPU) -> [B, Hq, D], or None where the kernel is unavailable.

    partition: keys per split of a sequence (a multiple of 16; 0 = the kernel's choice from the
    table width, the batch and the GPU's SM count). Nothing is read back to the host, so the call
    can be captured in a CUDA graph (the launch shape depends only on tensor shapes).
    """
    ext = cuda_kernels_or_none()
    fn = getattr(ext, "paged_decode_attention", None)
    if fn is None:
        return None
    return fn(q, k_cache, v_cache, block_tables, seq_lens, scale, partition)
