// y[M, N] = x[M, K] @ W[N, K]^T (+ bias) in bf16 without AMX: AVX-512 BF16, AVX-512F, AVX2 and a
// portable loop, picked at run time (the binary is built for the baseline ISA; each fast path is
// compiled with its own target attribute). AMX machines keep amx_linear.cpp: the same packed
// weight feeds both, so one layout serves every x86 server.
//
// Why our own kernel: a decode step's speed is the weight stream. oneDNN's packed bf16 linear on
// an AVX-512 EPYC without AMX read the medium model's weights at about half the read bandwidth
// (45 tok/s at batch 1, llama.cpp's f16 80); this kernel reads them at ~87% (93 tok/s, 1.13x
// llama.cpp f16: bench/README.md). Each weight byte is loaded once per step whatever the row
// count and feeds up to 6 rows from registers, so 16 rows cost ~1.5x one row's time.
//
// Layout: amx_bf16_pack's [N/16, K/32, 16, 16, 2] (N padded to 16 and K to 32 with zeros by
// bf16_pack where they are not multiples). Row r of chunk c of tile t is 64 bytes: lane n holds
// the pair (W[16t+n, 32c+2r], W[16t+n, 32c+2r+1]). That is exactly vdpbf16ps's operand: with x's
// pair (x[32c+2r], x[32c+2r+1]) broadcast to every lane, one instruction adds both products to
// the 16 outputs' accumulators, no horizontal sums. Without AVX-512 BF16 the pair is widened in
// registers (a shift gives the even k, a mask the odd one: bf16 is the top half of an fp32) and
// fed to two FMAs with x's even and odd element broadcast.
//
// Register tiling: a micro-kernel holds kTiles (4) output tiles x MR activation rows of
// accumulators over all of K (4 x 6 = 24 zmm, + 4 weight vectors + 1 broadcast of 32). Each
// 64-byte weight load then feeds MR multiplies, so 16 rows run at 6 multiplies per load; at one
// row the four independent accumulator chains hide vdpbf16ps' latency and the loop is bound by
// the read stream. Threads take groups of 4 tiles (64 output rows, 4 sequential streams the
// hardware prefetcher follows); within a group every MR-row slab of x re-reads the group's
// weights from L2 (4 x 16 x K x 2 bytes: 128 KiB at K = 1024, 360 KiB at K = 2816).
#include <torch/extension.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "decode_ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HL_X86 1
#else
#define HL_X86 0
#endif

namespace {

using chatglm_cpu::Isa;

constexpr int64_t kTileN = 16;  // output rows per tile (one 512-bit vector of fp32)
constexpr int64_t kTileK = 32;  // k per chunk (16 rows of pairs)
constexpr int kTiles = 4;       // tiles per micro-kernel / per thread work item
constexpr int kMR512 = 6;       // activation rows per AVX-512 micro-kernel
constexpr int kMR256 = 2;       // AVX2 activation rows (with 2 tiles: see mk_avx2)

struct Problem {
  const uint16_t* w;  // packed weight
  int64_t chunks;     // Kpad / 32
  int64_t tiles;      // Npad / 16
  int64_t N;          // real output features
  int64_t M;
  const uint16_t* xb;  // bf16 x [M, Kpad] (zero padded), for the vdpbf16ps path
  const float* xf;     // fp32 x [M, Kpad] (zero padded), for the widening paths
  int64_t ldx;         // = Kpad
  float* y;            // fp32 [M, Npad] before bias / rounding
  int64_t ldy;         // = Npad
  const uint16_t* tile_ptr(int64_t t) const { return w + t * chunks * kTileN * kTileK; }
};

// ---------------------------------------------------------------- portable
void tiles_scalar(const Problem& p, int64_t t0, int nt) {
  for (int64_t m = 0; m < p.M; ++m) {
    const float* x = p.xf + m * p.ldx;
    for (int j = 0; j < nt; ++j) {
      const uint16_t* w = p.tile_ptr(t0 + j);
      float acc[kTileN] = {0};
      for (int64_t c = 0; c < p.chunks; ++c)
        for (int r = 0; r < 16; ++r)
          for (int n = 0; n < kTileN; ++n)
            for (int e = 0; e < 2; ++e) {
              const uint32_t bits = static_cast<uint32_t>(w[((c * 16 + r) * kTileN + n) * 2 + e])
                                    << 16;
              float wf;
              std::memcpy(&wf, &bits, 4);
              acc[n] += wf * x[c * kTileK + 2 * r + e];
            }
      std::memcpy(p.y + m * p.ldy + (t0 + j) * kTileN, acc, sizeof(acc));
    }
  }
}

#if HL_X86
// ---------------------------------------------------------------- AVX-512 BF16 (vdpbf16ps)
template <int MR, int NT>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void mk_avx512bf16(const Problem& p,
                                                                           int64_t t0,
                                                                           int64_t m0) {
  __m512 acc[MR][NT];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_setzero_ps();
  const uint16_t* w[NT];
  for (int j = 0; j < NT; ++j) w[j] = p.tile_ptr(t0 + j);
  const uint16_t* x = p.xb + m0 * p.ldx;
  const int64_t rows = p.chunks * 16;  // 64-byte weight rows per tile
  for (int64_t r = 0; r < rows; ++r) {
    __m512i wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = _mm512_loadu_si512(w[j] + r * 32);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * p.ldx + 2 * r, 4);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)wv[j], xv);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NT; ++j)
      _mm512_storeu_ps(p.y + (m0 + m) * p.ldy + (t0 + j) * kTileN, acc[m][j]);
}

