// Tile sizes and row limits of the weight-only CUDA kernels, and the host-side choice of the
// GEMM's K splits: plain C++ (no CUDA headers), shared by the kernels (quant_tile.cuh), the
// bindings and their argument checks (arg_checks.h), and the host check tests/kernels/gemm_check.cu.
#pragma once

#include <cstdint>

namespace chatglm_quant {

constexpr int kMaxGemvBatch = 8;  // the GEMV's rows (quant_gemv.cu)

constexpr int kGemmWarps = 4;                   // warps per block
constexpr int kGemmBN = 128;                    // weight rows (output columns) per block
constexpr int kGemmWarpN = kGemmBN / kGemmWarps;  // 32 per warp = 4 n8 tiles
constexpr int kGemmNTiles = kGemmWarpN / 8;
constexpr int kGemmBK = 64;                     // k per pipeline stage
constexpr int kGemmStages = 4;                  // cp.async stages in flight
constexpr int kGemmMaxRows = 64;                // 4 m16 tiles; more rows: dequantize + cuBLAS
constexpr int kGemmMaxSplits = 16;
// x rows in shared memory are padded by 8 halves: a row is 36 words, so the 8 rows x 4 lanes of
// an A-fragment load hit 32 distinct banks.
constexpr int kGemmXStride = kGemmBK + 8;

// m16 tiles for M rows (1, 2 or 4; 3 rounds up to 4 so only three kernels are compiled).
inline int gemm_m_tiles(int M) { return M <= 16 ? 1 : M <= 32 ? 2 : 4; }

// How many slices of K the grid splits into. Few output columns (N = 4096: 32 blocks of 128)
// would leave most of an H100/H200's 132 SMs idle while the weight streams; splitting K gives
// every SM work. Each split writes fp32 partials [M, N] that a second kernel sums, so the
// partials (written and read: 8 M N bytes a split) are kept under the weight's own bytes, and
// each split streams at least the pipeline's depth of k tiles.
inline int gemm_splits(int M, int N, int K, int bits, int sm_count) {
  const int sms = sm_count > 0 ? sm_count : 132;
  const int blocks_n = (N + kGemmBN - 1) / kGemmBN;
  const int k_tiles = K / kGemmBK;
  int s = (2 * sms + blocks_n - 1) / blocks_n;  // two blocks per SM
  const int64_t by_bytes = static_cast<int64_t>(K) * bits / (64 * (M > 0 ? M : 1));
  s = static_cast<int>(s < by_bytes ? s : by_bytes);
  const int by_depth = k_tiles / kGemmStages;
  s = s < by_depth ? s : by_depth;
  s = s < kGemmMaxSplits ? s : kGemmMaxSplits;
  return s > 1 ? s : 1;
}

}  // namespace chatglm_quant
