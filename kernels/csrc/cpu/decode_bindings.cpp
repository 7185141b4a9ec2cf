// Python bindings of the CPU decode fast paths (kernels/cpu_decode.py builds and loads them).
//
// The compute calls release the GIL: the server's event loop thread can then format and send
// the last step's tokens while this step computes, instead of both taking turns on the GIL.
#include "cpu_common.h"
#include "decode_ops.h"

#include <string>
#include <vector>

namespace py = pybind11;

namespace {
// the rungs of cpu_common.h's ladder this CPU has and CHATGLM_SERVE_CPU_ISA allows, lowest first
std::vector<std::string> allowed_isas() {
  using chatglm_cpu::Isa;
  const char* names[] = {"scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"};
  std::vector<std::string> out;
  for (int i = 0; i < 6; ++i)
    if (chatglm_cpu::isa_allowed(static_cast<Isa>(i))) out.emplace_back(names[i]);
  return out;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("allowed_isas", &allowed_isas, "instruction sets the kernels may use here, lowest first");
  m.def("paged_decode_attention", &cpu_paged_decode_attention,
        "decode attention over a paged KV cache (CPU, fp32/bf16)", nogil);
  m.def("small_linear", &cpu_small_linear, "x[M<=16, K] @ w[N, K]^T + bias (CPU, fp32)", nogil);
  m.def("panel_pack", &panel_pack, "fp32 W[N, K] -> panels [N/16, K, 16]");
  m.def("panel_linear", &panel_linear, "x[M, K] @ W^T + bias, W in panels (CPU, fp32)", nogil);
  m.def("amx_bf16_usable", &amx_bf16_usable, "whether AMX-BF16 runs here");
  m.def("amx_bf16_pack", &amx_bf16_pack, "bf16 W[N, K] -> AMX B tiles [N/16, K/32, 16, 16, 2]");
  m.def("amx_bf16_linear", &amx_bf16_linear, "x[M, K] @ W^T + bias, W packed (CPU, bf16, AMX)",
        nogil);
  m.def("bf16_linear_impl", &bf16_linear_impl,
        "the bf16 linear implementation `impl` resolves to here (0: the best this CPU runs)");
  m.def("bf16_pack", &bf16_pack, "bf16 W[N, K] -> tiles, N and K padded to 16 and 32");
  m.def("bf16_linear", &bf16_linear,
        "x[M, K] @ W^T + bias, W from bf16_pack (CPU, bf16: AMX, AVX-512 BF16, AVX-512, AVX2)",
        nogil);
  m.def("decode_stack", &cpu_decode_stack,
        "every layer of a decode step for single-token rows (CPU, fp32/bf16)", nogil);
}
