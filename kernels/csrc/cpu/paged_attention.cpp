// Decode attention over the paged KV cache on the CPU: each sequence's single query token reads
// its keys and values straight from the cache blocks its block table lists, up to its own length.
//
// Why our own kernel: the PyTorch path gathers every decoding sequence's blocks into a dense
// [B, Hkv, L, D] copy per layer (K and V) and runs SDPA over it padded to the longest sequence.
// At 16 streams the copy and the padding cost more than the attention arithmetic; here every
// cached key and value byte is read once and nothing is written but the output.
//
// Shapes: q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] (any strides with a
// unit last one, e.g. kv_cache[0] / kv_cache[1]); block_tables [B, max_blocks] int64;
// seq_lens [B] int64 (context length including this token); out [B, Hq, D] in q's dtype.
// fp32 or bf16 (q and the cache alike); arithmetic in fp32, softmax with the maximum
// subtracted. One work item = (sequence, KV head): its Hq/Hkv query heads share every key and
// value row it reads. The two passes (scores, values) have AVX-512 and AVX2 forms for D % 16 ==
// 0, picked at run time; the generic loops beside them are plain C++ that GCC vectorizes, with
// target_clones building them for AVX-512, AVX2 and the baseline.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PA_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define PA_CLONES
#endif

// out[j * stride] = dot(q + j * D, k, D) for j < g
PA_CLONES void dots(const float* q, const float* k, float* out, int64_t stride, int64_t g,
                    int64_t D) {
  for (int64_t j = 0; j < g; ++j) {
    const float* qj = q + j * D;
    float acc[16] = {0};
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      for (int l = 0; l < 16; ++l) acc[l] += qj[d + l] * k[d + l];
    }
    float s = 0.f;
    for (; d < D; ++d) s += qj[d] * k[d];
    for (int l = 0; l < 16; ++l) s += acc[l];
    out[j * stride] = s;
  }
}

// acc[j] += p[j * stride] * v for j < g
PA_CLONES void axpys(const float* p, int64_t stride, const float* v, float* acc, int64_t g,
                     int64_t D) {
  for (int64_t j = 0; j < g; ++j) {
    const float w = p[j * stride];
    float* aj = acc + j * D;
    for (int64_t d = 0; d < D; ++d) aj[d] += w * v[d];
  }
}

// e^x for x <= 0 (scores minus their maximum), element-wise; the loop vectorizes
PA_CLONES void exp_nonpositive(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = chatglm_cpu::exp_nonpositive(x[i]);
}

PA_CLONES void bf16_to_float(const uint16_t* src, uint32_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint32_t>(src[i]) << 16;
}

// A row of D values as fp32: the row itself (fp32) or a converted copy in `buf` (bf16).
template <typename T>
inline const float* row_f32(const T* row, float* buf, uint32_t* ubuf, int64_t D);

template <>
inline const float* row_f32<float>(const float* row, float*, uint32_t*, int64_t) {
  return row;
}

template <>
inline const float* row_f32<at::BFloat16>(const at::BFloat16* row, float* buf, uint32_t* ubuf,
                                         int64_t D) {
  bf16_to_float(reinterpret_cast<const uint16_t*>(row), ubuf, D);
  std::memcpy(buf, ubuf, D * sizeof(float));
  return buf;
}


#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PA_X86 1

using chatglm_cpu::load16_f32;

// asks for a cache row's 64-byte lines (the score passes: this position's value row, a key row
// ahead)
inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64)
    _mm_prefetch(static_cast<const char*>(row) + b, _MM_HINT_T0);
}

