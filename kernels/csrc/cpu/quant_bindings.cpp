// Python bindings of the weight-only int4/int8 matmul (kernels/build.py load_cpu_kernels).
#include "quant_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmm", &qmm, "weight-only int4/int8 matmul (packed layout, see quant_matmul.cpp)",
        py::arg("x"), py::arg("w"), py::arg("sw"), py::arg("bits"), py::arg("group"),
        py::arg("ablk"), py::arg("n"), py::arg("impl"), py::arg("bias") = py::none());
  m.def("available_impls", &available_impls, "implementations this CPU can run");
}
