// Tile geometry and fragment indexing of the weight-only tensor-core GEMM (quant_gemm.cu),
// host- and device-compiled: tests/kernels/gemm_check.cu walks every fragment of a weight on the
// host with these very functions and compares what they decode with the plain dequantization.
//
// The GEMM computes y[M, N] = x[M, K] @ W^T with mma.m16n8k16 (fp32 accumulation): A = x rows,
// B[k][n] = W[n][k]. It reads W in the GPU word layout of quant_decode.cuh as it is (no repack):
// a B fragment wants, for lane (g = lane / 4, t = lane % 4), the k pairs (2t, 2t+1) and
// (2t+8, 2t+9) of weight row g, and that layout stores every k pair (2i, 2i+1) in one word's two
// 16-bit halves, so each register of the fragment is one pair decoded from one word.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "quant_decode.cuh"
#include "quant_limits.h"

namespace chatglm_quant {

template <int BITS>
struct GemmWords {
  static constexpr int kPerWord = BITS == 4 ? 8 : 4;        // k per 32-bit word
  static constexpr int kPerRow = kGemmBK / kPerWord;        // words of one row in a stage: 8 / 16
  static constexpr int kStride = kPerRow + 4;               // padded (12 / 20): bank-conflict-free
  static constexpr int kChunks = kPerRow / 4;               // 16-byte copies per row and stage
};

// Bytes of dynamic shared memory for `m_tiles` m16 tiles.
template <int BITS>
constexpr int gemm_smem_bytes(int m_tiles) {
  return kGemmStages * (m_tiles * 16 * kGemmXStride * 2 + kGemmBN * GemmWords<BITS>::kStride * 4);
}

// Where the k pair (k, k+1) (k even) of a row lives: word k / per_word, pair index within it.
struct PairAt {
  int word;
  int pair;
};
template <int BITS>
__host__ __device__ inline PairAt pair_at(int k) {
  constexpr int per_word = GemmWords<BITS>::kPerWord;
  return PairAt{k / per_word, (k % per_word) / 2};
}

// The B fragment register `reg` (0 or 1) of lane quad index t covers k pair k16 + 2t + 8 reg.
__host__ __device__ inline int b_frag_k(int k16, int t, int reg) { return k16 + 2 * t + 8 * reg; }

// One k pair of one weight row, dequantized to two T packed in 32 bits (low half = lower k),
// exactly as the plain dequantization rounds q * scale: fp16 multiplies the exact q by the
// scale in half precision (the scale is an fp16 value and q * scale is exact in fp32, so one
// rounding either way); bf16 cannot hold an fp16 scale, so it multiplies in fp32 and rounds.
template <typename T, int BITS>
__host__ __device__ inline uint32_t dequant_pair(uint32_t word, int pair, float scale);

template <>
__host__ __device__ inline uint32_t dequant_pair<__half, 4>(uint32_t word, int pair, float scale) {
  const __half2 h = __hmul2(int4_pair_half2(word, pair), __float2half2_rn(scale));
  const __half2_raw r = h;
  return static_cast<uint32_t>(r.x) | (static_cast<uint32_t>(r.y) << 16);
}
template <>
__host__ __device__ inline uint32_t dequant_pair<__half, 8>(uint32_t word, int pair, float scale) {
  const __half2 h = __hmul2(int8_pair_half2(word, pair), __float2half2_rn(scale));
  const __half2_raw r = h;
  return static_cast<uint32_t>(r.x) | (static_cast<uint32_t>(r.y) << 16);
}

template <int BITS>
__host__ __device__ inline uint32_t dequant_pair_bf16(uint32_t word, int pair, float scale) {
  const float2 q = BITS == 4 ? int4_pair_float2(word, pair) : int8_pair_float2(word, pair);
  const __nv_bfloat162 h = __floats2bfloat162_rn(q.x * scale, q.y * scale);
  const __nv_bfloat162_raw r = h;
  return static_cast<uint32_t>(r.x) | (static_cast<uint32_t>(r.y) << 16);
}
template <>
__host__ __device__ inline uint32_t dequant_pair<__nv_bfloat16, 4>(uint32_t word, int pair,
                                                                   float scale) {
  return dequant_pair_bf16<4>(word, pair, scale);
}
template <>
__host__ __device__ inline uint32_t dequant_pair<__nv_bfloat16, 8>(uint32_t word, int pair,
                                                                   float scale) {
  return dequant_pair_bf16<8>(word, pair, scale);
}

// The k tiles [begin, end) of split `s` of `splits` over `k_tiles` tiles (even shares).
struct TileRange {
  int begin;
  int end;
};
__host__ __device__ inline TileRange split_tiles(int k_tiles, int splits, int s) {
  return TileRange{static_cast<int>(static_cast<int64_t>(k_tiles) * s / splits),
                   static_cast<int>(static_cast<int64_t>(k_tiles) * (s + 1) / splits)};
}

}  // namespace chatglm_quant
