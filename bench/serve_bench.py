"""Serving benchmark: streaming load on our daemon and on llama-server (same checkpoint, same
load, one at a time), our engine without HTTP, and the seed's way (transformers' generate).

    # 16 clients, 4 requests each, 64 tokens per reply (the issue's figure), all targets:
    PYTHONPATH=. python bench/serve_bench.py --ckpt /tmp/ckpt-medium \
        --gguf /tmp/peers-medium/medium-f32.gguf --targets ours,engine,llama,hf-seq,hf-batch
    # ShareGPT-like prompt/reply lengths at 2 requests/s (open loop), against a running daemon:
    PYTHONPATH=. python bench/serve_bench.py --url http://127.0.0.1:8000/v1 --ckpt /tmp/ckpt-medium \
        --dist sharegpt --rate 2 --num-requests 64

Targets (--targets, run in this order every run, each alone on the machine):
  ours      our daemon (`python -m chatglm_serve`), started here on --ckpt (or --url: already running)
  engine    our AsyncEngine in this process, same requests, no HTTP: ours vs engine is the
            server's own overhead (HTTP + SSE + the event loop)
  llama     llama-server -np <concurrency> on --gguf (the same weights, converted by
            ../shared/peers/llama_cpp_peer.py), started here
  hf-seq    the seed's way: transformers GlmForCausalLM with our weights, generate() one request
            at a time
  hf-batch  the same, static batching: batches of --concurrency requests (left-padded, run
            to the longest reply), one batch after another; no streaming, so no TTFT

Load: --concurrency clients each send requests back to back (closed loop), or with --rate a
Poisson stream of --num-requests requests (open loop). Replies are exactly as long as asked
(`ignore_eos` and `min_tokens`, which both servers accept). --dist fixed: every prompt is
--prompt ("你好") and every reply --max-tokens; --dist sharegpt: prompt and reply lengths drawn
(fixed --seed) from log-normal fits of ShareGPT's spread, scaled to this machine by
--prompt-scale / --output-scale, prompts made of demo-corpus lines. Per target: output tokens/s,
TTFT and inter-token latency p50/p99, errors; with --runs R the median [min-max] of each, the
targets interleaved run by run. The load average is printed with each run: numbers taken while
other jobs share the CPU are not comparable with quiet ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from decode_bench import llama_repack  # bench/ is this script's sys.path[0]

REPO = Path(__file__).resolve().parent.parent
LLAMA_SERVER = "/tmp/peers/llama-server-build/bin/llama-server"


@dataclass
class Request:
    messages: list[dict]
    max_tokens: int
    prompt_ids: list[int] = field(default_factory=list)


@dataclass
class Record:
    ok: bool = False
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    t0: float = 0.0
    t_end: float = 0.0
    err: str | None = None


@dataclass
class Result:
    target: str
    tok_s: float
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    errors: int
    requests: int
    wall: float
    loadavg: float
    note: str = ""

    def row(self) -> str:
        def ms(x: float | None) -> str:
            return "-" if x is None else f"{1000 * x:.0f}"

        return (
            f"{self.target:9} {self.tok_s:8.1f} {ms(self.ttft_p50):>9} {ms(self.ttft_p99):>9} "
            f"{ms(self.itl_p50):>8} {ms(self.itl_p99):>8} {self.errors:>4}/{self.requests:<4} "
            f"{self.wall:7.1f} {self.loadavg:5.1f} {self.note}"
        )


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(target: str, recs: list[Record], note: str = "") -> Result:
    ok = [r for r in recs if r.ok]
    errors = [r.err for r in recs if not r.ok and r.err]
    if errors:  # the first one says what went wrong
        note = f"{note} first error: {errors[0][:160]}".strip()
    start = min((r.t0 for r in recs), default=0.0)
    end = max((r.t_end for r in recs), default=0.0)
    wall = max(end - start, 1e-9)
    return Result(
        target,
        sum(r.tokens for r in ok) / wall,
        pct([r.ttft for r in ok if r.ttft is not None], 50),
        pct([r.ttft for r in ok if r.ttft is not None], 99),
        pct([g for r in ok for g in r.gaps], 50),
        pct([g for r in ok for g in r.gaps], 99),
        len(recs) - len(ok),
        len(recs),
        wall,
        os.getloadavg()[0],
        note,
    )


# ---- the workload -----------------------------------------------------------------------------


def make_requests(args: argparse.Namespace, tokenizer) -> list[Request]:
    rng = random.Random(args.seed)
    n = args.num_requests or args.concurrency * args.requests_per_client
    if args.dist == "fixed":
        reqs = [
            Request([{"role": "user", "content": args.prompt}], args.max_tokens) for _ in range(n)
        ]
    else:
        from chatglm_serve.model.demo_tokenizer import demo_corpus_lines

        lines = [ln for ln in demo_corpus_lines() if ln.strip()]
        reqs = []
        for _ in range(n):
            # ShareGPT (vLLM's benchmark set): prompts median ~200 tokens, replies ~250, both
            # long-tailed; log-normal fits, then scaled for a 2-core CPU
            p = rng.lognormvariate(math.log(200), 0.9) * args.prompt_scale
            o = rng.lognormvariate(math.log(250), 0.8) * args.output_scale
            p = int(min(max(p, 4), args.max_prompt))
            o = int(min(max(o, 4), args.max_tokens))
            text = ""
            while len(tokenizer.encode(text, add_special_tokens=False)) < p:
                text += rng.choice(lines) + " "
            reqs.append(Request([{"role": "user", "content": text.strip()}], o))
    for r in reqs:
        r.prompt_ids = tokenizer.encode_chat(r.messages[-1]["content"], [])
    return reqs


async def drive(args: argparse.Namespace, reqs: list[Request], one) -> list[Record]:
    """Closed loop (concurrency clients) or open loop (Poisson at --rate)."""
    recs: list[Record] = []
    if args.rate:
        rng = random.Random(args.seed + 1)
        tasks = []
        for r in reqs:
            tasks.append(asyncio.create_task(one(r)))
            await asyncio.sleep(rng.expovariate(args.rate))
        recs = list(await asyncio.gather(*tasks))
    else:
        queue = list(reqs)

        async def client() -> None:
            while queue:
                recs.append(await one(queue.pop(0)))

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
    return recs


async def http_load(args: argparse.Namespace, base_url: str, reqs: list[Request]) -> list[Record]:
    url = base_url.rstrip("/") + "/chat/completions"
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:

        async def one(req: Request) -> Record:
            rec = Record(t0=time.perf_counter())
            body = {
                "model": "default",
                "messages": req.messages,
                "max_tokens": req.max_tokens,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
                "min_tokens": req.max_tokens,
            }
            last, chunks, usage = None, 0, None
            try:
                async with client.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        rec.err = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                        return rec
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        ev = json.loads(data)
                        now = time.perf_counter()
                        if ev.get("usage"):
                            usage = ev["usage"].get("completion_tokens")
                        for ch in ev.get("choices") or []:
                            if (ch.get("delta") or {}).get("content"):
                                chunks += 1
                                if last is None:
                                    rec.ttft = now - rec.t0
                                else:
                                    rec.gaps.append(now - last)
                                last = now
                rec.tokens = usage if usage is not None else chunks
                # a reply of tokens that print as nothing (random weights) still counts
                rec.ok = rec.tokens > 0
                if not rec.ok:
                    rec.err = "no tokens"
            except Exception as e:  # noqa: BLE001 - every failure is a counted error
                rec.err = f"{type(e).__name__}: {e}"
            finally:
                rec.t_end = time.perf_counter()
            return rec

        await one(reqs[0])  # warm-up, untimed
        return await drive(args, reqs, one)


# ---- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], port: int, env: dict | None = None) -> None:
        self.cmd, self.port = cmd, port
        self.log = open(f"/tmp/serve_bench_{port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[0]} exited {self.proc.returncode}: {self.log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.cmd[0]} not ready after {timeout}s: {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_ours(args: argparse.Namespace) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "chatglm_serve", "--model", args.ckpt, "--port", str(port)]
    cmd += ["--max-num-seqs", str(max(args.concurrency, 16)), "--log-level", "warning"]
    cmd += ["--threads", str(args.threads), "--shutdown-timeout", "1", "--device", args.device]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.quantize:
        cmd += ["--quantize", str(args.quantize)]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    # keep a PYTHONPATH already set (bench/gpu_check.sh puts carried wheels there)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    server = Server(cmd, port, dict(os.environ, PYTHONPATH=path))
    server.wait_ready("/health", 600)
    return server


def start_llama(args: argparse.Namespace) -> Server:
    port = free_port()
    slots = args.concurrency
    # per slot: our longest request plus room for llama-server's own chat template (~20 tokens
    # more than ours for the same message)
    ctx = slots * ((args.max_model_len or 512) + 64)
    cmd = [args.llama_server, "-m", args.gguf, "-t", str(args.threads), "-tb", str(args.threads)]
    cmd += ["-np", str(slots), "-c", str(ctx), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--no-webui"]
    if not llama_repack(args.llama_repack):  # see decode_bench.py
        cmd += ["--no-repack"]
    server = Server(cmd, port)
    server.wait_ready("/health", 300)
    return server


# ---- in-process targets -----------------------------------------------------------------------


async def engine_load(args: argparse.Namespace, reqs: list[Request]) -> list[Record]:
    from chatglm_serve.engine.async_engine import AsyncEngine
    from chatglm_serve.engine.config import EngineArgs, EngineConfig
    from chatglm_serve.engine.types import SamplingParams

    config = EngineConfig(
        max_num_seqs=max(args.concurrency, 16),
        max_model_len=args.max_model_len,
        num_threads=args.threads,
    )
    # loaded as the daemon loads it, on the engine's own thread (AsyncEngine.launch says why)
    engine = AsyncEngine.from_args(
        EngineArgs(
            model=args.ckpt,
            dtype=args.dtype,
            device=args.device,
            quantize=args.quantize,
            engine=config,
        )
    )
    counter = iter(range(1 << 30))

    async def one(req: Request) -> Record:
        rec = Record(t0=time.perf_counter())
        params = SamplingParams(
            temperature=0.0, max_tokens=req.max_tokens, min_tokens=req.max_tokens, ignore_eos=True
        )
        last = None
        try:
            async for out in engine.generate(req.prompt_ids, params, f"b{next(counter)}"):
                now = time.perf_counter()
                if out.token_ids:
                    rec.tokens += len(out.token_ids)
                    if last is None:
                        rec.ttft = now - rec.t0
                    else:
                        rec.gaps.append(now - last)
                    last = now
            rec.ok = rec.tokens > 0
        except Exception as e:  # noqa: BLE001
            rec.err = f"{type(e).__name__}: {e}"
        rec.t_end = time.perf_counter()
        return rec

    try:
        await one(reqs[0])  # warm-up
        return await drive(args, reqs, one)
    finally:
        await engine.shutdown(timeout=5)


def hf_targets(args: argparse.Namespace, reqs: list[Request], which: list[str]) -> list[Result]:
    """The seed's way: transformers' generate, one request at a time, then as one batch."""
    import torch

    from chatglm_serve.engine.config import EngineArgs
    from chatglm_serve.engine.load import load_model
    from chatglm_serve.model.hf_glm import glm_from_state

    torch.set_num_threads(args.threads)
    model, _ = load_model(
        EngineArgs(model=args.ckpt, dtype=args.dtype, device=args.device, quantize=args.quantize)
    )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ref = glm_from_state(model.state_dict(), model.config, dtype).to(device)
    del model
    out = []
    with torch.inference_mode():
        ref.generate(
            torch.tensor([reqs[0].prompt_ids], device=device), max_new_tokens=2, pad_token_id=0
        )
        if "hf-seq" in which:
            recs = []
            for r in reqs[: args.hf_seq_requests or len(reqs)]:
                rec = Record(t0=time.perf_counter())
                ids = torch.tensor([r.prompt_ids], device=device)
                g = ref.generate(
                    ids,
                    max_new_tokens=r.max_tokens,
                    min_new_tokens=r.max_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
                rec.t_end = time.perf_counter()
                rec.tokens, rec.ok = g.shape[1] - ids.shape[1], True
                recs.append(rec)
            out.append(summarize("hf-seq", recs, "no streaming: no TTFT/ITL"))
        if "hf-batch" in which:
            # static batching at the same concurrency: batches of --concurrency requests, one
            # after another, each padded to its longest prompt and run to its longest reply
            recs = []
            t_start = time.perf_counter()
            for b0 in range(0, len(reqs), args.concurrency):
                batch = reqs[b0 : b0 + args.concurrency]
                width = max(len(r.prompt_ids) for r in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, r in enumerate(batch):  # left padding, as batched generation needs
                    ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
                    mask[i, width - len(r.prompt_ids) :] = 1
                most = max(r.max_tokens for r in batch)
                t0 = time.perf_counter()
                ref.generate(
                    ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=most,
                    min_new_tokens=most,
                    do_sample=False,
                    pad_token_id=0,
                )
                t1 = time.perf_counter()
                # a static batch runs until its longest reply: only the tokens asked for count
                recs += [Record(ok=True, tokens=r.max_tokens, t0=t0, t_end=t1) for r in batch]
            recs[0].t0 = t_start
            out.append(summarize("hf-batch", recs, f"batches of {args.concurrency}, no streaming"))
    return out


# ---- main -------------------------------------------------------------------------------------


def run_target(args: argparse.Namespace, target: str, reqs: list[Request]) -> Result:
    if target == "ours":
        if args.url:
            return summarize("ours", asyncio.run(http_load(args, args.url, reqs)), "--url")
        server = start_ours(args)
        try:
            recs = asyncio.run(http_load(args, f"http://127.0.0.1:{server.port}/v1", reqs))
        finally:
            server.stop()
        return summarize("ours", recs)
    if target == "engine":
        return summarize("engine", asyncio.run(engine_load(args, reqs)))
    if target == "llama":
        if not args.gguf or not Path(args.llama_server).exists():
            return summarize("llama", [], "skipped: needs --gguf and llama-server")
        server = start_llama(args)
        try:
            recs = asyncio.run(http_load(args, f"http://127.0.0.1:{server.port}/v1", reqs))
        finally:
            server.stop()
        return summarize("llama", recs, Path(args.gguf).name)
    raise ValueError(target)


def median_result(results: list[Result]) -> tuple[Result, str]:
    tok = [r.tok_s for r in results]
    med = sorted(results, key=lambda r: r.tok_s)[len(results) // 2]
    return med, f"[{min(tok):.1f}-{max(tok):.1f}]"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", required=True, help="HF-format checkpoint dir")
    ap.add_argument("--url", help="our daemon's base URL (…/v1) if already running")
    ap.add_argument("--gguf", help="the same checkpoint for llama-server")
    ap.add_argument("--llama-server", default=LLAMA_SERVER)
    ap.add_argument(
        "--llama-repack",
        choices=["auto", "on", "off"],
        default="auto",
        help="llama.cpp's weight repacking; auto: on unless the CPU has AMX (decode_bench.py)",
    )
    ap.add_argument("--targets", default="ours,engine,llama")
    ap.add_argument("--dtype", default=None, help="ours: float32 / bfloat16 (default: the file's)")
    ap.add_argument("--quantize", type=int, choices=[4, 8], default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="ours, engine and HF: cpu, cuda, auto")
    ap.add_argument(
        "--hf-seq-requests", type=int, default=0, help="hf-seq: only the first N (default all)"
    )
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-n", "--requests-per-client", type=int, default=4)
    ap.add_argument("--num-requests", type=int, default=0, help="total (default c x n)")
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s, Poisson (open loop)")
    ap.add_argument("--dist", choices=["fixed", "sharegpt"], default="fixed")
    ap.add_argument("--prompt", default="你好")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--prompt-scale", type=float, default=0.5)
    ap.add_argument("--output-scale", type=float, default=0.25)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json-out", default="")
    return ap


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()

    from chatglm_serve.model.tokenizer import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer(str(Path(args.ckpt) / "tokenizer.model"))
    reqs = make_requests(args, tokenizer)
    need = max(len(r.prompt_ids) + r.max_tokens for r in reqs) + 16
    args.max_model_len = args.max_model_len or max(256, need)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    load = (
        f"Poisson {args.rate}/s, {len(reqs)} requests"
        if args.rate
        else f"{args.concurrency} clients x {len(reqs) // args.concurrency} requests"
    )
    plens = [len(r.prompt_ids) for r in reqs]
    olens = [r.max_tokens for r in reqs]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} CPUs, {args.threads} threads; "
        f"{args.ckpt} {args.dtype or 'file dtype'}{f' int{args.quantize}' if args.quantize else ''}"
        f"; {load}; {args.dist}: prompt tokens mean {statistics.mean(plens):.0f} "
        f"(max {max(plens)}), reply tokens mean {statistics.mean(olens):.0f} "
        f"(max {max(olens)}); {args.runs} runs",
        flush=True,
    )
    header = (
        f"{'target':9} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
        f"{'err/req':>9} {'wall s':>7} {'load':>5}   (ms)"
    )
    per: dict[str, list[Result]] = {t: [] for t in targets}
    for run in range(args.runs):
        print(f"run {run + 1}:\n{header}", flush=True)
        http = [t for t in targets if t in ("ours", "engine", "llama")]
        for t in http:
            res = run_target(args, t, reqs)
            per[t].append(res)
            print(res.row(), flush=True)
        hf = [t for t in targets if t in ("hf-seq", "hf-batch")]
        if hf:
            for res in hf_targets(args, reqs, hf):
                per[res.target].append(res)
                print(res.row(), flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                for t in targets:
                    if per[t]:
                        f.write(json.dumps(per[t][-1].__dict__) + "\n")

    print(f"\nmedian of {args.runs} runs (by tok/s) [tok/s range]:\n{header}")
    meds = {}
    for t in targets:
        if per[t] and per[t][0].requests:
            meds[t], rng = median_result(per[t])
            print(meds[t].row() + " " + rng)

    def ratio(a: str, b: str, what: str) -> None:
        if a in meds and b in meds and meds[b].tok_s:
            print(f"  {what}: {meds[a].tok_s / meds[b].tok_s:.2f}x")

    print("ratios (output tok/s, medians):")
    ratio("ours", "llama", "ours / llama-server")
    ratio("ours", "hf-seq", "ours / HF generate one at a time")
    ratio("ours", "hf-batch", "ours / HF static batch")
    if "ours" in meds and "llama" in meds:
        a, b = meds["ours"].ttft_p99, meds["llama"].ttft_p99
        if a and b:
            print(f"  TTFT p99 ours / llama-server: {a / b:.2f}x ({a:.2f}s vs {b:.2f}s)")
    if "ours" in meds and "engine" in meds:
        gap = 1 - meds["ours"].tok_s / meds["engine"].tok_s
        print(f"  server overhead (1 - HTTP / engine-only tok/s): {gap:.1%}")


if __name__ == "__main__":
    main()
