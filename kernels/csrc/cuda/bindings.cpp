// torch bindings of the CUDA kernels in quant_gemv.cu (shapes and dtypes checked here; the
// kernels take raw pointers and run on the current stream, so CUDA graphs can capture them).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "quant_gemv.h"

namespace {

chatglm_quant::DType act_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16, "activations must be float16 or bfloat16, got ", t);
  return t == at::kHalf ? chatglm_quant::DType::kHalf : chatglm_quant::DType::kBFloat16;
}

void check_weight(const torch::Tensor& w, const torch::Tensor& scale, int64_t bits, int64_t K,
                  int64_t group) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(w.is_cuda() && w.scalar_type() == at::kInt && w.dim() == 2 && w.is_contiguous(),
              "w must be a contiguous int32 CUDA tensor [N, K/", bits == 4 ? 8 : 4, "]");
  TORCH_CHECK(w.size(1) * (bits == 4 ? 8 : 4) == K, "w has ", w.size(1), " words per row; K=", K);
  TORCH_CHECK(K % 32 == 0, "K=", K, " must be a multiple of 32");
  TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, "group ", group,
              " must be a multiple of 32 dividing K=", K);
  TORCH_CHECK(scale.is_cuda() && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == w.size(0) * (K / group),
              "scale must be contiguous float32 [N, K/group]");
  TORCH_CHECK(w.device() == scale.device(), "w and scale on different devices");
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t bits,
                   int64_t group) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous CUDA [B, K]");
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(B >= 1 && B <= chatglm_quant::kMaxGemvBatch, "gemv takes 1..",
              chatglm_quant::kMaxGemvBatch, " rows, got ", B);
  check_weight(w, scale, bits, K, group);
  TORCH_CHECK(x.device() == w.device(), "x and w on different devices");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({B, N}, x.options());
  const cudaError_t err = chatglm_quant::launch_gemv(
      x.data_ptr(), reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>()), scale.data_ptr<float>(),
      y.data_ptr(), static_cast<int>(B), static_cast<int>(N), static_cast<int>(K),
      static_cast<int>(group), static_cast<int>(bits), act_dtype(x.scalar_type()),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "quantized gemv launch failed: ", cudaGetErrorString(err));
  return y;
}

torch::Tensor dequantize(torch::Tensor w, torch::Tensor scale, int64_t bits, int64_t group,
                         bool bf16) {
  const at::ScalarType dtype = bf16 ? at::kBFloat16 : at::kHalf;
  const int64_t N = w.size(0), K = w.size(1) * (bits == 4 ? 8 : 4);
  check_weight(w, scale, bits, K, group);
  const c10::cuda::CUDAGuard guard(w.device());
  auto out = torch::empty({N, K}, w.options().dtype(dtype));
  const cudaError_t err = chatglm_quant::launch_dequantize(
      reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>()), scale.data_ptr<float>(), out.data_ptr(),
      static_cast<int>(N), static_cast<int>(K), static_cast<int>(group), static_cast<int>(bits),
      act_dtype(dtype), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dequantize launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "weight-only int4/int8 GEMV, batch 1-8 (GPU layout, see quant_decode.cuh)");
  m.def("dequantize", &dequantize, "int4/int8 GPU layout -> fp16 (bf16=False) or bf16 weight [N, K]");
}
