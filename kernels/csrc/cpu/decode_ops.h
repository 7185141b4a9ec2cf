// The CPU decode fast paths' entry points (one source file each), bound in decode_bindings.cpp.
#pragma once

#include <torch/extension.h>

#include <vector>

// paged_attention.cpp
torch::Tensor cpu_paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                         const torch::Tensor& v_cache,
                                         const torch::Tensor& block_tables,
                                         const torch::Tensor& seq_lens, double scale);
// small_gemm.cpp
torch::Tensor cpu_small_linear(const torch::Tensor& x, const torch::Tensor& w,
                               const c10::optional<torch::Tensor>& bias);
// panel_linear.cpp
torch::Tensor panel_pack(const torch::Tensor& w);
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& packed,
                           const c10::optional<torch::Tensor>& bias);
// amx_linear.cpp
bool amx_bf16_usable();
torch::Tensor amx_bf16_pack(const torch::Tensor& w);
torch::Tensor amx_bf16_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                              const c10::optional<torch::Tensor>& bias);
// half_linear.cpp (bf16 without AMX; auto dispatch includes amx_linear.cpp)
int64_t bf16_linear_impl(int64_t impl);
torch::Tensor bf16_pack(const torch::Tensor& w);
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                          const c10::optional<torch::Tensor>& bias, int64_t impl);
// decode_stack.cpp
torch::Tensor cpu_decode_stack(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                               const std::vector<torch::Tensor>& kv_caches,
                               const c10::optional<torch::Tensor>& final_norm,
                               const torch::Tensor& rotation, const torch::Tensor& slot_mapping,
                               const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                               int64_t hq, int64_t hkv, int64_t head_dim, double eps,
                               double scale);
