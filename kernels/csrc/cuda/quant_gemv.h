// Launchers of the weight-only quantized CUDA kernels; plain pointers, no torch headers, so the
// kernels compile with nvcc alone (tests do that on machines without a GPU).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace chatglm_quant {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };

constexpr int kMaxGemvBatch = 8;

// y[B, N] = x[B, K] @ (q * scale)^T, B in 1..kMaxGemvBatch. w: the GPU layout of
// quant_decode.cuh, [N, K/8] (int4) or [N, K/4] (int8) 32-bit words; scale fp32 [N, K/group].
// K must be a multiple of 32 and group a multiple of 32 dividing K.
cudaError_t launch_gemv(const void* x, const uint32_t* w, const float* scale, void* y, int B,
                        int N, int K, int group, int bits, DType dtype, cudaStream_t stream);

// out[N, K] = q * scale in fp16/bf16 (prefill: the caller then runs cuBLAS on it).
cudaError_t launch_dequantize(const uint32_t* w, const float* scale, void* out, int N, int K,
                              int group, int bits, DType dtype, cudaStream_t stream);

}  // namespace chatglm_quant
