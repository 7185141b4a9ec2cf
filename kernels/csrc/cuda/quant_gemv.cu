// Weight-only int4/int8 kernels for CUDA: a GEMV for decode (batch 1-8, memory-bound: the point
// is to read 4x/2x fewer weight bytes than fp16) and a dequantizer for prefill (the caller feeds
// its output to cuBLAS, whose tensor cores win once the matmul is compute-bound).
//
// GEMV: each warp owns kRows output rows; each lane streams 16 bytes of every row per step (32 k
// for int4, 16 for int8), decodes them in registers (quant_decode.cuh), multiplies with the
// activations of all B batch rows (read through L1: every warp of the SM shares them), and the
// warp reduces at the end. The weight is read with an evict-first load, so it does not push
// the activations out of L1. fp16 activations multiply in half2 (4 products per word, then
// fp32); bf16 ones in fp32, as bf16's 8-bit mantissa cannot hold the partial sums.
#include "quant_decode.cuh"
#include "quant_gemv.h"
#include "quant_tile.cuh"

namespace chatglm_quant {
namespace {

constexpr int kWarps = 4;  // warps per block
constexpr int kRows = 2;   // output rows per warp: each activation load serves two weight rows

template <int BITS>
struct Fmt {
  static constexpr int kPerWord = BITS == 4 ? 8 : 4;  // k per 32-bit word
  static constexpr int kPerVec = 4 * kPerWord;        // k per 16-byte load
  static constexpr int kPairs = kPerWord / 2;         // half2 pairs per word
};

// The activations of one word's k range, as pairs.
template <typename T, int BITS>
struct XPairs;

template <int BITS>
struct XPairs<__half, BITS> {
  __half2 p[Fmt<BITS>::kPairs];
  __device__ void load(const __half* src) {
    if constexpr (BITS == 4) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
      p[0] = bits_to_half2(v.x), p[1] = bits_to_half2(v.y);
      p[2] = bits_to_half2(v.z), p[3] = bits_to_half2(v.w);
    } else {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
      p[0] = bits_to_half2(v.x), p[1] = bits_to_half2(v.y);
    }
  }
};

template <int BITS>
struct XPairs<__nv_bfloat16, BITS> {
  float2 p[Fmt<BITS>::kPairs];
  __device__ void load(const __nv_bfloat16* src) {
    uint32_t u[Fmt<BITS>::kPairs];
    if constexpr (BITS == 4) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
      u[0] = v.x, u[1] = v.y, u[2] = v.z, u[3] = v.w;
    } else {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
      u[0] = v.x, u[1] = v.y;
    }
    // bf16 -> fp32 is a shift: the low element sits in the low 16 bits.
#pragma unroll
    for (int i = 0; i < Fmt<BITS>::kPairs; ++i)
      p[i] = make_float2(bits_to_float(u[i] << 16), bits_to_float(u[i] & 0xFFFF0000u));
  }
};

__device__ __forceinline__ float dot_word(uint32_t word, const XPairs<__half, 4>& x) {
  __half2 acc = __hmul2(int4_pair_half2(word, 0), x.p[0]);
#pragma unroll
  for (int i = 1; i < 4; ++i) acc = __hfma2(int4_pair_half2(word, i), x.p[i], acc);
  const float2 f = __half22float2(acc);
  return f.x + f.y;
}

__device__ __forceinline__ float dot_word(uint32_t word, const XPairs<__half, 8>& x) {
  const __half2 acc = __hfma2(int8_pair_half2(word, 1), x.p[1], __hmul2(int8_pair_half2(word, 0), x.p[0]));
  const float2 f = __half22float2(acc);
  return f.x + f.y;
}

template <int BITS>
__device__ __forceinline__ float dot_word(uint32_t word, const XPairs<__nv_bfloat16, BITS>& x) {
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < Fmt<BITS>::kPairs; ++i) {
    const float2 q = BITS == 4 ? int4_pair_float2(word, i) : int8_pair_float2(word, i);
    acc = fmaf(q.x, x.p[i].x, acc);
    acc = fmaf(q.y, x.p[i].y, acc);
  }
  return acc;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int BITS, int B>
// min 4 blocks per SM: ptxas may then use up to 128 registers (on sm_80 without it, it chose
// 64 for batch 4 and spilled)
__global__ void __launch_bounds__(kWarps * 32, 4)
    gemv_kernel(const T* __restrict__ x, const uint32_t* __restrict__ w,
                const float* __restrict__ scale, T* __restrict__ y, int N, int K, int group) {
  using F = Fmt<BITS>;
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kWarps + threadIdx.x / 32) * kRows;
  if (row0 >= N) return;
  const int words_per_row = K / F::kPerWord;
  const int nvec = K / F::kPerVec;
  const int groups = K / group;
  float acc[kRows][B];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = 0.f;

  for (int v = lane; v < nvec; v += 32) {
    const int k0 = v * F::kPerVec;
    uint4 wv[kRows];
    float s[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = min(row0 + r, N - 1);  // a missing last row repeats one (never stored)
      wv[r] = __ldcs(reinterpret_cast<const uint4*>(w + static_cast<size_t>(row) * words_per_row) + v);
      s[r] = __ldg(scale + static_cast<size_t>(row) * groups + k0 / group);
    }
    float part[kRows][B];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int b = 0; b < B; ++b) part[r][b] = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int kk = k0 + j * F::kPerWord;
