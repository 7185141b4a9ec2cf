// y[M, N] = x[M, K] @ W[N, K]^T (+ bias) in fp32, with W packed once into panels of 16 rows.
//
// Why our own kernel: a GEMM micro-kernel needs the 16 outputs of one k in one vector, which
// the plain [N, K] layout does not give; with panels ([N/16, K, 16], W[16p + j, k] at
// panel p, row k, lane j) each x[m, k] is broadcast and multiplied into 4 panels' vectors, a
// 6 x 64 output tile held in 24 registers over all of K: one load per 2.4 FMAs and no
// horizontal sums. Measured on the medium model's shapes, 2 threads, weights in cache: 261
// GFLOP/s at 16 rows against 209 for the dot-product kernel (small_gemm.cpp) and 129 for MKL;
// 374 / 404 at 64 / 256 rows against MKL's 276 / 361. One layout then serves decode and
// prefill, so the weight is held once.
//
// Threads take groups of 4 panels (64 output rows); within a group every 6-row tile of x reuses
// the group's panels from L2, and the first tile prefetches them ahead of use from memory.
// AVX-512, or AVX2 (a panel's k row is two ymm halves; 16 registers hold at most 12
// accumulators: one row x 4 panels, or 3 rows x 2 panels with the x tiles walking each pair of
// panels while it sits in L2; 4-16 rows transpose x instead, see xt_linear), picked at run
// time; elsewhere the caller keeps a plain nn.Linear.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

#include "cpu_common.h"
#include "decode_ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PL_X86 1
#else
#define PL_X86 0
#endif

namespace {

constexpr int64_t kPanel = 16;      // output rows per panel (one AVX-512 vector)
constexpr int kPanels = 4;          // panels per micro-kernel tile
constexpr int kRowsTile = 6;        // x rows per micro-kernel tile
constexpr int64_t kPrefetchK = 16;  // k rows ahead (1 KiB per panel) for the first tile

#if PL_X86
using chatglm_cpu::Isa;

bool has_avx512() {
  static const bool ok = chatglm_cpu::isa_allowed(Isa::kAvx512);
  return ok;
}

bool has_avx2() {
  static const bool ok = chatglm_cpu::isa_allowed(Isa::kAvx2);
  return ok;
}

// out[m, 16 NP cols] (+ bias) = x[m] . the NP panels at w, for MR rows of x, over all of K
template <int MR, int NP, bool kPrefetch>
__attribute__((target("avx512f,avx512dq,fma"))) inline void tile(const float* x, int64_t K,
                                                                const float* w, float* out,
                                                                int64_t ldo, const float* bias) {
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t pstride = K * kPanel;
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[NP];
    for (int j = 0; j < NP; ++j) {
      wv[j] = _mm512_loadu_ps(w + j * pstride + k * kPanel);
      if (kPrefetch)
        _mm_prefetch(reinterpret_cast<const char*>(w + j * pstride + (k + kPrefetchK) * kPanel),
                     _MM_HINT_T0);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * K + k]);
      for (int j = 0; j < NP; ++j) acc[m][j] = _mm512_fmadd_ps(xb, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NP; ++j) {
      __m512 v = acc[m][j];
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j * kPanel));
      _mm512_storeu_ps(out + m * ldo + j * kPanel, v);
    }
  }
}

// rows [m0, M) of one x tile shape MR, the first (m0 == 0) prefetching the panels
template <int MR, int NP>
__attribute__((target("avx512f,avx512dq,fma"))) inline void rows(const float* x, int64_t m0,
                                                                int64_t K, const float* w,
                                                                float* out, int64_t N,
                                                                const float* bias) {
  if (m0 == 0)
    tile<MR, NP, true>(x, K, w, out, N, bias);
  else
    tile<MR, NP, false>(x + m0 * K, K, w, out + m0 * N, N, bias);
}

template <int NP>
__attribute__((target("avx512f,avx512dq,fma"))) void group(const float* x, int64_t M, int64_t K,
                                                           const float* w, float* out, int64_t N,
                                                           const float* bias) {
  int64_t m = 0;
  for (; m + kRowsTile <= M; m += kRowsTile) rows<kRowsTile, NP>(x, m, K, w, out, N, bias);
  switch (M - m) {
    case 5: rows<5, NP>(x, m, K, w, out, N, bias); break;
    case 4: rows<4, NP>(x, m, K, w, out, N, bias); break;
    case 3: rows<3, NP>(x, m, K, w, out, N, bias); break;
    case 2: rows<2, NP>(x, m, K, w, out, N, bias); break;
    case 1: rows<1, NP>(x, m, K, w, out, N, bias); break;
    default: break;
  }
}

