"""Soak: mixed traffic against the daemon for N minutes; does it keep serving, and keep its size?

    PYTHONPATH=. python bench/soak.py --minutes 2                 # starts a demo-model daemon
    PYTHONPATH=. python bench/soak.py --minutes 2 -- --max-num-seqs 8 --max-queue 16
    PYTHONPATH=. python bench/soak.py --url http://127.0.0.1:8000 --api-key KEY --pid 1234

Without --url it starts `python -m chatglm_serve serve` (flags after `--` go to it; the default is the
embedded demo model with a small context) and stops it with SIGTERM at the end. Traffic, from
--concurrency clients: chat completions plain and streamed (some with n=2), streams the client
cuts mid-way, the seed's legacy POST /, bad requests, prompts past the context, /v1/models,
/health and /metrics, and every so often a burst past the queue (429s are expected then).

Reports requests served and errors by kind (expected refusals, 400/413/429, apart from failures:
5xx, timeouts, broken streams, dropped connections), latency p50/p99 per time window, the
daemon's resident memory (RSS, from /proc with --pid or a started daemon) at start, after the
first window and at the end, and the engine's state once idle (nothing running, KV empty).
Exit status 1 on any failure or leak.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
USER = "你好，请介绍一下你自己"
DEFAULT_DAEMON_FLAGS = ["--max-model-len", "512", "--max-num-seqs", "16", "--max-queue", "32"]


# --- the daemon ---------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class DaemonProcess:
    """`python -m chatglm_serve serve` on 127.0.0.1 (a port the OS picks), logging to a file; stopped
    with SIGTERM (graceful drain) on exit. Also used by bench/fuzz_long.py."""

    def __init__(self, flags: list[str]) -> None:
        self.flags = flags
        self.log_path = Path(tempfile.mkstemp(prefix="chatglm-daemon-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> DaemonProcess:
        cmd = [sys.executable, "-m", "chatglm_serve", "serve", "--host", "127.0.0.1", "--port", "0"]
        cmd += ["--log-level", "info", *self.flags]  # info: the start-up lines read below
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 300  # a real checkpoint takes a while to load
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{self.log_path.read_text()[-3000:]}")
            text = self.log_path.read_text(errors="replace")
            m = re.search(r"running on (http://[\d.]+:\d+)", text)
            if m and "ready:" in text:
                self.url = m.group(1)
                return self
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("daemon did not become ready")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def errors_logged(self) -> list[str]:
        """ERROR/CRITICAL lines and tracebacks in the daemon's log."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        # "<date> <time> LEVEL logger: message" (server/cli.py); a logged path may say anything
        level = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) ")
        return [line for line in lines if level.match(line) or line.startswith("Traceback")]


# --- traffic ------------------------------------------------------------------------------------

# What each kind of request may be refused with, besides being served.
GENERATION_REFUSALS = frozenset({429})  # overloaded: the bursts push past the queue
BAD_INPUT = frozenset({400})


@dataclass
class Record:
    t: float  # seconds since the start of the soak
    kind: str
    outcome: str  # "ok", "refused 429", ..., or a failure: "5xx 500", "timeout", "broken stream"
    latency: float | None = None  # seconds, for served requests


@dataclass
class Soak:
    client: httpx.AsyncClient
    start: float
    records: list[Record] = field(default_factory=list)

    def note(self, kind: str, outcome: str, latency: float | None = None) -> None:
        self.records.append(Record(time.perf_counter() - self.start, kind, outcome, latency))

    async def request(
        self, kind: str, method: str, path: str, refusals: frozenset = frozenset(), **kw
    ) -> None:
        t0 = time.perf_counter()
        try:
            r = await self.client.request(method, path, **kw)
        except httpx.TimeoutException:
            self.note(kind, "timeout")
            return
        except httpx.TransportError as e:
            self.note(kind, f"connection {type(e).__name__}")
            return
        self.note(kind, *judge(r, time.perf_counter() - t0, refusals))

    async def stream(self, kind: str, body: dict, cut_after: int | None = None) -> None:
        """A streamed chat completion, read to [DONE] or (cut_after events) hung up on."""
        t0 = time.perf_counter()
        try:
            async with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    self.note(kind, *judge(r, time.perf_counter() - t0, GENERATION_REFUSALS))
                    return
                events = 0
                last = ""
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    events += 1
                    last = line[5:].strip()
                    if '"error"' in last and last.startswith('{"error"'):
                        self.note(kind, "error in stream")
                        return
                    if cut_after is not None and events >= cut_after:
                        self.note(kind, "ok (cut)", time.perf_counter() - t0)
                        return  # leaving the block closes the connection mid-stream
                if last != "[DONE]":
                    self.note(kind, "broken stream")
                    return
        except httpx.TimeoutException:
            self.note(kind, "timeout")
            return
        except httpx.TransportError as e:
            self.note(kind, f"connection {type(e).__name__}")
            return
        self.note(kind, "ok", time.perf_counter() - t0)