// AVX-512 work item: scores for 4 query heads per pass over a key row (independent FMA chains),
// values accumulated per 16-channel slice with the accumulators in registers. D % 16 == 0.
// The score pass also asks for the value rows (`vrows`), which the value pass then reads 64
// bytes of per row at a time: without them in cache its strided reads waited on memory (16
// sequences of ~80 tokens in an int4 step on the EPYC: attention 5.2 -> 4.3 ms of a 15.7 ms step).
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512dq"))) void scores_avx512(
    const float* qf, const T* const* rows, const T* const* vrows, float* s, int64_t L, int64_t g,
    int64_t D) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < L; ++t) {
    const T* k = rows[t];
    prefetch_row(vrows[t], row_bytes);
    int64_t j = 0;
    for (; j + 4 <= g; j += 4) {
      const float* q0 = qf + j * D;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 kv = load16_f32(k + d);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + d), kv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + D + d), kv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 2 * D + d), kv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 3 * D + d), kv, a3);
      }
      s[j * L + t] = _mm512_reduce_add_ps(a0);
      s[(j + 1) * L + t] = _mm512_reduce_add_ps(a1);
      s[(j + 2) * L + t] = _mm512_reduce_add_ps(a2);
      s[(j + 3) * L + t] = _mm512_reduce_add_ps(a3);
    }
    for (; j < g; ++j) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + j * D + d), load16_f32(k + d), a);
      s[j * L + t] = _mm512_reduce_add_ps(a);
    }
  }
}

// acc[j, :] = sum_t p[j, t] v_t, one 16-channel slice at a time: the slice's accumulators for
// up to 16 query heads stay in registers while the rows stream past.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512dq"))) void values_avx512(
    const float* p, const T* const* rows, float* acc, int64_t L, int64_t g, int64_t D) {
  for (int64_t j0 = 0; j0 < g; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, g - j0);
    for (int64_t d = 0; d < D; d += 16) {
      __m512 a[16];
      for (int64_t j = 0; j < nj; ++j) a[j] = _mm512_setzero_ps();
      for (int64_t t = 0; t < L; ++t) {
        const __m512 v = load16_f32(rows[t] + d);
        for (int64_t j = 0; j < nj; ++j)
          a[j] = _mm512_fmadd_ps(_mm512_set1_ps(p[(j0 + j) * L + t]), v, a[j]);
      }
      for (int64_t j = 0; j < nj; ++j) _mm512_storeu_ps(acc + (j0 + j) * D + d, a[j]);
    }
  }
}

// the CPU's AVX-512, unless CHATGLM_SERVE_CPU_ISA caps it (the tests check the lower paths so)
bool has_avx512() {
  static const bool ok = chatglm_cpu::isa_allowed(chatglm_cpu::Isa::kAvx512);
  return ok;
}

// ---------------------------------------------------------------- AVX2
// The same two passes in 8-lane vectors. The generic loops compute one query head's dot at a
// time (reading each key row g times) and one head's axpy per value row (its accumulators
// through memory); here a key row serves 4 heads at once and a value slice's accumulators stay
// in registers.
using chatglm_cpu::load8_f32;

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// scores for up to 4 query heads per pass over a key row, two chains per head (even and odd
// 8-lane slices) so 8 FMAs are in flight. D % 16 == 0. The key rows of one (sequence, head)
// are 512-byte pieces scattered over the cache blocks, which no hardware prefetcher follows:
// each pass also asks for the key row kKeysAhead positions on (16 sequences of 96 positions,
// 16 layers, blocks scattered over 1 GiB, Zen 3 EPYC: 8.0 -> 6.6 ms).
constexpr int64_t kKeysAhead = 4;
template <typename T>
__attribute__((target("avx2,fma"))) void scores_avx2(const float* qf, const T* const* rows,
                                                     const T* const* vrows, float* s, int64_t L,
                                                     int64_t g, int64_t D) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < L; ++t) {
    const T* k = rows[t];
    prefetch_row(vrows[t], row_bytes);
    if (t + kKeysAhead < L) prefetch_row(rows[t + kKeysAhead], row_bytes);
    for (int64_t j0 = 0; j0 < g; j0 += 4) {
      const int nj = static_cast<int>(std::min<int64_t>(4, g - j0));
      __m256 a[8];
      for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __m256 k0 = load8_f32(k + d), k1 = load8_f32(k + d + 8);
        for (int j = 0; j < nj; ++j) {
          const float* qj = qf + (j0 + j) * D + d;
          a[2 * j] = _mm256_fmadd_ps(_mm256_loadu_ps(qj), k0, a[2 * j]);
          a[2 * j + 1] = _mm256_fmadd_ps(_mm256_loadu_ps(qj + 8), k1, a[2 * j + 1]);
        }
      }
      for (int j = 0; j < nj; ++j)
        s[(j0 + j) * L + t] = hsum8(_mm256_add_ps(a[2 * j], a[2 * j + 1]));
    }
  }
}

