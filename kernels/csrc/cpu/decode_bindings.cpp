// Python bindings of the CPU decode fast paths (kernels/cpu_decode.py builds and loads them).
#include <torch/extension.h>

torch::Tensor cpu_paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                         const torch::Tensor& v_cache,
                                         const torch::Tensor& block_tables,
                                         const torch::Tensor& seq_lens, double scale);
torch::Tensor cpu_small_linear(const torch::Tensor& x, const torch::Tensor& w,
                               const c10::optional<torch::Tensor>& bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &cpu_paged_decode_attention,
        "decode attention over a paged KV cache (CPU, fp32/bf16)");
  m.def("small_linear", &cpu_small_linear, "x[M<=16, K] @ w[N, K]^T + bias (CPU, fp32)");
}
