"""Quantized-matmul kernels: C++ (CPU: AMX / AVX-512 VNNI / AVX2 / portable) and CUDA sources in
`csrc/`, built on first use by `build.py` (cached on disk), called through `ops.py`."""
