// Weight-only int4/int8 matmul on the CPU: y[B, N] = x[B, K] @ (q[N, K] * scale)^T.
//
// Why our own kernel: PyTorch's `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm` re-dequantize
// the weight for every activation row, so their time grows with the batch and continuous
// batching would lose its advantage after quantization. Here the activations are quantized to
// int8 (one scale per `ablk` channels of a row) and multiplied in integers: each weight byte is
// unpacked once per group of batch rows, then AVX-512 VNNI `vpdpbusd` (64 MACs per instruction)
// or, from a few rows on, AMX `tdpbsud` (16x16x64 MACs per instruction) does the arithmetic.
//
// Packed layout (built by kernels/ops.py; N padded to a multiple of 16, K a multiple of 32):
//   tiles of 16 output rows; tile t is K/8 (int4) or K/4 (int8) chunks of 64 bytes each.
//   int4 chunk c: byte r*4+j holds u(r, 8c+j) in the low nibble and u(r, 8c+4+j) in the high one,
//                 u = q + 8 (0..15).
//   int8 chunk c: byte r*4+j holds u(r, 4c+j) = q + 128 (1..255).
//   So one 512-bit lane = one output row and four consecutive k: vpdpbusd's shape, and 8 such
//   rows (32 k) are exactly an AMX B tile.
// Scales: fp32 [K/group, N_pad]; group is a multiple of 32 (per-row scale: group = K).
// Activation blocks: `ablk` divides `group` (one weight scale per block) and is a multiple of 32.
// The unsigned offset is undone per activation block: each block's int32 accumulator starts at
// -offset * sum(xq over the block), so no per-weight correction is needed.
//
// Implementations with the same arithmetic, picked at run time by CPU features (the binary is
// built for the baseline ISA; the fast paths use per-function target attributes):
//   amx, avx512_vnni, avx2 (vpmaddubsw + vpmaddwd), scalar (portable, also non-x86).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "quant_ops.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define QM_X86 1
#else
#define QM_X86 0
#endif

namespace {

constexpr int kTileRows = 16;
constexpr int kMinBlock = 32;  // activation blocks and weight groups are multiples of this

enum Impl : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512Vnni = 3, kAmx = 4 };

struct Problem {
  const uint8_t* w;   // packed weight
  const float* sw;    // [G, npad]
  int64_t npad, n, K, group, ablk, B;
  const int8_t* xq;   // [B (padded to 16 for AMX), K]
  const float* xs;    // [B, nblk] activation scale per block
  const int32_t* xc;  // [B, nblk] -offset * sum(xq in block)
  int64_t nblk;       // K / ablk
  float* y;           // [B, n]
  bool int4;
  int64_t tile_bytes() const { return int4 ? K * 8 : K * 16; }
  int64_t block_bytes() const { return int4 ? ablk * 8 : ablk * 16; }  // one block, one tile
  const float* scale_of_block(int64_t blk, int64_t t) const {
    return sw + (blk * ablk / group) * npad + t * kTileRows;
  }
};

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---------------------------------------------------------------- activation quantization
// One block of `ablk` values -> int8 xq, its scale, and -offset * sum(xq). Scalar and AVX-512
// give the same bytes: the same fp32 max, multiply and round-half-even (cvtps rounds as
// nearbyint does in the default mode). AVX2 likewise.
template <typename T>
void quantize_block_scalar(const T* src, int64_t ablk, int32_t offset, int8_t* dst, float* xs,
                           int32_t* xc) {
  float amax = 0.f;
  for (int64_t i = 0; i < ablk; ++i) amax = std::max(amax, std::fabs(static_cast<float>(src[i])));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t sum = 0;
  for (int64_t i = 0; i < ablk; ++i) {
    float r = std::nearbyint(static_cast<float>(src[i]) * inv);
    r = std::min(127.f, std::max(-127.f, r));
    dst[i] = static_cast<int8_t>(r);
    sum += dst[i];
  }
  *xs = amax / 127.f;
  *xc = -offset * sum;
}

#if QM_X86
using chatglm_cpu::load16_f32;
using chatglm_cpu::load8_f32;

