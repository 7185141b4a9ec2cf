"""The choice between the quantized CUDA paths (kernels/cuda_qmm.py): the crossover table built
from measurements, its lookups, and the routing; CPU-only (fake timings, fake paths), plus the
paths against the reference where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from chatglm_serve.kernels import cuda_qmm, ops

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_candidates_follow_the_kernels_limits():
    assert cuda_qmm.candidates(1, 4096) == ["gemv", "gemm", "dequant"]
    assert cuda_qmm.candidates(8, 4096) == ["gemv", "gemm", "dequant"]
    assert cuda_qmm.candidates(9, 4096) == ["gemm", "dequant"]
    assert cuda_qmm.candidates(64, 4096) == ["gemm", "dequant"]
    assert cuda_qmm.candidates(65, 4096) == ["dequant"]
    assert cuda_qmm.candidates(16, 96) == ["dequant"]  # K not a multiple of 64: no GEMM
    assert cuda_qmm.candidates(4, 96) == ["gemv", "dequant"]


def test_table_from_measured_times_picks_the_fastest_and_the_next_probe():
    times = {
        16: {"gemm": 20.0, "dequant": 140.0},
        32: {"gemm": 30.0, "dequant": 141.0},
        48: {"gemm": 160.0, "dequant": 142.0},
        64: {"gemm": 200.0, "dequant": 143.0},
    }
    table = cuda_qmm.table_from_times(times)
    assert table.measured and table.rows == (16, 32, 48, 64)
    assert table.methods == ("gemm", "gemm", "dequant", "dequant")
    assert [table.method(r, 4096) for r in (1, 8, 9, 16, 17, 32, 33, 48, 64, 65, 512)] == [
        "gemv", "gemv", "gemm", "gemm", "gemm", "gemm", "dequant", "dequant", "dequant",
        "dequant", "dequant",
    ]  # fmt: skip
    assert table.method(20, 96) == "dequant"  # the GEMM cannot take K = 96
    assert table.describe() == "gemv<=8 gemm<=32 dequant<=64 dequant above"
    assert table.times_us[48]["dequant"] == 142.0


def test_default_table_is_gemv_then_gemm_then_dequant():
    t = cuda_qmm.DEFAULT_TABLE
    assert not t.measured
    assert [t.method(r, 4096) for r in (1, 8, 9, 64, 65)] == [
        "gemv", "gemv", "gemm", "gemm", "dequant",
    ]  # fmt: skip


def test_measure_times_runs_every_candidate_at_every_probe():
    calls = []

    def run(method, rows):
        calls.append((method, rows))

    def timer(fn):
        fn()
        method, rows = calls[-1]
        return {"gemm": 1.0, "dequant": 2.0}[method] * rows

    times = cuda_qmm.measure_times(run, 4096, timer)
    assert sorted(times) == list(cuda_qmm.PROBE_ROWS)
    assert times[64] == {"gemm": 64.0, "dequant": 128.0}
    assert set(calls) == {(m, r) for r in cuda_qmm.PROBE_ROWS for m in ("gemm", "dequant")}
    assert cuda_qmm.measure_times(run, 96, timer)[16] == {"dequant": 32.0}


def test_quant_matmul_routes_by_rows_and_measures_once_per_shape(monkeypatch):
    seen, measured = [], []
    monkeypatch.setattr(cuda_qmm, "run_method", lambda m, x, *a: seen.append((m, x.shape[0])))
    monkeypatch.setattr(cuda_qmm, "_tables", {})
    monkeypatch.delenv("CHATGLM_CUDA_QMM", raising=False)

    def fake_measure(words, scale, bits, group, dtype):
        measured.append((tuple(words.shape), dtype))
        return cuda_qmm.table_from_times(
            {r: {"gemm": 1.0 if r <= 32 else 9.0, "dequant": 5.0} for r in cuda_qmm.PROBE_ROWS}
        )

    monkeypatch.setattr(cuda_qmm, "_measure", fake_measure)
    words = torch.zeros(16, 512 // 8, dtype=torch.int32)
    scale = torch.ones(16, 4)
    for rows in (1, 8, 9, 32, 40, 64, 100):
        cuda_qmm.quant_matmul(torch.zeros(rows, 512).half(), words, scale, 4, 128)
    assert seen == [("gemv", 1), ("gemv", 8), ("gemm", 9), ("gemm", 32), ("dequant", 40),
                    ("dequant", 64), ("dequant", 100)]  # fmt: skip
    assert measured == [((16, 64), torch.float16)]  # once, on the first batch over 8 rows
    cuda_qmm.quant_matmul(torch.zeros(20, 512).bfloat16(), words, scale, 4, 128)
    assert measured[-1] == ((16, 64), torch.bfloat16)  # another dtype: its own table
    assert len(cuda_qmm.crossover_tables()) == 2


def test_default_env_skips_the_measurement(monkeypatch):
    monkeypatch.setattr(cuda_qmm, "_tables", {})
    monkeypatch.setenv("CHATGLM_CUDA_QMM", "default")
    monkeypatch.setattr(cuda_qmm, "_measure", lambda *a: pytest.fail("measured"))
    words, scale = torch.zeros(16, 64, dtype=torch.int32), torch.ones(16, 4)
    assert cuda_qmm.table_for(words, scale, 4, 128, torch.float16) is cuda_qmm.DEFAULT_TABLE


def test_unknown_path_is_an_error():
    with pytest.raises(ValueError, match="unknown quantized matmul path"):
        cuda_qmm.run_method("cutlass", torch.zeros(1, 64), torch.zeros(1, 8), torch.ones(1), 4, 64)


# ---------------------------------------------------------------- on a GPU
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(4, 128), (4, None), (8, None), (8, 32)])
def test_gpu_every_path_matches_the_reference(dtype, bits, group):
    """GEMV, tensor-core GEMM (every split count it may pick, and forced ones) and dequantize +
    cuBLAS agree with x @ dequant(W)^T; the dequantized weight equals the plain one exactly."""
    from chatglm_serve.model.quantize import dequantize, quantize_weight

    for k, n in [(4096, 4608), (13696, 4096), (256, 200)]:
        g = torch.Generator(device="cuda").manual_seed(k + n + bits)
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        q, scale = quantize_weight(w, bits, group)
        scale = scale.float().reshape(n, -1).contiguous()
        words = ops.pack_cuda(q, bits)
        gs = group or k
        ref_w = dequantize(q, scale, dtype)
        assert torch.equal(ops.cuda_dequantize(words, scale, bits, gs, dtype), ref_w)
        x_all = torch.randn(64, k, device="cuda", generator=g).to(dtype)
        ref_all = x_all.float() @ ref_w.float().t()
        for rows in (1, 5, 8, 9, 16, 17, 31, 32, 33, 48, 63, 64):
            x, ref = x_all[:rows], ref_all[:rows]
            outs = {m: cuda_qmm.run_method(m, x, words, scale, bits, gs)
                    for m in cuda_qmm.candidates(rows, k)}  # fmt: skip
            if "gemm" in outs:
                for splits in (1, 3, 16):
                    if k // 64 >= splits:
                        outs[f"gemm/{splits}"] = ops.cuda_gemm(x, words, scale, bits, gs, splits)
            for name, y in outs.items():
                assert y.dtype == dtype and y.shape == (rows, n)
                rel = ((y.float() - ref).norm() / ref.norm()).item()
                assert rel < 5e-3, (k, n, rows, name, rel)


def test_misaligned_rows_are_copied_before_the_kernels(monkeypatch):
    seen = []
    monkeypatch.setattr(cuda_qmm, "run_method", lambda m, x, *a: seen.append(x.data_ptr() % 16))
    x = torch.zeros(4 * 512 + 1, dtype=torch.float16)[1:].view(4, 512)  # 2 bytes off
    cuda_qmm.quant_matmul(x, torch.zeros(16, 64, dtype=torch.int32), torch.ones(16, 4), 4, 128)
    assert seen == [0]


def test_no_measurement_inside_a_graph_capture(monkeypatch):
    """A capture cannot time anything: the default table, not cached, so the next eager call
    measures."""
    monkeypatch.setattr(cuda_qmm, "_tables", {})
    monkeypatch.delenv("CHATGLM_CUDA_QMM", raising=False)
    monkeypatch.setattr(cuda_qmm, "_measure", lambda *a: pytest.fail("measured in a capture"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    words, scale = torch.zeros(16, 64, dtype=torch.int32), torch.ones(16, 4)
    assert cuda_qmm.table_for(words, scale, 4, 128, torch.float16) is cuda_qmm.DEFAULT_TABLE
    assert cuda_qmm.crossover_tables() == {}