def judge(r: httpx.Response, latency: float, refusals: frozenset) -> tuple[str, float | None]:
    if r.status_code == 200:
        return ("ok", latency) if refusals != BAD_INPUT else ("bad input accepted", None)
    if r.status_code in refusals:
        try:
            shaped = set(r.json()["error"]) == {"message", "type", "param", "code"}
        except (ValueError, KeyError, TypeError):
            shaped = False
        if r.status_code == 429 and not r.headers.get("retry-after"):
            return "429 without Retry-After", None
        return (f"refused {r.status_code}" if shaped else f"unshaped {r.status_code}"), None
    if r.status_code >= 500:
        return f"5xx {r.status_code}", None
    return f"unexpected {r.status_code}: {r.text[:120]}", None


async def one_request(soak: Soak, rng: random.Random) -> None:
    """One request of the mix (weights: mostly generation, some probes and abuse)."""
    kind = rng.choices(
        ["chat", "stream", "stream-n2", "cut", "legacy", "bad", "too-long", "models", "health", "metrics"],
        weights=[25, 30, 5, 12, 8, 5, 3, 4, 4, 4],
    )[0]  # fmt: skip
    max_tokens = rng.randint(8, 96)
    chat = {"messages": [{"role": "user", "content": USER}], "max_tokens": max_tokens}
    if kind == "chat":
        await soak.request(kind, "POST", "/v1/chat/completions", GENERATION_REFUSALS, json=chat)
    elif kind == "stream":
        await soak.stream(kind, {**chat, "stream": True})
    elif kind == "stream-n2":
        await soak.stream(kind, {**chat, "stream": True, "n": 2, "temperature": 1.0})
    elif kind == "cut":
        await soak.stream(kind, {**chat, "stream": True, "ignore_eos": True}, rng.randint(1, 20))
    elif kind == "legacy":
        legacy = {"prompt": USER, "max_length": 64}
        await soak.request(kind, "POST", "/", GENERATION_REFUSALS, json=legacy)
    elif kind == "bad":
        body = rng.choice([b"{not json", b'{"messages": []}', b'{"messages": "x"}', b"\xff\xfe"])
        await soak.request(kind, "POST", "/v1/chat/completions", BAD_INPUT, content=body)
    elif kind == "too-long":  # 100k tokens: past any ChatGLM2 context, well under the body limit
        long = {"messages": [{"role": "user", "content": "字" * 100_000}]}
        await soak.request(kind, "POST", "/v1/chat/completions", BAD_INPUT, json=long)
    elif kind == "models":
        await soak.request(kind, "GET", "/v1/models")
    else:
        await soak.request(kind, "GET", "/" + kind)


async def burst(soak: Soak, size: int) -> None:
    """Many at once, past the queue: the excess must be refused with 429, the rest served."""
    body = {"messages": [{"role": "user", "content": USER}], "max_tokens": 32, "ignore_eos": True}
    await asyncio.gather(
        *(
            soak.request("burst", "POST", "/v1/chat/completions", GENERATION_REFUSALS, json=body)
            for _ in range(size)
        )
    )


async def engine_state(client: httpx.AsyncClient) -> dict[str, float]:
    """Gauges from /metrics (running, waiting, KV blocks used)."""
    r = await client.get("/metrics")
    state = {}
    for name in ("requests_running", "requests_waiting", "kv_cache_blocks_used"):
        m = re.search(rf"^chatglm_{name} ([0-9.e+-]+)$", r.text, re.MULTILINE)
        if m:
            state[name] = float(m.group(1))
    return state