// ablk is a multiple of 32 (kMinBlock)
template <typename T>
__attribute__((target("avx512f,avx512bw"))) void quantize_block_avx512(const T* src, int64_t ablk,
                                                                     int32_t offset, int8_t* dst,
                                                                     float* xs, int32_t* xc) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = 0; i < ablk; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(load16_f32(src + i)));
  const float amax = _mm512_reduce_max_ps(m);
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t i = 0; i < ablk; i += 16) {
    const __m512 r = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(load16_f32(src + i), inv)));
    const __m512i q = _mm512_cvtps_epi32(r);  // |r| <= 127: rounding then clamping is the same
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_cvtepi32_epi8(q));
    sum = _mm512_add_epi32(sum, q);
  }
  *xs = amax / 127.f;
  *xc = -offset * _mm512_reduce_add_epi32(sum);
}

// The same bytes as quantize_block_scalar on AVX2: an AVX2-only server quantizes every linear's
// input rows here, where it ran the scalar loop (a nearbyint call per value) before.
template <typename T>
__attribute__((target("avx2,fma"))) void quantize_block_avx2(const T* src, int64_t ablk,
                                                            int32_t offset, int8_t* dst, float* xs,
                                                            int32_t* xc) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 m = _mm256_setzero_ps();
  for (int64_t i = 0; i < ablk; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(load8_f32(src + i), abs_mask));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float amax = _mm_cvtss_f32(m4);
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane split
  __m256i sum = _mm256_setzero_si256();
  for (int64_t i = 0; i < ablk; i += 32) {  // ablk is a multiple of 32
    __m256i q[4];
    for (int j = 0; j < 4; ++j) {
      const __m256 r = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(load8_f32(src + i + 8 * j), inv)));
      q[j] = _mm256_cvtps_epi32(r);  // round half even, as nearbyint; |r| <= 127
      sum = _mm256_add_epi32(sum, q[j]);
    }
    const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permutevar8x32_epi32(w, order));
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  *xs = amax / 127.f;
  *xc = -offset * _mm_cvtsi128_si32(s4);
}
#endif

template <typename T>
void quantize_rows(const T* x, int64_t B, int64_t K, int64_t ablk, int32_t offset, int8_t* xq,
                   float* xs, int32_t* xc) {
  const int64_t nblk = K / ablk;
#if QM_X86
  const bool avx512 = chatglm_cpu::isa_allowed(chatglm_cpu::Isa::kAvx512);
  const bool avx2 = chatglm_cpu::isa_allowed(chatglm_cpu::Isa::kAvx2);
#endif
  // rows of at least ~32K values per thread: a fork/join costs more than quantizing fewer
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / K), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t at = b * K + blk * ablk, i = b * nblk + blk;
#if QM_X86
        if (avx512) {
          quantize_block_avx512(x + at, ablk, offset, xq + at, xs + i, xc + i);
          continue;
        }
        if (avx2) {
          quantize_block_avx2(x + at, ablk, offset, xq + at, xs + i, xc + i);
          continue;
        }
#endif
        quantize_block_scalar(x + at, ablk, offset, xq + at, xs + i, xc + i);
      }
    }
  });
}

// ---------------------------------------------------------------- scalar (portable)
void tile_scalar(const Problem& p, int64_t t, int64_t b0, int nb) {
  const uint8_t* w = p.w + t * p.tile_bytes();
  const int ncols = static_cast<int>(std::min<int64_t>(kTileRows, p.n - t * kTileRows));
  for (int r = 0; r < ncols; ++r) {
    for (int b = 0; b < nb; ++b) {
      const int8_t* xq = p.xq + (b0 + b) * p.K;
      float accf = 0.f;
      for (int64_t blk = 0; blk < p.nblk; ++blk) {
        int32_t acc = p.xc[(b0 + b) * p.nblk + blk];
        for (int64_t k = blk * p.ablk; k < (blk + 1) * p.ablk; ++k) {
          int32_t u;
          if (p.int4) {
            const uint8_t byte = w[(k / 8) * 64 + r * 4 + (k % 8 & 3)];
            u = k % 8 < 4 ? (byte & 0x0F) : (byte >> 4);
          } else {
            u = w[(k / 4) * 64 + r * 4 + (k & 3)];
          }
          acc += u * static_cast<int32_t>(xq[k]);
        }
        const float s = p.xs[(b0 + b) * p.nblk + blk] * p.scale_of_block(blk, t)[r];
        accf = std::fma(static_cast<float>(acc), s, accf);
      }
      p.y[(b0 + b) * p.n + t * kTileRows + r] = accf;
    }
  }
}

