"""Build the C++/CUDA extensions in `kernels/csrc` once, cache them, load them.

`torch.utils.cpp_extension.load` compiles with ninja into a build directory keyed by a hash of
the sources, the flags, the torch and Python versions, so a second process (or the next test
session) only imports the cached `.so`. Everything that can be missing (a C++ compiler, ninja,
nvcc, a GPU) raises `KernelUnavailable` with a message that says what to install; callers fall
back to plain PyTorch.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = [CSRC / "cpu" / "quant_matmul.cpp"]
CUDA_KERNEL_SOURCES = [CSRC / "cuda" / "quant_gemv.cu"]
CUDA_SOURCES = [CSRC / "cuda" / "bindings.cpp", *CUDA_KERNEL_SOURCES]
CUDA_HEADERS = [CSRC / "cuda" / "quant_gemv.h"]

# -fopenmp: at::parallel_for is a header template; without it the loop runs on one thread.
_CPU_CFLAGS = ["-O3", "-fopenmp"]  # torch picks the C++ standard its headers need
_CPU_LDFLAGS = ["-fopenmp"]
# Hopper is the target; sm_80 keeps A100s working. Override with TORCH_CUDA_ARCH_LIST.
_CUDA_ARCHES = ("80", "90")
# No -std here: torch adds the one its headers need (nvcc rejects a second).
_NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


class KernelUnavailable(RuntimeError):
    """The extension cannot be built or used here; the message says why and what to install."""


def cache_root() -> Path:
    """Where built extensions live: $CHATGLM_SERVE_KERNEL_CACHE or ~/.cache/chatglm-serve/kernels."""
    env = os.environ.get("CHATGLM_SERVE_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chatglm-serve" / "kernels"


def _fingerprint(files: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for part in (*flags, torch.__version__, sys.version, platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def cxx_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def nvcc_path() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime.h), found from CUDA_HOME or nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = nvcc_path()
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        # nvcc may be a wrapper script (`exec /usr/local/cuda-X/bin/nvcc "$@"`): ask it where
        # it lives (its dry run prints `#$ _HERE_=<toolkit>/bin`)
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull],
                capture_output=True,
                text=True,
                timeout=60,
            )
            for line in (out.stdout + out.stderr).splitlines():
                if "_HERE_=" in line:
                    candidates.append(str(Path(line.split("_HERE_=", 1)[1].strip()).parent))
        except (OSError, subprocess.SubprocessError):
            pass
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c) / "include"
    return None


def _check_toolchain() -> None:
    from torch.utils.cpp_extension import is_ninja_available

    if cxx_compiler() is None:
        raise KernelUnavailable(
            "no C++ compiler found (set CXX or install g++, e.g. `apt-get install g++`)"
        )
    if not is_ninja_available():
        raise KernelUnavailable("ninja is not installed (`pip install ninja`)")


def _load(name: str, sources: list[Path], headers: list[Path], verbose: bool, **kw) -> ModuleType:
    from torch.utils.cpp_extension import load

    flags = [*kw.get("extra_cflags", []), *kw.get("extra_cuda_cflags", [])]
    tag = _fingerprint(sources + headers, flags)
    build_dir = cache_root() / f"{name}_{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        log.info(
            "building %s in %s (first use on this machine; about half a minute)", name, build_dir
        )
    try:
        return load(
            name=f"{name}_{tag}",
            sources=[str(s) for s in sources],
            build_directory=str(build_dir),
            verbose=verbose,
            **kw,
        )
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        raise KernelUnavailable(f"building {name} in {build_dir} failed: {e}") from e


# One build/load per process: the loaded module is immutable, and re-running `load` costs a
# ninja check per call, which is why this is cached rather than passed around.
@functools.cache
def load_cpu_kernels(verbose: bool = False) -> ModuleType:
    """The CPU int4/int8 matmul extension (compiled on first use, then cached on disk)."""
    _check_toolchain()
    return _load(
        "chatglm_quant_cpu",
        CPU_SOURCES,
        [],
        verbose,
        extra_cflags=_CPU_CFLAGS,
        extra_ldflags=_CPU_LDFLAGS,
    )


@functools.cache
def cpu_kernels_or_none() -> ModuleType | None:
    """load_cpu_kernels(), or None (logged once) where it cannot be built."""
    try:
        return load_cpu_kernels()
    except KernelUnavailable as e:
        log.warning("CPU quantized kernels unavailable, using the PyTorch fallback: %s", e)
        return None


def _cuda_arch_flags() -> list[str]:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []  # torch's cpp_extension turns it into -gencode flags itself
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in _CUDA_ARCHES]


@functools.cache
def load_cuda_kernels(verbose: bool = False) -> ModuleType:
    """The CUDA weight-only GEMV/dequant extension; needs a CUDA build of torch, nvcc and a GPU."""
    if torch.version.cuda is None:
        raise KernelUnavailable(
            f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch"
        )
    if not torch.cuda.is_available():
        raise KernelUnavailable("no CUDA device is visible (torch.cuda.is_available() is False)")
    if nvcc_path() is None:
        raise KernelUnavailable("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    _check_toolchain()
    return _load(
        "chatglm_quant_cuda",
        CUDA_SOURCES,
        CUDA_HEADERS,
        verbose,
        extra_cflags=["-O3"],
        extra_cuda_cflags=[*_NVCC_FLAGS, *_cuda_arch_flags()],
    )


def nvcc_object_cmd(
    source: Path, out: Path, arch: str = "sm_90", extra: list[str] | None = None
) -> list[str]:
    """The nvcc command compiling one CUDA source to an object file (no GPU needed)."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise KernelUnavailable("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    return [
        nvcc,
        "-c",
        str(source),
        "-o",
        str(out),
        f"-arch={arch}",
        "-std=c++17",
        *_NVCC_FLAGS,
        "-Xcompiler",
        "-Wall",
        "-Werror=all-warnings",
        f"-I{CSRC / 'cuda'}",
        *(extra or []),
    ]


def nvcc_compile_object(
    source: Path, out: Path, arch: str = "sm_90", extra: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Compile one CUDA source to an object file; for tests and CI checks on GPU-less machines."""
    cmd = nvcc_object_cmd(source, out, arch, extra)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)
