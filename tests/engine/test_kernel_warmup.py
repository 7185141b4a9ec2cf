"""A first start serves at once on the PyTorch path while the CPU kernels build in a background
process, then switches to them between steps (engine/kernel_warmup.py).

Each case runs in a fresh interpreter with an empty kernel cache (kernels are process-wide once
imported). The background "build" is the real one where the cache the tests share already holds
the builds (copied in: what a finished compile leaves) after a wait, or a failing command."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chatglm_serve.kernels import build, cpu_decode

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import json, logging, sys, threading, time
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from chatglm_serve.engine import kernel_warmup
    from chatglm_serve.engine.config import EngineArgs, EngineConfig
    from chatglm_serve.engine.load import build_engine
    from chatglm_serve.engine.types import SamplingParams
    from chatglm_serve.kernels import build, cpu_decode

    kernel_warmup._build_command = lambda: sys.argv[1:]
    gate = threading.Event()  # the "compile" waits until the first reply is out
    real_run = kernel_warmup.BackgroundKernelBuild._run
    def run(self):
        gate.wait(120)
        real_run(self)
    kernel_warmup.BackgroundKernelBuild._run = run

    args = EngineArgs(
        model=None, dtype="float32", device="cpu", kernel_build="background",
        engine=EngineConfig(max_num_seqs=4, kv_cache_tokens=4096, max_model_len=256),
    )
    engine = build_engine(args)
    kb = engine.kernel_build

    def reply():
        engine.add_request(f"r{time.monotonic()}", engine.encode_chat("你好", []),
                           SamplingParams(temperature=0, max_tokens=6))
        ids = []
        while engine.has_unfinished():
            for out in engine.step():
                ids += out.token_ids
        return ids

    def kinds():
        return sorted({type(m).__name__ for m in engine.model.modules()
                       if type(m).__name__.endswith("Linear")})

    report = {"background": kb is not None}
    first = reply()  # served while the build has not even started
    report.update(before_done=not kb.wait(0), before=kinds(),
                  decode_before=cpu_decode.decode_kernels_or_none() is not None)
    gate.set()
    kb.wait(120)
    second = reply()  # this step switched first
    report.update(ok=kb.ok, after=kinds(), same=first == second, n=len(second),
                  decode_after=cpu_decode.decode_kernels_or_none() is not None)
    print(json.dumps(report))
    """
)


def _child(tmp_path: Path, command: list[str]) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATGLM_")}
    env["CHATGLM_SERVE_KERNEL_CACHE"] = str(tmp_path / "empty-cache")
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run(
        [sys.executable, "-c", CHILD, *command],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1]) | {"log": p.stderr}


@pytest.fixture(scope="module")
def built_cache() -> Path:
    """The shared kernel cache, holding the CPU builds (compiled here once if need be)."""
    try:
        for _, load in build._cpu_targets():
            load()
    except build.KernelUnavailable as e:
        pytest.skip(f"the CPU kernels cannot be built here: {e}")
    return build.cache_root()


def test_serves_on_pytorch_then_switches_to_the_built_kernels(tmp_path, built_cache):
    dirs = [str(d) for d in built_cache.iterdir() if d.name.startswith("chatglm_")]
    dest = tmp_path / "empty-cache"
    copy = ["sh", "-c", 'mkdir -p "$0" && cp -r "$@" "$0"', str(dest), *dirs]
    r = _child(tmp_path, copy)
    assert r["background"] and r["before_done"] and r["ok"]
    assert r["before"] == ["Linear"] and not r["decode_before"]  # plain PyTorch meanwhile
    assert r["decode_after"] and r["n"] == 6
    if cpu_decode.has_avx512():
        assert "PanelLinear" in r["after"] or "SmallBatchLinear" in r["after"]
    assert "CPU kernels ready" in r["log"]


