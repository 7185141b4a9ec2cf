// Weight-only int4/int8 matmul on the CPU: y[B, N] = x[B, K] @ (q[N, K] * scale)^T.
//
// Why our own kernel: PyTorch's `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm` are fast at
// batch 1 but their time grows with every extra row (they re-dequantize the weight per row), so
// continuous batching would lose its advantage after quantization. Here the activations are
// quantized to int8 per 32-channel block (as llama.cpp's q8_0) and each 64-byte weight chunk is
// unpacked once per group of batch rows and multiplied with VNNI `vpdpbusd` (64 int8 MACs per
// instruction), so a batch of 16 costs far less than 16 batch-1 calls.
//
// Packed layout (built by kernels/ops.py; N padded to a multiple of 16, K a multiple of 32):
//   tiles of 16 output rows; tile t is K/8 (int4) or K/4 (int8) chunks of 64 bytes each.
//   int4 chunk c: byte r*4+j holds u(r, 8c+j) in the low nibble and u(r, 8c+4+j) in the high one,
//                 u = q + 8 (0..15).
//   int8 chunk c: byte r*4+j holds u(r, 4c+j) = q + 128 (1..255).
//   So one 512-bit lane = one output row and four consecutive k: exactly vpdpbusd's shape.
// Scales: fp32 [K/group, N_pad]; group is a multiple of 32 (per-row scale: group = K).
// The unsigned offset is undone per activation block: each block's int32 accumulator starts at
// -offset * sum(xq over the block), so no per-weight correction is needed.
//
// Three implementations with the same arithmetic, picked at run time by CPU features (the
// binary is built for the baseline ISA; the fast paths use per-function target attributes):
//   avx512_vnni (vpdpbusd), avx2 (vpmaddubsw + vpmaddwd), scalar (portable, also non-x86).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QM_X86 1
#else
#define QM_X86 0
#endif

namespace {

constexpr int kTileRows = 16;
constexpr int kBlock = 32;  // activation quantization block (k channels)

enum Impl : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512Vnni = 3 };

struct Problem {
  const uint8_t* w;   // packed weight
  const float* sw;    // [G, npad]
  int64_t npad, n, K, group, B;
  const int8_t* xq;   // [B, K]
  const float* xs;    // [B, nblk]
  const int32_t* xc;  // [B, nblk], -offset * sum(xq in block)
  int64_t nblk;
  float* y;           // [B, n]
  bool int4;
  int64_t tile_bytes() const { return int4 ? K * 8 : K * 16; }
};

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---------------------------------------------------------------- activation quantization
template <typename T>
void quantize_rows(const T* x, int64_t B, int64_t K, int32_t offset, int8_t* xq, float* xs,
                   int32_t* xc) {
  const int64_t nblk = K / kBlock;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const T* src = x + b * K + blk * kBlock;
        float v[kBlock];
        float amax = 0.f;
        for (int i = 0; i < kBlock; ++i) {
          v[i] = static_cast<float>(src[i]);
          amax = std::max(amax, std::fabs(v[i]));
        }
        const float scale = amax / 127.f;
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        int8_t* dst = xq + b * K + blk * kBlock;
        for (int i = 0; i < kBlock; ++i) {
          float r = std::nearbyint(v[i] * inv);
          r = std::min(127.f, std::max(-127.f, r));
          dst[i] = static_cast<int8_t>(r);
          sum += dst[i];
        }
        xs[b * nblk + blk] = scale;
        xc[b * nblk + blk] = -offset * sum;
      }
    }
  });
}

// ---------------------------------------------------------------- scalar (portable)
void tile_scalar(const Problem& p, int64_t t, int64_t b0, int nb) {
  const uint8_t* w = p.w + t * p.tile_bytes();
  const int64_t bpg = p.group / kBlock;
  const int ncols = static_cast<int>(std::min<int64_t>(kTileRows, p.n - t * kTileRows));
  for (int r = 0; r < ncols; ++r) {
    for (int b = 0; b < nb; ++b) {
      const int8_t* xq = p.xq + (b0 + b) * p.K;
      float accf = 0.f;
      for (int64_t g = 0; g < p.K / p.group; ++g) {
        float accg = 0.f;
        for (int64_t blk = g * bpg; blk < (g + 1) * bpg; ++blk) {
          int32_t acc = p.xc[(b0 + b) * p.nblk + blk];
          for (int64_t k = blk * kBlock; k < (blk + 1) * kBlock; ++k) {
            int32_t u;
            if (p.int4) {
              const int64_t c = k / 8, kk = k % 8;
              const uint8_t byte = w[c * 64 + r * 4 + (kk & 3)];
              u = kk < 4 ? (byte & 0x0F) : (byte >> 4);
            } else {
              u = w[(k / 4) * 64 + r * 4 + (k & 3)];
            }
            acc += u * static_cast<int32_t>(xq[k]);
          }
          accg = std::fma(static_cast<float>(acc), p.xs[(b0 + b) * p.nblk + blk], accg);
        }
        accf = std::fma(accg, p.sw[g * p.npad + t * kTileRows + r], accf);
      }
      p.y[(b0 + b) * p.n + t * kTileRows + r] = accf;
    }
  }
}

