// Python bindings of the CPU decode fast paths (kernels/cpu_decode.py builds and loads them).
//
// The compute calls release the GIL: the server's event loop thread can then format and send
// the last step's tokens while this step computes, instead of both taking turns on the GIL.
#include "decode_ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode_attention", &cpu_paged_decode_attention,
        "decode attention over a paged KV cache (CPU, fp32/bf16)", nogil);
  m.def("small_linear", &cpu_small_linear, "x[M<=16, K] @ w[N, K]^T + bias (CPU, fp32)", nogil);
  m.def("panel_pack", &panel_pack, "fp32 W[N, K] -> panels [N/16, K, 16]");
  m.def("panel_linear", &panel_linear, "x[M, K] @ W^T + bias, W in panels (CPU, fp32)", nogil);
  m.def("amx_bf16_usable", &amx_bf16_usable, "whether AMX-BF16 runs here");
  m.def("amx_bf16_pack", &amx_bf16_pack, "bf16 W[N, K] -> AMX B tiles [N/16, K/32, 16, 16, 2]");
  m.def("amx_bf16_linear", &amx_bf16_linear, "x[M, K] @ W^T + bias, W packed (CPU, bf16, AMX)",
        nogil);
  m.def("decode_stack", &cpu_decode_stack,
        "every layer of a decode step for single-token rows (CPU, fp32/bf16)", nogil);
}