def test_a_failed_background_build_keeps_serving_on_pytorch(tmp_path, built_cache):
    r = _child(tmp_path, [sys.executable, "-c", "raise SystemExit('no compiler today')"])
    assert r["background"] and r["before_done"] and not r["ok"]
    assert r["before"] == r["after"] == ["Linear"] and r["same"] and r["n"] == 6
    assert not r["decode_after"]  # nothing compiled in the serving process either
    assert "the background build failed" in r["log"] and "no compiler today" in r["log"]


def test_nothing_to_build_when_the_cache_has_the_kernels(built_cache):
    from chatglm_serve.engine.kernel_warmup import start_if_needed

    assert start_if_needed(on_cpu=True) is None
    assert start_if_needed(on_cpu=False) is None
    assert build._compile_here.is_set()  # compiling in-process is allowed again


def test_the_daemon_and_chat_build_in_the_background_the_python_api_does_not():
    from chatglm_serve.engine.config import EngineArgs
    from chatglm_serve.server.settings import engine_args, load_settings

    assert engine_args(load_settings({}, environ={})).kernel_build == "background"
    assert EngineArgs().kernel_build == "now"
    with pytest.raises(ValueError, match="kernel_build"):
        EngineArgs(kernel_build="later").validate()


def test_an_idle_async_engine_switches_without_waiting_for_a_request():
    import threading

    from chatglm_serve.engine.async_engine import AsyncEngine
    from chatglm_serve.engine.config import EngineConfig
    from chatglm_serve.model.loader import load_model_and_tokenizer

    class FinishedBuild:  # the part of BackgroundKernelBuild the engine calls
        def __init__(self) -> None:
            self.switched = threading.Event()

        def ready(self) -> bool:
            return not self.switched.is_set()

        def switch(self, model) -> None:
            self.switched.set()

    model, tokenizer = load_model_and_tokenizer(None, dtype="float32", device="cpu")
    engine = AsyncEngine(model, tokenizer, EngineConfig(kv_cache_tokens=1024, max_model_len=256))
    engine.engine.kernel_build = build_done = FinishedBuild()
    engine.start()
    try:
        assert build_done.switched.wait(30)  # no request was ever sent
    finally:
        import asyncio

        asyncio.run(engine.shutdown(timeout=2))


BUILDER = textwrap.dedent(
    """
    import os, signal, sys, time
    def record(sig, frame):
        with open(sys.argv[1], "a") as f:
            f.write(signal.Signals(sig).name + "\\n")
        os._exit(1)
    signal.signal(signal.SIGINT, record)
    signal.signal(signal.SIGTERM, record)
    with open(sys.argv[1], "w") as f:
        f.write("started\\n")
    time.sleep(300)
    """
)

SERVER = textwrap.dedent(
    """
    import sys, time
    from chatglm_serve.engine.kernel_warmup import BackgroundKernelBuild
    BackgroundKernelBuild([sys.executable, "-c", sys.argv[1], sys.argv[2]])
    print("ready", flush=True)
    time.sleep(300)  # until the Ctrl-C
    """
)


def test_a_ctrl_c_in_the_terminal_does_not_reach_the_background_build(tmp_path):
    """The terminal sends Ctrl-C's SIGINT to its whole foreground process group. The build
    must not get it (it would die mid-compile, every session, and the kernels would never
    be built); it is ended with SIGTERM when the serving process exits."""
    import signal
    import time

    log = tmp_path / "builder.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # start_new_session: the server and everything it starts are a "terminal's" group
    p = subprocess.Popen(
        [sys.executable, "-c", SERVER, BUILDER, str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert p.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.read_text() == "started\n"
        os.killpg(p.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, err = p.communicate(timeout=60)
        assert "KeyboardInterrupt" in err  # the server got it
        deadline = time.monotonic() + 10
        while log.read_text() == "started\n" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.read_text() == "started\nSIGTERM\n"  # the build did not; it was ended
    finally:
        if p.poll() is None:
            p.kill()
