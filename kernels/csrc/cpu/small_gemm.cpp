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
// elsewhere and for larger M. Threads split the weight rows. (A bf16 twin with vdpbf16ps made
// the whole-model batch-1 step 8% faster than oneDNN's packed bf16 but the 16-stream step 18%
// slower, where oneDNN uses AMX; oneDNN packing serves bf16 instead: model/cpu_linear.py.)
#include <torch/extension.h>

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

// acc[m][r] += x[m, k0:k0+16] . w[r, k0:k0+16] over all K, for MB activation rows and the
// kRows weight rows starting at w; the sums land in out[m * ldo + r].
template <int MB>
__attribute__((target("avx512f,avx512dq,fma"))) inline void block(const float* x, int64_t ldx,
                                                                 const float* w, int64_t K,
                                                                 float* out, int64_t ldo) {
  __m512 acc[MB][kRows];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < kRows; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t kv = K & ~int64_t(15);
  for (int64_t k = 0; k < kv; k += 16) {
    const __m512 w0 = _mm512_loadu_ps(w + k);
    const __m512 w1 = _mm512_loadu_ps(w + K + k);
    const __m512 w2 = _mm512_loadu_ps(w + 2 * K + k);
    const __m512 w3 = _mm512_loadu_ps(w + 3 * K + k);
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      acc[m][0] = _mm512_fmadd_ps(xv, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xv, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(xv, w2, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(xv, w3, acc[m][3]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < kRows; ++r) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      for (int64_t k = kv; k < K; ++k) s += x[m * ldx + k] * w[r * K + k];
      out[m * ldo + r] = s;
    }
  }
}

__attribute__((target("avx512f,avx512dq,fma"))) void rows_block(const float* x, int64_t M,
                                                                const float* w, int64_t K,
                                                                float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block<4>(x + m * K, K, w, K, out + m * ldo, ldo);
  switch (M - m) {
    case 3: block<3>(x + m * K, K, w, K, out + m * ldo, ldo); break;
    case 2: block<2>(x + m * K, K, w, K, out + m * ldo, ldo); break;
    case 1: block<1>(x + m * K, K, w, K, out + m * ldo, ldo); break;
    default: break;
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
  // grain: enough rows per task that a thread streams long runs of weights
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows_block(xp, M, wp + b * kRows * K, K, op + b * kRows, N);
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
