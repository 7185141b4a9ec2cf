"""The CUDA paged decode attention kernel (kernels/csrc/cuda/paged_attention.cu): it compiles with
nvcc for sm_90 and sm_80 without register spills on any machine (no GPU needed); on a GPU it
matches dense attention over each sequence's own keys; and model/attention.py falls back to
gather + SDPA wherever the kernel does not apply."""

from __future__ import annotations

import math
import re
import subprocess

import pytest
import torch

from chatglm_serve.kernels import build, cuda_decode
from chatglm_serve.model import attention
from chatglm_serve.model.attention import AttentionMetadata

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SOURCE = build.CSRC / "cuda" / "paged_attention.cu"
ARCHES = ("sm_90", "sm_80")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Both architectures at once (independent compiles), with ptxas's register report."""
    if build.nvcc_path() is None:
        pytest.skip("nvcc (CUDA toolkit) not installed")
    out = tmp_path_factory.mktemp("nvcc_attn")
    procs = {
        arch: subprocess.Popen(
            build.nvcc_object_cmd(
                SOURCE, out / f"paged_attention_{arch}.o", arch, ["-Xptxas", "-v"]
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for arch in ARCHES
    }
    results = {}
    for arch, p in procs.items():
        log, _ = p.communicate(timeout=900)
        results[arch] = (p.returncode, log)
    return out, results


@pytest.mark.parametrize("arch", ARCHES)
def test_attention_kernel_compiles_without_spills(compiled, arch):
    out, results = compiled
    rc, log = results[arch]
    assert rc == 0, log[-4000:]
    assert (out / f"paged_attention_{arch}.o").stat().st_size > 0
    # one report per kernel: the mma kernel (fp16, bf16) and the fp32 one for D = 64 and 128,
    # and the three combine kernels
    kernels = re.findall(r"Compiling entry function '(\w+)'", log)
    assert sum("mma_decode_kernel" in k for k in kernels) == 4, log[-4000:]
    assert sum("simt_decode_kernel" in k for k in kernels) == 2, log[-4000:]
    assert sum("combine_kernel" in k for k in kernels) == 3, log[-4000:]
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills and not any(spills), "a kernel spills registers:\n" + log[-4000:]
    stack = [int(m) for m in re.findall(r"(\d+) bytes stack frame", log)]
    assert not any(stack), "a kernel uses a stack frame (local memory):\n" + log[-4000:]


# ---------------------------------------------------------------- the dispatch (any machine)
def _paged(lens, hq, hkv, d, dtype, device, bs=16, seed=0, extra_blocks=3):
    """A random cache [2, nb, bs, hkv, d] whose sequences own scattered, non-monotonic blocks
    (tables padded with 0), and q [B, hq, d] as a strided view (as the model's fused qkv)."""
    g = torch.Generator().manual_seed(seed)
    need = [(L + bs - 1) // bs for L in lens]
    nb = sum(need) + extra_blocks
    cache = torch.randn(2, nb, bs, hkv, d, generator=g).to(dtype).to(device)
    perm = torch.randperm(nb, generator=g)
    tables = torch.zeros(len(lens), max(need) + 1, dtype=torch.int64)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used : used + n]
        used += n
    qkv = torch.randn(len(lens), hq + 2 * hkv, d, generator=g).to(dtype).to(device)
    q = qkv[:, :hq]  # not contiguous: rows of hq + 2 hkv heads
    return q, cache, tables.to(device), torch.tensor(lens, dtype=torch.int64, device=device)


def _reference(q, k_cache, v_cache, tables, lens, scale):
    """Dense attention of each sequence's query over its own first `len` cached positions."""
    outs = []
    bs = k_cache.shape[1]
    for b in range(q.shape[0]):
        L = int(lens[b])
        blocks = tables[b, : (L + bs - 1) // bs]
        k = k_cache[blocks].flatten(0, 1)[:L].transpose(0, 1).double()  # [Hkv, L, D]
        v = v_cache[blocks].flatten(0, 1)[:L].transpose(0, 1).double()
        qb = q[b].double().unflatten(0, (k.shape[0], -1))  # [Hkv, group, D]
        p = torch.softmax(qb @ k.transpose(1, 2) * scale, dim=-1)
        outs.append((p @ v).flatten(0, 1))
    return torch.stack(outs)


def _meta(tables, lens):
    return AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64, device=tables.device),
        query_start_loc=list(range(len(lens) + 1)),
        seq_lens=[int(x) for x in lens],
        block_tables=tables,
        num_prefills=0,
        block_size=16,
        seq_lens_tensor=lens,
    )


def test_cpu_tensors_are_not_taken_by_the_cuda_kernel():
    q, cache, _, _ = _paged([5, 40], 8, 2, 128, torch.float32, "cpu")
    assert not cuda_decode.attention_supports(q, cache)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without a GPU")
def test_cuda_kernel_unavailable_is_none():
    q, cache, tables, lens = _paged([5, 40], 8, 2, 128, torch.float32, "cpu")
    assert cuda_decode.decode_attention(q, cache[0], cache[1], tables, lens, 0.1) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_falls_back_to_gather_and_sdpa(monkeypatch, dtype):
    """Neither kernel usable (the CUDA one claiming the step but unavailable): gather + SDPA,
    still right for a ragged batch."""
    lens = [1, 16, 17, 70, 33]
    q, cache, tables, lens_t = _paged(lens, 8, 2, 128, dtype, "cpu", seed=1)
    scale = 1 / math.sqrt(128)
    want = _reference(q, cache[0], cache[1], tables, lens_t, scale)
    monkeypatch.setattr(attention.cpu_decode, "attention_supports", lambda q, kv: False)
    monkeypatch.setattr(attention.cuda_decode, "attention_supports", lambda q, kv: True)
    calls = []

    def unavailable(*args):
        calls.append(args)

    monkeypatch.setattr(attention.cuda_decode, "decode_attention", unavailable)
    got = attention._decode_attention(q, cache, _meta(tables, lens_t), scale)
    assert len(calls) == 1  # tried, returned None, fell back
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


# ---------------------------------------------------------------- on a GPU
SHAPES = [(8, 2, 128), (32, 2, 128), (32, 2, 64), (4, 4, 64), (48, 2, 128), (16, 1, 128)]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("hq", "hkv", "d"), SHAPES)
@pytest.mark.parametrize("partition", [0, 16, 48])  # 0 = the kernel's choice; others split
def test_gpu_kernel_matches_dense_attention(dtype, hq, hkv, d, partition):
    lens = [1, 16, 17, 70, 33, 300, 2]
    q, cache, tables, lens_t = _paged(lens, hq, hkv, d, dtype, "cuda", seed=hq * 100 + d)
    scale = 1 / math.sqrt(d)
    assert cuda_decode.attention_supports(q, cache)
    got = cuda_decode.decode_attention(q, cache[0], cache[1], tables, lens_t, scale, partition)
    assert got is not None, "the CUDA extension did not load"
    want = _reference(q, cache[0], cache[1], tables, lens_t, scale)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kernel_long_contexts(dtype):
    """Up to 32k keys (many splits), next to short sequences; large scores (a peaked softmax)."""
    lens = [32768, 1, 5000, 12345]
    q, cache, tables, lens_t = _paged(lens, 32, 2, 128, dtype, "cuda", seed=5)
    q.mul_(4)
    scale = 1 / math.sqrt(128)
    want = _reference(q, cache[0], cache[1], tables, lens_t, scale)
    for partition in (0, 512, 32768):
        got = cuda_decode.decode_attention(q, cache[0], cache[1], tables, lens_t, scale, partition)
        torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


