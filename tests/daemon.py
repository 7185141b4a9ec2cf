"""Starting the real daemon in a subprocess: a free port, and waiting until it is healthy."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    """A port nothing listens on (the OS picks it; closed again before it is returned)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, what: str = "daemon") -> None:
    """Poll `url`/health until it answers 200; fail with the process's stderr if it died."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, (proc.communicate()[1] or "")[-3000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what} did not become healthy"
        time.sleep(0.1)
