"""Linear layers for CPU decode: the right matmul for a few rows at a time.

A decode step multiplies one row per running sequence by every weight, so its speed is how fast
the weights stream from memory (one row) or how well the FMA units are used (a dozen rows):
  * bf16: our kernels on weights packed once into AMX's tile layout: `Bf16Linear`. With AMX
    (kernels/csrc/cpu/amx_linear.cpp) they stream at the machine's read bandwidth for 1 to 16
    rows, where oneDNN's packed bf16 reached ~70% of it (Xeon, medium model, 2 threads: 12.8 vs
    18.3 ms per step's weights at one row, 13.1 vs 18.0 at sixteen). Without AMX the same layout
    feeds AVX-512 BF16 `vdpbf16ps`, or AVX-512 / AVX2 FMAs on weights widened in registers
    (half_linear.cpp), picked at run time: on an AVX-512 EPYC without AMX oneDNN read bf16
    weights at about half the bandwidth.
  * fp16 (and bf16 on a CPU without AVX2): a plain `F.linear` reads the weight at about half
    the bandwidth a decode step can use. oneDNN's blocked layout, made once at load time, reads
    it faster and is as fast for prefill chunks: `PackedLinear`.
    Either packed weight replaces the dense one (no second copy in memory); `weight` and the
    state dict give a dense copy back on request.
  * fp32: MKL's sgemv is at the bandwidth for one row, but from a few rows on its sgemm runs
    far below the FMA peak (16 rows took 3x one row). `PanelLinear` packs the weight once into
    panels of 16 rows for our AVX-512 or AVX2 GEMM kernel (kernels/csrc/cpu/panel_linear.cpp),
    which beats MKL from one row to prefill chunks; packed linears also let a decode step run in
    one C++ call (model/cpu_step.py). Shapes it cannot pack (N % 16 != 0) keep the plain weight
    as `SmallBatchLinear` on AVX-512: up to 16 rows to our dot-product kernel (small_gemm.cpp),
    the rest to MKL.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatglm_serve.kernels import cpu_decode
from chatglm_serve.model.changes import note_change

log = logging.getLogger(__name__)
# oneDNN picks its blocking for this many rows; measured fastest for 1 row and for 512
BATCH_HINT = 512


class SmallBatchLinear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose fp32 CPU forward for at most 16 rows,
    outside autograd, runs our kernel."""

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if not torch.is_grad_enabled() and cpu_decode.small_linear_supports(x2, self.weight):
            y = cpu_decode.small_linear(x2, self.weight, self.bias)
            if y is not None:
                return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def can_use_small_batch(weight: Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and cpu_decode.has_avx512()
        and cpu_decode.decode_kernels_or_none() is not None
    )


