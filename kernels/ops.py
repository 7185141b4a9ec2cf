"""Python side of the quantized-matmul kernels: each kernel's weight layout, and the calls.

The weights arrive as signed integers `q` [N, K] (int4 values in [-8, 7] or int8 in [-127, 127])
with fp32 scales [N, K/group]; `pack_cpu` / `pack_cuda` turn them into the layout the kernel
reads. The extensions themselves are built on first use by kernels/build.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from chatglm_serve.kernels.build import cpu_kernels_or_none, load_cpu_kernels, load_cuda_kernels

CPU_BLOCK = 32  # the CPU kernel's unit: K, weight groups and activation blocks are multiples of it
CPU_TILE = 16  # output rows per 512-bit vector

_IMPL_IDS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512_vnni": 3, "amx": 4}  # = the C++ enum


def cpu_kernel_supports(k: int, group_size: int) -> bool:
    """Whether the CPU kernel takes this shape (else the caller uses the PyTorch fallback)."""
    return k % CPU_BLOCK == 0 and group_size % CPU_BLOCK == 0 and k % group_size == 0


def pack_cpu(q: Tensor, scale: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """q int8 [N, K], scale [N, G] -> (packed uint8 weight, fp32 scales [G, N_pad]).

    Layout (see kernels/csrc/cpu/quant_matmul.cpp): tiles of 16 rows; per tile, chunks of
    64 bytes where byte r*4+j is row r at four consecutive k, so one 32-bit lane feeds vpdpbusd.
    int4 stores u = q+8, low nibble k = 8c+j, high nibble k = 8c+4+j; int8 stores u = q+128.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    n, k = q.shape
    if k % CPU_BLOCK:
        raise ValueError(f"in_features {k} is not a multiple of {CPU_BLOCK}")
    n_pad = -(-n // CPU_TILE) * CPU_TILE
    offset = 8 if bits == 4 else 128
    u = torch.full((n_pad, k), offset, dtype=torch.int16, device=q.device)
    u[:n] = q.to(torch.int16) + offset  # padding rows decode to q = 0
    u = u.to(torch.uint8)
    t = n_pad // CPU_TILE
    if bits == 4:
        u = u.view(t, CPU_TILE, k // 8, 2, 4)  # tile, row, chunk, half, j
        packed = u[:, :, :, 0, :] | (u[:, :, :, 1, :] << 4)  # [t, 16, k/8, 4]
    else:
        packed = u.view(t, CPU_TILE, k // 4, 4)
    packed = packed.permute(0, 2, 1, 3).contiguous().view(-1)
    sw = torch.zeros((scale.shape[1], n_pad), dtype=torch.float32, device=q.device)
    sw[:, :n] = scale.float().t()
    return packed, sw


def unpack_cpu(packed: Tensor, sw: Tensor, bits: int, n: int, k: int) -> tuple[Tensor, Tensor]:
    """Inverse of pack_cpu: -> (q int8 [N, K], fp32 scale [N, G])."""
    n_pad = sw.shape[1]
    t = n_pad // CPU_TILE
    if bits == 4:
        b = packed.view(t, k // 8, CPU_TILE, 4).permute(0, 2, 1, 3)  # [t, 16, k/8, 4]
        u = torch.stack([b & 0x0F, b >> 4], dim=3)  # [t, 16, k/8, 2, 4]
        q = u.reshape(n_pad, k).to(torch.int16) - 8
    else:
        u = packed.view(t, k // 4, CPU_TILE, 4).permute(0, 2, 1, 3)
        q = u.reshape(n_pad, k).to(torch.int16) - 128
    return q[:n].to(torch.int8), sw[:, :n].t().contiguous()


def cpu_impls() -> list[str]:
    """The CPU kernel implementations this machine can run ([] if the extension is unavailable)."""
    ext = cpu_kernels_or_none()
    return list(ext.available_impls()) if ext is not None else []


def activation_block(bits: int, group_size: int) -> int:
    """Channels per activation scale in the CPU kernel.

    int8 weights are accurate (~0.8% layer error), so activations keep fine 32-channel blocks.
    int4 weights lose ~10%, so their activations may use blocks as wide as a weight group (up
    to ACT_BLOCK_INT4_MAX): the kernel then rescales once per group instead of every 32
    channels, which is what lets AMX run near its speed; wider than 128 would let one outlier
    channel (real LLM activations have them) coarsen a whole row.
    """
    if bits == 8:
        return CPU_BLOCK
    block = min(group_size, ACT_BLOCK_INT4_MAX)
    while group_size % block:
        block -= CPU_BLOCK
    return block


ACT_BLOCK_INT4_MAX = 128


def cpu_qmm(
    x: Tensor,
    packed: Tensor,
    sw: Tensor,
    bits: int,
    group_size: int,
    n: int,
    impl: str = "auto",
    act_block: int | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """x [B, K] (fp32/bf16) @ dequant(W)^T -> fp32 [B, n]; the kernel quantizes activations to
    int8 per `act_block` channels (default: activation_block(bits, group_size))."""
    ext = load_cpu_kernels()
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    ablk = act_block or activation_block(bits, group_size)
    return ext.qmm(x.contiguous(), packed, sw, bits, group_size, ablk, n, _IMPL_IDS[impl], bias)


def quantize_activations_reference(x: Tensor, block: int = CPU_BLOCK) -> tuple[Tensor, Tensor]:
    """What the CPU kernel does to x: -> (xq int8 [B, K], scale fp32 [B, K/block])."""
    xb = x.float().unflatten(-1, (-1, block))
    amax = xb.abs().amax(-1)
    scale = amax / 127.0
    # a true division as in C++ (a Python scalar / tensor is reciprocal-then-multiply in torch)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return xq.flatten(-2), scale


# ---------------------------------------------------------------- CUDA
GEMV_MAX_ROWS = 8  # = kMaxGemvBatch (kernels/csrc/cuda/quant_limits.h)
GEMM_MAX_ROWS = 64  # = kGemmMaxRows
GEMM_K_MULTIPLE = 64  # = kGemmBK


def pack_cuda(q: Tensor, bits: int) -> Tensor:
    """q int8 [N, K] -> int32 words [N, K/8] (int4) or [N, K/4] (int8): the GPU layout of
    kernels/csrc/cuda/quant_decode.cuh (offset-binary values, pairs in activation order)."""
    n, k = q.shape
    if k % 32:
        raise ValueError(f"in_features {k} is not a multiple of 32")
    if bits == 4:
        u = (q.to(torch.int16) + 8).to(torch.uint8).view(n, k // 8, 8)
        even, odd = u[..., 0::2], u[..., 1::2]  # k = 0,2,4,6 and 1,3,5,7 of each word
        b = torch.stack(
            [
                even[..., 0] | (even[..., 1] << 4),
                even[..., 2] | (even[..., 3] << 4),
                odd[..., 0] | (odd[..., 1] << 4),
                odd[..., 2] | (odd[..., 3] << 4),
            ],
            dim=-1,
        )
    elif bits == 8:
        u = (q.to(torch.int16) + 128).to(torch.uint8).view(n, k // 4, 4)
        b = u[..., [0, 2, 1, 3]]
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return b.contiguous().view(torch.int32).view(n, -1)


def unpack_cuda(words: Tensor, bits: int) -> Tensor:
    """Inverse of pack_cuda: -> q int8 [N, K]."""
    n = words.shape[0]
    b = words.contiguous().view(torch.uint8).view(n, -1, 4)
    if bits == 4:
        lo, hi = b & 0x0F, b >> 4  # [n, w, 4]: byte j holds (lo, hi)
        even = torch.stack([lo[..., 0], hi[..., 0], lo[..., 1], hi[..., 1]], dim=-1)
        odd = torch.stack([lo[..., 2], hi[..., 2], lo[..., 3], hi[..., 3]], dim=-1)
        u = torch.stack([even, odd], dim=-1).view(n, -1)  # interleave: k = 2i, 2i+1
        return (u.to(torch.int16) - 8).to(torch.int8)
    u = b[..., [0, 2, 1, 3]].reshape(n, -1)
    return (u.to(torch.int16) - 128).to(torch.int8)


def check_cuda_call(
    x: Tensor, words: Tensor, scale: Tensor, bits: int, max_rows: int, what: str
) -> None:
    """Python-side argument check of the quantized CUDA calls, before the extension is touched
    (the extension checks everything again, kernels/csrc/cuda/arg_checks.h; this keeps the common
    mistakes, wrong row counts, dtypes and devices, out of C++ entirely). Raises ValueError."""
    if bits not in (4, 8):
        raise ValueError(f"{what}: bits must be 4 or 8, got {bits}")
    if x.dim() != 2 or not 1 <= x.shape[0] <= max_rows:
        raise ValueError(f"{what} takes 1..{max_rows} rows of a 2-D x, got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{what}: x must be float16 or bfloat16, got {x.dtype}")
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"{what}: w must be int32 [N, K/{8 if bits == 4 else 4}] words")
    if words.shape[1] * (8 if bits == 4 else 4) != x.shape[1]:
        raise ValueError(f"{what}: w has {words.shape[1]} words per row, x has K={x.shape[1]}")
    if scale.dtype != torch.float32:
        raise ValueError(f"{what}: scale must be float32, got {scale.dtype}")
    for name, t in (("x", x), ("w", words), ("scale", scale)):
        if t.device.type != "cuda" or t.device != words.device:
            raise ValueError(f"{what}: {name} must be on the weight's CUDA device, got {t.device}")


def cuda_gemv(x: Tensor, words: Tensor, scale: Tensor, bits: int, group_size: int) -> Tensor:
    """x [B, K] fp16/bf16, B <= 8, @ dequant(W)^T -> [B, N] in x's dtype; scale fp32 [N, G]."""
    check_cuda_call(x, words, scale, bits, GEMV_MAX_ROWS, "gemv")
    return load_cuda_kernels().gemv(x.contiguous(), words, scale, bits, group_size)


def cuda_gemm(
    x: Tensor, words: Tensor, scale: Tensor, bits: int, group_size: int, splits: int = 0
) -> Tensor:
    """x [M, K] fp16/bf16, M <= 64 and K a multiple of 64, @ dequant(W)^T on tensor cores ->
    [M, N] in x's dtype. splits: slices of K (0: the kernel's choice for this GPU)."""
    if x.dim() == 2 and x.shape[1] % GEMM_K_MULTIPLE:
        raise ValueError(f"gemm needs K a multiple of {GEMM_K_MULTIPLE}, got {x.shape[1]}")
    check_cuda_call(x, words, scale, bits, GEMM_MAX_ROWS, "gemm")
    return load_cuda_kernels().gemm(x.contiguous(), words, scale, bits, group_size, splits)


def cuda_dequantize(
    words: Tensor, scale: Tensor, bits: int, group_size: int, dtype: torch.dtype
) -> Tensor:
    """The full weight [N, K] in `dtype`, for cuBLAS (large batches, prefill)."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dequantize makes float16 or bfloat16, not {dtype}")
    if words.device.type != "cuda" or scale.device != words.device:
        raise ValueError(f"dequantize: w and scale must be on one CUDA device, got {words.device}")
    return load_cuda_kernels().dequantize(words, scale, bits, group_size, dtype == torch.bfloat16)
