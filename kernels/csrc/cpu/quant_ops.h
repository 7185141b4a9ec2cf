// The weight-only int4/int8 matmul's entry points (quant_matmul.cpp): bound on their own in
// quant_bindings.cpp, and called directly by the one-call decode step (decode_stack.cpp).
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

// the implementations this CPU can run (and CHATGLM_SERVE_CPU_ISA allows), lowest first
std::vector<std::string> available_impls();
// x [B, K] fp32/bf16 @ dequant(W)^T (+ bias) -> fp32 [B, n]; see quant_matmul.cpp for the layout
torch::Tensor qmm(torch::Tensor x, torch::Tensor w, torch::Tensor sw, int64_t bits, int64_t group,
                  int64_t ablk, int64_t n, int64_t impl, c10::optional<torch::Tensor> bias);