// ---------------------------------------------------------------- AVX2
// out[m, 16 NP cols] (+ bias) = x[m] . the NP panels at w for MR rows of x over all of K; a
// panel's k row is two 8-lane halves, so MR x NP x 2 accumulators (at most 12 of 16 ymm).
template <int MR, int NP, bool kPrefetch>
__attribute__((target("avx2,fma"))) inline void tile_avx2(const float* x, int64_t K,
                                                          const float* w, float* out, int64_t ldo,
                                                          const float* bias,
                                                          const float* ahead0 = nullptr,
                                                          const float* ahead1 = nullptr) {
  // one flat array, its loops unrolled by pragma: with acc[MR][NP][2] GCC 12 kept the 3 x 2
  // tile's accumulators in registers but also stored them to the stack every k (12 stores per
  // 12 FMAs), which held 16 rows at a third of the FMA peak
  constexpr int kAcc = MR * NP * 2;
  __m256 acc[kAcc];
#pragma GCC unroll 16
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_setzero_ps();
  const int64_t pstride = K * kPanel;
  for (int64_t k = 0; k < K; ++k) {
    __m256 xb[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) xb[m] = _mm256_broadcast_ss(x + m * K + k);
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) {
      const float* wk = w + j * pstride + k * kPanel;
      if (kPrefetch)
        _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetchK * kPanel), _MM_HINT_T0);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256 wv = _mm256_loadu_ps(wk + 8 * h);
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
          __m256& a = acc[(m * NP + j) * 2 + h];
          a = _mm256_fmadd_ps(xb[m], wv, a);
        }
      }
    }
    // row k of the panels the next pass will read from memory (see pair_avx2)
    if (ahead0 != nullptr) _mm_prefetch(reinterpret_cast<const char*>(ahead0 + k * kPanel), _MM_HINT_T1);
    if (ahead1 != nullptr) _mm_prefetch(reinterpret_cast<const char*>(ahead1 + k * kPanel), _MM_HINT_T1);
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m256 v = acc[(m * NP + j) * 2 + h];
        if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j * kPanel + 8 * h));
        _mm256_storeu_ps(out + m * ldo + j * kPanel + 8 * h, v);
      }
}

// rows [m0, m0 + MR) against NP panels; the first rows (m0 == 0) prefetch the panels, later
// ones the next panels (ahead0/1) while they compute from L2
template <int MR, int NP>
__attribute__((target("avx2,fma"))) inline void rows_avx2(const float* x, int64_t m0, int64_t K,
                                                          const float* w, float* out, int64_t N,
                                                          const float* bias, const float* ahead0,
                                                          const float* ahead1) {
  if (m0 == 0)
    tile_avx2<MR, NP, true>(x, K, w, out, N, bias);
  else
    tile_avx2<MR, NP, false>(x + m0 * K, K, w, out + m0 * N, N, bias, ahead0, ahead1);
}

// All M rows against NP (<= 2) panels, 3 rows at a time. The first 3 rows stream the panels
// from memory at a fraction of the FMA rate; the later ones, computing from L2, prefetch the
// two panels after these (in memory order: the next pair, or the next group's), one row of one
// panel per k, so the next pair's first rows find them in cache rather than waiting on memory
// (the medium model's linears at 16 rows on a Zen 3 EPYC: 58 vs 63 ms, one run each; the
// memory rate there moves by ~20% from minute to minute).
template <int NP>
__attribute__((target("avx2,fma"))) void pair_avx2(const float* x, int64_t M, int64_t K,
                                                   const float* w, float* out, int64_t N,
                                                   const float* bias) {
  const float* next0 = w + NP * K * kPanel;  // prefetching past the end never faults
  const float* next1 = next0 + K * kPanel;
  const int64_t later = (M - 1) / 3;  // passes after the first
  // what the pass over rows [m0, m0 + 3) prefetches, as (first, second) panel
  auto ahead = [&](int64_t m0, int which) -> const float* {
    const int64_t pass = m0 / 3;
    if (pass == 0) return nullptr;                      // it streams its own panels
    if (later == 1) return which == 0 ? next0 : next1;  // one later pass takes both panels
    return which == 0 && pass <= 2 ? (pass == 1 ? next0 : next1) : nullptr;
  };
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) rows_avx2<3, NP>(x, m, K, w, out, N, bias, ahead(m, 0), ahead(m, 1));
  if (M - m == 2) rows_avx2<2, NP>(x, m, K, w, out, N, bias, ahead(m, 0), ahead(m, 1));
  if (M - m == 1) rows_avx2<1, NP>(x, m, K, w, out, N, bias, ahead(m, 0), ahead(m, 1));
}

