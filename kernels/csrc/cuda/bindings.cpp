// torch bindings of the CUDA kernels in quant_gemv.cu and paged_attention.cu (shapes and dtypes
// checked here; the kernels take raw pointers and run on the current stream, so CUDA graphs can
// capture them).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <initializer_list>

#include "paged_attention.h"
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

int sm_count(int device) {
  int n = 0;  // a host-side attribute query (no GPU work, fine inside a graph capture)
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;  // choose_partition then assumes an H100's count
  }
  return n;
}

bool aligned16(const torch::Tensor& t, std::initializer_list<int64_t> strides) {
  const int64_t per = 16 / static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
  for (int64_t s : strides) {
    if (s % per) return false;
  }
  return true;
}

// q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
// int64; seq_lens [B] int64 -> [B, Hq, D]. Reads nothing from the GPU on the host (no sync):
// lengths and block ids are trusted (a length past the table is clipped to it on the device).
// partition: keys per split (rounded up to a multiple of 16); 0 = choose_partition's.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale,
                                     int64_t partition) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3, "paged_decode_attention: q must be a CUDA [B, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "paged_decode_attention: caches [num_blocks, block_size, Hkv, D] of one shape");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_decode_attention: q and the cache must have one dtype");
  const at::ScalarType st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "paged_decode_attention: float32, float16 or bfloat16, got ", st);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "paged_decode_attention: head_dim mismatch");
  TORCH_CHECK(chatglm_attn::head_dim_supported(static_cast<int>(D)),
              "paged_decode_attention: head_dim must be 64 or 128, got ", D);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "paged_decode_attention: Hq must be a multiple of Hkv");
  for (const auto* t : {&k_cache, &v_cache, &block_tables, &seq_lens}) {
    TORCH_CHECK(t->device() == q.device(), "paged_decode_attention: tensors on different devices");
  }
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_decode_attention: the head_dim axis must be contiguous");
  TORCH_CHECK(aligned16(q, {q.stride(0), q.stride(1)}) &&
                  aligned16(k_cache, {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)}) &&
                  aligned16(v_cache, {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)}),
              "paged_decode_attention: q and cache rows must be 16-byte aligned");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "paged_decode_attention: int64 block tables and lengths");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.stride(1) == 1 &&
                  seq_lens.dim() == 1 && seq_lens.size(0) == B && seq_lens.is_contiguous(),
              "paged_decode_attention: block_tables [B, max_blocks], seq_lens [B]");
  TORCH_CHECK(B <= 65535 && Hq <= 65535, "paged_decode_attention: at most 65535 sequences and heads");
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
  m.def("dequantize", &dequantize, "int4/int8 GPU layout -> fp16 (bf16=False) or bf16 weight [N, K]");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over the paged KV cache, each sequence up to its own length",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("scale"), py::arg("partition") = 0);
}