def can_pack(weight: Tensor) -> bool:
    """Whether packing is available (and worth it) for this weight."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_fp16_supported()


class PackedLinear(nn.Module):
    """`y = x W^T + b` with W held in oneDNN's blocked layout (CPU, bf16/fp16)."""

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        note_change()  # `packed` and the kernel choice are plain attributes (model/changes.py)

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = self._pack(weight.detach())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def _pack(self, weight: Tensor) -> Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)

    @property
    def weight(self) -> Tensor:
        """A dense copy of the weight (for inspection and saving; forward never makes one)."""
        return self.packed.to_dense()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features).to(self.dtype))
        return y.view(*lead, self.out_features)

    def _matmul(self, x: Tensor) -> Tensor:
        """x [M, in_features] in the weight's dtype -> [M, out_features]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors
    ) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        else:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                errors.append(f"size mismatch for {key}: {tuple(w.shape)}")
            else:
                self.packed = self._pack(w.detach().to(self.dtype))
        if self.bias is not None:
            bkey = prefix + "bias"
            if bkey in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bkey])
            else:
                missing_keys.append(bkey)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {str(self.dtype).removeprefix('torch.')} "
            f"{self.layout}-packed"
        )

    layout = "oneDNN"


class Bf16Linear(PackedLinear):
    """`y = x W^T + b` in bf16, W packed into AMX's tile layout (CPU): AMX where it runs, else
    AVX-512 BF16, AVX-512 or AVX2 (kernels/csrc/cpu/half_linear.cpp picks at run time)."""

    layout = "bf16-tile"
    impl = "auto"  # bf16_linear's implementation; tests pin the lower ones

    def _pack(self, weight: Tensor) -> Tensor:
        return cpu_decode.bf16_pack(weight)

    @property
    def weight(self) -> Tensor:
        return cpu_decode.bf16_unpack(self.packed, self.out_features, self.in_features)

    def _matmul(self, x: Tensor) -> Tensor:
        return cpu_decode.bf16_linear(x, self.packed, self.out_features, self.bias, self.impl)


class PanelLinear(PackedLinear):
    """`y = x W^T + b` in fp32, W packed into our GEMM kernel's panels (CPU, AVX-512 or AVX2)."""

    layout = "panel"

    def _pack(self, weight: Tensor) -> Tensor:
        return cpu_decode.panel_pack(weight)

    @property
    def weight(self) -> Tensor:
        return cpu_decode.panel_unpack(self.packed)

    def _matmul(self, x: Tensor) -> Tensor:
        return cpu_decode.panel_linear(x, self.packed, self.bias)


def can_use_panels(weight: Tensor) -> bool:
    """Whether our fp32 panel kernel takes this weight: N % 16 == 0, AVX2 or better."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.shape[0] % 16 == 0
        and "avx2" in cpu_decode.allowed_isas()
    )


def can_use_bf16_tiles(weight: Tensor) -> bool:
    """Whether our bf16 kernels take this weight: any shape (padded to the tiles) on a CPU with
    AVX2 or better; AMX runs where the shape needs no padding."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and "avx2" in cpu_decode.allowed_isas()
    )


@functools.cache
def log_paths() -> dict[str, str]:
    """Which kernel each linear kind runs on this CPU; logged once per process."""
    from chatglm_serve.kernels.ops import cpu_impls

    isas = cpu_decode.allowed_isas()
    quant = cpu_impls()
    paths = {
        "fp32": "panel/small GEMM (AVX-512)"
        if "avx512" in isas
        else "panel GEMM (AVX2)"
        if "avx2" in isas
        else "PyTorch (MKL)",
        "bf16": f"bf16 tiles ({cpu_decode.bf16_linear_path()})"
        if "avx2" in isas
        else "oneDNN packed",
        "int4/int8": "PyTorch (dequantize per call)"
        if not quant
        else "avx512_vnni, amx from 8-16 rows"
        if quant[-1] == "amx"
        else quant[-1],
        "decode step": "one C++ call"
        if "avx2" in isas
        else "one C++ call for int4/int8, layer by layer otherwise"
        if isas
        else "layer by layer (PyTorch)",
    }
    log.info(
        "CPU kernels: ISAs %s; %s",
        ",".join(isas) or "none",
        "; ".join(f"{k}: {v}" for k, v in paths.items()),
    )
    return paths


def optimize_linears(model: nn.Module) -> list[str]:
    """Give every plain nn.Linear on a CPU its decode matmul; returns their names.

    bf16 weights become `Bf16Linear` where AVX2 or better runs, else (and fp16) `PackedLinear`;
    fp32 ones
    `PanelLinear`, or `SmallBatchLinear` where N % 16 != 0 (a class change in place: the
    parameters stay). Subclasses (tensor-parallel linears) and quantized linears are left alone.
    """
    log_paths()
    names = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        w = module.weight
        packed_cls = (
            Bf16Linear
            if can_use_bf16_tiles(w)
            else PanelLinear
            if can_use_panels(w)
            else PackedLinear
            if can_pack(w)
            else None
        )
        if packed_cls is not None:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, packed_cls.from_linear(module))
        elif can_use_small_batch(module.weight):
            module.__class__ = SmallBatchLinear
        else:
            continue
        names.append(name)
    return names