// a group of np (<= 4) panels: one row takes all four in one pass (8 independent FMA chains
// hide their latency), more rows a pair of panels at a time
__attribute__((target("avx2,fma"))) void group_avx2(const float* x, int64_t M, int64_t K,
                                                    const float* w, float* out, int64_t N,
                                                    const float* bias, int64_t np) {
  if (M == 1 && np == 4) return tile_avx2<1, 4, true>(x, K, w, out, N, bias);
  for (int64_t p = 0; p < np; p += 2) {
    const float* b = bias ? bias + p * kPanel : nullptr;
    if (np - p >= 2)
      pair_avx2<2>(x, M, K, w + p * K * kPanel, out + p * kPanel, N, b);
    else
      pair_avx2<1>(x, M, K, w + p * K * kPanel, out + p * kPanel, N, b);
  }
}

// 4-16 rows (the decode batch of several streams) take the other orientation: x transposed
// into xt [K, 8 R] (rows past M zero), its rows as R ymm (R = 1 up to 8 rows, else 2), each
// weight broadcast from its panel. A panel then streams from memory once for all the rows,
// where the tiles above read it once per 3 rows with the first pass waiting on memory. The k
// axis goes in blocks of 32 rows (2 KiB of the panel): the first column group of a block reads
// it from memory, prefetching 128 rows ahead, the others from L1; with 128-row blocks the
// panel's requests came in bursts and the same loop took 20% longer. The medium model's
// linears on a Zen 3 EPYC (standalone loop, medians of 7-9): 16 rows 41 ms against 58 for the
// 3 x 2 tiles, 12 rows even (44-47 vs 46), 8 rows 31 vs 40, 4 rows 30 vs 33; at 3 rows and
// below, and above 16 (prefill, where the tiles reach the FMA peak from L2), the tiles stay.
constexpr int64_t kXtBlock = 32;   // k rows per block
constexpr int64_t kXtAhead = 128;  // k rows the first column group prefetches ahead (8 KiB)

// accT[c][8 R rows] += x rows . panel column c0 + c, c < NC, over k in [k0, k1): R NC
// accumulators (12 at R = 2, NC = 6); kFirst starts them at zero
template <int R, int NC, bool kFirst, bool kPrefetch>
__attribute__((target("avx2,fma"))) inline void xt_columns(const float* xt, const float* w,
                                                           int64_t k0, int64_t k1, int c0,
                                                           float* accT) {
  constexpr int64_t L = 8 * R;
  __m256 acc[R * NC];
#pragma GCC unroll 12
  for (int i = 0; i < R * NC; ++i)
    acc[i] = kFirst ? _mm256_setzero_ps()
                    : _mm256_load_ps(accT + (c0 + i / R) * L + 8 * (i % R));
  for (int64_t k = k0; k < k1; ++k) {
    __m256 xv[R];
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) xv[r] = _mm256_load_ps(xt + k * L + 8 * r);
    const float* wk = w + k * kPanel + c0;
    if (kPrefetch)
      _mm_prefetch(reinterpret_cast<const char*>(w + (k + kXtAhead) * kPanel), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const __m256 wb = _mm256_broadcast_ss(wk + c);
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) acc[c * R + r] = _mm256_fmadd_ps(xv[r], wb, acc[c * R + r]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < R * NC; ++i) _mm256_store_ps(accT + (c0 + i / R) * L + 8 * (i % R), acc[i]);
}

// one k block of a panel's 16 columns, as 6 + 6 + 4 (R = 2) or 8 + 8 (R = 1); the first group
// reads the block from memory (and prefetches ahead), the others from L1
template <int R, bool kFirst>
__attribute__((target("avx2,fma"))) inline void xt_block(const float* xt, const float* w,
                                                         int64_t k0, int64_t k1, float* accT) {
  if constexpr (R == 2) {
    xt_columns<2, 6, kFirst, true>(xt, w, k0, k1, 0, accT);
    xt_columns<2, 6, kFirst, false>(xt, w, k0, k1, 6, accT);
    xt_columns<2, 4, kFirst, false>(xt, w, k0, k1, 12, accT);
  } else {
    xt_columns<1, 8, kFirst, true>(xt, w, k0, k1, 0, accT);
    xt_columns<1, 8, kFirst, false>(xt, w, k0, k1, 8, accT);
  }
}

