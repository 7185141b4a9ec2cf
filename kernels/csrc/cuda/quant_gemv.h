// Launchers of the weight-only quantized CUDA kernels; plain pointers, no torch headers, so the
// kernels compile with nvcc alone (tests do that on machines without a GPU).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "quant_limits.h"

namespace chatglm_quant {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };

// y[B, N] = x[B, K] @ (q * scale)^T, B in 1..kMaxGemvBatch. w: the GPU layout of
// quant_decode.cuh, [N, K/8] (int4) or [N, K/4] (int8) 32-bit words; scale fp32 [N, K/group].
// K must be a multiple of 32 and group a multiple of 32 dividing K.
cudaError_t launch_gemv(const void* x, const uint32_t* w, const float* scale, void* y, int B,
                        int N, int K, int group, int bits, DType dtype, cudaStream_t stream);

// out[N, K] = q * scale in fp16/bf16 (large batches and prefill: the caller then runs cuBLAS).
cudaError_t launch_dequantize(const uint32_t* w, const float* scale, void* out, int N, int K,
                              int group, int bits, DType dtype, cudaStream_t stream);

// y[M, N] = x[M, K] @ (q * scale)^T on tensor cores (quant_gemm.cu), M in 1..kGemmMaxRows (64)
// and K a multiple of 64; same weight layout as the GEMV. splits > 1 slices K (see gemm_splits
// in quant_tile.cuh) and needs an fp32 workspace of splits * M * N floats.
struct GemmArgs {
  const void* x;
  const uint32_t* w;
  const float* scale;
  void* y;
  float* workspace;
  int M, N, K, group, bits, splits;
};
bool gemm_shape_ok(int M, int N, int K, int group, int bits);
cudaError_t launch_gemm(const GemmArgs& args, DType dtype, cudaStream_t stream);

}  // namespace chatglm_quant