// acc[j, :] = sum_t p[j, t] v_t, a 16-channel slice (two ymm) for up to 4 heads at a time: 8
// accumulators in registers while the rows stream past. D % 16 == 0.
template <typename T>
__attribute__((target("avx2,fma"))) void values_avx2(const float* p, const T* const* rows,
                                                     float* acc, int64_t L, int64_t g,
                                                     int64_t D) {
  for (int64_t j0 = 0; j0 < g; j0 += 4) {
    const int nj = static_cast<int>(std::min<int64_t>(4, g - j0));
    for (int64_t d = 0; d < D; d += 16) {
      __m256 a[8];
      for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
      for (int64_t t = 0; t < L; ++t) {
        const __m256 v0 = load8_f32(rows[t] + d), v1 = load8_f32(rows[t] + d + 8);
        for (int j = 0; j < nj; ++j) {
          const __m256 pj = _mm256_broadcast_ss(p + (j0 + j) * L + t);
          a[2 * j] = _mm256_fmadd_ps(pj, v0, a[2 * j]);
          a[2 * j + 1] = _mm256_fmadd_ps(pj, v1, a[2 * j + 1]);
        }
      }
      for (int j = 0; j < nj; ++j) {
        _mm256_storeu_ps(acc + (j0 + j) * D + d, a[2 * j]);
        _mm256_storeu_ps(acc + (j0 + j) * D + d + 8, a[2 * j + 1]);
      }
    }
  }
}

bool has_avx2() {
  static const bool ok = chatglm_cpu::isa_allowed(chatglm_cpu::Isa::kAvx2);
  return ok;
}
#else
#define PA_X86 0
#endif

// Below this many bytes of keys and values a step's attention runs on one thread: one row at
// ~32 positions (64 KiB, the medium model's 2 KV heads in fp32) took ~16.5 us a layer on one
// thread and ~19.5 us split over two (Zen 4 EPYC).
constexpr int64_t kSerialBytes = 128 << 10;

template <typename T>
void decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale,
            torch::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t g = Hq / Hkv;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t tstride = block_tables.stride(0);
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
  const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
  const int64_t os0 = out.stride(0), os1 = out.stride(1);
  const float fscale = static_cast<float>(scale);
  // the vector passes: 2 = AVX-512, 1 = AVX2, 0 = the generic loops
#if PA_X86
  const int fast = D % 16 != 0 ? 0 : has_avx512() ? 2 : has_avx2() ? 1 : 0;
#else
  const int fast = 0;
