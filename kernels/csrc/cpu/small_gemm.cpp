// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) for a few rows M, fp32 weights in their plain layout.
//
// Why our own kernel: decode steps multiply a handful of rows (one per running sequence) by
// every weight. MKL's sgemm reads fp32 weights at full bandwidth for one row, but from a few
// rows on it runs at a fraction of the FMA peak (at 16 rows a 16-layer step took 3x the one-row
// time here). This kernel reads each weight once per step whatever M is: a block of 4 weight
// rows is multiplied with up to 4 activation rows at a time (16 independent accumulators),
// while the 4 weight rows stay in L1/L2 for the next activation rows.
//
// AVX-512 only (target attribute, checked at run time); the caller falls back to F.linear
// elsewhere and for larger M. Threads split the weight rows. (A bf16 twin with vdpbf16ps was
// slow from 4 rows on, where this CPU's vdpbf16ps throughput shows; bf16 runs on AMX instead:
// amx_linear.cpp.)
#include "cpu_common.h"
#include "decode_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SG_X86 1
#else
#define SG_X86 0
#endif

namespace {

constexpr int64_t kRows = 4;   // weight rows per block
constexpr int64_t kMaxM = 16;  // activation rows this kernel takes

#if SG_X86
bool cpu_ok() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return ok;
}

// acc[m][r] += x[m, k0:k1] . w[r, k0:k1] (16 lanes each) for MB activation rows and the kRows
// weight rows starting at w, with the accumulators kept in `accs` between K chunks. `next`, when
// given, is the following weight block: its same columns are prefetched while this one is used,
// so the weight stream from memory overlaps the arithmetic.
template <int MB>
__attribute__((target("avx512f,avx512dq,fma"))) inline void chunk(const float* x, int64_t ldx,
                                                                 const float* w, int64_t K,
                                                                 int64_t k0, int64_t k1,
                                                                 __m512* accs, const float* next) {
  __m512 acc[MB][kRows];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < kRows; ++r) acc[m][r] = accs[m * kRows + r];
  for (int64_t k = k0; k < k1; k += 16) {
    const __m512 w0 = _mm512_loadu_ps(w + k);
    const __m512 w1 = _mm512_loadu_ps(w + K + k);
    const __m512 w2 = _mm512_loadu_ps(w + 2 * K + k);
    const __m512 w3 = _mm512_loadu_ps(w + 3 * K + k);
    if (next != nullptr) {
      for (int r = 0; r < kRows; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(next + r * K + k), _MM_HINT_T0);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      acc[m][0] = _mm512_fmadd_ps(xv, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xv, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(xv, w2, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(xv, w3, acc[m][3]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < kRows; ++r) accs[m * kRows + r] = acc[m][r];
}

// K per chunk from 5 rows on: every row's slice of x for a chunk (16 x 128 floats) and the
// block's (4 x 128) stay in L1 while all rows pass over them. Below that x is small and one pass
// over K is fastest. Measured on the medium model's weights streamed from memory, 16 rows:
// 41 ms a pass at 128 against 50 ms without chunks or prefetch.
constexpr int64_t kChunkK = 128;

// The lane sums of 4 accumulators at once, [sum(v[0]), .., sum(v[3])]: 11 shuffles and adds
// where 4 separate reductions take ~36 (16 rows x 4 weight rows of them end every block).
__attribute__((target("avx512f,avx512dq,fma"))) inline __m128 reduce4(const __m512* v) {
  // within each 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
  // each 128-bit lane: [a, b, c, d] partial sums
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// out[m * ldo + r] = x[m] . w[r] for all M rows and the kRows weight rows at w
__attribute__((target("avx512f,avx512dq,fma"))) void rows_block(const float* x, int64_t M,
                                                                const float* w, int64_t K,
                                                                float* out, int64_t ldo,
                                                                const float* next) {
  alignas(64) __m512 accs[kMaxM * kRows];
  for (int64_t i = 0; i < M * kRows; ++i) accs[i] = _mm512_setzero_ps();
  const int64_t kv = K & ~int64_t(15);  // the vector part; the tail is summed below
  const int64_t step = M > 4 ? kChunkK : std::max<int64_t>(kv, 16);
  for (int64_t k0 = 0; k0 < kv; k0 += step) {
    const int64_t k1 = std::min(kv, k0 + step);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      chunk<4>(x + m * K, K, w, K, k0, k1, accs + m * kRows, m == 0 ? next : nullptr);
    const float* pf = m == 0 ? next : nullptr;
    switch (M - m) {
      case 3: chunk<3>(x + m * K, K, w, K, k0, k1, accs + m * kRows, pf); break;
      case 2: chunk<2>(x + m * K, K, w, K, k0, k1, accs + m * kRows, pf); break;
      case 1: chunk<1>(x + m * K, K, w, K, k0, k1, accs + m * kRows, pf); break;
      default: break;
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    alignas(16) float sums[kRows];
    _mm_store_ps(sums, reduce4(accs + m * kRows));
    for (int r = 0; r < kRows; ++r) {
      float sum = sums[r];
      for (int64_t k = kv; k < K; ++k) sum += x[m * K + k] * w[r * K + k];
      out[m * ldo + r] = sum;
    }
  }
}
#endif

torch::Tensor small_linear(const torch::Tensor& x, const torch::Tensor& w,
                           const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat,
              "small_linear: fp32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "small_linear: x [M, K], w [N, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxM, "small_linear: 1 to 16 rows");
  TORCH_CHECK(w.is_contiguous(), "small_linear: contiguous weight");
#if SG_X86
  TORCH_CHECK(cpu_ok(), "small_linear: needs AVX-512");
  const torch::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  auto out = torch::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = N / kRows;
  // chunks of 8 blocks (32 weight rows): long weight runs per task, and enough tasks to rebalance
  chatglm_cpu::parallel_chunks(blocks, 32, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* next = b + 1 < b1 ? wp + (b + 1) * kRows * K : nullptr;
      rows_block(xp, M, wp + b * kRows * K, K, op + b * kRows, N, next);
    }
  });
  if (blocks * kRows < N) {  // the last N % 4 rows
    out.slice(1, blocks * kRows).copy_(torch::matmul(xc, w.slice(0, blocks * kRows).t()));
  }
  if (bias.has_value() && bias->defined()) out.add_(bias->to(out.scalar_type()));
  return out;
#else
  TORCH_CHECK(false, "small_linear: needs an x86-64 CPU with AVX-512");
#endif
}

}  // namespace

// bound in decode_bindings.cpp
torch::Tensor cpu_small_linear(const torch::Tensor& x, const torch::Tensor& w,
                               const c10::optional<torch::Tensor>& bias) {
  return small_linear(x, w, bias);
}
