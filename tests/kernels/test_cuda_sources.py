"""The CUDA kernels: the sources compile with nvcc on any machine (no GPU needed), the decoding
bit tricks are checked on the host, and on a GPU the kernels match the reference."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from chatglm_serve.kernels import build, ops

needs_nvcc = pytest.mark.skipif(
    build.nvcc_path() is None, reason="nvcc (CUDA toolkit) not installed"
)
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"
)
HERE = Path(__file__).resolve().parent


def _bindings_cmd(stub_root: Path) -> list[str]:
    """bindings.cpp against this torch's headers, syntax only. A CPU build of torch lacks one
    generated CUDA header; it only carries a build macro, so a stub stands in for it."""
    from torch.utils.cpp_extension import include_paths

    stub = stub_root / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cuda_inc = build.cuda_include_dir()
    assert cuda_inc is not None, "nvcc is installed but its include directory was not found"
    incs = [*include_paths(), sysconfig.get_paths()["include"], str(stub_root), str(cuda_inc)]
    return [
        build.cxx_compiler(), "-fsyntax-only", "-std=c++20", "-Wall",
        "-DTORCH_EXTENSION_NAME=chatglm_quant_cuda_check",
        *[f"-I{p}" for p in incs], str(build.CSRC / "cuda" / "bindings.cpp"),
    ]  # fmt: skip


QUANT_SOURCES = [s for s in build.CUDA_KERNEL_SOURCES if s.name.startswith("quant_")]
ARCHES = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every compile of this file, two at a time (the machines running tests are small): the
    quantized kernels to sm_80 and sm_90 objects with ptxas's register report, the host checks
    of the decoding and of the GEMM's tiles, the torch bindings (syntax)."""
    if build.nvcc_path() is None:
        pytest.skip("nvcc (CUDA toolkit) not installed")
    out = tmp_path_factory.mktemp("nvcc")
    host = [build.nvcc_path(), "-std=c++17", f"-I{build.CSRC / 'cuda'}"]
    jobs = {
        f"{src.stem}_{arch}": build.nvcc_object_cmd(
            src, out / f"{src.stem}_{arch}.o", arch, ["-Xptxas", "-v"]
        )
        for src in QUANT_SOURCES
        for arch in ARCHES
    }
    jobs["decode"] = [*host, str(HERE / "decode_check.cu"), "-o", str(out / "decode_check")]
    jobs["gemm_check"] = [*host, str(HERE / "gemm_check.cu"), "-o", str(out / "gemm_check")]
    jobs["bindings"] = _bindings_cmd(out / "stub")

    def run(cmd):
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return p.returncode, p.stdout

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, cmd) for name, cmd in jobs.items()}
        results = {name: f.result(timeout=900) for name, f in futures.items()}
    return out, results


def register_report(log: str) -> dict[str, tuple[int, int, int]]:
    """ptxas -v output -> {kernel: (registers, spill bytes, stack frame bytes)}."""
    report = {}
    for m in re.finditer(
        r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
        r"(\d+) bytes spill loads.*?Used (\d+) registers",
        log,
        re.S,
    ):
        name, stack, st, ld, regs = m.groups()
        report[name] = (int(regs), int(st) + int(ld), int(stack))
    return report


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("source", [s.stem for s in QUANT_SOURCES])
def test_kernels_compile_without_spills(compiled, source, arch):
    out, results = compiled
    rc, log = results[f"{source}_{arch}"]
    assert rc == 0, log[-4000:]
    assert (out / f"{source}_{arch}.o").stat().st_size > 0
    report = register_report(log)
    # gemv: 2 dtypes x 2 bit widths x batch 1..8, dequant: 4; gemm: 4 x 3 m-tile counts, reduce: 2
    expected = {"quant_gemv": {"gemv_kernel": 32, "dequant_kernel": 4},
                "quant_gemm": {"gemm_kernel": 12, "gemm_reduce_kernel": 2}}[source]  # fmt: skip
    for kernel, count in expected.items():
        assert sum(f"{len(kernel)}{kernel}" in k for k in report) == count, sorted(report)
    assert not any(spill for _, spill, _ in report.values()), "spills:\n" + log[-3000:]
    assert not any(stack for _, _, stack in report.values()), "stack frame:\n" + log[-3000:]
    # recorded in the test log (pytest -s / -rP), see bench/README.md for the table
    print(f"\n{source} {arch}: max {max(r for r, _, _ in report.values())} registers")
    for name, (regs, _, _) in sorted(report.items()):
        print(f"  {regs:4d}  {name}")