#if QM_X86
// The first pass over a tile (batch rows 0..7) asks for the weight bytes this far ahead; later
// passes re-read the tile from L1/L2. At 8 rows a pass consumes a 64-byte chunk in ~16 dpbusd,
// too slowly for the hardware prefetcher to run far enough ahead of memory latency: on the EPYC
// every linear of the medium model at 16 rows took 8.0 ms for int4 and 10.5 for int8 without,
// 4.5 and 6.1 with 8 KiB (4 KiB: 4.6 / 7.0; batch 1 unchanged, 4 rows 2.3 -> 1.9 ms); the AVX2
// path (2 rows a pass) 15.3 -> 13.6 ms for int4 at 16 rows.
constexpr int64_t kPrefetchBytes = 8192;
// With one or two rows a pass keeps up with the hardware prefetcher, and the extra requests
// only got in its way. On a Zen 4 EPYC (the same loop, prefetch vs none, interleaved in one
// process): int8 1 row 6.37 vs 6.09 ms, 2 rows 5.17 vs 4.73; int4 1 row 3.61 vs 3.45; 8 rows
// 8.95 vs 11.13 and 16 rows 13.71 vs 15.74 with it. At 4 rows the CPUs disagree (Zen 4 7.09
// vs 6.26 without, the Zen 5 above 1.9 vs 2.3 with): it keeps the prefetch.
constexpr int64_t kPrefetchMinRows = 3;

// ---------------------------------------------------------------- AVX-512 VNNI
template <int NB, bool kInt4>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_avx512(const Problem& p, int64_t t,
                                                                         int64_t b0) {
  const uint8_t* w = p.w + t * p.tile_bytes();
  const int64_t K = p.K;
  const int8_t* xq = p.xq + b0 * K;
  const float* xs = p.xs + b0 * p.nblk;
  const int32_t* xc = p.xc + b0 * p.nblk;
  const __m512i m0f = _mm512_set1_epi8(0x0F);
  // the first pass over the tile reads memory
  const int64_t pf = b0 == 0 && p.B >= kPrefetchMinRows ? kPrefetchBytes : 0;
  __m512 accf[NB];
  for (int b = 0; b < NB; ++b) accf[b] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < p.nblk; ++blk) {
    // Two accumulators per row (acc, acc2), summed at the block's end: with one, every
    // vpdpbusd waited for the last (latency ~5 cycles), which capped one row at ~13 bytes of
    // weight per cycle, below what a core can stream; two chains double that.
    __m512i acc[NB], acc2[NB];
    for (int b = 0; b < NB; ++b) {
      acc[b] = _mm512_set1_epi32(xc[b * p.nblk + blk]);
      acc2[b] = _mm512_setzero_si512();
    }
    const uint8_t* wb = w + blk * p.block_bytes();
    const int8_t* xb = xq + blk * p.ablk;
    if constexpr (kInt4) {
      for (int64_t c = 0; c < p.ablk / 8; ++c) {
        if (pf > 0) _mm_prefetch(reinterpret_cast<const char*>(wb + c * 64 + pf), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(wb + c * 64);
        const __m512i lo = _mm512_and_si512(v, m0f);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
        for (int b = 0; b < NB; ++b) {
          acc[b] = _mm512_dpbusd_epi32(acc[b], lo, _mm512_set1_epi32(load4(xb + b * K + c * 8)));
          acc2[b] =
              _mm512_dpbusd_epi32(acc2[b], hi, _mm512_set1_epi32(load4(xb + b * K + c * 8 + 4)));
        }
      }
    } else {
      for (int64_t c = 0; c < p.ablk / 4; c += 2) {  // ablk is a multiple of 32: c + 1 exists
        if (pf > 0) {
          _mm_prefetch(reinterpret_cast<const char*>(wb + c * 64 + pf), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(wb + c * 64 + 64 + pf), _MM_HINT_T0);
        }
        const __m512i v = _mm512_loadu_si512(wb + c * 64);
        const __m512i v2 = _mm512_loadu_si512(wb + c * 64 + 64);
        for (int b = 0; b < NB; ++b) {
          acc[b] = _mm512_dpbusd_epi32(acc[b], v, _mm512_set1_epi32(load4(xb + b * K + c * 4)));
          acc2[b] =
              _mm512_dpbusd_epi32(acc2[b], v2, _mm512_set1_epi32(load4(xb + b * K + c * 4 + 4)));
        }
      }
    }
    const __m512 s = _mm512_loadu_ps(p.scale_of_block(blk, t));
    for (int b = 0; b < NB; ++b)
      accf[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[b], acc2[b])),
                                _mm512_mul_ps(s, _mm512_set1_ps(xs[b * p.nblk + blk])), accf[b]);
  }
  const int64_t ncols = std::min<int64_t>(kTileRows, p.n - t * kTileRows);
  const __mmask16 mask = static_cast<__mmask16>((1u << ncols) - 1u);
  for (int b = 0; b < NB; ++b)
    _mm512_mask_storeu_ps(p.y + (b0 + b) * p.n + t * kTileRows, mask, accf[b]);
}