async def until_idle(client: httpx.AsyncClient, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    state: dict[str, float] = {}
    while time.monotonic() < deadline:
        state = await engine_state(client)
        if state and not any(state.values()):
            break
        await asyncio.sleep(0.2)
    return state


async def run(args, url: str, pid: int | None) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout, connect=10)
    limits = httpx.Limits(max_connections=args.concurrency + args.burst + 8)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=timeout, limits=limits
    ) as client:
        models = (await client.get("/v1/models")).json()
        print(f"soak: {url}, model {models['data'][0]['id']}, {args.minutes} min, "
              f"{args.concurrency} clients, windows of {args.window}s")  # fmt: skip
        soak = Soak(client, time.perf_counter())
        rss: dict[str, int | None] = {"start": rss_bytes(pid) if pid else None}
        window_rss: dict[int, int | None] = {}
        end = soak.start + args.minutes * 60
        rng = random.Random(args.seed)

        async def worker(i: int) -> None:
            r = random.Random(rng.random())
            while time.perf_counter() < end:
                await one_request(soak, r)

        async def bursts_and_sampling() -> None:
            window = 0
            while time.perf_counter() < end:
                await asyncio.sleep(min(args.window, max(0.0, end - time.perf_counter())))
                window += 1
                window_rss[window] = rss_bytes(pid) if pid else None
                if args.burst and time.perf_counter() < end:
                    await burst(soak, args.burst)

        await asyncio.gather(bursts_and_sampling(), *(worker(i) for i in range(args.concurrency)))
        state = await until_idle(client)
        rss["end"] = rss_bytes(pid) if pid else None
        rss["after first window"] = window_rss.get(1)
        health = (await client.get("/health")).status_code
    return report(soak.records, args.window, args.minutes * 60, rss, window_rss, state, health)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def report(
    records: list[Record],
    window: float,
    duration: float,
    rss: dict[str, int | None],
    window_rss: dict[int, int | None],
    state: dict[str, float],
    health: int,
) -> int:
    served = [r for r in records if r.outcome.startswith("ok")]
    refused = Counter(r.outcome for r in records if r.outcome.startswith("refused"))
    failures = Counter(
        f"{r.kind}: {r.outcome}"
        for r in records
        if not r.outcome.startswith("ok") and not r.outcome.startswith("refused")
    )
    print(f"\nrequests: {len(records)}; served {len(served)}; refused as expected "
          f"{sum(refused.values())} {dict(sorted(refused.items()))}; failures {sum(failures.values())}")  # fmt: skip
    print("served by kind:", dict(sorted(Counter(r.kind for r in served).items())))
    for what, n in sorted(failures.items()):
        print(f"  FAILURE {what}: {n}")
    print(f"\n{'window':>12} {'requests':>9} {'served':>7} {'p50 s':>7} {'p99 s':>7} {'RSS':>11}")
    by_window: dict[int, list[Record]] = defaultdict(list)
    last = max(0, math.ceil(duration / window) - 1)  # answers that end after the soak: the last
    for r in records:
        by_window[min(int(r.t // window), last)].append(r)
    for w in sorted(by_window):
        rs = by_window[w]
        lat = [r.latency for r in rs if r.latency is not None and r.kind != "cut"]
        span = f"{w * window:.0f}-{(w + 1) * window:.0f}s"
        print(f"{span:>12} {len(rs):>9} {sum(r.outcome.startswith('ok') for r in rs):>7} "
              f"{pct(lat, 0.5):>7.3f} {pct(lat, 0.99):>7.3f} {mib(window_rss.get(w + 1)):>11}")  # fmt: skip
    print(f"\ndaemon RSS: start {mib(rss['start'])}, after the first window "
          f"{mib(rss['after first window'])}, end {mib(rss['end'])}")  # fmt: skip
    grew = None
    if rss["end"] is not None and rss["after first window"] is not None:
        grew = rss["end"] - rss["after first window"]
        print(f"RSS growth after warm-up: {grew / 2**20:+.1f} MiB")
    print(f"engine once idle: {state}; /health {health}")
    leaked = not state or any(state.values())
    if leaked:
        print("LEAK: the engine did not return to idle (running/waiting/KV blocks)")
    return 1 if failures or leaked or health != 200 else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--url", help="a running daemon (default: start one)")
    ap.add_argument("--pid", type=int, help="the running daemon's process id, for its RSS")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--concurrency", type=int, default=12, help="clients sending in a loop")
    ap.add_argument(
        "--burst", type=int, default=64, help="requests per burst, once a window (0: none)"
    )
    ap.add_argument("--window", type=float, default=20.0, help="seconds per report window")
    ap.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("daemon_flags", nargs="*", help="after --: flags for the started daemon")
    args = ap.parse_args()
    if args.url:
        return asyncio.run(run(args, args.url.rstrip("/"), args.pid))
    flags = args.daemon_flags or DEFAULT_DAEMON_FLAGS
    if args.api_key:
        flags = [*flags, "--api-key", args.api_key]
    with DaemonProcess(flags) as daemon:
        code = asyncio.run(run(args, daemon.url, daemon.pid))
        return exit_status(daemon, code)  # errors read while the daemon still runs


def exit_status(daemon: DaemonProcess, code: int) -> int:
    """Print the started daemon's logged errors; 1 if the run or the daemon's log failed."""
    errors = daemon.errors_logged()
    print(f"daemon log: {daemon.log_path} ({len(errors)} error lines)")
    for line in errors[:20]:
        print("  " + line)
    return 1 if code or errors else 0


if __name__ == "__main__":
    sys.exit(main())