#if QM_X86
// ---------------------------------------------------------------- AVX-512 VNNI
template <int NB, bool kInt4>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_avx512(const Problem& p, int64_t t,
                                                                         int64_t b0) {
  const uint8_t* w = p.w + t * p.tile_bytes();
  const int64_t bpg = p.group / kBlock;
  const int64_t K = p.K;
  const int8_t* xq = p.xq + b0 * K;
  const float* xs = p.xs + b0 * p.nblk;
  const int32_t* xc = p.xc + b0 * p.nblk;
  const __m512i m0f = _mm512_set1_epi8(0x0F);
  __m512 accf[NB];
  for (int b = 0; b < NB; ++b) accf[b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / p.group; ++g) {
    __m512 accg[NB];
    for (int b = 0; b < NB; ++b) accg[b] = _mm512_setzero_ps();
    for (int64_t blk = g * bpg; blk < (g + 1) * bpg; ++blk) {
      __m512i acc[NB];
      for (int b = 0; b < NB; ++b) acc[b] = _mm512_set1_epi32(xc[b * p.nblk + blk]);
      const int8_t* xb = xq + blk * kBlock;
      if constexpr (kInt4) {
        const uint8_t* wb = w + blk * 256;
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const __m512i v = _mm512_loadu_si512(wb + c * 64);
          const __m512i lo = _mm512_and_si512(v, m0f);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
          for (int b = 0; b < NB; ++b) {
            acc[b] = _mm512_dpbusd_epi32(acc[b], lo, _mm512_set1_epi32(load4(xb + b * K + c * 8)));
            acc[b] =
                _mm512_dpbusd_epi32(acc[b], hi, _mm512_set1_epi32(load4(xb + b * K + c * 8 + 4)));
          }
        }
      } else {
        const uint8_t* wb = w + blk * 512;
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) {
          const __m512i v = _mm512_loadu_si512(wb + c * 64);
          for (int b = 0; b < NB; ++b)
            acc[b] = _mm512_dpbusd_epi32(acc[b], v, _mm512_set1_epi32(load4(xb + b * K + c * 4)));
        }
      }
      for (int b = 0; b < NB; ++b)
        accg[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[b]), _mm512_set1_ps(xs[b * p.nblk + blk]),
                                  accg[b]);
    }
    const __m512 s = _mm512_loadu_ps(p.sw + g * p.npad + t * kTileRows);
    for (int b = 0; b < NB; ++b) accf[b] = _mm512_fmadd_ps(accg[b], s, accf[b]);
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
  const int64_t bpg = p.group / kBlock;
  const int64_t K = p.K;
  const int8_t* xq = p.xq + b0 * K;
  const float* xs = p.xs + b0 * p.nblk;
  const int32_t* xc = p.xc + b0 * p.nblk;
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 accf[NB][2];
  for (int b = 0; b < NB; ++b) accf[b][0] = accf[b][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / p.group; ++g) {
    __m256 accg[NB][2];
    for (int b = 0; b < NB; ++b) accg[b][0] = accg[b][1] = _mm256_setzero_ps();
    for (int64_t blk = g * bpg; blk < (g + 1) * bpg; ++blk) {
      __m256i acc[NB][2];
      for (int b = 0; b < NB; ++b)
        acc[b][0] = acc[b][1] =
            kInt4 ? _mm256_set1_epi32(xc[b * p.nblk + blk]) : _mm256_setzero_si256();
      const int8_t* xb = xq + blk * kBlock;
      if constexpr (kInt4) {
        const uint8_t* wb = w + blk * 256;
        for (int c = 0; c < 4; ++c) {
          for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64 + h * 32));
            const __m256i lo = _mm256_and_si256(v, m0f);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
            for (int b = 0; b < NB; ++b) {
              const __m256i xl = _mm256_set1_epi32(load4(xb + b * K + c * 8));
              const __m256i xh = _mm256_set1_epi32(load4(xb + b * K + c * 8 + 4));
              const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl),
                                                 _mm256_maddubs_epi16(hi, xh));
              acc[b][h] = _mm256_add_epi32(acc[b][h], _mm256_madd_epi16(s, ones));
            }
          }
        }
      } else {
        const uint8_t* wb = w + blk * 512;
        for (int c = 0; c < 8; ++c) {
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
      for (int b = 0; b < NB; ++b) {
        const __m256 sx = _mm256_set1_ps(xs[b * p.nblk + blk]);
        for (int h = 0; h < 2; ++h)
          accg[b][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[b][h]), sx, accg[b][h]);
      }
    }
    const float* s = p.sw + g * p.npad + t * kTileRows;
    const __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + 8);
    for (int b = 0; b < NB; ++b) {
      accf[b][0] = _mm256_fmadd_ps(accg[b][0], s0, accf[b][0]);
      accf[b][1] = _mm256_fmadd_ps(accg[b][1], s1, accf[b][1]);
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
#endif  // QM_X86

// Batch rows per pass: all accumulators must stay in registers (32 zmm: 3 per row + 4 fixed;
// 16 ymm for AVX2: 6 per row + 3 fixed).
constexpr int kNbAvx512 = 8;
constexpr int kNbAvx2 = 2;

bool cpu_has(const char* feature) {
#if QM_X86
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx512_vnni") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
  if (std::strcmp(feature, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::strcmp(feature, "scalar") == 0;
}

int64_t resolve_impl(int64_t impl) {
  if (impl == kAuto) {
    if (cpu_has("avx512_vnni")) return kAvx512Vnni;
    if (cpu_has("avx2")) return kAvx2;
    return kScalar;
  }
  const char* names[] = {"", "scalar", "avx2", "avx512_vnni"};
  TORCH_CHECK(impl >= kScalar && impl <= kAvx512Vnni, "unknown impl ", impl);
  TORCH_CHECK(cpu_has(names[impl]), "this CPU lacks ", names[impl]);
  return impl;
}

}  // namespace

std::vector<std::string> available_impls() {
  std::vector<std::string> out{"scalar"};
  if (cpu_has("avx2")) out.emplace_back("avx2");
  if (cpu_has("avx512_vnni")) out.emplace_back("avx512_vnni");
  return out;
}

// x [B, K] fp32 or bf16; w packed uint8; sw fp32 [K/group, npad] -> y fp32 [B, n].
torch::Tensor qmm(torch::Tensor x, torch::Tensor w, torch::Tensor sw, int64_t bits, int64_t group,
                  int64_t n, int64_t impl) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [B, K] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "w must be contiguous uint8");
  TORCH_CHECK(sw.scalar_type() == at::kFloat && sw.dim() == 2 && sw.is_contiguous(),
              "sw must be contiguous float32 [K/group, npad]");
  const int64_t B = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kBlock == 0, "K=", K, " must be a multiple of ", kBlock);
  TORCH_CHECK(group % kBlock == 0 && group > 0 && K % group == 0, "group ", group,
              " must be a multiple of 32 dividing K=", K);
  const int64_t npad = sw.size(1);
  TORCH_CHECK(npad % kTileRows == 0 && n <= npad && n > npad - kTileRows, "bad n/npad");
  TORCH_CHECK(sw.size(0) == K / group, "sw has ", sw.size(0), " groups, expected ", K / group);
  TORCH_CHECK(bits == 8 || w.numel() == npad * K / 2, "packed int4 weight has the wrong size");
  TORCH_CHECK(bits == 4 || w.numel() == npad * K, "packed int8 weight has the wrong size");
  const int64_t which = resolve_impl(impl);

  const int64_t nblk = K / kBlock;
  auto y = torch::empty({B, n}, x.options().dtype(at::kFloat));
  if (B == 0) return y;
  std::vector<int8_t> xq(B * K);
  std::vector<float> xs(B * nblk);
  std::vector<int32_t> xc(B * nblk);
  const int32_t offset = bits == 4 ? 8 : 128;
  if (x.scalar_type() == at::kFloat)
    quantize_rows(x.data_ptr<float>(), B, K, offset, xq.data(), xs.data(), xc.data());
  else
    quantize_rows(x.data_ptr<at::BFloat16>(), B, K, offset, xq.data(), xs.data(), xc.data());

  Problem p{w.data_ptr<uint8_t>(), sw.data_ptr<float>(), npad, n, K, group, B,
            xq.data(), xs.data(), xc.data(), nblk, y.data_ptr<float>(), bits == 4};
  const int64_t tiles = npad / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
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
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmm", &qmm, "weight-only int4/int8 matmul (packed layout, see source)");
  m.def("available_impls", &available_impls, "implementations this CPU can run");
}
