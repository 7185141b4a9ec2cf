"""Decode attention on a GPU: our paged kernel vs the gather + SDPA path (needs a CUDA GPU).

    PYTHONPATH=. python bench/cuda_decode_attention.py
    PYTHONPATH=. python bench/cuda_decode_attention.py --batches 1 64 --contexts 2048 32768

ChatGLM2's attention shape (32 query heads on 2 KV groups, head_dim 128), one layer's paged cache
with scattered blocks; each batch's lengths are spread evenly over [context/2, context] (ragged,
as in serving). Per (dtype, batch, context): the median time of model/attention.py's decode
through the kernel (default split choice, and each --partitions value) and through gather + SDPA,
and the kernel's effective bandwidth: the K/V bytes the sequences' own lengths need, over its
time (an H100 SXM's HBM3 peaks at about 3.35 TB/s). Which path is faster is what this decides;
the kernel has not been timed yet (it was written without a GPU).
"""

from __future__ import annotations

import argparse
import math

import torch

from chatglm_serve.kernels import cuda_decode
from chatglm_serve.kernels.cuda_qmm import cuda_event_timer
from chatglm_serve.model import attention
from chatglm_serve.model.attention import AttentionMetadata


def _case(batch: int, context: int, dtype: torch.dtype, hq=32, hkv=2, d=128, bs=16):
    lens = torch.linspace(context // 2, context, batch).round().long().clamp(min=1)
    need = ((lens + bs - 1) // bs).tolist()
    nb = sum(need) + 1
    cache = torch.randn(2, nb, bs, hkv, d, device="cuda", dtype=dtype)
    perm = torch.randperm(nb, device="cuda")
    tables = torch.zeros(batch, max(need), dtype=torch.int64, device="cuda")
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used : used + n]
        used += n
    q = torch.randn(batch, hq, d, device="cuda", dtype=dtype)
    lens = lens.cuda()
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64, device="cuda"),
        query_start_loc=list(range(batch + 1)),
        seq_lens=lens.tolist(),
        block_tables=tables,
        num_prefills=0,
        block_size=bs,
        seq_lens_tensor=lens,
    )
    kv_bytes = int(lens.sum()) * hkv * d * 2 * cache.element_size()
    return q, cache, meta, kv_bytes


def _time(fn, reps: int) -> float:
    """Median seconds of fn() over reps CUDA-event-timed calls (after 3 warm-up calls)."""
    return cuda_event_timer(fn, warmup=3, reps=reps) / 1e6


def _row(name: str, batch: int, context: int, partitions: list[int], reps: int) -> list:
    dtype = getattr(torch, name)
    q, cache, meta, kv_bytes = _case(batch, context, dtype)
    scale = 1 / math.sqrt(q.shape[-1])
    tables, lens = meta.block_tables, meta.decode_lens()
    if not cuda_decode.attention_supports(q, cache):
        raise SystemExit("the kernel does not take this shape")
    if cuda_decode.decode_attention(q, cache[0], cache[1], tables, lens, 1.0) is None:
        raise SystemExit("the CUDA extension did not load (see the log)")

    def through_model() -> None:
        attention._decode_attention(q, cache, meta, scale)

    ours = _time(through_model, reps)
    fixed = [
        _time(
            lambda x=x: cuda_decode.decode_attention(q, cache[0], cache[1], tables, lens, scale, x),
            reps,
        )
        for x in partitions
    ]
    real = attention.cuda_decode.attention_supports
    attention.cuda_decode.attention_supports = lambda q, kv: False
    try:
        torch_s = _time(through_model, reps)
    finally:
        attention.cuda_decode.attention_supports = real
    row = [name, batch, context, f"{ours * 1e6:.1f}", f"{kv_bytes / ours / 1e9:.0f}"]
    row += [f"{t * 1e6:.1f}" for t in fixed]
    return row + [f"{torch_s * 1e6:.1f}", f"{torch_s / ours:.2f}x"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--partitions", type=int, nargs="*", default=[256, 1024])
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (torch.cuda.is_available() is False)")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    header = ["dtype", "batch", "context", "kernel us", "GB/s"]
    header += [f"p={x} us" for x in args.partitions] + ["gather+SDPA us", "speed-up"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with torch.inference_mode():
        for name in args.dtypes:
            for batch in args.batches:
                for context in args.contexts:
                    row = _row(name, batch, context, args.partitions, args.reps)
                    print("| " + " | ".join(str(x) for x in row) + " |", flush=True)
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