@needs_gpu
def test_gpu_kernel_odd_block_size_and_cuda_graph():
    """Block size 8 (a key step spans blocks), and the launch captured in a CUDA graph replays
    with new lengths (the grid depends only on shapes)."""
    lens = [9, 40, 1]
    q, cache, tables, lens_t = _paged(lens, 32, 2, 128, torch.float16, "cuda", bs=8, seed=9)
    tables = torch.cat([tables, torch.zeros_like(tables)], 1)  # room to grow
    scale = 1 / math.sqrt(128)
    want = _reference(q, cache[0], cache[1], tables, lens_t, scale)
    got = cuda_decode.decode_attention(q, cache[0], cache[1], tables, lens_t, scale)
    torch.testing.assert_close(got.double(), want, atol=4e-3, rtol=4e-3)

    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_decode.decode_attention(q, cache[0], cache[1], tables, lens_t, scale)  # warm-up
        with torch.cuda.graph(graph, stream=stream):
            out = cuda_decode.decode_attention(q, cache[0], cache[1], tables, lens_t, scale)
    torch.cuda.current_stream().wait_stream(stream)
    lens_t.copy_(torch.tensor([3, 41, 8], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    want = _reference(q, cache[0], cache[1], tables, lens_t, scale)
    torch.testing.assert_close(out.double(), want, atol=4e-3, rtol=4e-3)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_attention_dispatch(monkeypatch, dtype):
    """model/attention.py takes the kernel on CUDA, and agrees with its gather + SDPA path."""
    lens = [1, 16, 17, 70, 33]
    q, cache, tables, lens_t = _paged(lens, 32, 2, 128, dtype, "cuda", seed=3)
    scale = 1 / math.sqrt(128)
    calls = []
    real = cuda_decode.decode_attention

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(attention.cuda_decode, "decode_attention", counted)
    with_kernel = attention._decode_attention(q, cache, _meta(tables, lens_t), scale)
    assert calls == [1]
    monkeypatch.setattr(attention.cuda_decode, "attention_supports", lambda q, kv: False)
    without = attention._decode_attention(q, cache, _meta(tables, lens_t), scale)
    assert calls == [1]
    torch.testing.assert_close(with_kernel.float(), without.float(), atol=2e-2, rtol=2e-2)


@needs_gpu
def test_gpu_unsupported_shapes_fall_back():
    q, cache, _, _ = _paged([5], 6, 2, 40, torch.float16, "cuda")  # head_dim 40
    assert not cuda_decode.attention_supports(q, cache)
    q, cache, _, _ = _paged([5], 8, 2, 128, torch.float64, "cuda")
    assert not cuda_decode.attention_supports(q, cache)


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-v"]))
