// Decode attention over the paged KV cache on CUDA: each sequence's single query token reads its
// keys and values straight from the cache blocks its block table lists, up to its own length (the
// CUDA twin of kernels/csrc/cpu/paged_attention.cpp). UNVERIFIED ON A GPU: written and compiled
// (sm_80, sm_90) without one; tests/kernels/test_cuda_attention.py checks it against dense
// attention where a GPU is present. Nothing here has been timed.
//
// Why: the PyTorch path gathers every decoding sequence's blocks up to the LONGEST context into a
// dense copy (K and V, every layer) and runs SDPA on it with a mask, so a batch with one long
// chat reads, writes and reads again the padding of every short one. Here every cached byte of
// a sequence's own keys and values is read once, and nothing is written but the output.
//
// Shapes: q [B, Hq, D] (any strides with a unit last one, 16-byte aligned rows); k_cache,
// v_cache [num_blocks, block_size, Hkv, D] (kv_cache[0] / kv_cache[1] of one contiguous tensor
// are fine); block_tables [B, max_blocks] int64; seq_lens [B] int64 (context length including
// this token); out [B, Hq, D] in q's dtype. D = 64 or 128. fp16, bf16 or fp32 (q and cache alike).
//
// Shape of the work, and why it should be close to memory-bound on an H100:
// - ChatGLM2 has 32 query heads on 2 KV groups: 16 query heads read every K/V row. Done on CUDA
//   cores in fp32 that is 16 * D FMAs per D-element K row and as many per V row, i.e. 8 FMAs
//   per cached byte at fp16: at 3.35 TB/s that needs ~27 of the ~33.5 TFMA/s an H100 SXM has in
//   fp32, so a CUDA-core kernel would be compute-bound, not memory-bound. So for fp16/bf16 one
//   warp runs the 16 query heads of a KV group as the M = 16 of tensor-core mma.m16n8k16 (fp32
//   accumulation): S = Q K^T, then O += P V with P from the same registers (the C fragment of
//   the first mma is the A fragment of the second, as in FlashAttention-2). Tensor cores turn
//   the arithmetic into a small fraction of the time the bytes take to arrive. Fewer query heads
//   per group (tests' 4) pad M with zero rows; more (e.g. 32 on 1 group) take several warps.
// - Loads are 16 bytes per lane and whole sectors per instruction. For S, lane (g, t) of the
//   warp's 8x4 quads loads bytes [t*16, t*16 + 16) of every 64 of key row g: a quad reads 64
//   contiguous bytes of one row, and the order of d inside an mma's k = 16 does not matter as
//   long as Q uses the same order (Q's fragments are the same 16-byte pieces of its rows). For
//   P V, lane (g, t) loads 8 consecutive d (16 bytes) of 4 key rows; 8 lanes read 128 contiguous
//   bytes of a row. The pairs of rows each mma B fragment needs are formed with one byte_perm,
//   and output column n of n-tile i is d = 8 n + i (so a lane's 8 results are 8 consecutive d:
//   one 16-byte store).
// - Work item = (sequence, KV group, split of its keys). A split is `partition` keys (a multiple
//   of 16); a sequence uses only the splits its length reaches, the rest of the grid exits at
//   once. Splitting (flash-decoding) keeps the GPU busy when the batch alone cannot (one long
//   chat: 2 KV groups = 2 warps otherwise); each split leaves an unnormalized partial output with
//   its max and denominator, and a second kernel combines them. A split's partial is Hq/Hkv * D
//   floats per sequence, so splits stay long (the default is >= 128 keys, see choose_partition).
// - Each warp is independent (no shared memory, no __syncthreads): 4 per thread block, on
//   consecutive splits. Every lane issues its 8 K and 8 V 16-byte loads of a 16-key step (8 KB
//   a warp) before the arithmetic that needs them. ptxas gives the D = 128 mma kernel 168
//   registers and no spills (sm_90), i.e. 12 resident warps an SM: up to ~96 KB of loads in
//   flight per SM, which is the order latency x bandwidth asks for (an estimate, not a
//   measurement).
// - The grid depends only on shapes (B, Hkv, the table's width), never on seq_lens' values, and
//   nothing reads device memory on the host: the launch can be captured in a CUDA graph.
// - fp32 (not a serving dtype on a GPU) runs a CUDA-core kernel: one K/V row per warp load (D/32
//   floats a lane), 8 query heads per warp, warp-shuffle dot products.
// Softmax: online (running max and denominator, in the log2 domain), fp32 throughout; P is
// rounded to the cache's dtype for the P V mma, as FlashAttention does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "paged_attention.h"