// ---------------------------------------------------------------- AVX2 (no VNNI)
// vpmaddubsw multiplies u8 x s8 pairs into saturating s16: fine for int4 (15*127*2 < 32767).
// For int8 the weight is made signed again and the sign moved onto x (|w| * sign(w)x), the
// usual trick, so pairs stay below 127*127*2; that path needs no offset correction.
template <int NB, bool kInt4>
__attribute__((target("avx2,fma"))) void tile_avx2(const Problem& p, int64_t t, int64_t b0) {
  const uint8_t* w = p.w + t * p.tile_bytes();
  const int64_t K = p.K;
  const int8_t* xq = p.xq + b0 * K;
  const float* xs = p.xs + b0 * p.nblk;
  const int32_t* xc = p.xc + b0 * p.nblk;
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  const int64_t pf = b0 == 0 ? kPrefetchBytes : 0;
  __m256 accf[NB][2];
  for (int b = 0; b < NB; ++b) accf[b][0] = accf[b][1] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < p.nblk; ++blk) {
    __m256i acc[NB][2];
    for (int b = 0; b < NB; ++b)
      acc[b][0] = acc[b][1] = kInt4 ? _mm256_set1_epi32(xc[b * p.nblk + blk]) : _mm256_setzero_si256();
    const uint8_t* wb = w + blk * p.block_bytes();
    const int8_t* xb = xq + blk * p.ablk;
    if constexpr (kInt4) {
      for (int64_t c = 0; c < p.ablk / 8; ++c) {
        if (pf > 0) _mm_prefetch(reinterpret_cast<const char*>(wb + c * 64 + pf), _MM_HINT_T0);
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64 + h * 32));
          const __m256i lo = _mm256_and_si256(v, m0f);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
          for (int b = 0; b < NB; ++b) {
            const __m256i xl = _mm256_set1_epi32(load4(xb + b * K + c * 8));
            const __m256i xh = _mm256_set1_epi32(load4(xb + b * K + c * 8 + 4));
            const __m256i s =
                _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
            acc[b][h] = _mm256_add_epi32(acc[b][h], _mm256_madd_epi16(s, ones));
          }
        }
      }
    } else {
      for (int64_t c = 0; c < p.ablk / 4; ++c) {
        if (pf > 0) _mm_prefetch(reinterpret_cast<const char*>(wb + c * 64 + pf), _MM_HINT_T0);
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64 + h * 32));
          const __m256i ws = _mm256_xor_si256(v, bias);  // back to signed q
          const __m256i wa = _mm256_sign_epi8(ws, ws);   // |q| as u8
          for (int b = 0; b < NB; ++b) {
            const __m256i xv = _mm256_set1_epi32(load4(xb + b * K + c * 4));
            const __m256i s = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv, ws));
            acc[b][h] = _mm256_add_epi32(acc[b][h], _mm256_madd_epi16(s, ones));
          }
        }
      }
    }
    const float* sp = p.scale_of_block(blk, t);
    const __m256 s0 = _mm256_loadu_ps(sp), s1 = _mm256_loadu_ps(sp + 8);
    for (int b = 0; b < NB; ++b) {
      const __m256 sx = _mm256_set1_ps(xs[b * p.nblk + blk]);
      accf[b][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[b][0]), _mm256_mul_ps(s0, sx), accf[b][0]);
      accf[b][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[b][1]), _mm256_mul_ps(s1, sx), accf[b][1]);
    }
  }
  const int64_t ncols = std::min<int64_t>(kTileRows, p.n - t * kTileRows);
  for (int b = 0; b < NB; ++b) {
    float* dst = p.y + (b0 + b) * p.n + t * kTileRows;
    if (ncols == kTileRows) {
      _mm256_storeu_ps(dst, accf[b][0]);
      _mm256_storeu_ps(dst + 8, accf[b][1]);
    } else {
      alignas(32) float tmp[16];
      _mm256_store_ps(tmp, accf[b][0]);
      _mm256_store_ps(tmp + 8, accf[b][1]);
      std::memcpy(dst, tmp, ncols * sizeof(float));
    }
  }
}