#endif

  // items differ in length (each sequence its own): handed out one at a time; a step that
  // reads little of the cache runs on the calling thread (see kSerialBytes)
  int64_t positions = 0;
  for (int64_t b = 0; b < B; ++b) positions += lens[b];
  const int64_t bytes = positions * Hkv * D * 2 * static_cast<int64_t>(sizeof(T));
  const int64_t grain = bytes < kSerialBytes ? B * Hkv : 1;
  chatglm_cpu::parallel_chunks(B * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(g * D), acc(g * D), buf(D), scores;
    std::vector<uint32_t> ubuf(D);
    std::vector<const T*> rows_k, rows_v;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t L = lens[b];
      const int64_t* table = tables + b * tstride;
      for (int64_t j = 0; j < g; ++j) {  // this KV head's query heads, pre-scaled, in fp32
        const T* src = qp + b * qs0 + (h * g + j) * qs1;
        for (int64_t d = 0; d < D; ++d) qf[j * D + d] = static_cast<float>(src[d]) * fscale;
      }
      scores.resize(static_cast<size_t>(L * g));
      float* s = scores.data();  // [g, L]: one softmax row per query head
      rows_k.resize(static_cast<size_t>(L));
      rows_v.resize(static_cast<size_t>(L));
      for (int64_t t = 0; t < L; ++t) {  // where each position's key and value rows live
        const int64_t blk = table[t / bs], off = t % bs;
        rows_k[t] = kp + blk * ks0 + off * ks1 + h * ks2;
        rows_v[t] = vp + blk * vs0 + off * vs1 + h * vs2;
      }
      if (fast) {
#if PA_X86
        if (fast == 2)
          scores_avx512<T>(qf.data(), rows_k.data(), rows_v.data(), s, L, g, D);
        else
          scores_avx2<T>(qf.data(), rows_k.data(), rows_v.data(), s, L, g, D);
#endif
      } else {
        for (int64_t t = 0; t < L; ++t)
          dots(qf.data(), row_f32<T>(rows_k[t], buf.data(), ubuf.data(), D), s + t, L, g, D);
      }
      float sum[64];  // g <= 64 (checked by the caller)
      for (int64_t j = 0; j < g; ++j) {
        float* row = s + j * L;
        const float mx = *std::max_element(row, row + L);
        for (int64_t t = 0; t < L; ++t) row[t] -= mx;
        exp_nonpositive(row, L);
        float total = 0.f;
        for (int64_t t = 0; t < L; ++t) total += row[t];
        sum[j] = total;
      }
      if (fast) {
#if PA_X86
        if (fast == 2)
          values_avx512<T>(s, rows_v.data(), acc.data(), L, g, D);
        else
          values_avx2<T>(s, rows_v.data(), acc.data(), L, g, D);
#endif
      } else {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = 0; t < L; ++t)
          axpys(s + t, L, row_f32<T>(rows_v[t], buf.data(), ubuf.data(), D), acc.data(), g, D);
      }
      for (int64_t j = 0; j < g; ++j) {
        T* dst = op + b * os0 + (h * g + j) * os1;
        const float inv = 1.f / sum[j];
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[j * D + d] * inv);
      }
    }
  });
}

torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache,
                                     const torch::Tensor& block_tables,
                                     const torch::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "paged_decode_attention: q [B, Hq, D], caches [blocks, block_size, Hkv, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "paged_decode_attention: K/V cache shapes differ");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_decode_attention: q and the cache must have one dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "paged_decode_attention: head_dim mismatch");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_decode_attention: the head_dim axis must be contiguous");
  const int64_t Hq = q.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= 64,
              "paged_decode_attention: Hq must be a multiple of Hkv (at most 64x)");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && seq_lens.scalar_type() == torch::kInt64,
              "paged_decode_attention: int64 block tables and lengths");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) &&
                  block_tables.stride(1) == 1 && seq_lens.numel() == q.size(0) &&
                  seq_lens.is_contiguous(),
              "paged_decode_attention: block_tables [B, max_blocks], seq_lens [B]");
  auto lens = seq_lens.accessor<int64_t, 1>();
  auto tables = block_tables.accessor<int64_t, 2>();
  const int64_t max_blocks = block_tables.size(1), bs = k_cache.size(1);
  const int64_t num_blocks = k_cache.size(0);
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * bs,
                "paged_decode_attention: a sequence length exceeds its block table");
    for (int64_t i = 0; i < (lens[b] + bs - 1) / bs; ++i) {
      TORCH_CHECK(tables[b][i] >= 0 && tables[b][i] < num_blocks,
                  "paged_decode_attention: block id out of range");
    }
  }
  auto out = torch::empty_like(q, at::MemoryFormat::Contiguous);
  if (q.scalar_type() == torch::kFloat) {
    decode<float>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
  } else if (q.scalar_type() == torch::kBFloat16) {
    decode<at::BFloat16>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: fp32 or bf16 only");
  }
  return out;
}

}  // namespace

// bound in decode_bindings.cpp
torch::Tensor cpu_paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                         const torch::Tensor& v_cache,
                                         const torch::Tensor& block_tables,
                                         const torch::Tensor& seq_lens, double scale) {
  return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale);
}