namespace chatglm_attn {
namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;

__device__ __forceinline__ uint4 ld16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// Where token t of a sequence lives: its block from the table, then the offset in the block.
template <typename T>
__device__ __forceinline__ const T* row_of(const T* base, const int64_t* table, int t, int bs,
                                           int64_t s0, int64_t s1) {
  const int64_t blk = __ldg(table + t / bs);
  return base + blk * s0 + static_cast<int64_t>(t % bs) * s1;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// d[16x8] += a[16x16] b[16x8], fp32 accumulators (PTX ISA "mma.m16n8k16" fragment layouts).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Sequence b's length; one beyond its table (never from the engine) is clipped rather than read
// past the table.
__device__ __forceinline__ int clipped_len(const PagedDecodeParams& p, int b) {
  const int64_t cap = static_cast<int64_t>(p.max_blocks) * p.block_size;
  const int64_t len = p.seq_lens[b];
  return static_cast<int>(len < 0 ? 0 : len > cap ? cap : len);
}

// This warp's split and items; false where it has nothing to do.
struct Item {
  int b, h, head0, rows, start, end, split;
};

__device__ __forceinline__ bool item_of(const PagedDecodeParams& p, int heads, Item& it) {
  it.split = blockIdx.x * kWarpsPerBlock + static_cast<int>(threadIdx.x >> 5);
  if (it.split >= p.num_splits) return false;
  it.b = blockIdx.z;
  it.h = blockIdx.y / p.m_tiles;
  it.head0 = it.h * p.group + static_cast<int>(blockIdx.y % p.m_tiles) * heads;
  it.rows = min(heads, (it.h + 1) * p.group - it.head0);
  const int len = clipped_len(p, it.b);
  it.start = it.split * p.partition;
  if (it.split > 0 && it.start >= len) return false;  // split 0 always writes (even for len 0)
  it.end = min(len, it.start + p.partition);
  return true;
}

// The tensor-core kernel (fp16 / bf16). Lane = (g, t): g = lane / 4 (mma "groupID"), t = lane % 4.
template <typename T, int D>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    mma_decode_kernel(const PagedDecodeParams p) {
  constexpr int KC = D / 32;  // 16-byte pieces of a K row per lane (a quad covers 32 d each)
  constexpr int VH = D / 64;  // 16-byte pieces of a V row per lane (8 lanes cover 64 d each)
  constexpr int NT = D / 8;   // output n-tiles
  Item it;
  if (!item_of(p, kMmaHeads, it)) return;
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

  // Q rows g and g + 8 of this warp's 16 heads: the A fragments of S = Q K^T for every k-step.
  // mma k-step (c, s) uses words 2s, 2s+1 of piece c: logical k = 2 t4 + e is d = 32 c + 8 t4 +
  // 4 s + e, logical k = 8 + 2 t4 + e is d = 32 c + 8 t4 + 4 s + 2 + e (K below uses the same).
  const T* q = static_cast<const T*>(p.q) + it.b * p.q_s0 + it.head0 * p.q_s1;
  uint4 qa[KC], qb[KC];
#pragma unroll
  for (int c = 0; c < KC; ++c) {
    qa[c] = g < it.rows ? ld16(q + g * p.q_s1 + c * 32 + t4 * 8) : make_uint4(0, 0, 0, 0);
    qb[c] = g + 8 < it.rows ? ld16(q + (g + 8) * p.q_s1 + c * 32 + t4 * 8) : make_uint4(0, 0, 0, 0);
  }

  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY;  // running max of rows g and g + 8 (log2 domain)
  float l0 = 0.f, l1 = 0.f;              // this lane's part of their denominators

  const int64_t* table = p.block_tables + it.b * p.table_s0;
  const T* kbase = static_cast<const T*>(p.k_cache) + it.h * p.k_s2;
  const T* vbase = static_cast<const T*>(p.v_cache) + it.h * p.v_s2;
  const int bs = p.block_size;

  for (int t0 = it.start; t0 < it.end; t0 += kTokensPerIter) {
    // every load of the step first: K rows t0 + g and t0 + 8 + g (the n of S's two 8-key
    // tiles), V rows t0 + 8 r + 2 t4 + e (the k of P V). Keys past the end load the last key
    // (no divergent branch before the mma.sync) and are then zeroed (scores masked below).
    uint4 kr[2][KC], vr[2][2][VH];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int t = t0 + 8 * r + g;
      const T* krow = row_of(kbase, table, min(t, it.end - 1), bs, p.k_s0, p.k_s1);
#pragma unroll
      for (int c = 0; c < KC; ++c) kr[r][c] = ld16(krow + c * 32 + t4 * 8);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int tv = t0 + 8 * r + 2 * t4 + e;
        const T* vrow = row_of(vbase, table, min(tv, it.end - 1), bs, p.v_s0, p.v_s1);
#pragma unroll
        for (int hv = 0; hv < VH; ++hv) {
          const uint4 x = ld16(vrow + hv * 64 + g * 8);
          vr[r][e][hv] = tv < it.end ? x : make_uint4(0, 0, 0, 0);  // P = 0 times a NaN is NaN
        }
      }
    }

    // S [16 heads x 16 keys] as two n-tiles: s[r][0..1] = rows g, keys t0 + 8 r + 2 t4 + {0,1};
    // s[r][2..3] = row g + 8, same keys
    float s[2][4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      s[r][0] = s[r][1] = s[r][2] = s[r][3] = 0.f;
#pragma unroll
      for (int c = 0; c < KC; ++c) {
        mma16816<T>(s[r], qa[c].x, qb[c].x, qa[c].y, qb[c].y, kr[r][c].x, kr[r][c].y);
        mma16816<T>(s[r], qa[c].z, qb[c].z, qa[c].w, qb[c].w, kr[r][c].z, kr[r][c].w);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool ok = t0 + 8 * r + 2 * t4 + e < it.end;
        s[r][e] = ok ? s[r][e] * p.scale_log2 : -INFINITY;
        s[r][2 + e] = ok ? s[r][2 + e] * p.scale_log2 : -INFINITY;
      }

    // online softmax: the quad of lanes sharing g holds a row's 16 scores
    float x0 = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
    float x1 = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
    x0 = fmaxf(x0, __shfl_xor_sync(kFull, x0, 1));
    x1 = fmaxf(x1, __shfl_xor_sync(kFull, x1, 1));
    x0 = fmaxf(x0, __shfl_xor_sync(kFull, x0, 2));
    x1 = fmaxf(x1, __shfl_xor_sync(kFull, x1, 2));
    const float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1);
    const float u0 = n0 == -INFINITY ? 0.f : n0, u1 = n1 == -INFINITY ? 0.f : n1;
    const float a0 = exp2f(m0 - u0), a1 = exp2f(m1 - u1);  // 0 on the first step
    m0 = n0;
    m1 = n1;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[r][e] = exp2f(s[r][e] - u0);
        s[r][2 + e] = exp2f(s[r][2 + e] - u1);
      }
    l0 = l0 * a0 + (s[0][0] + s[0][1]) + (s[1][0] + s[1][1]);
    l1 = l1 * a1 + (s[0][2] + s[0][3]) + (s[1][2] + s[1][3]);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      o[n][0] *= a0;
      o[n][1] *= a0;
      o[n][2] *= a1;
      o[n][3] *= a1;
    }

    // O += P V. A fragment of P: rows g / g + 8, keys (k) 2 t4 + {0,1} and 8 + 2 t4 + {0,1}: exactly
    // S's C fragments. B fragment of n-tile (hv, i), column n = this lane's g, is d = 64 hv + 8 g
    // + i: element i of the V pieces, paired across rows (2 t4, 2 t4 + 1) and (8 + 2 t4, 9 + 2 t4).
    const uint32_t pa0 = pack2<T>(s[0][0], s[0][1]), pa1 = pack2<T>(s[0][2], s[0][3]);
    const uint32_t pa2 = pack2<T>(s[1][0], s[1][1]), pa3 = pack2<T>(s[1][2], s[1][3]);
