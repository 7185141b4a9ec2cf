"""Ahead-of-time kernel builds: `python -m chatglm_serve.kernels.build` fills a kernel cache, and a later process
with no compiler, no ninja and a read-only cache imports the prebuilt extensions from it and
computes exactly what the freshly built ones do (the Docker runtime image relies on this)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatglm_serve.kernels import build, cpu_decode, ops

ROOT = Path(__file__).resolve().parents[2]

# Run in the toolchain-less subprocess: load both CPU extensions from the prebuilt cache and
# compute on the inputs the test wrote; argv: inputs.pt, outputs.pt, cache dir.
_PROBE = r"""
import sys
from pathlib import Path

import torch

from chatglm_serve.kernels import build, cpu_decode, ops

torch.set_num_threads(1)
inp, out, cache = sys.argv[1], sys.argv[2], Path(sys.argv[3])
try:
    build._check_toolchain()
    sys.exit("probe: a C++ compiler and ninja are on PATH; the test meant to hide them")
except build.KernelUnavailable as e:
    toolchain = str(e)
qmm, dec = build.cpu_kernels_or_none(), cpu_decode.decode_kernels_or_none()
if qmm is None or dec is None:
    sys.exit(f"probe: not loaded (quant {qmm}, decode {dec})")
try:
    (cache / "probe-write").write_text("x")
    read_only = False
except OSError:
    read_only = True
t = torch.load(inp)
torch.save(
    {
        "qmm": ops.cpu_qmm(t["x"], t["packed"], t["sw"], 4, 32, t["n"]),
        "attn": cpu_decode.decode_attention(
            t["q"], t["k"], t["v"], t["tables"], t["lens"], t["scale"]
        ),
        "info": [build.build_info(qmm), build.build_info(dec)],
        "files": [qmm.__file__, dec.__file__],
        "toolchain": toolchain,
        "read_only": read_only,
    },
    out,
)
"""


def _inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    n, k = 48, 128
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    packed, sw = ops.pack_cpu(q, torch.rand(n, k // 32, generator=g) + 0.01, 4)
    blocks, block_size, hkv, d = 8, 16, 2, 32
    return {
        "x": torch.randn(5, k, generator=g),
        "packed": packed,
        "sw": sw,
        "n": n,
        "q": torch.randn(3, 4, d, generator=g),
        "k": torch.randn(blocks, block_size, hkv, d, generator=g),
        "v": torch.randn(blocks, block_size, hkv, d, generator=g),
        "tables": torch.stack([torch.randperm(blocks, generator=g)[:2] for _ in range(3)]),
        "lens": torch.tensor([1, 17, 32]),
        "scale": d**-0.5,
    }


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def _read_only(cache: Path, cmd: list[str]) -> tuple[list[str], bool]:
    """(cmd run with `cache` read-only, whether that is enforced). The tree is made a-w, which
    binds every user but root; as root, a private mount namespace remounts it read-only."""
    for p in [cache, *cache.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    if os.geteuid() != 0:
        return cmd, True
    unshare, mount, sh = (shutil.which(t) for t in ("unshare", "mount", "sh"))
    if not (unshare and mount and sh):
        return cmd, False
    if subprocess.run([unshare, "--mount", "true"], capture_output=True).returncode != 0:
        return cmd, False  # no CAP_SYS_ADMIN here: the snapshot check still applies
    script = f'{mount} --bind "$1" "$1" && {mount} -o remount,bind,ro "$1" && shift && exec "$@"'
    return [unshare, "--mount", sh, "-c", script, "sh", str(cache), *cmd], True


@pytest.fixture(scope="module")
def aot_cache(tmp_path_factory) -> Path:
    """A kernel cache filled by `python -m chatglm_serve.kernels.build --cpu`.

    The compile itself (the same cpp_extension build that first use runs, ~30 s per extension)
    is reused from this session's cache: the build directories for the current fingerprints are
    copied in without their stamps, so the AOT command has to rebuild (ninja finds the objects
    up to date) and stamp them itself.
    """
    try:
        build._check_toolchain()
    except build.KernelUnavailable as e:
        pytest.skip(f"no toolchain to build the kernels with: {e}")
    cache = tmp_path_factory.mktemp("kernel-cache")
    for mod in (build.load_cpu_kernels(), cpu_decode.load_decode_kernels()):
        src = Path(mod.__file__).parent
        shutil.copytree(src, cache / src.name, ignore=shutil.ignore_patterns(build.STAMP))
    env = {**os.environ, "CHATGLM_SERVE_KERNEL_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "chatglm_serve.kernels.build", "--cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CPU quantized matmul: " in r.stdout and "CPU decode" in r.stdout, r.stdout
    assert "2 of 2 ready" in r.stdout, r.stdout
    stamps = sorted(cache.glob(f"*/{build.STAMP}"))
    assert {p.parent.name.rsplit("_", 1)[0] for p in stamps} == {
        "chatglm_quant_cpu",
        "chatglm_cpu_decode",
    }, stamps
    return cache


def test_prebuilt_kernels_load_without_toolchain_from_a_read_only_cache(aot_cache, tmp_path):
    inputs = _inputs()
    torch.save(inputs, tmp_path / "in.pt")
    empty_bin = tmp_path / "bin"  # PATH: no c++, g++, ninja, nvcc
    empty_bin.mkdir()
    env = {
        "PATH": str(empty_bin),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "CHATGLM_SERVE_KERNEL_CACHE": str(aot_cache),
        "LANG": "C.UTF-8",
    }
    before = _snapshot(aot_cache)
    probe = [sys.executable, "-c", _PROBE, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")]
    cmd, enforced = _read_only(aot_cache, [*probe, str(aot_cache)])
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    got = torch.load(tmp_path / "out.pt")

    assert "no C++ compiler" in got["toolchain"]
    assert all(info["prebuilt"] for info in got["info"]), got["info"]
    assert all(f.startswith(str(aot_cache)) for f in got["files"]), got["files"]
    assert got["read_only"] or not enforced
    assert _snapshot(aot_cache) == before, "loading wrote into the kernel cache"

    # The same numbers as this process's own (compiled or cached) extensions, on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want_qmm = ops.cpu_qmm(inputs["x"], inputs["packed"], inputs["sw"], 4, 32, inputs["n"])
        want_attn = cpu_decode.decode_attention(
            inputs["q"], inputs["k"], inputs["v"], inputs["tables"], inputs["lens"], inputs["scale"]
        )
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got["qmm"], want_qmm)
    assert torch.equal(got["attn"], want_attn)


def test_a_build_that_does_not_match_its_stamp_is_not_imported(aot_cache, tmp_path, monkeypatch):
    src = next(aot_cache.glob("chatglm_quant_cpu_*"))
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    dst.chmod(0o755)  # the copy keeps the a-w modes the other test gave the cache
    monkeypatch.setenv("CHATGLM_SERVE_KERNEL_CACHE", str(tmp_path))
    module, build_dir = build._locate(
        "chatglm_quant_cpu",
        build.CPU_SOURCES,
        build.CPU_HEADERS,
        {"extra_cflags": build._CPU_CFLAGS},
    )
    assert build_dir == dst  # the same fingerprint as the AOT build
    so = dst / f"{module}.so"
    so.chmod(0o644)
    with so.open("ab") as f:
        f.write(b"\0")  # e.g. a build interrupted, or overwritten since
    assert build._import_prebuilt(module, dst) is None
    # ...so loading falls back to compiling, which needs the toolchain
    monkeypatch.setattr(build, "cxx_compiler", lambda: None)
    with pytest.raises(build.KernelUnavailable, match="no C..? compiler"):
        build._load(
            "chatglm_quant_cpu",
            build.CPU_SOURCES,
            build.CPU_HEADERS,
            False,
            extra_cflags=build._CPU_CFLAGS,
            extra_ldflags=build._CPU_LDFLAGS,
        )
    (dst / build.STAMP).unlink()
    assert build._import_prebuilt(module, dst) is None  # no stamp: not a finished build


def test_unwritable_cache_without_a_prebuilt_build_says_what_to_run(tmp_path, monkeypatch):
    try:
        build._check_toolchain()
    except build.KernelUnavailable as e:
        pytest.skip(f"no toolchain: {e}")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CHATGLM_SERVE_KERNEL_CACHE", str(blocker / "kernels"))  # cannot exist
    with pytest.raises(build.KernelUnavailable, match="python -m chatglm_serve.kernels.build"):
        build._load("chatglm_quant_cpu", build.CPU_SOURCES, [], False, extra_cflags=["-O3"])


_TINY = r"""
#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", [] { return 42; }); }
"""

# In a child (a hang is then a timeout, not a stuck test run): a build directory holding the
# `lock` file of a builder that was killed mid-compile; argv: source, cache dir.
_STALE = r"""
import sys
from pathlib import Path