// ---------------------------------------------------------------- AMX (int8 tiles)
// TDPBSUD multiplies 16 activation rows x kt channels (tile A, read in place from the quantized
// activations) by the same channels of 16 weight rows (tile B: kt/4 rows of 64 bytes, which is
// our chunk layout: int4 unpacked to bytes in L1 first, int8 read in place) into a
// 16x16 int32 tile C. C sums a whole activation block before it is stored and rescaled on
// AVX-512; that rescale is the cost AMX cannot hide, which is why int4 uses blocks as wide as
// its weight groups (see kernels/ops.py) and per-32 blocks are kept for int8.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

constexpr int kAmxGroup = 4;  // activation blocks in flight (C tiles tmm4-7)

// Packed int4 chunks [c0, c1) of a tile -> dst, one byte per value (2 rows of 64 per chunk).
__attribute__((target("avx512f,avx512bw"))) void unpack_int4(const uint8_t* src, int64_t c0,
                                                             int64_t c1, uint8_t* dst) {
  const __m512i m0f = _mm512_set1_epi8(0x0F);
  for (int64_t c = c0; c < c1; ++c) {
    const __m512i v = _mm512_loadu_si512(src + c * 64);
    _mm512_store_si512(dst + (2 * (c - c0)) * 64, _mm512_and_si512(v, m0f));
    _mm512_store_si512(dst + (2 * (c - c0) + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f));
  }
  asm volatile("" ::: "memory");  // the tile loads that read dst are asm the compiler cannot see
}

