"""How a batch-1 decode step's one C++ call (kernels/csrc/cpu/decode_stack.cpp) scales from one
thread to two, next to the memory's read rate measured in the same loop.

    PYTHONPATH=. python bench/make_checkpoint.py --shape medium --out /tmp/ckpt-medium
    PYTHONPATH=. python bench/step_scaling_bench.py --ckpt /tmp/ckpt-medium --formats int8,int4

Why: a batch-1 step streams every weight once, so its time is bytes / read rate plus what is
lost around the ~100 parallel regions it opens (a linear, an attention, a SwiGLU each). Some
hosts change the read rate they give a guest from minute to minute (bench/README.md, the Zen 4
section), so a step time alone says little; here every sample of the step is taken right after
a `torch.sum` on the same thread count, and its share of that rate is printed beside it.

Each format's engine is built the way bench/decode_bench.py builds it (one load path), a short
greedy request runs through `LLMEngine.step`, and the arguments of its last decode_stack call
are kept; that call is then repeated (same inputs, same KV slot) on 1 and 2 threads in turn.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from decode_bench import cpuinfo, ours_engine_args, read_rate, sum_buffer

from chatglm_serve.engine.llm_engine import LLMEngine
from chatglm_serve.engine.load import load_model
from chatglm_serve.engine.types import SamplingParams
from chatglm_serve.kernels import cpu_decode

# format -> decode_bench.py's row detail
FORMATS = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8", "int4": "int4"}


def captured_step(ckpt: str, fmt: str) -> tuple[tuple, dict, int]:
    """The args of a decode_stack call from a real engine step, and the bytes it reads."""
    args = ours_engine_args(ckpt, FORMATS[fmt])
    model, tok = load_model(args)
    engine = LLMEngine(model, tok, args.engine)
    seen: list = []
    real = cpu_decode.decode_stack

    def spy(*a, **kw):
        seen.append((a, kw))
        return real(*a, **kw)

    cpu_decode.decode_stack = spy
    try:
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        engine.add_request("warm", tok.encode_chat("你好", []), params)
        while engine.has_unfinished():
            engine.step()
    finally:
        cpu_decode.decode_stack = real
    if not seen:
        raise SystemExit(f"{fmt}: the engine never took the one-call decode step here")
    a, kw = seen[-1]
    weights = a[1]
    nbytes = sum(w.numel() * w.element_size() for w in weights) + a[3].numel() * a[3].element_size()
    return a, kw, nbytes


def time_calls(a: tuple, kw: dict, calls: int) -> float:
    """Median seconds of one decode_stack call."""
    times = []
    with torch.no_grad():
        for _ in range(calls):
            t0 = time.perf_counter()
            cpu_decode.decode_stack(*a, **kw)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--formats", default="fp32,bf16,int8,int4")
    ap.add_argument("--samples", type=int, default=8, help="1-then-2-thread pairs per format")
    ap.add_argument("--calls", type=int, default=15, help="calls per sample (median)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sum-mib", type=int, default=512)
    args = ap.parse_args()

    buf = sum_buffer(args.sum_mib)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}  {cpuinfo('model name') or 'unknown CPU'}, {os.cpu_count()} CPUs, "
        f"ISAs {','.join(cpu_decode.allowed_isas())}; {args.ckpt}; {args.samples} samples x "
        f"{args.calls} calls; share = step GB/s / the sum's GB/s just before, same threads",
        flush=True,
    )
    for fmt in args.formats.split(","):
        a, kw, nbytes = captured_step(args.ckpt, fmt)
        rows: dict[int, list[tuple[float, float]]] = {t: [] for t in args.threads}
        for s in range(args.samples):
            order = args.threads if s % 2 == 0 else args.threads[::-1]
            for t in order:
                torch.set_num_threads(t)
                time_calls(a, kw, 2)  # the threads' first touch after the switch
                rate = read_rate(buf, 3)
                sec = time_calls(a, kw, args.calls)
                rows[t].append((sec, rate))
                print(
                    f"  {fmt} {t}t sample {s + 1}: {sec * 1e3:6.2f} ms  "
                    f"{nbytes / sec / 1e9:5.1f} GB/s of sum {rate:5.1f} ({nbytes / sec / 1e9 / rate:4.0%})",
                    flush=True,
                )
        summary = []
        for t, rs in rows.items():
            ms = statistics.median(r[0] for r in rs) * 1e3
            share = statistics.median(nbytes / r[0] / 1e9 / r[1] for r in rs)
            summary.append(f"{t}t {ms:.2f} ms ({share:.0%} of the sum)")
        print(f"{fmt}: {nbytes / 1e6:.1f} MB a step; medians: " + "; ".join(summary), flush=True)


if __name__ == "__main__":
    main()
