"""Build the C++/CUDA extensions in `kernels/csrc`, cache them, load them.

Each extension is built into its own directory of the kernel cache, named for a fingerprint of
its sources, flags, the torch and Python versions (and for CUDA the target architectures), so a
directory only ever holds the build of exactly these inputs. A build gets there either

- ahead of time: `python -m chatglm_serve.kernels.build [--cpu] [--cuda]` (the Docker builder stage runs it; no
  GPU needed, the CUDA architectures come from TORCH_CUDA_ARCH_LIST), or
- on first use, through `torch.utils.cpp_extension.load` (ninja and a C++ compiler; nvcc for CUDA).

A finished build leaves a stamp next to its `.so` (`built.json`: the library's sha256 and what it
was built from). A process that finds a stamped `.so` for its fingerprint imports it directly:
no ninja, no compiler, no write access to the cache. That is how a runtime image with a read-only
root and no toolchain uses the kernels its builder stage compiled. Everything that can be missing
(a compiler, ninja, nvcc, a GPU, a writable cache) raises `KernelUnavailable` with a message that
says what to install or run; callers fall back to plain PyTorch.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = [CSRC / "cpu" / "quant_matmul.cpp", CSRC / "cpu" / "quant_bindings.cpp"]
CPU_HEADERS = [CSRC / "cpu" / "cpu_common.h", CSRC / "cpu" / "quant_ops.h"]
# one CUDA extension: the weight-only GEMV/GEMM/dequantize and the paged decode attention
CUDA_KERNEL_SOURCES = [
    CSRC / "cuda" / "quant_gemv.cu",
    CSRC / "cuda" / "quant_gemm.cu",
    CSRC / "cuda" / "paged_attention.cu",
]
CUDA_SOURCES = [CSRC / "cuda" / "bindings.cpp", *CUDA_KERNEL_SOURCES]
CUDA_HEADERS = [
    CSRC / "cuda" / "quant_gemv.h",
    CSRC / "cuda" / "quant_limits.h",
    CSRC / "cuda" / "quant_decode.cuh",
    CSRC / "cuda" / "quant_tile.cuh",
    CSRC / "cuda" / "arg_checks.h",
    CSRC / "cuda" / "paged_attention.h",
]

# -fopenmp: at::parallel_for is a header template; without it the loop runs on one thread.
# -fno-trapping-math: we never unmask FP exceptions, and with them assumed GCC 12 would not
# if-convert a float comparison, so loops with one (SwiGLU's sigmoid, e^x's clamp) stayed
# scalar: 3% of a 16-stream fp32 step on a Zen 3 EPYC. Results are the same; only what may be
# vectorized changes (no reassociation, no change to FMA contraction).
_CPU_CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]  # torch picks the C++ standard
_CPU_LDFLAGS = ["-fopenmp"]
# Hopper is the target; sm_80 keeps A100s working. Override with TORCH_CUDA_ARCH_LIST.
_CUDA_ARCHES = ("80", "90")
# No -std here: torch adds the one its headers need (nvcc rejects a second).
_NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


class KernelUnavailable(RuntimeError):
    """The extension cannot be built or used here; the message says why and what to install."""


class KernelNotBuiltYet(KernelUnavailable):
    """No build in the cache yet, and compiling in this process is held off (a background build
    is making it: engine/kernel_warmup.py)."""


# Cleared while a background process compiles the kernels into the cache, so that loading the
# model never waits a minute for ninja: callers get KernelNotBuiltYet and keep their PyTorch
# paths until forget_unavailable() (after the build) lets them import the finished build.
_compile_here = threading.Event()
_compile_here.set()


def hold_compiling(hold: bool) -> None:
    """Hold off (True) or allow again (False) compiling kernels in this process."""
    if hold:
        _compile_here.clear()
    else:
        _compile_here.set()


def forget_unavailable() -> None:
    """Let the next use of each CPU extension look again (after a background build finished)."""
    from chatglm_serve.kernels import cpu_decode  # it imports this module: only here

    for cached in (
        cpu_kernels_or_none,
        cpu_decode.decode_kernels_or_none,
        cpu_decode.amx_bf16_available,
        cpu_decode.allowed_isas,
    ):
        cached.cache_clear()


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
    # The Python ABI (e.g. ".cpython-311-x86_64-linux-gnu.so"), not sys.version: an image's
    # builder and runtime stages may differ in the patch release, and extensions do not care.
    abi = sysconfig.get_config_var("EXT_SUFFIX") or sys.implementation.cache_tag
    for part in (*flags, torch.__version__, abi, platform.machine()):
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


STAMP = "built.json"  # written next to a finished build's .so; see the module docstring
BUILD_LOCK = ".build.lock"  # flock()ed by the process compiling into the directory (_load)
_BUILD_INFO = "chatglm_build_info"  # attribute set on every module _load returns


def _is_cuda(sources: list[Path]) -> bool:
    return any(s.suffix == ".cu" for s in sources)


def _locate(name: str, sources: list[Path], headers: list[Path], kw: dict) -> tuple[str, Path]:
    """(module name, build directory) of this extension for the current inputs."""
    flags = [*kw.get("extra_cflags", []), *kw.get("extra_cuda_cflags", [])]
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if _is_cuda(sources) and arch_list:
        # torch turns it into -gencode flags outside `flags`: a build for other GPUs must not
        # pass for this one
        flags.append(f"TORCH_CUDA_ARCH_LIST={arch_list}")
    module = f"{name}_{_fingerprint(sources + headers, flags)}"
    return module, cache_root() / module


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _import_prebuilt(module: str, build_dir: Path) -> ModuleType | None:
    """The stamped build in build_dir, imported without ninja; None where there is none (or it
    does not match its stamp: an interrupted build, a file replaced since)."""
    so = build_dir / f"{module}.so"
    try:
        stamp = json.loads((build_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if not so.is_file() or stamp.get("so") != so.name or stamp.get("sha256") != _sha256(so):
        log.warning("%s does not match its build stamp; it will be rebuilt", so)
        return None
    spec = importlib.util.spec_from_file_location(module, so)
    if spec is None or spec.loader is None:
        return None
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except ImportError as e:
        log.warning("prebuilt %s cannot be imported (%s); it will be rebuilt", so, e)
        return None
    log.info("loaded prebuilt %s from %s", module, build_dir)
    setattr(mod, _BUILD_INFO, {"prebuilt": True, "seconds": 0.0, **stamp})
    return mod


def _write_stamp(build_dir: Path, module: str, sources: list[Path], kw: dict, secs: float) -> dict:
    so = build_dir / f"{module}.so"
    stamp = {
        "module": module,
        "so": so.name,
        "sha256": _sha256(so),
        "sources": [s.name for s in sources],
        "flags": {k: v for k, v in kw.items() if isinstance(v, list)},
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")
        if _is_cuda(sources)
        else None,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(secs, 1),
    }
    tmp = build_dir / f".{STAMP}.{os.getpid()}"
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    os.replace(tmp, build_dir / STAMP)  # readers never see half a stamp
    return stamp


def _load(name: str, sources: list[Path], headers: list[Path], verbose: bool, **kw) -> ModuleType:
    """The extension for the current inputs: its prebuilt `.so` when the cache holds one, else
    compiled (ninja) into the cache now."""
    module, build_dir = _locate(name, sources, headers, kw)
    mod = _import_prebuilt(module, build_dir)
    if mod is not None:
        return mod

    _check_toolchain()
    if not _compile_here.is_set():
        raise KernelNotBuiltYet(f"{name} is not built yet (it is being built in the background)")
    if _is_cuda(sources) and nvcc_path() is None:
        raise KernelUnavailable("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(build_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise KernelUnavailable(
            f"no prebuilt {module} in {build_dir}, and the kernel cache cannot be written there; "
            "run `python -m chatglm_serve.kernels.build` where it can, or point CHATGLM_SERVE_KERNEL_CACHE at a "
            "writable directory"
        )
    from torch.utils.cpp_extension import load

    # One builder per build directory at a time, under a lock the OS drops however its holder
    # exits. torch's own lock there (its FileBaton, a plain file named `lock`) stays behind when
    # a builder is killed mid-compile (a daemon stopped during its first start), and every later
    # load then waits on it forever; holding ours, no live builder can own that file.
    with open(build_dir / BUILD_LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        mod = _import_prebuilt(module, build_dir)  # built by the holder this one waited for
        if mod is not None:
            return mod
        (build_dir / "lock").unlink(missing_ok=True)
        log.info(
            "building %s in %s (first use on this machine; about half a minute)", name, build_dir
        )
        t0 = time.monotonic()
        try:
            mod = load(
                name=module,
                sources=[str(s) for s in sources],
                build_directory=str(build_dir),
                verbose=verbose,
                # copies: load() appends torch's own flags to the lists it is given
                **{k: list(v) if isinstance(v, list) else v for k, v in kw.items()},
            )
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            raise KernelUnavailable(f"building {name} in {build_dir} failed: {e}") from e
        secs = time.monotonic() - t0
        stamp = _write_stamp(build_dir, module, sources, kw, secs)
    setattr(mod, _BUILD_INFO, {"prebuilt": False, "seconds": secs, **stamp})
    return mod


def build_info(mod: ModuleType) -> dict:
    """How `mod` (from _load) came to be: `prebuilt` (imported from the cache as is) or compiled
    in this process (`seconds`), plus its stamp (module, sha256, flags, torch, built_at)."""
    return dict(getattr(mod, _BUILD_INFO))


# One build/load per process: the loaded module is immutable, and re-running `load` costs a
# ninja check per call, which is why this is cached rather than passed around.
@functools.cache
def load_cpu_kernels(verbose: bool = False) -> ModuleType:
    """The CPU int4/int8 matmul extension (prebuilt, or compiled on first use; cached on disk)."""
    return _load(
        "chatglm_quant_cpu",
        CPU_SOURCES,
        CPU_HEADERS,
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


def build_cuda_kernels(verbose: bool = False) -> ModuleType:
    """The CUDA extension, prebuilt or compiled now, without needing a GPU: the architectures
    come from TORCH_CUDA_ARCH_LIST (else sm_80 and sm_90), never from the visible devices."""
    if torch.version.cuda is None:
        raise KernelUnavailable(
            f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch"
        )
    return _load(
        "chatglm_quant_cuda",
        CUDA_SOURCES,
        CUDA_HEADERS,
        verbose,
        extra_cflags=["-O3"],
        extra_cuda_cflags=[*_NVCC_FLAGS, *_cuda_arch_flags()],
    )


@functools.cache
def load_cuda_kernels(verbose: bool = False) -> ModuleType:
    """The CUDA extension (weight-only GEMV/dequant, paged decode attention); needs a CUDA build
    of torch, a GPU, and either a prebuilt extension in the cache or nvcc to compile one."""
    if torch.version.cuda is None:
        raise KernelUnavailable(
            f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch"
        )
    if not torch.cuda.is_available():
        raise KernelUnavailable("no CUDA device is visible (torch.cuda.is_available() is False)")
    return build_cuda_kernels(verbose)


@functools.cache
def cuda_kernels_or_none() -> ModuleType | None:
    """load_cuda_kernels(), or None (logged once) where it cannot be built or loaded."""
    try:
        return load_cuda_kernels()
    except KernelUnavailable as e:
        log.warning("CUDA kernels unavailable, using the PyTorch paths: %s", e)
        return None


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


def _cpu_targets() -> list[tuple[str, Callable[[bool], ModuleType]]]:
    from chatglm_serve.kernels import (
        cpu_decode,  # it imports this module: only here, not at the top
    )

    return [
        ("CPU quantized matmul", load_cpu_kernels),
        (
            "CPU decode (paged attention, small and AMX linears, decode step)",
            cpu_decode.load_decode_kernels,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    """`python -m chatglm_serve.kernels.build`: compile the kernels into the cache ahead of time."""
    p = argparse.ArgumentParser(
        prog="python -m chatglm_serve.kernels.build",
        description="Compile chatglm-serve's kernels into the kernel cache ahead of time "
        f"(CHATGLM_SERVE_KERNEL_CACHE, now {cache_root()}), so that later processes import "
        "them without a compiler. With neither flag: --cpu, and --cuda where torch is a CUDA "
        "build and nvcc is installed.",
    )
    p.add_argument(
        "--cpu",
        action="store_true",
        help="the CPU kernels (quantized matmul; decode attention, linears and step)",
    )
    p.add_argument(
        "--cuda",
        action="store_true",
        help="the CUDA kernels, for TORCH_CUDA_ARCH_LIST (default 8.0 and 9.0); no GPU needed",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    args = p.parse_args(argv)
    if not (args.cpu or args.cuda):
        args.cpu = True
        args.cuda = torch.version.cuda is not None and nvcc_path() is not None
    logging.basicConfig(level=logging.INFO, format="kernels.build: %(message)s")

    targets = _cpu_targets() if args.cpu else []
    if args.cuda:
        arches = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(
            f"{a[0]}.{a[1]}" for a in _CUDA_ARCHES
        )
        targets.append(
            (f"CUDA quantized GEMV and decode attention (arch {arches})", build_cuda_kernels)
        )
    failed = 0
    for label, loader in targets:
        try:
            info = build_info(loader(args.verbose))
        except KernelUnavailable as e:
            print(f"chatglm-serve: kernels: {label}: NOT built: {e}", flush=True)
            failed += 1
            continue
        how = "already built" if info["prebuilt"] else f"compiled in {info['seconds']:.1f} s"
        where = cache_root() / info["module"] / info["so"]
        print(f"chatglm-serve: kernels: {label}: {how}: {where}", flush=True)
    print(
        f"chatglm-serve: kernels: {len(targets) - failed} of {len(targets)} ready in {cache_root()}",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    # Run the package's own instance of this module (the one kernels.ops and cpu_decode import), not
    # this __main__ copy, so each extension is loaded once.
    from chatglm_serve.kernels.build import main as _main

    sys.exit(_main())