template <bool kInt4>
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vnni"))) void amx_tiles(
    const Problem& p, int64_t t0, int64_t t1) {
  const int64_t K = p.K, nblk = p.nblk;
  const int kt = p.ablk % 64 == 0 ? 64 : 32;  // k per tile multiply
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int i = 0; i < 2; ++i) cfg.rows[i] = 16, cfg.colsb[i] = static_cast<uint16_t>(kt);  // A
  for (int i = 2; i < 4; ++i) cfg.rows[i] = static_cast<uint8_t>(kt / 4), cfg.colsb[i] = 64;  // B
  for (int i = 4; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;  // C: 16 x 16 int32
  _tile_loadconfig(&cfg);
  // int4 weights are unpacked to one byte per value (in k order, so B tiles are contiguous).
  // One batch tile (B <= 16): unpack a slab of kAmxGroup blocks at a time, which stays in L1.
  // More: unpack the whole 16-row tile once (K * 16 bytes) and let every batch tile reuse it.
  const bool slabs = p.B <= 16;
  const int64_t slab_k = kAmxGroup * p.ablk;
  std::vector<uint8_t> wstore(kInt4 ? (slabs ? slab_k : K) * 16 + 64 : 0);
  uint8_t* wbuf = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(wstore.data()) + 63) &
                                             ~static_cast<uintptr_t>(63));
  alignas(64) int32_t cbuf[kAmxGroup][16 * 16];
  const int64_t steps = p.ablk / kt;  // tile multiplies per activation block
  auto unpack = [wbuf](const uint8_t* src, int64_t c0, int64_t c1) { unpack_int4(src, c0, c1, wbuf); };
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = p.w + t * p.tile_bytes();
    const uint8_t* w = wt;  // B rows of k = 0 are at w; k advances 16 bytes per k
    if (kInt4 && !slabs) {
      unpack(wt, 0, K / 8);
      w = wbuf;
    }
    const int64_t ncols = std::min<int64_t>(kTileRows, p.n - t * kTileRows);
    const __mmask16 mask = static_cast<__mmask16>((1u << ncols) - 1u);
    for (int64_t b0 = 0; b0 < p.B; b0 += 16) {
      const int M = static_cast<int>(std::min<int64_t>(16, p.B - b0));
      const int8_t* xa = p.xq + b0 * K;
      __m512 acc[16];
#pragma GCC unroll 16
      for (int m = 0; m < 16; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t blk0 = 0; blk0 < nblk; blk0 += kAmxGroup) {
        const int nb = static_cast<int>(std::min<int64_t>(kAmxGroup, nblk - blk0));
        int64_t wk0 = 0;  // the k that w's first byte row holds
        if (kInt4 && slabs) {
          wk0 = blk0 * p.ablk;
          unpack(wt, wk0 / 8, (wk0 + nb * p.ablk) / 8);
          w = wbuf;
        }
#define CHATGLM_AMX_BLOCK(J, C)                                         \
  if (J < nb) {                                                         \
    _tile_zero(C);                                                      \
    const int64_t k0 = (blk0 + J) * p.ablk;                             \
    for (int64_t s = 0; s < steps; s += 2) {                            \
      _tile_loadd(0, xa + k0 + s * kt, K);                              \
      _tile_loadd(2, w + (k0 - wk0 + s * kt) * 16, 64);                 \
      _tile_dpbsud(C, 0, 2);                                            \
      if (s + 1 < steps) {                                              \
        _tile_loadd(1, xa + k0 + (s + 1) * kt, K);                      \
        _tile_loadd(3, w + (k0 - wk0 + (s + 1) * kt) * 16, 64);         \
        _tile_dpbsud(C, 1, 3);                                          \
      }                                                                 \
    }                                                                   \
  }
        CHATGLM_AMX_BLOCK(0, 4)
        CHATGLM_AMX_BLOCK(1, 5)
        CHATGLM_AMX_BLOCK(2, 6)
        CHATGLM_AMX_BLOCK(3, 7)
#undef CHATGLM_AMX_BLOCK
        _tile_stored(4, cbuf[0], 64);
        if (nb > 1) _tile_stored(5, cbuf[1], 64);
        if (nb > 2) _tile_stored(6, cbuf[2], 64);
        if (nb > 3) _tile_stored(7, cbuf[3], 64);
        for (int j = 0; j < nb; ++j) {
          const int64_t blk = blk0 + j;
          const __m512 s = _mm512_loadu_ps(p.scale_of_block(blk, t));
          const int32_t* xc = p.xc + b0 * nblk + blk;
          const float* xs = p.xs + b0 * nblk + blk;
#pragma GCC unroll 16
          for (int m = 0; m < 16; ++m) {
            if (m < M) {
              const __m512i c =
                  _mm512_add_epi32(_mm512_load_si512(cbuf[j] + m * 16), _mm512_set1_epi32(xc[m * nblk]));
              acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), _mm512_mul_ps(s, _mm512_set1_ps(xs[m * nblk])),
                                       acc[m]);
            }
          }
        }
      }
#pragma GCC unroll 16
      for (int m = 0; m < 16; ++m)
        if (m < M) _mm512_mask_storeu_ps(p.y + (b0 + m) * p.n + t * kTileRows, mask, acc[m]);
    }
  }
  _tile_release();
}

template <bool kInt4, int NB>
void run_avx512(const Problem& p, int64_t t, int64_t b0, int nb) {
  if constexpr (NB > 1) {
    if (nb < NB) return run_avx512<kInt4, NB - 1>(p, t, b0, nb);
  }
  tile_avx512<NB, kInt4>(p, t, b0);
}

template <bool kInt4, int NB>
void run_avx2(const Problem& p, int64_t t, int64_t b0, int nb) {
  if constexpr (NB > 1) {
    if (nb < NB) return run_avx2<kInt4, NB - 1>(p, t, b0, nb);
  }
  tile_avx2<NB, kInt4>(p, t, b0);
}