from chatglm_serve.kernels import build

src = [Path(sys.argv[1])]
_, build_dir = build._locate("tiny", src, [], {"extra_cflags": ["-O0"]})
build_dir.mkdir(parents=True)
(build_dir / "lock").write_text("")
mod = build._load("tiny", src, [], False, extra_cflags=["-O0"])
assert mod.answer() == 42 and not (build_dir / "lock").exists()
assert build._load("tiny", src, [], False, extra_cflags=["-O0"]) is mod
print("built past the stale lock")
"""


def test_a_build_killed_mid_compile_does_not_block_the_next(tmp_path):
    """torch's build lock is a plain file that a killed builder leaves behind; the next process
    to build there must not wait on it forever (it holds an flock of its own instead)."""
    try:
        build._check_toolchain()
    except build.KernelUnavailable as e:
        pytest.skip(f"no toolchain: {e}")
    src = tmp_path / "tiny.cpp"
    src.write_text(_TINY)
    out = subprocess.run(
        [sys.executable, "-c", _STALE, str(src)],
        env={**os.environ, "CHATGLM_SERVE_KERNEL_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "built past the stale lock" in out.stdout


def test_cuda_fingerprint_covers_the_target_architectures(monkeypatch):
    kw = {"extra_cuda_cflags": ["-O3"]}
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    a = build._locate("cuda", build.CUDA_SOURCES, build.CUDA_HEADERS, kw)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    b = build._locate("cuda", build.CUDA_SOURCES, build.CUDA_HEADERS, kw)
    assert a != b  # an image built for other GPUs is not taken for this one
    # CPU builds do not depend on it
    c = build._locate("cpu", build.CPU_SOURCES, [], {})
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert build._locate("cpu", build.CPU_SOURCES, [], {}) == c


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch message")
def test_cuda_build_on_cpu_torch_fails_clearly(capsys):
    assert build.main(["--cuda"]) == 1
    out = capsys.readouterr().out
    assert "NOT built" in out and "CPU-only build" in out and "0 of 1 ready" in out
