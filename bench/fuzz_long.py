"""The long fuzz: schemathesis against the daemon's own OpenAPI schema, for as long as you like.

    PYTHONPATH=. python bench/fuzz_long.py                     # starts a demo-model daemon
    PYTHONPATH=. python bench/fuzz_long.py --examples 2000 --seed 7
    PYTHONPATH=. python bench/fuzz_long.py --url http://127.0.0.1:8000 --api-key KEY

Two passes over every operation (legacy POST / included):
1. the fuzzer of tests/reliability (the CI test runs it with a few dozen examples): positive and
   negative requests, --examples per operation and mode, each answer judged by our contract (a
   4xx in OpenAI's error shape, or a schema-valid response / a well-formed SSE stream);
2. schemathesis' own runner (its CLI) with its coverage phase too (boundary values of every
   field: the largest and smallest numbers, empty and over-long strings and lists, wrong types)
   and its schema checks: no server error, documented status codes, content types and bodies.
Then the daemon must still answer /health, hold no request and no KV block, and (when started
here) have logged no error. Exit status 1 on any problem.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import subprocess
import sys

import httpx
from soak import (  # bench/soak.py (this script's directory is on sys.path)
    DaemonProcess,
    exit_status,
    until_idle,
)

from tests.reliability.fuzzing import fuzz

DEFAULT_DAEMON_FLAGS = ["--max-model-len", "256", "--max-num-seqs", "16"]
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)


def schemathesis_cli(url: str, examples: int, seed: int, api_key: str | None) -> tuple[int, int]:
    """Run `schemathesis run` (coverage + fuzzing phases); (test cases generated, exit status)."""
    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        print("schemathesis CLI not found; skipping pass 2")
        return 0, 0
    cmd = [exe, "run", f"{url}/openapi.json", "--checks", CHECKS]
    cmd += ["--phases", "examples,coverage,fuzzing", "--max-examples", str(examples)]
    cmd += ["--seed", str(seed), "--workers", "1", "--request-timeout", "120", "--no-color"]
    cmd += ["--generation-database", "none"]  # leave no example database in the working tree
    if api_key:
        cmd += ["-H", f"Authorization: Bearer {api_key}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    summary = out[out.rfind("SUMMARY") :] if "SUMMARY" in out else out[-3000:]
    print(summary if proc.returncode == 0 else out[-8000:])
    m = re.search(r"(\d+) generated", out)
    return (int(m.group(1)) if m else 0), proc.returncode


def fuzz_daemon(url: str, args) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    print(f"pass 1: {args.examples} examples per operation and mode, seed {args.seed}")
    result = fuzz(url, max_examples=args.examples, headers=headers, seed=args.seed)
    print(result.summary())
    for problem in result.problems[:20]:
        print("PROBLEM " + problem)
    cases, cli_status = 0, 0
    if not args.no_cli:
        print(f"\npass 2: schemathesis run, {args.examples} examples, seed {args.seed}")
        cases, cli_status = schemathesis_cli(url, args.examples, args.seed, args.api_key)

    async def after() -> tuple[int, dict[str, float]]:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
            state = await until_idle(c)
            return (await c.get("/health")).status_code, state

    health, state = asyncio.run(after())
    print(f"\nfuzzed: {result.requests} requests (pass 1) + {cases} test cases (pass 2); "
          f"5xx: {result.server_errors}; problems: {len(result.problems)}; "
          f"schemathesis run: {'passed' if cli_status == 0 else 'FAILED'}")  # fmt: skip
    print(f"afterwards: /health {health}; engine {state}")
    idle = bool(state) and not any(state.values())
    return 0 if not result.problems and cli_status == 0 and health == 200 and idle else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", help="a running daemon (default: start one)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--examples", type=int, default=500, help="per operation (and mode)")
    ap.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    ap.add_argument("--no-cli", action="store_true", help="skip pass 2 (schemathesis run)")
    ap.add_argument("daemon_flags", nargs="*", help="after --: flags for the started daemon")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = random.randrange(2**31)
    if args.url:
        return fuzz_daemon(args.url.rstrip("/"), args)
    flags = args.daemon_flags or DEFAULT_DAEMON_FLAGS
    if args.api_key:
        flags = [*flags, "--api-key", args.api_key]
    with DaemonProcess(flags) as daemon:
        code = fuzz_daemon(daemon.url, args)
        return exit_status(daemon, code)  # errors read while the daemon still runs


if __name__ == "__main__":
    sys.exit(main())