// out[m, 16 cols] (+ bias) = x[m] . the panel at w, m < M <= 8 R, over all of K. Each output
// still sums its k in order from zero, as the tiles above do, so a row's result does not
// depend on how many rows share the call.
template <int R>
__attribute__((target("avx2,fma"))) void xt_panel(const float* xt, int64_t M, int64_t K,
                                                  const float* w, float* out, int64_t N,
                                                  const float* bias) {
  constexpr int64_t L = 8 * R;
  alignas(32) float accT[kPanel * L];  // accT[c][m]: the outputs, transposed
  for (int64_t k0 = 0; k0 < K; k0 += kXtBlock) {
    const int64_t k1 = std::min(K, k0 + kXtBlock);
    if (k0 == 0)
      xt_block<R, true>(xt, w, k0, k1, accT);
    else
      xt_block<R, false>(xt, w, k0, k1, accT);
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < kPanel; ++c)
      out[m * N + c] = bias != nullptr ? accT[c * L + m] + bias[c] : accT[c * L + m];
}

// xt[k, m] = x[m, k] for m < M, zero for M <= m < L (k outer: xt is written once, in order)
void transpose_rows(const float* x, int64_t M, int64_t K, int64_t L, float* xt) {
  for (int64_t k = 0; k < K; ++k) {
    float* row = xt + k * L;
    for (int64_t m = 0; m < M; ++m) row[m] = x[m * K + k];
    for (int64_t m = M; m < L; ++m) row[m] = 0.f;
  }
}

// all M (4..16) rows against every panel, the panels handed out one at a time
void xt_linear(const float* x, int64_t M, int64_t K, const float* w, float* out, int64_t N,
               const float* bias, float* xt) {
  const int64_t L = M > 8 ? 16 : 8;
  transpose_rows(x, M, K, L, xt);
  chatglm_cpu::parallel_chunks(N / kPanel, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* wp = w + p * K * kPanel;
      const float* bp = bias != nullptr ? bias + p * kPanel : nullptr;
      if (L == 16)
        xt_panel<2>(xt, M, K, wp, out + p * kPanel, N, bp);
      else
        xt_panel<1>(xt, M, K, wp, out + p * kPanel, N, bp);
    }
  });
}
#endif

}  // namespace

torch::Tensor panel_pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat, "panel_pack: fp32 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % kPanel == 0, "panel_pack: N % 16 must be 0");
  return w.contiguous().view({N / kPanel, kPanel, K}).transpose(1, 2).contiguous();
}

torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& packed,
                           const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == torch::kFloat,
              "panel_linear: x must be a 2-D fp32 CPU tensor");
  TORCH_CHECK(packed.scalar_type() == torch::kFloat && packed.is_contiguous() &&
                  packed.dim() == 3 && packed.size(1) == x.size(1) && packed.size(2) == kPanel,
              "panel_linear: packed weight must come from panel_pack for [N, K]");
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0), N = panels * kPanel;
#if PL_X86
  const bool avx512 = has_avx512();
  TORCH_CHECK(avx512 || has_avx2(), "panel_linear: needs AVX-512 or AVX2");
  const torch::Tensor xc = x.contiguous();
  auto out = torch::empty({M, N}, x.options());
  torch::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined() && bias->numel() > 0) {
    TORCH_CHECK(bias->numel() == N, "panel_linear: bias must have N elements");
    bf = bias->to(torch::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  if (M == 0) return out;
  const float* xp = xc.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (!avx512 && M >= 4 && M <= 16) {
    // the CPU allocator aligns to 64 bytes, as the aligned loads need
    const torch::Tensor xt = torch::empty({K, 16}, x.options());
    xt_linear(xp, M, K, wp, op, N, bp, xt.data_ptr<float>());
    return out;
  }
  const int64_t groups = (panels + kPanels - 1) / kPanels;
  auto run_groups = [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t p0 = g * kPanels;
      const float* w = wp + p0 * K * kPanel;
      float* o = op + p0 * kPanel;
      const float* b = bp ? bp + p0 * kPanel : nullptr;
      const int64_t np = std::min<int64_t>(kPanels, panels - p0);
      if (!avx512) {
        group_avx2(xp, M, K, w, o, N, b, np);
        continue;
      }
      switch (np) {
        case 4: group<4>(xp, M, K, w, o, N, b); break;
        case 3: group<3>(xp, M, K, w, o, N, b); break;
        case 2: group<2>(xp, M, K, w, o, N, b); break;
        default: group<1>(xp, M, K, w, o, N, b); break;
      }
    }
  };
  chatglm_cpu::parallel_shares(groups, 1, run_groups);
  return out;
#else
  TORCH_CHECK(false, "panel_linear: needs an x86-64 CPU with AVX-512 or AVX2");
#endif
}