// AMX needs the CPU bits and, on Linux, the kernel's permission to use the tile state.
bool amx_usable() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 24)) || !(d & (1u << 25))) return false;  // AMX-TILE, AMX-INT8
    return chatglm_cpu::request_amx_permission();
  }();
  return ok;
}
#endif  // QM_X86

// Batch rows per pass: all accumulators must stay in registers (32 zmm: 3 per row + 4 fixed;
// 16 ymm for AVX2: 4 per row + 5 fixed). Each pass unpacks the weight tile again, so the more
// rows per pass the better: 8 rather than 6 made 16 rows 22% (int4) and 32% (int8) faster on
// the EPYC (every linear of the medium model, bench/README.md).
constexpr int kNbAvx512 = 8;
constexpr int kNbAvx2 = 2;

// Whether this CPU has the path and CHATGLM_SERVE_CPU_ISA (cpu_common.h) allows it.
bool cpu_has(const char* feature) {
  using chatglm_cpu::Isa;
  using chatglm_cpu::isa_allowed;
#if QM_X86
  if (std::strcmp(feature, "amx") == 0)
    return isa_allowed(Isa::kAmx) && isa_allowed(Isa::kAvx512Vnni) && amx_usable();
  if (std::strcmp(feature, "avx512_vnni") == 0) return isa_allowed(Isa::kAvx512Vnni);
  if (std::strcmp(feature, "avx2") == 0) return isa_allowed(Isa::kAvx2);
#endif
  return std::strcmp(feature, "scalar") == 0;
}

// From how many batch rows AMX beats AVX-512 VNNI, measured on one core (bench/quant_bench.py
// --section shapes --threads 1; int4 g128, activation blocks of 128), VNNI/AMX time:
//   1024->5632: 0.65x at 1 row, 1.05x at 8, 1.6x at 16 and 64; 2816->1024: 0.74x, 0.94x, 1.4x, 1.3x.
// With 32-channel activation blocks (int8, int4 g32) the per-block rescale dominates and AMX only
// wins from 16 rows (1.1-1.3x).
int64_t amx_min_batch(int64_t ablk) { return ablk >= 64 ? 8 : 16; }

int64_t resolve_impl(int64_t impl, int64_t B, int64_t ablk) {
  if (impl == kAuto) {
    if (B >= amx_min_batch(ablk) && cpu_has("amx")) return kAmx;
    if (cpu_has("avx512_vnni")) return kAvx512Vnni;
    if (cpu_has("avx2")) return kAvx2;
    return kScalar;
  }
  const char* names[] = {"", "scalar", "avx2", "avx512_vnni", "amx"};
  TORCH_CHECK(impl >= kScalar && impl <= kAmx, "unknown impl ", impl);
  TORCH_CHECK(cpu_has(names[impl]), "this CPU lacks ", names[impl]);
  return impl;
}

}  // namespace

std::vector<std::string> available_impls() {
  std::vector<std::string> out{"scalar"};
  if (cpu_has("avx2")) out.emplace_back("avx2");
  if (cpu_has("avx512_vnni")) out.emplace_back("avx512_vnni");
  if (cpu_has("amx")) out.emplace_back("amx");
  return out;
}