#pragma unroll
    for (int hv = 0; hv < VH; ++hv)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const unsigned sel = (i & 1) ? 0x7632u : 0x5410u;  // high or low halves of two words
        const uint32_t b0 = __byte_perm(word(vr[0][0][hv], i >> 1), word(vr[0][1][hv], i >> 1), sel);
        const uint32_t b1 = __byte_perm(word(vr[1][0][hv], i >> 1), word(vr[1][1][hv], i >> 1), sel);
        mma16816<T>(o[hv * 8 + i], pa0, pa1, pa2, pa3, b0, b1);
      }
  }

  l0 += __shfl_xor_sync(kFull, l0, 1);
  l1 += __shfl_xor_sync(kFull, l1, 1);
  l0 += __shfl_xor_sync(kFull, l0, 2);
  l1 += __shfl_xor_sync(kFull, l1, 2);

  // o[hv * 8 + i][2 rr + e]: row g + 8 rr, d = 64 hv + 8 (2 t4 + e) + i: 8 consecutive d per (hv, e)
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = g + 8 * rr;
    if (row >= it.rows) continue;
    const int64_t qh = static_cast<int64_t>(it.b) * p.Hq + it.head0 + row;
    const float l = rr ? l1 : l0;
    if (p.num_splits == 1) {
      const float inv = l > 0.f ? 1.f / l : 0.f;
      T* out = static_cast<T*>(p.out) + qh * D;
#pragma unroll
      for (int hv = 0; hv < VH; ++hv)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int k = 2 * rr + e;
          uint4 w;
          w.x = pack2<T>(o[hv * 8 + 0][k] * inv, o[hv * 8 + 1][k] * inv);
          w.y = pack2<T>(o[hv * 8 + 2][k] * inv, o[hv * 8 + 3][k] * inv);
          w.z = pack2<T>(o[hv * 8 + 4][k] * inv, o[hv * 8 + 5][k] * inv);
          w.w = pack2<T>(o[hv * 8 + 6][k] * inv, o[hv * 8 + 7][k] * inv);
          *reinterpret_cast<uint4*>(out + hv * 64 + (2 * t4 + e) * 8) = w;
        }
    } else {
      const int64_t slot = qh * p.num_splits + it.split;
      float* po = p.part_o + slot * D;
#pragma unroll
      for (int hv = 0; hv < VH; ++hv)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int k = 2 * rr + e;
          float* dst = po + hv * 64 + (2 * t4 + e) * 8;
          *reinterpret_cast<float4*>(dst) =
              make_float4(o[hv * 8 + 0][k], o[hv * 8 + 1][k], o[hv * 8 + 2][k], o[hv * 8 + 3][k]);
          *reinterpret_cast<float4*>(dst + 4) =
              make_float4(o[hv * 8 + 4][k], o[hv * 8 + 5][k], o[hv * 8 + 6][k], o[hv * 8 + 7][k]);
        }
      if (t4 == 0) {
        p.part_m[slot] = rr ? m1 : m0;
        p.part_l[slot] = l;
      }
    }
  }
}