@needs_nvcc
@pytest.mark.parametrize("bits", [4, 8])
def test_decode_tricks_on_the_host(compiled, tmp_path, bits):
    """quant_decode.cuh (what the kernels use) decodes pack_cuda's words back to q exactly."""
    out, results = compiled
    rc, log = results["decode"]
    assert rc == 0, log
    lo, hi = (-8, 8) if bits == 4 else (-127, 128)
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(lo, hi, (7, 256), generator=g, dtype=torch.int8)
    q[0, :16] = torch.arange(lo, lo + 16)  # the extremes
    q[1, :16] = torch.arange(hi - 16, hi)
    words = ops.pack_cuda(q, bits)
    words.numpy().tofile(tmp_path / "w.bin")
    subprocess.run(
        [str(out / "decode_check"), str(bits), str(tmp_path / "w.bin"), str(tmp_path / "o.bin")],
        check=True,
    )
    dec = torch.from_numpy(np.fromfile(tmp_path / "o.bin", dtype=np.float32)).view(7, -1, 4)
    via_half2 = dec[..., :2].reshape(7, -1)
    via_float2 = dec[..., 2:].reshape(7, -1)
    assert torch.equal(via_half2, q.float())
    assert torch.equal(via_float2, q.float())


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (4, None), (8, 64), (8, None)])
def test_gemm_tiles_dequantize_exactly_on_the_host(compiled, tmp_path, dtype, bits, group):
    """The tensor-core GEMM's fragment walk (every block, warp, lane and register, with the
    kernel's own indexing and decoding from quant_tile.cuh) and the dequantizer kernel's walk
    rebuild exactly the plain dequantization (QuantLinear's reference) from the words as loaded,
    every element once; N = 200 leaves a partial block. The K-split ranges cover every tile
    once and the split heuristic stays in its bounds (checked inside gemm_check)."""
    from chatglm_serve.model.quantize import dequantize, quantize_weight

    out, results = compiled
    rc, log = results["gemm_check"]
    assert rc == 0, log
    n, k = 200, 512
    g = torch.Generator().manual_seed(bits * 1000 + (group or 0))
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, 5] = 40.0  # one large weight: a large scale in its row/group
    q, scale = quantize_weight(w, bits, group)
    scale = scale.float().reshape(n, -1)
    ops.pack_cuda(q, bits).numpy().tofile(tmp_path / "w.bin")
    scale.numpy().tofile(tmp_path / "s.bin")
    files = [str(tmp_path / f) for f in ("w.bin", "s.bin", "tiles.bin", "deq.bin")]
    args = [str(bits), str(int(dtype == torch.bfloat16)), str(n), str(k), str(group or k)]
    proc = subprocess.run([str(out / "gemm_check"), *args, *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "splits K=4096 N=4608" in proc.stdout
    want = dequantize(q, scale, dtype)
    for f in files[2:]:
        got = torch.from_numpy(np.fromfile(f, dtype=np.int16)).view(dtype).view(n, k)
        assert torch.equal(got, want), f


@needs_nvcc
def test_bindings_compile_against_torch(compiled):
    rc, log = compiled[1]["bindings"]
    assert rc == 0, log[-4000:]


def test_no_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(build.KernelUnavailable, match="CPU-only build|no CUDA device"):
        build.load_cuda_kernels()


# ---------------------------------------------------------------- on a GPU
SHAPES_6B = [(4096, 4608), (4096, 4096), (4096, 27392), (13696, 4096)]  # (K, N) per layer


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(4, None), (4, 128), (8, None)])
def test_gpu_kernels_match_reference(dtype, bits, group):
    from chatglm_serve.model.quantize import QuantLinear, QuantSpec

    for k, n in SHAPES_6B:
        g = torch.Generator(device="cuda").manual_seed(k + n)
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        lin = QuantLinear(k, n, False, QuantSpec(bits, group), from_checkpoint=False, name="gpu")
        lin.load_weight("weight", w)
        lin.finalize()
        assert lin.path == "cuda_kernel"
        wd = lin.dequantized_weight()
        x_all = torch.randn(64, k, device="cuda", generator=g)
        ref_all = x_all.to(dtype).float() @ wd.t()
        for batch in range(1, 65):
            y = lin(x_all[:batch].to(dtype))
            assert y.dtype == dtype and y.shape == (batch, n)
            ref = ref_all[:batch]
            rel = ((y.float() - ref).norm() / ref.norm()).item()
            assert rel < 5e-3, (k, n, batch, rel)


@needs_gpu
def test_gpu_odd_sizes_are_rejected_or_handled():
    from chatglm_serve.model.quantize import QuantLinear, QuantSpec

    lin = QuantLinear(48, 40, False, QuantSpec(4), from_checkpoint=False, name="odd")
    lin.load_weight("weight", torch.randn(40, 48, device="cuda"))
    lin.finalize()
    assert lin.path == "torch"  # K % 32 != 0: dequantize per call instead of the kernel
    x = torch.randn(3, 48, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(
        lin(x).float(), x.float() @ lin.dequantized_weight().t(), rtol=1e-2, atol=1e-2
    )
    words = ops.pack_cuda(torch.zeros(16, 64, dtype=torch.int8, device="cuda"), 4)
    with pytest.raises(ValueError, match=r"1\.\.8 rows"):
        ops.cuda_gemv(
            torch.randn(9, 64, device="cuda").half(), words, torch.ones(16, 1, device="cuda"), 4, 64
        )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
