// A whole decode step's transformer layers in one call: a batch of single tokens (one per
// running sequence) through every ChatGLM2 block and the final RMSNorm, on the CPU.
//
// Why: at batch 1 the medium model's weights stream in ~13 ms (bf16) to ~26 ms (fp32), while
// the same layers run op by op from Python spent another ~7 ms per step on ~30 small ops and
// module calls per layer (norms, rotary, cache writes, SwiGLU, residuals). Here those are plain
// loops over a few rows and the matmuls call our kernels directly: fp32 weights go to
// panel_linear / small_linear, bf16 ones to bf16_linear (AMX where it runs, else AVX-512 BF16,
// AVX-512 or AVX2: half_linear.cpp), int4/int8 ones to qmm (quant_matmul.cpp). A quantized
// model paid ~0.1 ms of Python and dispatch per linear per step here before: about as much as
// its int4 weights take to stream.
//
// The element-wise loops (decode_loops.h) are compiled for AVX-512, AVX2 and the baseline ISA and
// picked like the kernels (cpu_common.h), so an AVX2-only server takes this step too (fp32
// panels, bf16 and int4/int8 linears; plain fp32 weights need AVX-512). Per layer, `weights`
// holds 7 tensors in order:
//   input_layernorm [H], query_key_value W and bias (empty: none), dense W, post_attention_layernorm [H],
//   dense_h_to_4h W, dense_4h_to_h W
// where W is fp32 [N, K] or panels, or bf16 packed (bf16_pack). A quantized model (uint8 W
// packed by kernels/ops.py pack_cpu) has 12 per layer: those 7, then the 4 linears' scales
// (fp32 [K/group, N_pad]) and an int64 [4, 4] of (bits, group, activation block, N) per linear.
// kv_caches[l] is [2, blocks, block_size,
// Hkv, D] in the model dtype; rotation [B, rot/2, 2] fp32 (cos, sin) for each token's position.
#include <torch/extension.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "decode_ops.h"
#include "quant_ops.h"