template <int E>
struct FloatVec;
template <>
struct FloatVec<2> {
  __device__ static void load(const float* p, float (&v)[2]) {
    const float2 x = __ldg(reinterpret_cast<const float2*>(p));
    v[0] = x.x, v[1] = x.y;
  }
  __device__ static void store(float* p, const float (&v)[2]) {
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  }
};
template <>
struct FloatVec<4> {
  __device__ static void load(const float* p, float (&v)[4]) {
    const float4 x = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
  }
  __device__ static void store(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

// The CUDA-core kernel (fp32): lane l holds d = E l .. E l + E - 1 of every row; R keys a step.
template <int D>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    simt_decode_kernel(const PagedDecodeParams p) {
  constexpr int E = D / 32, H = kSimtHeads, R = 4;
  using V = FloatVec<E>;
  Item it;
  if (!item_of(p, H, it)) return;
  const int lane = threadIdx.x & 31;

  const float* q = static_cast<const float*>(p.q) + it.b * p.q_s0 + it.head0 * p.q_s1;
  float qv[H][E], o[H][E], m[H], l[H];
#pragma unroll
  for (int j = 0; j < H; ++j) {
    if (j < it.rows) {
      V::load(q + j * p.q_s1 + lane * E, qv[j]);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) qv[j][e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
      qv[j][e] *= p.scale_log2;
      o[j][e] = 0.f;
    }
    m[j] = -INFINITY;
    l[j] = 0.f;
  }

  const int64_t* table = p.block_tables + it.b * p.table_s0;
  const float* kbase = static_cast<const float*>(p.k_cache) + it.h * p.k_s2;
  const float* vbase = static_cast<const float*>(p.v_cache) + it.h * p.v_s2;
  for (int t0 = it.start; t0 < it.end; t0 += R) {
    float kr[R][E], vr[R][E];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (t0 + r < it.end) {
        V::load(row_of(kbase, table, t0 + r, p.block_size, p.k_s0, p.k_s1) + lane * E, kr[r]);
        V::load(row_of(vbase, table, t0 + r, p.block_size, p.v_s0, p.v_s1) + lane * E, vr[r]);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) kr[r][e] = vr[r][e] = 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < H; ++j) {
      if (j >= it.rows) continue;  // warp-uniform
      float s[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s[r] = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) s[r] = fmaf(qv[j][e], kr[r][e], s[r]);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1)
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] += __shfl_xor_sync(kFull, s[r], off);
      float mx = m[j];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (t0 + r >= it.end) s[r] = -INFINITY;
        mx = fmaxf(mx, s[r]);  // finite: key t0 is always in range
      }
      const float a = exp2f(m[j] - mx);
      l[j] *= a;
#pragma unroll
      for (int e = 0; e < E; ++e) o[j][e] *= a;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float pr = exp2f(s[r] - mx);
        l[j] += pr;
#pragma unroll
        for (int e = 0; e < E; ++e) o[j][e] = fmaf(pr, vr[r][e], o[j][e]);
      }
      m[j] = mx;
    }
  }

