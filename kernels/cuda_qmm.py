"""Which CUDA path multiplies a batch of activation rows by a weight-only quantized matrix.

Three paths over the one GPU weight layout (kernels/ops.py `pack_cuda`):
- "gemv": kernels/csrc/cuda/quant_gemv.cu, 1-8 rows; reads the packed weight once per call.
- "gemm": kernels/csrc/cuda/quant_gemm.cu, 1-64 rows (K a multiple of 64); decodes the packed
  weight into tensor-core fragments, still one pass over it.
- "dequant": the whole weight dequantized to fp16/bf16, then cuBLAS (any row count; wins once
  the matmul is compute-bound, i.e. for prefill-sized batches).

1-8 rows always take the GEMV. Above, the choice is a crossover table per (device, N, K, bits,
group, dtype): for a few probe row counts (16, 32, 48, 64), the fastest of GEMM and dequantize +
cuBLAS, measured with CUDA events on the layer's own weight the first time a
batch of more than GEMV_MAX_ROWS rows meets that shape (outside any CUDA graph capture; during
a capture the default table is used and nothing is cached). A row count between two probes takes
the next larger probe's path. `CHATGLM_CUDA_QMM=default` skips the measurement and uses
DEFAULT_TABLE (GEMM up to 64 rows, dequantize + cuBLAS above) everywhere, e.g.
for reproducible benchmarks; `crossover_tables()` returns what was measured (bench/gpu_check.py
prints it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from chatglm_serve.kernels import ops

log = logging.getLogger(__name__)

GEMV_MAX_ROWS, GEMM_MAX_ROWS, GEMM_K_MULTIPLE = (
    ops.GEMV_MAX_ROWS,
    ops.GEMM_MAX_ROWS,
    ops.GEMM_K_MULTIPLE,
)
PROBE_ROWS = (16, 32, 48, 64)  # batches of 9..64 rows; 1-8 always take the GEMV
METHODS = ("gemv", "gemm", "dequant")


def candidates(rows: int, k: int) -> list[str]:
    """The paths that can take `rows` rows of in_features `k`."""
    out = []
    if rows <= GEMV_MAX_ROWS:
        out.append("gemv")
    if rows <= GEMM_MAX_ROWS and k % GEMM_K_MULTIPLE == 0:
        out.append("gemm")
    out.append("dequant")
    return out


@dataclass(frozen=True)
class Crossover:
    """Per probe row count (ascending) the path to use; `times_us` holds the measurements
    (probe rows -> path -> microseconds), empty for the default table."""

    rows: tuple[int, ...]
    methods: tuple[str, ...]
    measured: bool = False
    times_us: Mapping[int, Mapping[str, float]] = field(default_factory=dict)

    def method(self, rows: int, k: int) -> str:
        """The path for a batch of `rows` rows: the GEMV up to 8, else the path of the first
        probe >= rows where it can take the shape, else dequantize + cuBLAS."""
        if rows <= GEMV_MAX_ROWS:
            return "gemv"
        for probe, m in zip(self.rows, self.methods, strict=True):
            if rows <= probe:
                return m if m in candidates(rows, k) else "dequant"
        return "dequant"

    def describe(self) -> str:
        """One line: 'gemv<=8 gemm<=48 dequant<=64 dequant above', runs of equal paths merged."""
        parts: list[str] = [f"gemv<={GEMV_MAX_ROWS}"]
        for probe, m in zip(self.rows, self.methods, strict=True):
            if parts and parts[-1].startswith(m + "<="):
                parts[-1] = f"{m}<={probe}"
            else:
                parts.append(f"{m}<={probe}")
        return " ".join(parts) + " dequant above"


DEFAULT_TABLE = Crossover(
    rows=PROBE_ROWS,
    methods=("gemm",) * len(PROBE_ROWS),
)


def table_from_times(times_us: Mapping[int, Mapping[str, float]]) -> Crossover:
    """The crossover table of measured times (probe rows -> path -> µs): the fastest path at
    each probe."""
    rows = tuple(sorted(times_us))
    methods = tuple(min(times_us[r], key=lambda m: times_us[r][m]) for r in rows)
    return Crossover(rows, methods, measured=True, times_us={r: dict(times_us[r]) for r in rows})


def measure_times(
    run: Callable[[str, int], object],
    k: int,
    timer: Callable[[Callable[[], object]], float],
    probe_rows: tuple[int, ...] = PROBE_ROWS,
) -> dict[int, dict[str, float]]:
    """Time every candidate path at every probe row count: run(method, rows) does one call,
    timer(fn) returns its time in µs."""
    return {r: {m: timer(lambda m=m, r=r: run(m, r)) for m in candidates(r, k)} for r in probe_rows}


def cuda_event_timer(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median µs of `fn` over `reps` runs, each timed with CUDA events after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return sorted(times)[len(times) // 2]


def run_method(
    method: str, x: Tensor, words: Tensor, scale: Tensor, bits: int, group_size: int
) -> Tensor:
    """x [rows, K] @ dequant(W)^T through one path."""
    if method == "gemv":
        return ops.cuda_gemv(x, words, scale, bits, group_size)
    if method == "gemm":
        return ops.cuda_gemm(x, words, scale, bits, group_size)
    if method == "dequant":
        w = ops.cuda_dequantize(words, scale, bits, group_size, x.dtype)
        return torch.nn.functional.linear(x, w)
    raise ValueError(f"unknown quantized matmul path {method!r}; one of {METHODS}")


# One table per weight shape, shared by every layer of that shape in the process (28 layers of
# a 6B model have 4 shapes): measured once, then read on every call. The lock keeps two threads
# from measuring the same shape at once.
_tables: dict[tuple, Crossover] = {}
_lock = threading.Lock()


def crossover_tables() -> dict[tuple, Crossover]:
    """(device, N, K, bits, group, dtype) -> the table in use (measured or default)."""
    with _lock:
        return dict(_tables)


def _measure(words: Tensor, scale: Tensor, bits: int, group_size: int, dtype: torch.dtype):
    n, k = words.shape[0], words.shape[1] * (8 if bits == 4 else 4)
    gen = torch.Generator(device=words.device).manual_seed(0)
    xs = torch.randn(max(PROBE_ROWS), k, device=words.device, dtype=dtype, generator=gen)
    times = measure_times(
        lambda m, r: run_method(m, xs[:r], words, scale, bits, group_size), k, cuda_event_timer
    )
    table = table_from_times(times)
    log.info("quantized matmul crossover N=%d K=%d int%d g%d %s: %s", n, k, bits, group_size,
             dtype, table.describe())  # fmt: skip
    return table


def table_for(words: Tensor, scale: Tensor, bits: int, group_size: int, dtype: torch.dtype):
    """The crossover table of this weight's shape (measured on first use, see module doc)."""
    n, k = words.shape[0], words.shape[1] * (8 if bits == 4 else 4)
    key = (str(words.device), n, k, bits, group_size, dtype)
    with _lock:
        table = _tables.get(key)
        if table is not None:
            return table
        if os.environ.get("CHATGLM_CUDA_QMM", "").lower() == "default":
            table = DEFAULT_TABLE
        elif torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return DEFAULT_TABLE  # no timing inside a capture; measure on the next eager call
        else:
            table = _measure(words, scale, bits, group_size, dtype)
        _tables[key] = table
        return table


def quant_matmul(x: Tensor, words: Tensor, scale: Tensor, bits: int, group_size: int) -> Tensor:
    """x [rows, K] fp16/bf16 on the weight's GPU @ dequant(W)^T -> [rows, N] in x's dtype."""
    rows, k = x.shape
    if x.data_ptr() % 16:
        x = x.clone()  # the kernels load 16 bytes at a time (a view at an odd offset)
    if rows <= GEMV_MAX_ROWS:
        method = "gemv"  # small decode batches: no table lookup on the hottest path
    else:
        method = table_for(words, scale, bits, group_size, x.dtype).method(rows, k)
    return run_method(method, x, words, scale, bits, group_size)