namespace {

constexpr int kPerLayer = 7;
constexpr int kPerLayerQuant = 12;
// SwiGLU on fewer values than this runs on the calling thread: at one row of the medium model
// (2816) the two-thread split took ~6.5 us a layer against ~2.3 us on one (Zen 4 EPYC), the
// fork and join costing more than the exponentials. With the attention's like threshold
// (paged_attention.cpp, kSerialBytes) the whole int8 batch-1 call went from 4.2-4.7 to
// 3.75-3.97 ms there at the host's fast memory level: the linears between ran faster too.
constexpr int64_t kSerialSilu = 8192;
constexpr int kLinearSlots[4] = {1, 3, 5, 6};  // qkv, dense, h_to_4h, 4h_to_h in `weights`
using bf16 = c10::BFloat16;

// The element-wise loops, once per instruction set (decode_loops.h); run<> takes one set.
#if defined(__x86_64__) && defined(__GNUC__)
namespace avx512 {
#define DS_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#include "decode_loops.h"
#undef DS_TARGET
}  // namespace avx512
namespace avx2 {
#define DS_TARGET __attribute__((target("avx2,fma")))
#include "decode_loops.h"
#undef DS_TARGET
}  // namespace avx2
#define DS_X86 1
#else
#define DS_X86 0
#endif
namespace baseline {
#define DS_TARGET
#include "decode_loops.h"
#undef DS_TARGET
}  // namespace baseline

// One linear of a layer: its weight, and for int4/int8 its scales and format.
struct Linear {
  torch::Tensor w, scales;
  int64_t bits = 0, group = 0, ablk = 0, n = 0;  // bits 0: a float weight
};

Linear layer_linear(const torch::Tensor* w, bool quant, int slot) {
  Linear lin{w[kLinearSlots[slot]]};
  if (quant) {
    lin.scales = w[7 + slot];
    const int64_t* m = w[11].data_ptr<int64_t>() + slot * 4;
    lin.bits = m[0], lin.group = m[1], lin.ablk = m[2], lin.n = m[3];
  }
  return lin;
}

// y = x @ W^T (+ b) in x's dtype; N = output features
torch::Tensor linear(const torch::Tensor& x, const Linear& lin, const torch::Tensor& b, int64_t N) {
  const c10::optional<torch::Tensor> bias =
      b.defined() && b.numel() > 0 ? c10::optional<torch::Tensor>(b) : c10::nullopt;
  if (lin.bits != 0) {
    auto y = qmm(x.contiguous(), lin.w, lin.scales, lin.bits, lin.group, lin.ablk, N, 0,
                 bias.has_value() ? c10::optional<torch::Tensor>(bias->to(torch::kFloat))
                                  : c10::nullopt);
    return x.scalar_type() == torch::kFloat ? y : y.to(x.scalar_type());
  }
  if (x.scalar_type() != torch::kFloat) return bf16_linear(x, lin.w, N, bias, 0);
  return lin.w.dim() == 3 ? panel_linear(x, lin.w, bias) : cpu_small_linear(x, lin.w, bias);
}

int64_t out_features(const Linear& lin) {
  const torch::Tensor& w = lin.w;
  if (lin.bits != 0) return lin.n;
  if (w.dim() == 3) return w.size(0) * w.size(2);  // fp32 panels [N/16, K, 16]
  return w.dim() == 2 ? w.size(0) : w.size(0) * w.size(3);  // bf16: [N/16, K/32, 16, 16, 2]
}

template <typename T, typename L>
torch::Tensor run(torch::Tensor x, const std::vector<torch::Tensor>& weights,
                  const std::vector<torch::Tensor>& kv_caches, const torch::Tensor& final_norm,
                  const torch::Tensor& rotation, const torch::Tensor& slot_mapping,
                  const torch::Tensor& block_tables, const torch::Tensor& seq_lens, int64_t hq,
                  int64_t hkv, int64_t D, double eps, double scale) {
  const int64_t M = x.size(0), H = x.size(1), rot = rotation.size(1) * 2;
  const int64_t qkv_n = (hq + 2 * hkv) * D;
  const float e = static_cast<float>(eps);
  const float* rp = rotation.data_ptr<float>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  auto h = torch::empty_like(x);
  const bool quant = weights.size() == kv_caches.size() * kPerLayerQuant;
  const size_t per_layer = quant ? kPerLayerQuant : kPerLayer;
  for (size_t l = 0; l < kv_caches.size(); ++l) {
    const torch::Tensor* w = &weights[l * per_layer];
    L::rms_norm(x.data_ptr<T>(), w[0].data_ptr<T>(), h.data_ptr<T>(), M, H, e);
    auto qkv = linear(h, layer_linear(w, quant, 0), w[2], qkv_n);  // [M, (Hq + 2 Hkv) D]
    T* qp = qkv.data_ptr<T>();
    L::rotary(qp, qkv_n, rp, M, hq + hkv, D, rot);

    const torch::Tensor& cache = kv_caches[l];  // [2, blocks, bs, Hkv, D]
    T* kc = cache.data_ptr<T>();
    const int64_t half = cache.stride(0), row = hkv * D;
    for (int64_t m = 0; m < M; ++m) {
      std::memcpy(kc + slots[m] * row, qp + m * qkv_n + hq * D, row * sizeof(T));
      std::memcpy(kc + half + slots[m] * row, qp + m * qkv_n + (hq + hkv) * D, row * sizeof(T));
    }
    auto q = qkv.narrow(1, 0, hq * D).view({M, hq, D});
    auto attn = cpu_paged_decode_attention(q, cache[0], cache[1], block_tables, seq_lens, scale);
    auto y = linear(attn.view({M, hq * D}), layer_linear(w, quant, 1), torch::Tensor(), H);
    L::add_(y.data_ptr<T>(), x.data_ptr<T>(), M * H);
    x = y;

    L::rms_norm(x.data_ptr<T>(), w[4].data_ptr<T>(), h.data_ptr<T>(), M, H, e);
    const Linear up = layer_linear(w, quant, 2);
    const int64_t ffn = out_features(up) / 2;
    auto g = linear(h, up, torch::Tensor(), 2 * ffn);  // [M, 2 F]
    auto a = torch::empty({M, ffn}, x.options());
    const T* gp = g.data_ptr<T>();
    T* ap = a.data_ptr<T>();
    if (M * ffn <= kSerialSilu) {
      L::silu_mul(gp, ap, M, ffn);
    } else if (M >= 4) {
      chatglm_cpu::parallel_chunks(M, 4, [&](int64_t m0, int64_t m1) {
        L::silu_mul(gp + m0 * 2 * ffn, ap + m0 * ffn, m1 - m0, ffn);
      });
    } else {  // a few rows: split the columns, or one core computes every e^x while the other waits
      const int64_t cols = (ffn + 1) / 2;
      chatglm_cpu::parallel_chunks(ffn, cols, [&](int64_t j0, int64_t j1) {
        for (int64_t m = 0; m < M; ++m)
          L::silu_mul_cols(gp + m * 2 * ffn, ap + m * ffn, ffn, j0, j1);
      });
    }
    y = linear(a, layer_linear(w, quant, 3), torch::Tensor(), H);
    L::add_(y.data_ptr<T>(), x.data_ptr<T>(), M * H);
    x = y;
  }
  if (final_norm.defined()) {
    auto out = torch::empty_like(x);
    L::rms_norm(x.data_ptr<T>(), final_norm.data_ptr<T>(), out.data_ptr<T>(), M, H, e);
    return out;
  }
  return x;
}

}  // namespace

