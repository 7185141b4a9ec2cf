"""Every figure of issue 25's table on one GPU, next to its target, in one run.

    bash bench/gpu_check.sh                      # builds, runs the CUDA tests, then this
    PYTHONPATH=. python bench/gpu_check.py       # the figures only (kernels already built)
    PYTHONPATH=. python bench/gpu_check.py --only kernels,attention --budget 120

Sections, in this order (--only picks some; a section that would start past --budget seconds is
reported as not measured, and so is one that fails, with its error):
  bandwidth  device-to-device copy of 1 GiB (bytes read + written): the ceiling for the rest
  kernels    each 6B linear at 1/16/64 rows: fp16 cuBLAS, our int4 (groups of 128) and int8
             through the path QuantLinear takes (kernels/cuda_qmm.py), and each path alone
  attention  our decode attention kernel, batch 64 at 8k context and batch 1 at 128 keys
  decode     the engine on random 6B weights (fp16, CUDA graphs): batch-1 decode, 64-stream
             decode step, TTFT with 64 prompts of 128-512 tokens arriving at once; then int4
  http       the daemon over HTTP (bench/serve_bench.py's client), 64 x 128 tokens fp16, and
             16 / 64 streams int4 and fp16; the 6B checkpoint is written first (in the background
             while the sections above run)
  hf         the seed's way, transformers' generate: batch 1 and one static batch of 64
The report (last) gives the GPU, the date, and per row: measure | now | target | met.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("bandwidth", "kernels", "attention", "decode", "http", "hf")
# rough seconds a section needs on an H200 (what --budget is checked against before it starts)
SECTION_COST = {"bandwidth": 5, "kernels": 40, "attention": 15, "decode": 60, "http": 120,
                "hf": 60}  # fmt: skip
# (name, K, N) of the 6B layer's linears
LINEARS_6B = [("qkv", 4096, 4608), ("dense", 4096, 4096), ("h_to_4h", 4096, 27392),
              ("4h_to_h", 13696, 4096)]  # fmt: skip


@dataclasses.dataclass
class Figure:
    """One row of the report: what, the measurement (or why none), the target, whether met."""

    measure: str
    now: str
    target: str
    met: bool | None = None  # None: not measured


def unmeasured(measure: str, target: str, why: str) -> Figure:
    return Figure(measure, f"not measured: {why}", target, None)


def format_report(figures: list[Figure], gpu: str, when: str, notes: list[str]) -> str:
    """The final table (markdown, so it can be pasted into bench/README.md as is)."""
    mark = {True: "yes", False: "NO", None: "-"}
    lines = [f"## GPU check: {gpu}, {when}", "", "| measure | now | target | met |",
             "|---|---|---|---|"]  # fmt: skip
    for f in figures:
        lines.append(f"| {f.measure} | {f.now} | {f.target} | {mark[f.met]} |")
    met = sum(f.met is True for f in figures)
    missed = sum(f.met is False for f in figures)
    skipped = sum(f.met is None for f in figures)
    lines += ["", f"{met} met, {missed} missed, {skipped} not measured"]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all sections")
    ap.add_argument("--ckpt", default="", help="6B fp16 checkpoint dir (default: written to tmp)")
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    # a dry run of the script's plumbing on a CPU: --device cpu --shape tiny --dtype float32
    # --int4-group 32 --streams 4 --prompts 16-32 --only decode (tests/kernels/test_gpu_check.py)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=["tiny", "small", "6b"], default="6b", help="decode only")
    ap.add_argument("--dtype", default="float16", help="decode only")
    ap.add_argument("--int4-group", type=int, default=128, help="decode only")
    ap.add_argument("--streams", type=int, default=64, help="decode: concurrent requests")
    ap.add_argument("--prompts", default="128-512", help="decode: TTFT prompt lengths, LO-HI")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {', '.join(SECTIONS)}")
    args.only = only
    lo, _, hi = args.prompts.partition("-")
    if not (lo.isdigit() and hi.isdigit() and 0 < int(lo) <= int(hi)):
        ap.error(f"--prompts must be LO-HI, got {args.prompts!r}")
    args.prompts = (int(lo), int(hi))
    return args


# ---------------------------------------------------------------- measuring helpers
def cuda_time_us(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    from chatglm_serve.kernels.cuda_qmm import cuda_event_timer

    return cuda_event_timer(fn, warmup=warmup, reps=reps)


def copy_bandwidth_gbs() -> float:
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    us = cuda_time_us(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() / us / 1e3  # read + write


# ---------------------------------------------------------------- sections
class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.figs: dict[str, Figure] = {}
        self.notes: list[str] = []
        self.bw = 0.0  # copy GB/s
        self.fp16_bs1 = 0.0
        self.ours_bs64_http = 0.0
        self.ckpt_proc: subprocess.Popen | None = None
        self.ckpt = args.ckpt

    def note(self, line: str) -> None:
        print(line, flush=True)
        self.notes.append(line)

    # -- bandwidth
    def bandwidth(self) -> None:
        self.bw = copy_bandwidth_gbs()
        self.note(f"device copy bandwidth (read + write): {self.bw:.0f} GB/s")

    # -- kernels
    def kernels(self) -> None:
        import torch
        import torch.nn.functional as F

        from chatglm_serve.kernels import cuda_qmm, ops
        from chatglm_serve.model.quantize import quantize_weight

        results: dict[tuple[str, int, int], tuple[float, float]] = {}  # (lin, bits, rows)
        self.note("per linear, µs (GB/s of weight read): rows | fp16 cuBLAS | int4 g128 | int8")
        for name, k, n in LINEARS_6B:
            w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
            x_all = torch.randn(64, k, device="cuda", dtype=torch.float16)
            packed = {}
            for bits, group in ((4, 128), (8, None)):
                q, s = quantize_weight(w, bits, group)
                packed[bits] = (ops.pack_cuda(q, bits), s.float().reshape(n, -1).contiguous(),
                                group or k)  # fmt: skip
            for rows in (1, 16, 64):
                x = x_all[:rows]
                t16 = cuda_time_us(lambda x=x, w=w: F.linear(x, w))
                row = [f"{t16:.1f} ({n * k * 2 / t16 / 1e3:.0f})"]
                for bits in (4, 8):
                    words, scale, g = packed[bits]
                    t = cuda_time_us(
                        lambda x=x, words=words, scale=scale, g=g, bits=bits: cuda_qmm.quant_matmul(
                            x, words, scale, bits, g
                        )
                    )
                    results[(name, bits, rows)] = (t, t16)
                    alone = {m: cuda_time_us(lambda m=m, x=x, words=words, scale=scale, g=g,
                                             bits=bits: cuda_qmm.run_method(m, x, words, scale,
                                                                            bits, g))
                             for m in cuda_qmm.candidates(rows, k)}  # fmt: skip
                    paths = ", ".join(f"{m} {v:.1f}" for m, v in alone.items())
                    row.append(f"{t:.1f} ({n * k * bits / 8 / t / 1e3:.0f}) [{paths}]")
                self.note(f"  {name:8} {rows:3d} | " + " | ".join(row))
        for key, table in cuda_qmm.crossover_tables().items():
            self.note(f"crossover {key[1:]}: {table.describe()}")
        for bits in (4, 8):
            t = [results[("h_to_4h", bits, r)] for r in (16, 64)]
            slower = [(lin, r) for (lin, b, r), (a, f) in results.items() if b == bits and a > f]
            by = "int4 (groups of 128)" if bits == 4 else "int8 (per row)"
            self.figs[f"kernel{bits}"] = Figure(
                f"{by} kernel at 16 and 64 rows (h_to_4h 4096→27392)",
                f"{t[0][0]:.0f} / {t[1][0]:.0f} µs, "
                f"{4096 * 27392 * bits / 8 / t[0][0] / 1e3:.0f} / "
                f"{4096 * 27392 * bits / 8 / t[1][0] / 1e3:.0f} GB/s; fp16 cuBLAS "
                f"{t[0][1]:.0f} / {t[1][1]:.0f} µs; slower than fp16 at: "
                + (", ".join(f"{lin}@{r}" for lin, r in slower) or "none"),
                "never slower than fp16 at any batch (1, 16, 64 rows; every linear)",
                not slower,
            )

    # -- attention
    def attention(self) -> None:
        import torch
        from cuda_decode_attention import _case  # bench/ is sys.path[0]

        from chatglm_serve.kernels import cuda_decode

        def kernel_us(batch: int, context: int) -> tuple[float, int]:
            q, cache, meta, kv_bytes = _case(batch, context, torch.float16)
            lens = meta.seq_lens_tensor
            if (
                cuda_decode.decode_attention(q, cache[0], cache[1], meta.block_tables, lens, 1.0)
                is None
            ):
                raise RuntimeError("the CUDA decode attention kernel is unavailable")
            us = cuda_time_us(
                lambda: cuda_decode.decode_attention(
                    q, cache[0], cache[1], meta.block_tables, lens, 0.088
                ),
                reps=50,
            )
            return us, kv_bytes

        # _case spreads lengths over [context/2, context]: 8k keys at most, 6k on average
        us64, b64 = kernel_us(64, 8192)
        us1, _ = kernel_us(1, 128)
        gbs = b64 / us64 / 1e3
        share = gbs / self.bw if self.bw else float("nan")
        self.figs["attention"] = Figure(
            "decode attention kernel, batch 64, context 8k (lengths 4k-8k)",
            f"{gbs:.0f} GB/s ({share:.0%} of copy bandwidth); {us1:.1f} µs per layer at batch 1, "
            "128 keys",
            "≥ 70% of bandwidth; ≤ 8 µs per layer at batch 1",
            bool(share >= 0.70 and us1 <= 8.0),
        )

    # -- decode (engine, in process)
    def decode(self) -> None:
        import torch
        from engine_bench import pct, serve, shape_config

        from chatglm_serve.engine.config import EngineConfig
        from chatglm_serve.engine.llm_engine import LLMEngine
        from chatglm_serve.engine.types import SamplingParams
        from chatglm_serve.model.chatglm import ChatGLMForCausalLM
        from chatglm_serve.model.demo_tokenizer import train_demo_tokenizer_bytes
        from chatglm_serve.model.quantize import QuantSpec, quantize_model
        from chatglm_serve.model.tokenizer import ChatGLMTokenizer

        a = self.args
        tok = ChatGLMTokenizer.from_bytes(train_demo_tokenizer_bytes())
        cfg = shape_config(a.shape, tok.vocab_size)
        model = ChatGLMForCausalLM.random(cfg, dtype=a.dtype, device=a.device, seed=0, std=0.02)
        rng = random.Random(0)

        def prompt(n: int) -> list[int]:
            return tok.prefix_token_ids + [rng.randrange(3, tok.sp_vocab_size) for _ in range(n)]

        def weight_bytes(model: torch.nn.Module) -> int:
            tensors = [*model.named_parameters(), *model.named_buffers()]
            return sum(t.numel() * t.element_size() for name, t in tensors
                       if "embedding" not in name and "rotary" not in name)  # fmt: skip

        params = SamplingParams(temperature=0.0, max_tokens=self.args.tokens, ignore_eos=True)
        config = EngineConfig(
            max_num_seqs=a.streams, max_num_batched_tokens=2048, max_model_len=a.prompts[1] + 512
        )

        def bs1(engine: LLMEngine) -> float:
            serve(engine, [prompt(16)], dataclasses.replace(params, max_tokens=8))  # warm-up
            t = serve(engine, [prompt(16)], params)
            return 1 / pct(t.itl, 50)  # decode tok/s: median step, the prefill excluded

        wb = weight_bytes(model)  # before the engine (on a CPU it repacks the linears)
        engine = LLMEngine(model, tok, config)
        fp16 = bs1(engine)
        self.fp16_bs1 = fp16
        share = fp16 * wb / 1e9 / self.bw if self.bw else float("nan")
        self.figs["bs1_fp16"] = Figure(
            "bs1 decode fp16, engine, CUDA graphs",
            f"{fp16:.0f} tok/s = {share:.0%} of copy bandwidth ({wb / 1e9:.2f} GB of weights "
            "per token)",
            "≥ 300 tok/s (≥ 85%)",
            bool(fp16 >= 300 and share >= 0.85),
        )
        t64 = serve(engine, [prompt(16) for _ in range(a.streams)], params)
        step = pct(t64.itl, 50)
        self.engine_step_ms = step * 1e3
        self.note(f"engine-only, {a.streams} streams: decode step p50 {step * 1e3:.2f} ms = "
                  f"{a.streams / step:.0f} tok/s")  # fmt: skip
        engine.block_manager.reset_prefix_cache()
        long = [prompt(rng.randint(*a.prompts)) for _ in range(a.streams)]
        tt = serve(engine, long, dataclasses.replace(params, max_tokens=16))
        ttft = pct(tt.ttft, 50)
        self.figs["ttft"] = Figure(
            f"{a.streams} concurrent requests, prompts {a.prompts[0]}–{a.prompts[1]} tokens: "
            "TTFT p50 (engine)",
            f"{ttft * 1e3:.0f} ms (p99 {pct(tt.ttft, 99) * 1e3:.0f} ms)",
            "≤ 400 ms",
            bool(ttft <= 0.4),
        )
        engine = model = None
        torch.cuda.empty_cache()
        # a fresh model of the same weights, quantized before an engine touches it
        model = ChatGLMForCausalLM.random(cfg, dtype=a.dtype, device=a.device, seed=0, std=0.02)
        quantize_model(model, QuantSpec(4, a.int4_group))
        torch.cuda.empty_cache()
        wb4 = weight_bytes(model)
        engine = LLMEngine(model, tok, config)
        int4 = bs1(engine)
        self.figs["bs1_int4"] = Figure(
            f"bs1 decode int4 (groups of {a.int4_group})",
            f"{int4:.0f} tok/s = {int4 / fp16:.2f}x fp16; weights read at "
            f"{int4 * wb4 / 1e9:.0f} GB/s",
            "≥ 2.5x our fp16 bs1",
            bool(int4 >= 2.5 * fp16),
        )
        engine = model = None  # free the GPU for the next sections
        torch.cuda.empty_cache()

    # -- http (the daemon, serve_bench's client)
    def start_checkpoint(self) -> None:
        """Write the 6B fp16 checkpoint in the background (CPU work, niced) if none was given."""
        if self.ckpt:
            return
        self.ckpt = tempfile.mkdtemp(prefix="gpu_check_6b_")
        cmd = ["nice", "-n", "19", sys.executable, str(REPO / "bench" / "make_checkpoint.py"),
               "--shape", "6b", "--dtype", "float16", "--out", self.ckpt]  # fmt: skip
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, OMP_NUM_THREADS="4", PYTHONPATH=path)
        self.ckpt_proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def wait_checkpoint(self) -> None:
        if self.ckpt_proc is not None:
            out, _ = self.ckpt_proc.communicate(timeout=600)
            if self.ckpt_proc.returncode:
                raise RuntimeError(f"make_checkpoint failed: {out[-500:]}")
            self.ckpt_proc = None

    def serve_args(self, concurrency: int, quantize: int | None, extra: list[str] = ()):
        import serve_bench

        argv = ["--ckpt", self.ckpt, "--device", "cuda", "--threads", "4", "-c", str(concurrency),
                "-n", "1", "--max-tokens", str(self.args.tokens), "--runs", "1", *extra]  # fmt: skip
        if quantize:
            argv += ["--quantize", str(quantize)]
        return serve_bench.build_parser().parse_args(argv)

    def http(self) -> None:
        import asyncio

        import serve_bench

        from chatglm_serve.model.tokenizer import ChatGLMTokenizer

        self.wait_checkpoint()
        tok = ChatGLMTokenizer(str(Path(self.ckpt) / "tokenizer.model"))
        tok_s: dict[tuple[int | None, int], float] = {}
        for quantize in (None, 4):
            args = self.serve_args(64, quantize)
            args.max_model_len = 512
            server = serve_bench.start_ours(args)
            try:
                for c in (64, 16):
                    args.concurrency = c
                    reqs = serve_bench.make_requests(args, tok)
                    url = f"http://127.0.0.1:{server.port}/v1"
                    res = serve_bench.summarize(
                        "ours", asyncio.run(serve_bench.http_load(args, url, reqs))
                    )
                    tok_s[(quantize, c)] = res.tok_s
                    self.note(f"HTTP {'int4' if quantize else 'fp16'} {c} streams: {res.row()}")
            finally:
                server.stop()
        fp16_64 = tok_s[(None, 64)]
        self.ours_bs64_http = fp16_64
        engine = 64 / (self.engine_step_ms / 1e3) if getattr(self, "engine_step_ms", 0) else 0
        share = fp16_64 / engine if engine else float("nan")
        self.figs["http_fp16"] = Figure(
            f"daemon over HTTP, 64 streams × {self.args.tokens} tokens, fp16",
            f"{fp16_64:.0f} tok/s; engine-only decode step "
            + (
                f"{self.engine_step_ms:.1f} ms = {engine:.0f} tok/s (HTTP {share:.0%})"
                if engine
                else "not measured (decode section)"
            ),  # fmt: skip
            "≥ 7,500 tok/s over HTTP; HTTP ≥ 90% of engine-only",
            bool(fp16_64 >= 7500 and share >= 0.9),
        )
        self.figs["http_int4"] = Figure(
            "daemon over HTTP, int4, 16 / 64 streams",
            f"{tok_s[(4, 16)]:.0f} / {tok_s[(4, 64)]:.0f} tok/s (fp16: {tok_s[(None, 16)]:.0f} / "
            f"{fp16_64:.0f})",
            "≥ fp16 at every concurrency",
            bool(tok_s[(4, 16)] >= tok_s[(None, 16)] and tok_s[(4, 64)] >= fp16_64),
        )

    # -- hf (the seed's way)
    def hf(self) -> None:
        import serve_bench

        from chatglm_serve.model.tokenizer import ChatGLMTokenizer

        self.wait_checkpoint()
        tok = ChatGLMTokenizer(str(Path(self.ckpt) / "tokenizer.model"))
        args = self.serve_args(64, None, ["--hf-seq-requests", "2"])
        args.dtype = "float16"
        reqs = serve_bench.make_requests(args, tok)
        res = {r.target: r for r in serve_bench.hf_targets(args, reqs, ["hf-seq", "hf-batch"])}
        seq, batch = res["hf-seq"].tok_s, res["hf-batch"].tok_s
        r1 = self.fp16_bs1 / seq if self.fp16_bs1 else float("nan")
        r64 = self.ours_bs64_http / batch if self.ours_bs64_http else float("nan")
        self.figs["hf"] = Figure(
            "the seed's way, HF generate on the same GPU (ours: engine bs1, HTTP 64 streams)",
            f"bs1 {seq:.1f} tok/s, static bs64 {batch:.0f}; ours {r1:.1f}x and {r64:.1f}x",
            "ours ≥ 15x and ≥ 8x",
            bool(r1 >= 15 and r64 >= 8),
        )


TARGETS = {  # key -> (measure, target), for rows that were not measured
    "bs1_fp16": ("bs1 decode fp16, engine, CUDA graphs", "≥ 300 tok/s (≥ 85%)"),
    "bs1_int4": ("bs1 decode int4 (groups of 128)", "≥ 2.5x our fp16 bs1"),
    "kernel4": ("int4 kernel at 16 and 64 rows (h_to_4h 4096→27392)",
                "never slower than fp16 at any batch"),
    "kernel8": ("int8 kernel at 16 and 64 rows (h_to_4h 4096→27392)",
                "never slower than fp16 at any batch"),
    "http_fp16": ("daemon over HTTP, 64 streams × 128 tokens, fp16",
                  "≥ 7,500 tok/s over HTTP; HTTP ≥ 90% of engine-only"),
    "http_int4": ("daemon over HTTP, int4, 16 / 64 streams", "≥ fp16 at every concurrency"),
    "ttft": ("64 concurrent requests, prompts 128–512 tokens: TTFT p50", "≤ 400 ms"),
    "attention": ("decode attention kernel, batch 64, context 8k",
                  "≥ 70% of bandwidth; ≤ 8 µs per layer at batch 1"),
    "hf": ("the seed's way, HF generate on the same GPU", "ours ≥ 15x and ≥ 8x"),
}  # fmt: skip
SECTION_FIGURES = {"bandwidth": [], "kernels": ["kernel4", "kernel8"], "attention": ["attention"],
                   "decode": ["bs1_fp16", "ttft", "bs1_int4"], "http": ["http_fp16", "http_int4"],
                   "hf": ["hf"]}  # fmt: skip


def run_sections(check: Check, only: list[str], budget: float, clock=time.monotonic) -> None:
    """Run the chosen sections in order within `budget` seconds; whatever a section could not
    measure (skipped, over budget, failed) becomes a 'not measured' row saying why."""
    start = clock()
    for name in SECTIONS:
        if name not in only:
            why = "section not selected (--only)"
        elif clock() - start + SECTION_COST[name] > budget:
            why = f"time budget ({budget:.0f} s) spent"
        else:
            print(f"--- {name} ({clock() - start:.0f} s in)", flush=True)
            try:
                getattr(check, name)()
                why = "the section did not produce it"
            except Exception as e:  # noqa: BLE001 - reported in the table, the next section runs
                why = f"{type(e).__name__}: {str(e)[:160]}"
                print(f"{name} failed: {why}", flush=True)
        for key in SECTION_FIGURES[name]:
            if key not in check.figs:
                check.figs[key] = unmeasured(*TARGETS[key], why)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False)")
        return 2
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.multi_processor_count} SMs)"
    else:
        gpu = f"{args.device} (dry run, shape {args.shape})"
    gpu += f", torch {torch.__version__}, CUDA {torch.version.cuda}"
    check = Check(args)
    if "http" in args.only or "hf" in args.only:
        check.start_checkpoint()
    try:
        run_sections(check, args.only, args.budget)
    finally:
        if check.ckpt_proc is not None:
            check.ckpt_proc.kill()
    order = ["bs1_fp16", "bs1_int4", "kernel4", "kernel8", "http_fp16", "http_int4", "ttft",
             "attention", "hf"]  # fmt: skip
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print()
    print(format_report([check.figs[k] for k in order], gpu, when, []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