// x [B, K] fp32 or bf16; w packed uint8; sw fp32 [K/group, npad]; bias fp32 [n] or None
// -> y fp32 [B, n].
torch::Tensor qmm(torch::Tensor x, torch::Tensor w, torch::Tensor sw, int64_t bits, int64_t group,
                  int64_t ablk, int64_t n, int64_t impl, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && sw.device().is_cpu() &&
                  (!bias.has_value() || bias->device().is_cpu()),
              "the CPU kernel got a tensor on ", x.device().is_cpu() ? w.device() : x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [B, K] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "w must be contiguous uint8");
  TORCH_CHECK(sw.scalar_type() == at::kFloat && sw.dim() == 2 && sw.is_contiguous(),
              "sw must be contiguous float32 [K/group, npad]");
  const int64_t B = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kMinBlock == 0, "K=", K, " must be a multiple of ", kMinBlock);
  TORCH_CHECK(group % kMinBlock == 0 && group > 0 && K % group == 0, "group ", group,
              " must be a multiple of 32 dividing K=", K);
  TORCH_CHECK(ablk % kMinBlock == 0 && ablk > 0 && group % ablk == 0, "activation block ", ablk,
              " must be a multiple of 32 dividing the group ", group);
  const int64_t npad = sw.size(1);
  TORCH_CHECK(npad % kTileRows == 0 && n <= npad && n > npad - kTileRows, "bad n/npad");
  TORCH_CHECK(sw.size(0) == K / group, "sw has ", sw.size(0), " groups, expected ", K / group);
  TORCH_CHECK(bits == 8 || w.numel() == npad * K / 2, "packed int4 weight has the wrong size");
  TORCH_CHECK(bits == 4 || w.numel() == npad * K, "packed int8 weight has the wrong size");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "bias must be contiguous float32 [n]");
  const int64_t which = resolve_impl(impl, B, ablk);

  const int64_t nblk = K / ablk;
  auto y = torch::empty({B, n}, x.options().dtype(at::kFloat));
  if (B == 0) return y;
  // AMX reads activations 16 rows at a time: pad with zero rows (their results are dropped).
  const int64_t rows = which == kAmx ? (B + 15) / 16 * 16 : B;
  std::vector<int8_t> xq(rows * K, 0);
  std::vector<float> xs(B * nblk);
  std::vector<int32_t> xc(B * nblk);
  const int32_t offset = bits == 4 ? 8 : 128;
  if (x.scalar_type() == at::kFloat)
    quantize_rows(x.data_ptr<float>(), B, K, ablk, offset, xq.data(), xs.data(), xc.data());
  else
    quantize_rows(x.data_ptr<at::BFloat16>(), B, K, ablk, offset, xq.data(), xs.data(), xc.data());

  const Problem p{w.data_ptr<uint8_t>(), sw.data_ptr<float>(), npad, n, K, group, ablk, B,
                  xq.data(), xs.data(), xc.data(), nblk, y.data_ptr<float>(), bits == 4};
  const int64_t tiles = npad / kTileRows;
  auto run_tiles = [&](int64_t t0, int64_t t1) {
#if QM_X86
    if (which == kAmx) {
      p.int4 ? amx_tiles<true>(p, t0, t1) : amx_tiles<false>(p, t0, t1);
      return;
    }
#endif
    for (int64_t t = t0; t < t1; ++t) {
#if QM_X86
      if (which == kAvx512Vnni) {
        for (int64_t b0 = 0; b0 < B; b0 += kNbAvx512) {
          const int nb = static_cast<int>(std::min<int64_t>(kNbAvx512, B - b0));
          p.int4 ? run_avx512<true, kNbAvx512>(p, t, b0, nb)
                 : run_avx512<false, kNbAvx512>(p, t, b0, nb);
        }
        continue;
      }
      if (which == kAvx2) {
        for (int64_t b0 = 0; b0 < B; b0 += kNbAvx2) {
          const int nb = static_cast<int>(std::min<int64_t>(kNbAvx2, B - b0));
          p.int4 ? run_avx2<true, kNbAvx2>(p, t, b0, nb) : run_avx2<false, kNbAvx2>(p, t, b0, nb);
        }
        continue;
      }
#endif
      for (int64_t b0 = 0; b0 < B; b0 += 8)
        tile_scalar(p, t, b0, static_cast<int>(std::min<int64_t>(8, B - b0)));
    }
  };
  // Threads only for layers of at least ~64 KiB of weights per thread: below that the
  // fork/join (microseconds, far more when the other core is busy) costs more than it saves.
  // An even split up front, not chunks taken in turn: on a 2-vCPU EPYC, 16-64 KiB chunks
  // interleaved between the threads made an int4 batch-1 step 20-80% slower (each core's
  // prefetcher runs past its chunk into the other's), and OpenMP's dynamic schedule likewise.
  // parallel_shares (cpu_common.h), which helps the bf16 and fp32 linears, did not help here: a
  // batch-1 int8 step 2% slower with 32 KiB chunks, 1% with 128 KiB (Zen 4 EPYC, A/B in one
  // process).
  at::parallel_for(0, tiles, std::max<int64_t>(1, (64 << 10) / p.tile_bytes()), run_tiles);
  if (bias.has_value()) {  // here rather than as a torch op: saves a dispatch per call
    const float* bp = bias->data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < n; ++j) yp[b * n + j] += bp[j];
  }
  return y;
}