#pragma unroll
      for (int b = 0; b < B; ++b) {
        XPairs<T, BITS> xp;
        xp.load(x + static_cast<size_t>(b) * K + kk);
#pragma unroll
        for (int r = 0; r < kRows; ++r) part[r][b] += dot_word(word_of(wv[r], j), xp);
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int b = 0; b < B; ++b) acc[r][b] = fmaf(s[r], part[r][b], acc[r][b]);
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[r][b] += __shfl_xor_sync(0xFFFFFFFFu, acc[r][b], off);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (row0 + r >= N) break;
#pragma unroll
      for (int b = 0; b < B; ++b) y[static_cast<size_t>(b) * N + row0 + r] = from_float<T>(acc[r][b]);
    }
  }
}

// One thread per 32-bit word: its 8 (int4) or 4 (int8) outputs are consecutive, so one 16- or
// 8-byte store (2-byte stores left the dequantizer at a fraction of the bandwidth). The pairs are
// decoded by the tensor-core GEMM's own dequant_pair, so both paths give bit-identical weights.
template <typename T, int BITS>
__global__ void dequant_kernel(const uint32_t* __restrict__ w, const float* __restrict__ scale,
                               T* __restrict__ out, int N, int K, int group) {
  using F = Fmt<BITS>;
  const int64_t words_per_row = K / F::kPerWord;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(N) * words_per_row) return;
  const int64_t row = idx / words_per_row;
  const int k0 = static_cast<int>(idx % words_per_row) * F::kPerWord;
  const float s = scale[row * (K / group) + k0 / group];
  const uint32_t word = w[idx];
  T* dst = out + row * K + k0;
  if constexpr (BITS == 4) {
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(dequant_pair<T, 4>(word, 0, s), dequant_pair<T, 4>(word, 1, s),
                   dequant_pair<T, 4>(word, 2, s), dequant_pair<T, 4>(word, 3, s));
  } else {
    *reinterpret_cast<uint2*>(dst) = make_uint2(dequant_pair<T, 8>(word, 0, s), dequant_pair<T, 8>(word, 1, s));
  }
}

bool shape_ok(int N, int K, int group, int bits) {
  return N > 0 && K > 0 && K % 32 == 0 && group > 0 && group % 32 == 0 && K % group == 0 &&
         (bits == 4 || bits == 8);
}

template <typename T, int BITS>
cudaError_t gemv_dispatch(const void* x, const uint32_t* w, const float* scale, void* y, int B,
                          int N, int K, int group, cudaStream_t stream) {
  const dim3 block(kWarps * 32);
  const dim3 grid((N + kWarps * kRows - 1) / (kWarps * kRows));
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  switch (B) {
#define CHATGLM_GEMV_CASE(NB)                                                            \
  case NB:                                                                               \
    gemv_kernel<T, BITS, NB><<<grid, block, 0, stream>>>(xt, w, scale, yt, N, K, group); \
    break;
    CHATGLM_GEMV_CASE(1)
    CHATGLM_GEMV_CASE(2)
    CHATGLM_GEMV_CASE(3)
    CHATGLM_GEMV_CASE(4)
    CHATGLM_GEMV_CASE(5)
    CHATGLM_GEMV_CASE(6)
    CHATGLM_GEMV_CASE(7)
    CHATGLM_GEMV_CASE(8)
#undef CHATGLM_GEMV_CASE
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t dequant_dispatch(const uint32_t* w, const float* scale, void* out, int N, int K,
                             int group, cudaStream_t stream) {
  const int64_t words = static_cast<int64_t>(N) * (K / Fmt<BITS>::kPerWord);
  const int threads = 256;
  const int64_t blocks = (words + threads - 1) / threads;
  dequant_kernel<T, BITS><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      w, scale, static_cast<T*>(out), N, K, group);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemv(const void* x, const uint32_t* w, const float* scale, void* y, int B,
                        int N, int K, int group, int bits, DType dtype, cudaStream_t stream) {
  if (!shape_ok(N, K, group, bits) || B < 1 || B > kMaxGemvBatch) return cudaErrorInvalidValue;
  if (dtype == DType::kHalf)
    return bits == 4 ? gemv_dispatch<__half, 4>(x, w, scale, y, B, N, K, group, stream)
                     : gemv_dispatch<__half, 8>(x, w, scale, y, B, N, K, group, stream);
  return bits == 4 ? gemv_dispatch<__nv_bfloat16, 4>(x, w, scale, y, B, N, K, group, stream)
                   : gemv_dispatch<__nv_bfloat16, 8>(x, w, scale, y, B, N, K, group, stream);
}

cudaError_t launch_dequantize(const uint32_t* w, const float* scale, void* out, int N, int K,
                              int group, int bits, DType dtype, cudaStream_t stream) {
  if (!shape_ok(N, K, group, bits)) return cudaErrorInvalidValue;
  if (dtype == DType::kHalf)
    return bits == 4 ? dequant_dispatch<__half, 4>(w, scale, out, N, K, group, stream)
                     : dequant_dispatch<__half, 8>(w, scale, out, N, K, group, stream);
  return bits == 4 ? dequant_dispatch<__nv_bfloat16, 4>(w, scale, out, N, K, group, stream)
                   : dequant_dispatch<__nv_bfloat16, 8>(w, scale, out, N, K, group, stream);
}

}  // namespace chatglm_quant
