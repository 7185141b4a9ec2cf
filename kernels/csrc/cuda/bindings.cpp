// torch bindings of the CUDA kernels in quant_gemv.cu and paged_attention.cu (shapes and dtypes
// checked here; the kernels take raw pointers and run on the current stream, so CUDA graphs can
// capture them).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <initializer_list>

#include "arg_checks.h"
#include "paged_attention.h"
#include "quant_gemv.h"
#include "quant_limits.h"

namespace {

chatglm_quant::DType act_dtype(at::ScalarType t) {
  return t == at::kHalf ? chatglm_quant::DType::kHalf : chatglm_quant::DType::kBFloat16;
}

const uint32_t* words_ptr(const torch::Tensor& w) {
  return reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>());
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t bits,
                   int64_t group) {
  chatglm_checks::check_gemv_args(x, w, scale, bits, group, /*want_cuda=*/true);
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({B, N}, x.options());
  const cudaError_t err = chatglm_quant::launch_gemv(
      x.data_ptr(), words_ptr(w), scale.data_ptr<float>(), y.data_ptr(), static_cast<int>(B),
      static_cast<int>(N), static_cast<int>(K), static_cast<int>(group), static_cast<int>(bits),
      act_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "quantized gemv launch failed: ", cudaGetErrorString(err));
  return y;
}

torch::Tensor dequantize(torch::Tensor w, torch::Tensor scale, int64_t bits, int64_t group,
                         bool bf16) {
  chatglm_checks::check_dequantize_args(w, scale, bits, group, /*want_cuda=*/true);
  const at::ScalarType dtype = bf16 ? at::kBFloat16 : at::kHalf;
  const int64_t N = w.size(0), K = w.size(1) * (bits == 4 ? 8 : 4);
  TORCH_CHECK_VALUE(N * K <= INT32_MAX * int64_t{8}, "dequantize: weight too large");
  const c10::cuda::CUDAGuard guard(w.device());
  auto out = torch::empty({N, K}, w.options().dtype(dtype));
  const cudaError_t err = chatglm_quant::launch_dequantize(
      words_ptr(w), scale.data_ptr<float>(), out.data_ptr(), static_cast<int>(N),
      static_cast<int>(K), static_cast<int>(group), static_cast<int>(bits), act_dtype(dtype),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dequantize launch failed: ", cudaGetErrorString(err));
  return out;
}

int sm_count(int device) {
  int n = 0;  // a host-side attribute query (no GPU work, fine inside a graph capture)
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;  // choose_partition then assumes an H100's count
  }
  return n;
}

// y[M, N] = x @ dequant(W)^T on tensor cores, M in 1..64; splits: K slices (0 = gemm_splits').
torch::Tensor gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t bits,
                   int64_t group, int64_t splits) {
  chatglm_checks::check_gemm_args(x, w, scale, bits, group, /*want_cuda=*/true);
  TORCH_CHECK_VALUE(splits >= 0 && splits <= chatglm_quant::kGemmMaxSplits, "splits must be 0..",
                    chatglm_quant::kGemmMaxSplits, ", got ", splits);
  const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1));
  const int N = static_cast<int>(w.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  const int s = splits > 0 ? static_cast<int>(splits)
                           : chatglm_quant::gemm_splits(M, N, K, static_cast<int>(bits),
                                                        sm_count(x.get_device()));
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor ws;
  if (s > 1) ws = torch::empty({s, M, N}, x.options().dtype(at::kFloat));
  const chatglm_quant::GemmArgs args{x.data_ptr(), words_ptr(w), scale.data_ptr<float>(),
                                     y.data_ptr(), s > 1 ? ws.data_ptr<float>() : nullptr,
                                     M, N, K, static_cast<int>(group), static_cast<int>(bits), s};
  const cudaError_t err =
      chatglm_quant::launch_gemm(args, act_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "quantized gemm launch failed: ", cudaGetErrorString(err));
  return y;
}