#pragma unroll
  for (int j = 0; j < H; ++j) {
    if (j >= it.rows) continue;
    const int64_t qh = static_cast<int64_t>(it.b) * p.Hq + it.head0 + j;
    if (p.num_splits == 1) {
      const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) o[j][e] *= inv;
      V::store(static_cast<float*>(p.out) + qh * D + lane * E, o[j]);
    } else {
      const int64_t slot = qh * p.num_splits + it.split;
      V::store(p.part_o + slot * D + lane * E, o[j]);
      if (lane == 0) {
        p.part_m[slot] = m[j];
        p.part_l[slot] = l[j];
      }
    }
  }
}

// out[b, qh] = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s over the splits sequence b reached.
// Grid (Hq, B), D threads; shared memory: num_splits floats.
template <typename T>
__global__ void combine_kernel(const PagedDecodeParams p, int D) {
  extern __shared__ float w[];
  const int qh = blockIdx.x, b = blockIdx.y;
  const int len = clipped_len(p, b);
  const int used = max(1, min(p.num_splits, (len + p.partition - 1) / p.partition));
  const int64_t row = static_cast<int64_t>(b) * p.Hq + qh;
  const float* pm = p.part_m + row * p.num_splits;
  const float* pl = p.part_l + row * p.num_splits;
  const float* po = p.part_o + row * p.num_splits * D;
  float M = -INFINITY;
  for (int s = 0; s < used; ++s) M = fmaxf(M, pm[s]);
  for (int s = threadIdx.x; s < used; s += blockDim.x)
    w[s] = pm[s] == -INFINITY ? 0.f : exp2f(pm[s] - M);
  __syncthreads();
  float L = 0.f;
  for (int s = 0; s < used; ++s) L = fmaf(w[s], pl[s], L);
  const float inv = L > 0.f ? 1.f / L : 0.f;
  T* out = static_cast<T*>(p.out) + row * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < used; ++s) acc = fmaf(w[s], po[static_cast<int64_t>(s) * D + d], acc);
    out[d] = from_float<T>(acc * inv);
  }
}

