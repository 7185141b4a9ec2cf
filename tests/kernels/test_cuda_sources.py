"""The CUDA kernels: the sources compile with nvcc on any machine (no GPU needed), the decoding
bit tricks are checked on the host, and on a GPU the kernels match the reference."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
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


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Run every compile at once (independent, each takes tens of seconds): the kernels to an
    sm_90 object with ptxas's register report, the host decode check, the torch bindings."""
    if build.nvcc_path() is None:
        pytest.skip("nvcc (CUDA toolkit) not installed")
    out = tmp_path_factory.mktemp("nvcc")
    jobs = {
        "object": build.nvcc_object_cmd(
            build.CUDA_KERNEL_SOURCES[0], out / "quant_gemv.o", "sm_90", ["-Xptxas", "-v"]
        ),
        "decode": [
            build.nvcc_path(), "-std=c++17", f"-I{build.CSRC / 'cuda'}",
            str(HERE / "decode_check.cu"), "-o", str(out / "decode_check"),
        ],
        "bindings": _bindings_cmd(out / "stub"),
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in jobs.items()
    }
    results = {}
    for name, p in procs.items():
        log, _ = p.communicate(timeout=600)
        results[name] = (p.returncode, log)
    return out, results


@needs_nvcc
def test_kernels_compile_for_sm90_without_spills(compiled):
    out, results = compiled
    rc, log = results["object"]
    assert rc == 0, log
    assert (out / "quant_gemv.o").stat().st_size > 0
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and not any(spills), "a kernel spills registers:\n" + log[-3000:]


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
    with pytest.raises(RuntimeError, match="1..8 rows"):
        ops.cuda_gemv(
            torch.randn(9, 64, device="cuda").half(), words, torch.ones(16, 1, device="cuda"), 4, 64
        )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
