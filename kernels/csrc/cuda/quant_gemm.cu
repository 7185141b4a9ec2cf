// Weight-only int4/int8 GEMM on tensor cores for batches of 9-64 rows (the GEMV of
// quant_gemv.cu serves 1-8). UNVERIFIED ON A GPU: written and compiled (sm_80, sm_90) without
// one; the fragment indexing and the dequantization are checked on the host
// (tests/kernels/gemm_check.cu), the results against the reference where a GPU is present.
//
// Why: at 16-64 rows the GEMV (one pass over the weight per 8 rows) re-reads the weight, and
// dequantize + cuBLAS writes and reads a full fp16 copy of it (4x the int4 bytes, twice). Here
// the weight is read once, in its packed form, and decoded in registers straight into the B
// fragments of mma.m16n8k16 (the approach of Marlin / TinyChat's W4A16, our own layout):
// - A block owns 128 weight rows (4 warps x 32) and streams its K range through shared memory in
//   stages of 64 k, kGemmStages deep with cp.async: the packed words of its 128 rows and the x
//   tile (all M rows) of the stage. Rows of x past M are zero-filled.
// - Per 16 k, a warp loads the A fragments of its m16 tiles from shared memory (padded rows, no
//   bank conflicts), and per n8 tile two words of its weight row, decodes the pair each register
//   needs (quant_tile.cuh: exactly the plain dequantization's q * scale in fp16/bf16) and issues
//   one mma per m16 tile. The scale of a row changes at most once per 16 k (groups are multiples
//   of 32): it is reloaded only when the group changes.
// - Splits of K (gemm_splits) keep every SM streaming when N alone gives few blocks; each split
//   writes fp32 partials and gemm_reduce_kernel sums them. With one split the block writes y.
// No sync with the host and a launch shape that depends only on shapes: graph-capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "quant_gemv.h"
#include "quant_tile.cuh"

namespace chatglm_quant {
namespace {

constexpr int kMaxDevices = 64;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ T to_t(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// y = x @ W^T (splits == 1) or partials ws[split, M, N] (splits > 1); see the file comment.
template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(kGemmWarps * 32)
    gemm_kernel(const T* __restrict__ x, const uint32_t* __restrict__ w,
                const float* __restrict__ scale, T* __restrict__ y, float* __restrict__ ws, int M,
                int N, int K, int group) {
  using Wd = GemmWords<BITS>;
  constexpr int kXStage = MT * 16 * kGemmXStride;  // halves
  constexpr int kWStage = kGemmBN * Wd::kStride;   // words
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  uint32_t* wsm = reinterpret_cast<uint32_t*>(smem_raw + kGemmStages * kXStage * sizeof(T));

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int n_block = blockIdx.x * kGemmBN;
  const int words_per_row = K / Wd::kPerWord;
  const int groups = K / group;
  const TileRange range = split_tiles(K / kGemmBK, gridDim.y, blockIdx.y);
  const int tiles = range.end - range.begin;

  auto load_stage = [&](int slot, int tile) {
    const int k0 = tile * kGemmBK;
    uint32_t* wdst = wsm + slot * kWStage;
    for (int c = tid; c < kGemmBN * Wd::kChunks; c += kGemmWarps * 32) {
      const int r = c / Wd::kChunks, part = c % Wd::kChunks;
      const int row = min(n_block + r, N - 1);  // rows past N repeat the last (never stored)
      const uint32_t* src = w + static_cast<size_t>(row) * words_per_row + k0 / Wd::kPerWord + part * 4;
      cp_async16(wdst + r * Wd::kStride + part * 4, src, true);
    }
    T* xdst = xs + slot * kXStage;
    for (int c = tid; c < MT * 16 * (kGemmBK / 8); c += kGemmWarps * 32) {
      const int r = c / (kGemmBK / 8), part = c % (kGemmBK / 8);
      const bool valid = r < M;
      const T* src = x + static_cast<size_t>(valid ? r : 0) * K + k0 + part * 8;
      cp_async16(xdst + r * kGemmXStride + part * 8, src, valid);
    }
  };

  float acc[MT][kGemmNTiles][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < kGemmNTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // This lane's weight rows (one per n8 tile) and their current scales.
  int rows[kGemmNTiles];
  float s[kGemmNTiles];
#pragma unroll
  for (int j = 0; j < kGemmNTiles; ++j) rows[j] = min(n_block + warp * kGemmWarpN + j * 8 + g, N - 1);
  int cur_group = -1;

#pragma unroll
  for (int st = 0; st < kGemmStages - 1; ++st) {
    if (st < tiles) load_stage(st, range.begin + st);
    cp_async_commit();
  }

  for (int it = 0; it < tiles; ++it) {
    cp_async_wait<kGemmStages - 2>();
    __syncthreads();  // stage `it` visible to all; the slot of `it - 1` free for reuse
    const int next = it + kGemmStages - 1;
    if (next < tiles) load_stage(next % kGemmStages, range.begin + next);
    cp_async_commit();

    const int slot = it % kGemmStages;
    const T* xt = xs + slot * kXStage;
    const uint32_t* wt = wsm + slot * kWStage + (warp * kGemmWarpN + g) * Wd::kStride;
    const int k_tile = (range.begin + it) * kGemmBK;
#pragma unroll
    for (int kk = 0; kk < kGemmBK; kk += 16) {
      const int gi = (k_tile + kk) / group;  // uniform across the warp
      if (gi != cur_group) {
        cur_group = gi;
#pragma unroll
        for (int j = 0; j < kGemmNTiles; ++j) s[j] = __ldg(scale + static_cast<size_t>(rows[j]) * groups + gi);
      }
      uint32_t a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const T* base = xt + (i * 16 + g) * kGemmXStride + kk + 2 * t;
        a[i][0] = *reinterpret_cast<const uint32_t*>(base);
        a[i][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kGemmXStride);
        a[i][2] = *reinterpret_cast<const uint32_t*>(base + 8);
        a[i][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kGemmXStride + 8);
      }
#pragma unroll
      for (int j = 0; j < kGemmNTiles; ++j) {
        const uint32_t* wrow = wt + j * 8 * Wd::kStride;
        const PairAt p0 = pair_at<BITS>(b_frag_k(kk, t, 0));
        const PairAt p1 = pair_at<BITS>(b_frag_k(kk, t, 1));
        const uint32_t b0 = dequant_pair<T, BITS>(wrow[p0.word], p0.pair, s[j]);
        const uint32_t b1 = dequant_pair<T, BITS>(wrow[p1.word], p1.pair, s[j]);
#pragma unroll
        for (int i = 0; i < MT; ++i) mma16816<T>(acc[i][j], a[i], b0, b1);
      }
    }
  }
  cp_async_wait<0>();  // no copy may be in flight when the block exits

  // C fragment: c0, c1 = row g, columns 2t, 2t+1; c2, c3 = row g + 8.
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < kGemmNTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = i * 16 + g + (e >= 2 ? 8 : 0);
        const int n = n_block + warp * kGemmWarpN + j * 8 + 2 * t + (e & 1);
        if (m >= M || n >= N) continue;
        if (gridDim.y == 1) {
          y[static_cast<size_t>(m) * N + n] = to_t<T>(acc[i][j][e]);
        } else {
          ws[(static_cast<size_t>(blockIdx.y) * M + m) * N + n] = acc[i][j][e];
        }
      }
}

template <typename T>
__global__ void gemm_reduce_kernel(const float* __restrict__ ws, T* __restrict__ y, int MN,
                                   int splits) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= MN) return;
  float v = 0.f;
  for (int s = 0; s < splits; ++s) v += ws[static_cast<size_t>(s) * MN + idx];
  y[idx] = to_t<T>(v);
}

