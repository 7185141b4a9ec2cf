"""Run tests in a child process with CHATGLM_SERVE_CPU_ISA capping the kernels' instruction sets:
the cap is read once per process, so a lower path (AVX2, portable) is checked in a fresh one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_capped(cap: str, test_file: str, selection: str, before: str = "") -> str:
    """pytest `test_file -k selection` under the cap (after running the Python `before` in the
    same child); returns pytest's summary line, asserting the child passed."""
    code = (
        f"import sys, pytest\n{before}\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {test_file!r}, '-k', {selection!r}]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "CHATGLM_SERVE_CPU_ISA": cap},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]
