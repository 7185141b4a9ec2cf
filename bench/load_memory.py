"""Peak host memory while loading a sharded checkpoint, vs the model's and the largest shard's size.

    python bench/load_memory.py --ckpt /tmp/ckpt-medium [--dtype float32] [--quantize 4]

Run in a fresh process so ru_maxrss measures only this load. The loader's promise: peak RSS stays
near (model bytes + one shard), never twice the model.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quantize", type=int, default=None)
    args = ap.parse_args()

    from chatglm_serve.model.loader import load_checkpoint, weight_files

    base = rss_mb()
    t0 = time.perf_counter()
    model = load_checkpoint(args.ckpt, dtype=args.dtype, quantize=args.quantize)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    shards = [f.stat().st_size / 2**20 for f in weight_files(Path(args.ckpt))]
    print(
        f"load {dt:.2f}s | model {model_mb:.0f} MiB | shards {len(shards)} (largest {max(shards):.0f} MiB, "
        f"all {sum(shards):.0f} MiB) | RSS before {base:.0f} MiB, after {rss_mb():.0f} MiB, "
        f"peak {peak:.0f} MiB | peak - before = {peak - base:.0f} MiB "
        f"(budget model + one shard = {model_mb + max(shards):.0f} MiB)"
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
