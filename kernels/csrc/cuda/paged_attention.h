// Launcher of the CUDA paged decode attention kernel (paged_attention.cu); plain pointers and no
// torch headers, so the kernel compiles with nvcc alone (tests do that on machines without a GPU).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace chatglm_attn {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// Query heads one warp serves per pass over its keys: 16 for fp16/bf16 (the M of one tensor-core
// mma), 8 for fp32 (CUDA cores; registers). A KV group with more query heads than this is split
// into `m_tiles` warps that each read the group's K/V.
constexpr int kMmaHeads = 16;
constexpr int kSimtHeads = 8;
constexpr int kWarpsPerBlock = 4;  // each warp of a thread block takes its own key split
constexpr int kTokensPerIter = 16;  // partitions are multiples of this

struct PagedDecodeParams {
  const void* q;        // [B, Hq, D], element strides q_s0, q_s1, unit last stride
  const void* k_cache;  // [num_blocks, block_size, Hkv, D], strides k_s0..k_s2
  const void* v_cache;  // same shape, strides v_s0..v_s2
  void* out;            // [B, Hq, D] contiguous, q's dtype
  float* part_o;        // [B, Hq, num_splits, D] fp32 (num_splits > 1 only)
  float* part_m;        // [B, Hq, num_splits]: running max (log2 domain)
  float* part_l;        // [B, Hq, num_splits]: softmax denominator at that max
  const int64_t* block_tables;  // [B, max_blocks], row stride table_s0
  const int64_t* seq_lens;      // [B]
  int64_t q_s0, q_s1;
  int64_t k_s0, k_s1, k_s2;
  int64_t v_s0, v_s1, v_s2;
  int64_t table_s0;
  int B, Hq, Hkv, group, m_tiles;
  int block_size, max_blocks;
  int num_splits, partition;  // keys per split (a multiple of kTokensPerIter)
  float scale_log2;           // softmax scale * log2(e)
};

// The number of keys each split reads, for `max_len` keys (an upper bound of every length, known
// on the host without reading seq_lens: the block table's width times the block size), a batch
// of B sequences, and `sm_count` multiprocessors: long splits where the batch alone fills the
// GPU, shorter ones (down to 128 keys) where it does not.
int choose_partition(int64_t max_len, int B, int Hkv, int m_tiles, int sm_count);

// Heads per warp for this dtype (kMmaHeads or kSimtHeads).
inline int heads_per_warp(DType dtype) { return dtype == DType::kFloat ? kSimtHeads : kMmaHeads; }

// Whether the kernel is compiled for this head dimension.
inline bool head_dim_supported(int D) { return D == 64 || D == 128; }

// Runs the decode (and, with num_splits > 1, the reduction of the splits) on `stream`.
cudaError_t launch_paged_decode(const PagedDecodeParams& p, int head_dim, DType dtype,
                                cudaStream_t stream);

}  // namespace chatglm_attn