// ---------------------------------------------------------------- AVX-512F (widen to fp32)
template <int MR, int NT>
__attribute__((target("avx512f,avx512bw,fma"))) void mk_avx512(const Problem& p, int64_t t0,
                                                               int64_t m0) {
  __m512 acc[MR][NT];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_setzero_ps();
  const uint16_t* w[NT];
  for (int j = 0; j < NT; ++j) w[j] = p.tile_ptr(t0 + j);
  const float* x = p.xf + m0 * p.ldx;
  const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const int64_t rows = p.chunks * 16;
  for (int64_t r = 0; r < rows; ++r) {
    __m512 we[NT], wo[NT];
    for (int j = 0; j < NT; ++j) {
      const __m512i v = _mm512_loadu_si512(w[j] + r * 32);
      we[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));    // W[n, 2r]
      wo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));     // W[n, 2r + 1]
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 xe = _mm512_set1_ps(x[m * p.ldx + 2 * r]);
      const __m512 xo = _mm512_set1_ps(x[m * p.ldx + 2 * r + 1]);
      for (int j = 0; j < NT; ++j) {
        acc[m][j] = _mm512_fmadd_ps(we[j], xe, acc[m][j]);
        acc[m][j] = _mm512_fmadd_ps(wo[j], xo, acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NT; ++j)
      _mm512_storeu_ps(p.y + (m0 + m) * p.ldy + (t0 + j) * kTileN, acc[m][j]);
}

// ---------------------------------------------------------------- AVX2 (widen to fp32)
// 16 ymm registers: a tile row is two 8-lane halves, so MR rows x NT tiles take 2 MR NT
// accumulators; MR = 2, NT = 2 leaves 8 for the widened weights and the broadcasts. One row
// takes NT = 4 (8 accumulators): its 8 FMA chains hide their latency better (one row on a
// 2-vCPU EPYC Zen 3, the medium model's linears: 10.4 vs 10.9 ms).
template <int MR, int NT>
__attribute__((target("avx2,fma"))) void mk_avx2(const Problem& p, int64_t t0, int64_t m0) {
  // a flat accumulator array, loops unrolled by pragma: as acc[MR][NT][2], GCC 12 also stored
  // the 2-row kernel's accumulators to the stack every step (see panel_linear.cpp)
  constexpr int kAcc = MR * NT * 2;
  __m256 acc[kAcc];
#pragma GCC unroll 16
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_setzero_ps();
  const uint16_t* w[NT];
  for (int j = 0; j < NT; ++j) w[j] = p.tile_ptr(t0 + j);
  const float* x = p.xf + m0 * p.ldx;
  const __m256i hi = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const int64_t rows = p.chunks * 16;
  for (int64_t r = 0; r < rows; ++r) {
    __m256 xe[MR], xo[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      xe[m] = _mm256_broadcast_ss(x + m * p.ldx + 2 * r);
      xo[m] = _mm256_broadcast_ss(x + m * p.ldx + 2 * r + 1);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i v =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + r * 32 + h * 16));
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
          __m256& a = acc[(m * NT + j) * 2 + h];
          a = _mm256_fmadd_ps(we, xe[m], a);
          a = _mm256_fmadd_ps(wo, xo[m], a);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_ps(p.y + (m0 + m) * p.ldy + (t0 + j) * kTileN + h * 8,
                         acc[(m * NT + j) * 2 + h]);
}
#endif

