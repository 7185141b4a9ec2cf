"""First start on a machine: serve at once on the plain PyTorch path while the CPU kernels compile
in a background process, then switch the model over to them between two engine steps.

Compiling the CPU extensions (kernels/build.py) takes 1-2 minutes on two cores. Done in the
loading process, that minute comes before the first reply (every request meanwhile is a 503).
Instead, when the kernel cache has no build for this machine yet, `start_if_needed` holds off
compiling in this process (so the model loads and serves on its PyTorch paths) and runs
`python -m chatglm_serve.kernels.build --cpu` in a niced child process, which fills the cache.
The engine polls `ready()` before each step; once it is, `switch(model)` lets the kernels be
imported from the cache and gives the model its kernel paths (decode linears, attention, the
one-call decode step, quantized matmuls).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from torch import nn

from chatglm_serve.kernels import build

log = logging.getLogger(__name__)

# What the log promises while the build runs (2-core AMD EPYC VM, g++ -O3, nice 10: 96 s for
# both extensions, the quantized matmul after 24 s).
TYPICAL_BUILD_S = 90


def _all_prebuilt() -> bool:
    """Whether every CPU extension imports from the cache without compiling. Raises
    KernelUnavailable where one cannot be built here at all (no compiler...)."""
    try:
        for _label, load in build._cpu_targets():
            load()  # type: ignore[call-arg]  (the same cached call the model's paths make)
    except build.KernelNotBuiltYet:
        return False
    return True


class BackgroundKernelBuild:
    """One child process compiling the CPU kernels into the cache; see the module docstring."""

    def __init__(self, command: list[str] | None = None) -> None:
        self.command = command or _build_command()
        self.started = time.monotonic()
        self.seconds: float | None = None
        self.ok = False
        self._done = threading.Event()
        self._switched = False
        self._thread = threading.Thread(target=self._run, name="kernel-build", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        log.info(
            "CPU kernels: not built on this machine yet; compiling them in the background "
            "(about %d s on 2 cores). Serving on the plain PyTorch path until then; the engine "
            "switches to them when they are built.",
            TYPICAL_BUILD_S,
        )
        try:
            proc = subprocess.Popen(
                self.command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=_child_env(),
                # its own session (so its own process group): a Ctrl-C meant for the chat or
                # the daemon in the terminal must not reach (and kill) the compiler; we end it
                # ourselves at exit (start_new_session, not process_group: Python 3.10 has it)
                start_new_session=True,
            )
            atexit.register(_end_group, proc)
            tail: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                tail = [*tail[-20:], line]
                if line.startswith("chatglm-serve: kernels:"):  # one line per extension
                    elapsed = time.monotonic() - self.started
                    left = max(0, TYPICAL_BUILD_S - elapsed)
                    log.info("%s (%.0f s in, about %.0f s left)", line, elapsed, left)
            self.ok = proc.wait() == 0
            if not self.ok:
                log.warning(
                    "CPU kernels: the background build failed; staying on the PyTorch path:\n%s",
                    "\n".join(tail),
                )
        except OSError as e:
            log.warning("CPU kernels: cannot run the background build (%s)", e)
        finally:
            self.seconds = time.monotonic() - self.started
            self._done.set()

    def ready(self) -> bool:
        """The build has ended and the model has not been switched yet (cheap; every step)."""
        return not self._switched and self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def switch(self, model: nn.Module) -> None:
        """On the engine's step thread, between steps: the kernels' paths for `model`."""
        self._switched = True
        build.hold_compiling(False)
        if not self.ok:
            return
        build.forget_unavailable()
        from chatglm_serve.model.cpu_linear import log_paths

        log_paths.cache_clear()  # logged while nothing was built: say the real paths now
        t0 = time.monotonic()
        names = model.optimize_for_cpu() if hasattr(model, "optimize_for_cpu") else []
        quantized = sum(
            1 for m in model.modules() if hasattr(m, "use_cpu_kernel") and m.use_cpu_kernel()
        )
        log.info(
            "CPU kernels ready after %.0f s: switched %d linears and %d quantized linears to "
            "them (%.1f s)",
            self.seconds or 0.0,
            len(names),
            quantized,
            time.monotonic() - t0,
        )


def _end_group(proc: subprocess.Popen) -> None:
    """At this process's exit: stop a build still running (the compiler's own children too)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)


def _build_command() -> list[str]:
    cmd = [sys.executable, "-m", "chatglm_serve.kernels.build", "--cpu"]
    nice = shutil.which("nice")
    return [nice, "-n", "10", *cmd] if nice else cmd  # serving goes first on a small machine


def _child_env() -> dict[str, str]:
    """This process's environment, with the root this package is imported from on the path."""
    env = dict(os.environ)
    import chatglm_serve

    root = str(Path(chatglm_serve.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def start_if_needed(on_cpu: bool) -> BackgroundKernelBuild | None:
    """A background build when the model runs on the CPU and the cache lacks a CPU kernel
    build; None when there is nothing to build (or nothing can be: no compiler...)."""
    if not on_cpu:
        return None
    build.hold_compiling(True)
    try:
        if _all_prebuilt():
            build.hold_compiling(False)
            return None
    except build.KernelUnavailable:
        build.hold_compiling(False)  # no toolchain: the usual fallback, logged where used
        return None
    return BackgroundKernelBuild()