template <typename T>
cudaError_t launch_typed(const PagedDecodeParams& p, int D, cudaStream_t stream) {
  const dim3 grid((p.num_splits + kWarpsPerBlock - 1) / kWarpsPerBlock, p.Hkv * p.m_tiles, p.B);
  const dim3 block(kWarpsPerBlock * 32);
  if constexpr (std::is_same_v<T, float>) {
    if (D == 64) {
      simt_decode_kernel<64><<<grid, block, 0, stream>>>(p);
    } else {
      simt_decode_kernel<128><<<grid, block, 0, stream>>>(p);
    }
  } else {
    if (D == 64) {
      mma_decode_kernel<T, 64><<<grid, block, 0, stream>>>(p);
    } else {
      mma_decode_kernel<T, 128><<<grid, block, 0, stream>>>(p);
    }
  }
  if (p.num_splits > 1) {
    combine_kernel<T><<<dim3(p.Hq, p.B), D, p.num_splits * sizeof(float), stream>>>(p, D);
  }
  return cudaGetLastError();
}

}  // namespace

int choose_partition(int64_t max_len, int B, int Hkv, int m_tiles, int sm_count) {
  // Untuned (no GPU yet): enough warps for ~8 per SM, but splits of at least 128 keys, since
  // each costs Hq/Hkv * D * 8 bytes of partial-output traffic per sequence. At most 4096 splits
  // (the combine kernel's shared memory).
  const int64_t items = static_cast<int64_t>(B) * Hkv * m_tiles;
  const int64_t target = static_cast<int64_t>(sm_count > 0 ? sm_count : 132) * 8;
  const int64_t want = (target + items - 1) / (items > 0 ? items : 1);  // splits per item
  int64_t part = (max_len + want - 1) / (want > 0 ? want : 1);
  part = (part + kTokensPerIter - 1) / kTokensPerIter * kTokensPerIter;
  if (part < 128) part = 128;
  while ((max_len + part - 1) / part > 4096) part *= 2;
  return static_cast<int>(part > (int64_t{1} << 30) ? (int64_t{1} << 30) : part);
}

cudaError_t launch_paged_decode(const PagedDecodeParams& p, int head_dim, DType dtype,
                                cudaStream_t stream) {
  if (!head_dim_supported(head_dim) || p.B <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat:
      return launch_typed<float>(p, head_dim, stream);
    case DType::kHalf:
      return launch_typed<__half>(p, head_dim, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, head_dim, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace chatglm_attn