#if HL_X86
// Micro-kernels as class templates, so that one driver below unrolls rows and tiles for each.
template <int MR, int NT>
struct Bf16Mk {
  static void run(const Problem& p, int64_t t0, int64_t m0) { mk_avx512bf16<MR, NT>(p, t0, m0); }
};
template <int MR, int NT>
struct F512Mk {
  static void run(const Problem& p, int64_t t0, int64_t m0) { mk_avx512<MR, NT>(p, t0, m0); }
};
template <int MR, int NT>
struct F256Mk {
  static void run(const Problem& p, int64_t t0, int64_t m0) { mk_avx2<MR, NT>(p, t0, m0); }
};

// the micro-kernel for exactly `mr` (< MR) rows and NT tiles: templates unrolled at compile time
template <template <int, int> class Mk, int MR, int NT>
void tail(const Problem& p, int64_t t0, int64_t m0, int mr) {
  if constexpr (MR > 1) {
    if (mr == MR) return Mk<MR, NT>::run(p, t0, m0);
    return tail<Mk, MR - 1, NT>(p, t0, m0, mr);
  } else {
    Mk<1, NT>::run(p, t0, m0);
  }
}

template <template <int, int> class Mk, int MR, int NT>
void group_rows(const Problem& p, int64_t t0) {
  int64_t m = 0;
  for (; m + MR <= p.M; m += MR) Mk<MR, NT>::run(p, t0, m);
  if (m < p.M) tail<Mk, MR - 1 < 1 ? 1 : MR - 1, NT>(p, t0, m, static_cast<int>(p.M - m));
}

// one group of nt (<= NTmax) tiles for all M rows, MR rows at a time
template <template <int, int> class Mk, int MR, int NTmax>
void group(const Problem& p, int64_t t0, int nt) {
  if constexpr (NTmax > 1) {
    if (nt < NTmax) return group<Mk, MR, NTmax - 1>(p, t0, nt);
  }
  group_rows<Mk, MR, NTmax>(p, t0);
}
#endif

// out[n] = bf16(y[n] + bias[n]) for n in [n0, n1), rounded to nearest even as torch does
// (finite values; a plain integer loop the compiler vectorizes)
void round_rows(const float* y, const float* bias, int64_t n0, int64_t n1, uint16_t* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const float v = y[n] + (bias ? bias[n] : 0.f);
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    out[n] = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
}

// the implementation ids below match kernels/cpu_decode.py HALF_IMPLS
enum HalfImpl : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3, kAvx512Bf16 = 4, kAmx = 5 };

bool impl_runs(int64_t impl) {
  switch (impl) {
    case kScalar: return true;
    case kAvx2: return chatglm_cpu::isa_allowed(Isa::kAvx2);
    case kAvx512: return chatglm_cpu::isa_allowed(Isa::kAvx512);
    case kAvx512Bf16: return chatglm_cpu::isa_allowed(Isa::kAvx512Bf16);
    case kAmx: return chatglm_cpu::isa_allowed(Isa::kAmx) && amx_bf16_usable();
    default: return false;
  }
}

}  // namespace

int64_t bf16_linear_impl(int64_t impl) {
  if (impl != kAuto) {
    TORCH_CHECK(impl >= kScalar && impl <= kAmx, "bf16_linear: unknown impl ", impl);
    TORCH_CHECK(impl_runs(impl), "bf16_linear: this CPU (or CHATGLM_SERVE_CPU_ISA) does not allow ",
                "impl ", impl);
    return impl;
  }
  for (int64_t i : {kAmx, kAvx512Bf16, kAvx512, kAvx2})
    if (impl_runs(i)) return i;
  return kScalar;
}