template <typename T, int BITS, int MT>
cudaError_t gemm_typed(const GemmArgs& a, cudaStream_t stream) {
  constexpr int smem = gemm_smem_bytes<BITS>(MT);
  auto kernel = gemm_kernel<T, BITS, MT>;
  // Above 48 KB a block's dynamic shared memory must be allowed explicitly, once per device:
  // the first call (an eager one: warm-up runs precede every graph capture) does it, so no
  // capture ever sees this call.
  static std::atomic<bool> allowed[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device >= kMaxDevices || !allowed[device].load(std::memory_order_acquire)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    if (device < kMaxDevices) allowed[device].store(true, std::memory_order_release);
  }
  const dim3 grid((a.N + kGemmBN - 1) / kGemmBN, a.splits);
  kernel<<<grid, kGemmWarps * 32, smem, stream>>>(
      static_cast<const T*>(a.x), a.w, a.scale, static_cast<T*>(a.y), a.workspace, a.M, a.N, a.K,
      a.group);
  err = cudaGetLastError();
  if (err != cudaSuccess || a.splits == 1) return err;
  const int mn = a.M * a.N;
  gemm_reduce_kernel<T><<<(mn + 255) / 256, 256, 0, stream>>>(a.workspace, static_cast<T*>(a.y), mn,
                                                             a.splits);
  return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t gemm_rows(const GemmArgs& a, cudaStream_t stream) {
  switch (gemm_m_tiles(a.M)) {
    case 1:
      return gemm_typed<T, BITS, 1>(a, stream);
    case 2:
      return gemm_typed<T, BITS, 2>(a, stream);
    default:
      return gemm_typed<T, BITS, 4>(a, stream);
  }
}

}  // namespace

bool gemm_shape_ok(int M, int N, int K, int group, int bits) {
  return M >= 1 && M <= kGemmMaxRows && N > 0 && K > 0 && K % kGemmBK == 0 && group > 0 &&
         group % 32 == 0 && K % group == 0 && (bits == 4 || bits == 8);
}

cudaError_t launch_gemm(const GemmArgs& a, DType dtype, cudaStream_t stream) {
  if (!gemm_shape_ok(a.M, a.N, a.K, a.group, a.bits) || a.splits < 1 ||
      a.splits > kGemmMaxSplits || (a.splits > 1 && a.workspace == nullptr))
    return cudaErrorInvalidValue;
  if (dtype == DType::kHalf)
    return a.bits == 4 ? gemm_rows<__half, 4>(a, stream) : gemm_rows<__half, 8>(a, stream);
  return a.bits == 4 ? gemm_rows<__nv_bfloat16, 4>(a, stream)
                     : gemm_rows<__nv_bfloat16, 8>(a, stream);
}

}  // namespace chatglm_quant
