// y[M, N] = x[M, K] @ W[N, K]^T (+ bias) in bf16 on AMX, with W packed once into B tiles.
//
// Why our own kernel: a decode step reads every weight once per step, so its speed is the
// weight stream. oneDNN's packed bf16 linear streamed the medium model's weights at ~20 GB/s here
// for 1 to 16 rows, where the machine reads ~28 GB/s; this kernel reads them at ~28 GB/s from one
// row to sixteen, since each 1 KiB B tile feeds one TDPBF16PS whatever the row count.
//
// Packed layout ([N/16, K/32, 16, 16, 2], from amx_bf16_pack): tile t holds output rows
// 16t..16t+15, chunk c holds k = 32c..32c+31, and within a chunk row r, column n holds the pair
// (W[16t+n, 32c+2r], W[16t+n, 32c+2r+1]): exactly an AMX B tile (16 rows of 64 bytes), so a tile
// is one contiguous 1 KiB load. Threads split groups of 4 output tiles (4 C tiles in flight, one
// A tile load feeds 4 multiplies); within a group every 16-row slab of x reuses the group's B
// tiles from L2, which keeps prefill chunks compute-bound.
//
// Needs AMX-BF16 and the kernel's permission for the tile state (amx_bf16_usable); callers keep
// oneDNN's packed linear where it is missing (model/cpu_linear.py).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_common.h"
#include "decode_ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define AL_X86 1
#else
#define AL_X86 0
#endif

namespace {

constexpr int64_t kTileN = 16;     // output rows per B tile
constexpr int64_t kTileK = 32;     // k per B tile (16 rows of bf16 pairs)
constexpr int64_t kGroup = 4;      // B tiles (C tiles) in flight per A tile load
constexpr int64_t kTileElems = kTileN * kTileK;

#if AL_X86
struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool usable() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;  // AMX-BF16, AMX-TILE
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) return false;
    return chatglm_cpu::request_amx_permission();
  }();
  return ok;
}

// tmm0: A (rows x 32 bf16); tmm1-3: B (16 x 32 bf16 in pairs); tmm4-7: C (rows x 16 fp32)
__attribute__((target("amx-tile,amx-bf16"))) void configure(int rows) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  cfg.rows[0] = static_cast<uint8_t>(rows);
  cfg.colsb[0] = 64;
  for (int i = 1; i < 4; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  for (int i = 4; i < 8; ++i) cfg.rows[i] = static_cast<uint8_t>(rows), cfg.colsb[i] = 64;
  _tile_loadconfig(&cfg);
}

// C tiles (fp32, 16 columns each) + bias -> bf16 rows of out, rounded to nearest even
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) void store_rows(
    const float (*cbuf)[16][16], int nt, int rows, const float* bias, int64_t n0, uint16_t* out,
    int64_t ldo) {
  for (int j = 0; j < nt; ++j) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + n0 + j * kTileN) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      const __m512 v = _mm512_add_ps(_mm512_load_ps(cbuf[j][r]), b);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + n0 + j * kTileN),
                          (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16,avx512bw,avx512vl"))) void groups(
    const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias,
    uint16_t* out, int64_t g0, int64_t g1) {
  const int64_t chunks = K / kTileK, tiles = N / kTileN;
  alignas(64) float cbuf[kGroup][16][16];
  int configured = -1;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t t0 = g * kGroup;
    const int nt = static_cast<int>(std::min<int64_t>(kGroup, tiles - t0));
    const uint16_t* b = w + t0 * chunks * kTileElems;
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      const int rows = static_cast<int>(std::min<int64_t>(16, M - m0));
      if (rows != configured) configure(rows), configured = rows;
      const uint16_t* a = x + m0 * K;
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(0, a + c * kTileK, K * 2);
        _tile_loadd(1, b + c * kTileElems, 64);
        _tile_dpbf16ps(4, 0, 1);
        if (nt > 1) {
          _tile_loadd(2, b + (chunks + c) * kTileElems, 64);
          _tile_dpbf16ps(5, 0, 2);
        }
        if (nt > 2) {
          _tile_loadd(3, b + (2 * chunks + c) * kTileElems, 64);
          _tile_dpbf16ps(6, 0, 3);
        }
        if (nt > 3) {
          _tile_loadd(1, b + (3 * chunks + c) * kTileElems, 64);
          _tile_dpbf16ps(7, 0, 1);
        }
      }
      _tile_stored(4, cbuf[0], 64);
      if (nt > 1) _tile_stored(5, cbuf[1], 64);
      if (nt > 2) _tile_stored(6, cbuf[2], 64);
      if (nt > 3) _tile_stored(7, cbuf[3], 64);
      store_rows(cbuf, nt, rows, bias, t0 * kTileN, out + m0 * N, N);
    }
  }
  _tile_release();
}
#endif

void check_packed(const torch::Tensor& packed, int64_t N, int64_t K) {
  TORCH_CHECK(packed.scalar_type() == torch::kBFloat16 && packed.is_contiguous() &&
                  packed.dim() == 5 && packed.size(0) * kTileN == N &&
                  packed.size(1) * kTileK == K && packed.size(2) == 16 && packed.size(3) == 16 &&
                  packed.size(4) == 2,
              "amx_bf16_linear: packed weight must come from amx_bf16_pack for [N, K]");
}

}  // namespace

bool amx_bf16_usable() {
#if AL_X86
  return usable();
#else
  return false;
#endif
}

torch::Tensor amx_bf16_pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16, "amx_bf16_pack: bf16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % kTileN == 0 && K % kTileK == 0, "amx_bf16_pack: N % 16 and K % 32 must be 0");
  return w.contiguous().view({N / kTileN, kTileN, K / kTileK, 16, 2}).permute({0, 2, 3, 1, 4})
      .contiguous();
}

// y = x @ W^T + bias, x [M, K] bf16 (row stride may exceed K), packed from amx_bf16_pack(W)
torch::Tensor amx_bf16_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                              const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == torch::kBFloat16,
              "amx_bf16_linear: x must be a 2-D bf16 CPU tensor");
  const int64_t M = x.size(0), K = x.size(1);
  check_packed(packed, N, K);
#if AL_X86
  TORCH_CHECK(usable(), "amx_bf16_linear: this CPU (or kernel) does not allow AMX-BF16");
  const torch::Tensor xc = x.contiguous();
  auto out = torch::empty({M, N}, x.options());
  torch::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "amx_bf16_linear: bias must have N elements");
    bf = bias->to(torch::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  if (M == 0) return out;
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t ngroups = (N / kTileN + kGroup - 1) / kGroup;
  chatglm_cpu::parallel_chunks(ngroups, 2, [&](int64_t g0, int64_t g1) {
    groups(xp, M, K, wp, N, bp, op, g0, g1);
  });
  return out;
#else
  TORCH_CHECK(false, "amx_bf16_linear: needs an x86-64 CPU with AMX-BF16");
#endif
}