torch::Tensor bf16_pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16, "bf16_pack: bf16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t np = (N + kTileN - 1) / kTileN * kTileN, kp = (K + kTileK - 1) / kTileK * kTileK;
  torch::Tensor wp = w;
  if (np != N || kp != K) {  // zero rows / columns: they add nothing to any output
    wp = torch::zeros({np, kp}, w.options());
    wp.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  }
  return amx_bf16_pack(wp);
}

// y = x @ W^T + bias: x [M, K] bf16, packed = bf16_pack(W) with W [N, K] -> bf16 [M, N]
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                          const c10::optional<torch::Tensor>& bias, int64_t impl) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == torch::kBFloat16,
              "bf16_linear: x must be a 2-D bf16 CPU tensor");
  TORCH_CHECK(packed.scalar_type() == torch::kBFloat16 && packed.is_contiguous() &&
                  packed.dim() == 5 && packed.size(2) == 16 && packed.size(3) == 16 &&
                  packed.size(4) == 2,
              "bf16_linear: packed weight must come from bf16_pack");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t tiles = packed.size(0), chunks = packed.size(1);
  const int64_t Npad = tiles * kTileN, Kpad = chunks * kTileK;
  TORCH_CHECK(N <= Npad && N > Npad - kTileN && K <= Kpad && K > Kpad - kTileK,
              "bf16_linear: packed weight is for another shape");
  const int64_t which = bf16_linear_impl(impl);
  if (which == kAmx && Npad == N && Kpad == K) return amx_bf16_linear(x, packed, N, bias);
  // (an AMX machine with a padded shape runs the next-best path: AVX-512 BF16 comes with AMX)
  const int64_t run = which == kAmx ? kAvx512Bf16 : which;

  torch::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined() && bias->numel() > 0) {
    TORCH_CHECK(bias->numel() == N, "bf16_linear: bias must have N elements");
    bf = bias->to(torch::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  // x once per call in the form the path reads, K padded with zeros: bf16 pairs for
  // vdpbf16ps, fp32 for the widening paths (M x K values: nothing next to M x N x K).
  torch::Tensor xin = x;
  if (run == kAvx512Bf16) {
    if (Kpad != K || !x.is_contiguous()) {
      xin = torch::zeros({M, Kpad}, x.options());
      xin.narrow(1, 0, K).copy_(x);
    }
  } else {
    xin = torch::zeros({M, Kpad}, x.options().dtype(torch::kFloat));
    xin.narrow(1, 0, K).copy_(x);
  }
  std::vector<float> y(static_cast<size_t>(M * Npad));
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  Problem p{reinterpret_cast<const uint16_t*>(packed.data_ptr()),
            chunks,
            tiles,
            N,
            M,
            run == kAvx512Bf16 ? reinterpret_cast<const uint16_t*>(xin.data_ptr()) : nullptr,
            run == kAvx512Bf16 ? nullptr : xin.data_ptr<float>(),
            Kpad,
            y.data(),
            Npad};
  const int64_t groups = (tiles + kTiles - 1) / kTiles;
  auto run_groups = [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t t0 = g * kTiles;
      const int nt = static_cast<int>(std::min<int64_t>(kTiles, tiles - t0));
#if HL_X86
      if (run == kAvx512Bf16) {
        group<Bf16Mk, kMR512, kTiles>(p, t0, nt);
        continue;
      }
      if (run == kAvx512) {
        group<F512Mk, kMR512, kTiles>(p, t0, nt);
        continue;
      }
      if (run == kAvx2 && p.M == 1) {  // 4 tiles' 8 chains: ~5% faster than 2 at one row
        group<F256Mk, 1, kTiles>(p, t0, nt);
        continue;
      }
      if (run == kAvx2) {
        group<F256Mk, kMR256, 2>(p, t0, std::min(nt, 2));
        if (nt > 2) group<F256Mk, kMR256, 2>(p, t0 + 2, nt - 2);
        continue;
      }
#endif
      tiles_scalar(p, t0, nt);
    }
    // bias and rounding of the groups just computed, by the thread that holds them in cache
    const int64_t n0 = g0 * kTiles * kTileN, n1 = std::min(N, g1 * kTiles * kTileN);
    for (int64_t m = 0; m < M; ++m)
      round_rows(y.data() + m * Npad, bp, n0, n1, op + m * N);
  };
  chatglm_cpu::parallel_shares(groups, 1, run_groups);
  return out;
}
