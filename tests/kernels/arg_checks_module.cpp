// The CUDA entry points' argument checks (kernels/csrc/cuda/arg_checks.h) built into a CPU
// extension, so tests/kernels/test_cuda_sources.py exercises every one without a GPU: CPU tensors
// stand in for device ones (want_cuda=false), and each call returns None or raises ValueError.
#include "arg_checks.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", [](const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                   int64_t bits, int64_t group, bool want_cuda) {
    chatglm_checks::check_gemv_args(x, w, scale, bits, group, want_cuda);
  });
  m.def("gemm", [](const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                   int64_t bits, int64_t group, bool want_cuda) {
    chatglm_checks::check_gemm_args(x, w, scale, bits, group, want_cuda);
  });
  m.def("dequantize", [](const torch::Tensor& w, const torch::Tensor& scale, int64_t bits,
                         int64_t group, bool want_cuda) {
    chatglm_checks::check_dequantize_args(w, scale, bits, group, want_cuda);
  });
  m.def("attention", [](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& tables, const torch::Tensor& lens, bool want_cuda) {
    chatglm_checks::check_attention_args(q, k, v, tables, lens, want_cuda);
  });
}