// q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
// int64; seq_lens [B] int64 -> [B, Hq, D]. Reads nothing from the GPU on the host (no sync):
// lengths and block ids are trusted (a length past the table is clipped to it on the device).
// partition: keys per split (rounded up to a multiple of 16); 0 = choose_partition's.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale,
                                     int64_t partition) {
  chatglm_checks::check_attention_args(q, k_cache, v_cache, block_tables, seq_lens,
                                       /*want_cuda=*/true);
  const at::ScalarType st = q.scalar_type();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK(max_blocks * bs < (int64_t{1} << 30), "paged_decode_attention: block table too long");

  const c10::cuda::CUDAGuard guard(q.device());
  auto out = torch::empty({B, Hq, D}, q.options());
  if (B == 0) return out;
  const auto dtype = st == at::kFloat    ? chatglm_attn::DType::kFloat
                     : st == at::kHalf ? chatglm_attn::DType::kHalf
                                       : chatglm_attn::DType::kBFloat16;
  const int64_t group = Hq / Hkv;
  const int heads = chatglm_attn::heads_per_warp(dtype);
  const int m_tiles = static_cast<int>((group + heads - 1) / heads);
  const int64_t max_len = std::max<int64_t>(1, max_blocks * bs);
  int64_t part = partition > 0
                     ? (partition + chatglm_attn::kTokensPerIter - 1) /
                           chatglm_attn::kTokensPerIter * chatglm_attn::kTokensPerIter
                     : chatglm_attn::choose_partition(max_len, static_cast<int>(B),
                                                      static_cast<int>(Hkv), m_tiles,
                                                      sm_count(q.get_device()));
  part = std::min<int64_t>(part, int64_t{1} << 30);
  const int64_t splits = (max_len + part - 1) / part;
  TORCH_CHECK(splits <= 4096, "paged_decode_attention: more than 4096 splits; raise partition");

  chatglm_attn::PagedDecodeParams p{};
  torch::Tensor part_o, part_ml;
  if (splits > 1) {
    part_o = torch::empty({B, Hq, splits, D}, q.options().dtype(at::kFloat));
    part_ml = torch::empty({2, B, Hq, splits}, q.options().dtype(at::kFloat));
    p.part_o = part_o.data_ptr<float>();
    p.part_m = part_ml.data_ptr<float>();
    p.part_l = p.part_m + B * Hq * splits;
  }
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.block_tables = block_tables.data_ptr<int64_t>();
  p.seq_lens = seq_lens.data_ptr<int64_t>();
  p.q_s0 = q.stride(0), p.q_s1 = q.stride(1);
  p.k_s0 = k_cache.stride(0), p.k_s1 = k_cache.stride(1), p.k_s2 = k_cache.stride(2);
  p.v_s0 = v_cache.stride(0), p.v_s1 = v_cache.stride(1), p.v_s2 = v_cache.stride(2);
  p.table_s0 = block_tables.stride(0);
  p.B = static_cast<int>(B), p.Hq = static_cast<int>(Hq), p.Hkv = static_cast<int>(Hkv);
  p.group = static_cast<int>(group), p.m_tiles = m_tiles;
  p.block_size = static_cast<int>(bs), p.max_blocks = static_cast<int>(max_blocks);
  p.num_splits = static_cast<int>(splits), p.partition = static_cast<int>(part);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const cudaError_t err = chatglm_attn::launch_paged_decode(p, static_cast<int>(D), dtype,
                                                            c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "paged decode attention launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "weight-only int4/int8 GEMV, batch 1-8 (GPU layout, see quant_decode.cuh)");
  m.def("gemm", &gemm,
        "weight-only int4/int8 GEMM on tensor cores, 1-64 rows, K a multiple of 64 (quant_gemm.cu)",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("bits"), py::arg("group"),
        py::arg("splits") = 0);
  m.def("gemm_splits", [](int64_t M, int64_t N, int64_t K, int64_t bits, int64_t device) {
    return chatglm_quant::gemm_splits(static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                                      static_cast<int>(bits), sm_count(static_cast<int>(device)));
  }, "the K splits gemm chooses for this shape on this device");
  m.def("dequantize", &dequantize, "int4/int8 GPU layout -> fp16 (bf16=False) or bf16 weight [N, K]");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over the paged KV cache, each sequence up to its own length",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("scale"), py::arg("partition") = 0);
}
