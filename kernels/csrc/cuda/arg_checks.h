// Argument checks of every CUDA entry point (bindings.cpp), before anything is launched: shapes,
// dtypes, devices, contiguity, alignment. A failed check raises ValueError (TORCH_CHECK_VALUE)
// naming the argument, never a launch on bad memory. Header-only and free of CUDA code, so
// tests/kernels/arg_checks_module.cpp builds them into a CPU extension and exercises each one
// on a machine without a GPU (want_cuda=false there: CPU tensors stand in for device ones).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <initializer_list>

#include "paged_attention.h"
#include "quant_gemv.h"
#include "quant_limits.h"

namespace chatglm_checks {

inline void check_device(const torch::Tensor& t, const char* name, bool want_cuda) {
  TORCH_CHECK_VALUE(!want_cuda || t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

inline void check_same_device(const torch::Tensor& a, const torch::Tensor& b, const char* what) {
  TORCH_CHECK_VALUE(a.device() == b.device(), what, " are on different devices (", a.device(),
                    ", ", b.device(), ")");
}

// w: int32 words [N, K/8] (int4) or [N, K/4] (int8); scale fp32 [N, K/group].
inline void check_quant_weight(const torch::Tensor& w, const torch::Tensor& scale, int64_t bits,
                               int64_t K, int64_t group, bool want_cuda) {
  TORCH_CHECK_VALUE(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  check_device(w, "w", want_cuda);
  check_device(scale, "scale", want_cuda);
  check_same_device(w, scale, "w and scale");
  TORCH_CHECK_VALUE(w.scalar_type() == at::kInt && w.dim() == 2 && w.is_contiguous(),
                    "w must be a contiguous int32 [N, K/", bits == 4 ? 8 : 4, "], got ",
                    w.scalar_type(), " ", w.sizes(), w.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK_VALUE(w.size(0) > 0 && w.size(0) <= INT32_MAX, "w must have 1..2^31-1 rows, got ",
                    w.size(0));
  TORCH_CHECK_VALUE(K > 0 && K % 32 == 0, "K=", K, " must be a positive multiple of 32");
  TORCH_CHECK_VALUE(w.size(1) * (bits == 4 ? 8 : 4) == K, "w has ", w.size(1),
                    " words per row, K=", K, " needs ", K / (bits == 4 ? 8 : 4));
  TORCH_CHECK_VALUE(w.numel() <= INT32_MAX, "w has ", w.numel(), " words, at most 2^31-1");
  TORCH_CHECK_VALUE(group > 0 && group % 32 == 0 && K % group == 0, "group ", group,
                    " must be a multiple of 32 dividing K=", K);
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                        scale.numel() == w.size(0) * (K / group),
                    "scale must be a contiguous float32 [N, K/group] = [", w.size(0), ", ",
                    K / group, "], got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
                    "w must be 16-byte aligned");
}

// x: a contiguous fp16/bf16 [rows, K], rows in 1..max_rows, 16-byte aligned.
inline void check_activations(const torch::Tensor& x, int64_t max_rows, const char* what,
                              bool want_cuda) {
  check_device(x, "x", want_cuda);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                    "x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [rows, K], got ",
                    x.sizes(), x.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK_VALUE(x.size(0) >= 1 && x.size(0) <= max_rows, what, " takes 1..", max_rows,
                    " rows, got ", x.size(0));
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
                    "x must be 16-byte aligned");
}

inline void check_gemv_args(const torch::Tensor& x, const torch::Tensor& w,
                            const torch::Tensor& scale, int64_t bits, int64_t group,
                            bool want_cuda) {
  check_activations(x, chatglm_quant::kMaxGemvBatch, "gemv", want_cuda);
  check_quant_weight(w, scale, bits, x.size(1), group, want_cuda);
  check_same_device(x, w, "x and w");
}

inline void check_gemm_args(const torch::Tensor& x, const torch::Tensor& w,
                            const torch::Tensor& scale, int64_t bits, int64_t group,
                            bool want_cuda) {
  check_activations(x, chatglm_quant::kGemmMaxRows, "gemm", want_cuda);
  TORCH_CHECK_VALUE(x.size(1) % chatglm_quant::kGemmBK == 0, "gemm needs K a multiple of ",
                    chatglm_quant::kGemmBK, ", got ",
                    x.size(1));
  check_quant_weight(w, scale, bits, x.size(1), group, want_cuda);
  check_same_device(x, w, "x and w");
}

inline void check_dequantize_args(const torch::Tensor& w, const torch::Tensor& scale,
                                  int64_t bits, int64_t group, bool want_cuda) {
  TORCH_CHECK_VALUE(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK_VALUE(w.dim() == 2, "w must be 2-D [N, words], got ", w.sizes());
  check_quant_weight(w, scale, bits, w.size(1) * (bits == 4 ? 8 : 4), group, want_cuda);
}

inline bool aligned16(const torch::Tensor& t, std::initializer_list<int64_t> strides) {
  const int64_t per = 16 / static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
  for (int64_t s : strides) {
    if (s % per) return false;
  }
  return true;
}

// q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
// int64; seq_lens [B] int64.
inline void check_attention_args(const torch::Tensor& q, const torch::Tensor& k_cache,
                                 const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                 const torch::Tensor& seq_lens, bool want_cuda) {
  check_device(q, "paged_decode_attention: q", want_cuda);
  TORCH_CHECK_VALUE(q.dim() == 3, "paged_decode_attention: q must be [B, Hq, D], got ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
                    "paged_decode_attention: caches [num_blocks, block_size, Hkv, D] of one shape");
  TORCH_CHECK_VALUE(
      q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
      "paged_decode_attention: q and the cache must have one dtype");
  const at::ScalarType st = q.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                    "paged_decode_attention: float32, float16 or bfloat16, got ", st);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "paged_decode_attention: head_dim mismatch");
  TORCH_CHECK_VALUE(chatglm_attn::head_dim_supported(static_cast<int>(D)),
                    "paged_decode_attention: head_dim must be 64 or 128, got ", D);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq > 0 && Hq % Hkv == 0,
                    "paged_decode_attention: Hq must be a positive multiple of Hkv");
  TORCH_CHECK_VALUE(bs > 0, "paged_decode_attention: block_size must be positive");
  for (const auto* t : {&k_cache, &v_cache, &block_tables, &seq_lens}) {
    check_same_device(*t, q, "paged_decode_attention: tensors");
  }
  TORCH_CHECK_VALUE(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
                    "paged_decode_attention: the head_dim axis must be contiguous");
  TORCH_CHECK_VALUE(aligned16(q, {q.stride(0), q.stride(1)}) &&
                        aligned16(k_cache, {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)}) &&
                        aligned16(v_cache, {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)}),
                    "paged_decode_attention: q and cache rows must be 16-byte aligned");
  TORCH_CHECK_VALUE(
      block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
      "paged_decode_attention: int64 block tables and lengths");
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.size(0) == B &&
                        block_tables.stride(1) == 1 && seq_lens.dim() == 1 &&
                        seq_lens.size(0) == B && seq_lens.is_contiguous(),
                    "paged_decode_attention: block_tables [B, max_blocks], seq_lens [B]");
  TORCH_CHECK_VALUE(B <= 65535 && Hq <= 65535,
                    "paged_decode_attention: at most 65535 sequences and heads");
  TORCH_CHECK_VALUE(block_tables.size(1) * bs < (int64_t{1} << 30),
                    "paged_decode_attention: block table too long");
}

}  // namespace chatglm_checks