torch::Tensor cpu_decode_stack(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                               const std::vector<torch::Tensor>& kv_caches,
                               const c10::optional<torch::Tensor>& final_norm,
                               const torch::Tensor& rotation, const torch::Tensor& slot_mapping,
                               const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                               int64_t hq, int64_t hkv, int64_t head_dim, double eps,
                               double scale) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(),
              "decode_stack: x must be a contiguous [B, hidden] CPU tensor");
  TORCH_CHECK(dt == torch::kFloat || dt == torch::kBFloat16, "decode_stack: fp32 or bf16 only");
  const bool quant = weights.size() == kv_caches.size() * kPerLayerQuant;
  TORCH_CHECK(weights.size() == kv_caches.size() * kPerLayer || quant,
              "decode_stack: 7 weights per layer (12 quantized)");
  const int64_t M = x.size(0), H = x.size(1);
  TORCH_CHECK(rotation.scalar_type() == torch::kFloat && rotation.is_contiguous() &&
                  rotation.dim() == 3 && rotation.size(0) == M && rotation.size(2) == 2 &&
                  rotation.size(1) * 2 <= head_dim,
              "decode_stack: rotation must be [B, rot/2, 2] fp32");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == M,
              "decode_stack: slot_mapping must be [B] int64");
  for (size_t l = 0; l < kv_caches.size(); ++l) {
    const auto& c = kv_caches[l];
    TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == dt && c.is_contiguous() &&
                    c.dim() == 5 && c.size(0) == 2 && c.size(3) == hkv && c.size(4) == head_dim,
                "decode_stack: kv cache ", l, " must be a contiguous [2, blocks, bs, Hkv, D] "
                "tensor in the model dtype");
    const int64_t slots = c.size(1) * c.size(2);
    const int64_t* s = slot_mapping.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m)
      TORCH_CHECK(s[m] >= 0 && s[m] < slots, "decode_stack: slot out of range");
    const auto* w = &weights[l * (quant ? kPerLayerQuant : kPerLayer)];
    for (int i : {0, 4})
      TORCH_CHECK(w[i].scalar_type() == dt && w[i].numel() == H && w[i].is_contiguous(),
                  "decode_stack: layernorm weight shape/dtype");
    for (int i : kLinearSlots)
      TORCH_CHECK(w[i].scalar_type() == (quant ? torch::kByte : dt) && w[i].is_contiguous(),
                  "decode_stack: linear weights must be in the model dtype (uint8 quantized)");
    if (quant)
      TORCH_CHECK(w[11].scalar_type() == torch::kInt64 && w[11].is_contiguous() &&
                      w[11].numel() == 16,
                  "decode_stack: quantized layers need an int64 [4, 4] format table");
  }
  const torch::Tensor fnorm = final_norm.has_value() ? *final_norm : torch::Tensor();
  auto go = [&](auto loops) {
    using L = decltype(loops);
    if (dt == torch::kFloat)
      return run<float, L>(x, weights, kv_caches, fnorm, rotation, slot_mapping, block_tables,
                           seq_lens, hq, hkv, head_dim, eps, scale);
    return run<bf16, L>(x, weights, kv_caches, fnorm, rotation, slot_mapping, block_tables,
                        seq_lens, hq, hkv, head_dim, eps, scale);
  };
#if DS_X86
  if (chatglm_cpu::isa_allowed(chatglm_cpu::Isa::kAvx512)) return go(avx512::Loops{});
  if (chatglm_cpu::isa_allowed(chatglm_cpu::Isa::kAvx2)) return go(avx2::Loops{});
#endif
  return go(baseline::Loops{});
}
