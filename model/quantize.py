"""Weight-only INT8/INT4 quantization as a module swap (the model file knows nothing of it).

Formats (the seed's `chatglm2-6b-int4` / `-int8` checkpoints, read as is):
  weight        int8 [out, in/2] for int4: two signed 4-bit values per byte, the EVEN input index
                in the HIGH nibble; int8 [out, in] for int8.
  weight_scale  fp16 [out], symmetric: scale = max|w| / 7 (int4) or / 127 (int8), w ~ q * scale.
Beyond the seed, group-wise scales: weight_scale fp16 [out, in/group] (one scale per `group`
input channels). A checkpoint written from a group-quantized model carries that shape, and
loading infers the group from it.

On-the-fly quantization (a full-precision weight handed to `load_weight`) uses the seed's exact
per-row scheme, or for int4 groups all 16 levels (scale = signed extreme / -8, as llama.cpp's
q4_0: about a tenth less error than the seed's 15 levels).

`QuantLinear` keeps its weight in the layout of the kernel that will run it: 16-row tiles for the
CPU kernel (kernels/ops.py `pack_cpu`; activations are quantized to int8 on the fly there), 32-bit
words for the CUDA kernels (`pack_cuda`), or the seed's bytes for the plain-PyTorch fallback
(dequantize per call, used where no kernel can be built). `state_dict()` always gives the seed's
format back, whatever the layout in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatglm_serve.kernels.build import cpu_kernels_or_none
from chatglm_serve.model.changes import note_change

log = logging.getLogger(__name__)

# The four matmuls of every GLMBlock (the seed quantizes exactly these).
LAYER_LINEARS = (
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)
OUTPUT_LAYER = "transformer.output_layer"

# Rows quantized at a time when a full-precision weight streams in: bounds the fp32 temporaries
# (the 6B output layer is 65024 x 4096) without a Python loop per row.
_QUANT_ROW_CHUNK = 4096


# kernels/csrc/cpu/quant_matmul.cpp's implementation ids ("auto" picks by CPU and batch size)
CPU_IMPL_IDS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512_vnni": 3, "amx": 4}


class QuantFormatError(ValueError):
    """A quantized tensor with the wrong shape or dtype, or a module missing one; says which."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int | None = None  # None: one scale per output row, as the seed
    quantize_output_layer: bool = False
    # the output layer's bits when they differ (int8 under int4, one scale per row, as
    # llama.cpp keeps its output tensor at 6 bits under q4_0); None: `bits` and `group_size`
    head_bits: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or self.head_bits not in (None, 4, 8):
            raise ValueError(f"quantization bits must be 4 or 8, got {self.bits}/{self.head_bits}")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 2):
            raise ValueError(f"group_size must be a positive even number, got {self.group_size}")

    @property
    def name(self) -> str:
        name = f"int{self.bits}-" + (f"g{self.group_size}" if self.group_size else "row")
        if self.quantize_output_layer and self.head_bits not in (None, self.bits):
            name += f"+int{self.head_bits}-head"
        return name

    def for_module(self, name: str) -> QuantSpec:
        """The spec the module `name` is quantized with."""
        if name == OUTPUT_LAYER and self.head_bits not in (None, self.bits):
            return QuantSpec(bits=self.head_bits)
        return self


# ---------------------------------------------------------------------- the seed's format
def qmax(bits: int) -> int:
    return 7 if bits == 4 else 127


def quantize_weight(w: Tensor, bits: int, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric quantization of w [N, K] -> (q int8 [N, K], scale fp16 [N, K/group]).

    Per row (group_size None), exactly as the seed: scale = max|w| / 7 (int4) or / 127 (int8),
    kept in fp16, q = round(w / scale), so an on-the-fly model equals the seed's checkpoint.
    int4 groups use all 16 levels instead: scale = (the signed extreme) / -8, so the extreme maps
    to -8 and the rest of [-8, 7] is used (a possibly negative scale; as llama.cpp's q4_0), which
    cuts the error by about a tenth at no cost.
    """
    n, k = w.shape
    g = group_size or k
    if k % g:
        raise QuantFormatError(f"group_size {g} does not divide in_features {k}")
    lo, hi = (-8, 7) if bits == 4 and group_size else (-qmax(bits), qmax(bits))
    qs, ss = [], []
    for rows in w.split(_QUANT_ROW_CHUNK):
        wf = rows.float().view(rows.shape[0], k // g, g)
        if lo == -8:
            extreme = wf.gather(-1, wf.abs().argmax(-1, keepdim=True))[..., 0]
            scale = (extreme / -8).half()
        else:
            scale = (wf.abs().amax(-1) / qmax(bits)).half()
        s = scale.float()[..., None]
        q = torch.where(s != 0, wf / torch.where(s != 0, s, 1.0), 0.0)
        qs.append(torch.round(q).clamp_(lo, hi).to(torch.int8).view(rows.shape[0], k))
        ss.append(scale)
    return torch.cat(qs), torch.cat(ss)


def pack_int4(q: Tensor) -> Tensor:
    """q int8 [N, K] in [-8, 7] -> int8 [N, K/2]: even k in the high nibble, odd k in the low."""
    if q.shape[-1] % 2:
        raise QuantFormatError(f"int4 packing needs an even in_features, got {q.shape[-1]}")
    q16 = q.to(torch.int16)
    packed = (q16[..., 0::2] << 4) | (q16[..., 1::2] & 0x0F)
    return packed.to(torch.uint8).view(torch.int8)


def unpack_int4(packed: Tensor) -> Tensor:
    """int8 [N, K/2] -> int8 [N, K]: the inverse of pack_int4 (two's complement nibbles)."""
    p = packed.view(torch.uint8).to(torch.int16)
    hi = ((p >> 4) ^ 8) - 8
    lo = ((p & 0x0F) ^ 8) - 8
    return torch.stack([hi, lo], dim=-1).flatten(-2).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q int8 [N, K], scale [N] or [N, G] -> w [N, K] = q * scale of its group."""
    n, k = q.shape
    s = scale.float().reshape(n, -1)
    w = q.float().view(n, s.shape[1], -1) * s[..., None]
    return w.view(n, k).to(dtype)


# ---------------------------------------------------------------------- the module
class QuantLinear(nn.Module):
    """Weight-only quantized `nn.Linear` replacement (y = x W^T + b, W ~ q * scale).

    Created empty: placeholders on the meta device name the tensors the loader will hand over
    (`load_weight`), then `finalize()` lays the weight out for the device's kernel.
    from_checkpoint=True: expects the seed's `weight` (int8) and `weight_scale` (fp16).
    from_checkpoint=False: expects the full-precision `weight` [out, in] and quantizes it at once.
    """

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        note_change()  # path, cpu_impl, the format: plain attributes (model/changes.py)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        spec: QuantSpec,
        from_checkpoint: bool,
        name: str = "",
    ) -> None:
        super().__init__()
        if spec.bits == 4 and in_features % 2:
            raise QuantFormatError(f"{name}: int4 needs an even in_features, got {in_features}")
        if spec.group_size is not None and in_features % spec.group_size:
            raise QuantFormatError(
                f"{name}: group_size {spec.group_size} does not divide in_features {in_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = spec.bits
        self.group_size = spec.group_size or in_features
        self.from_checkpoint = from_checkpoint
        self.name = name
        # "placeholder" -> "seed" once loaded -> finalize: "cpu_tiles", "cuda_words" or "seed"
        self.layout = "placeholder"
        self.path = "unfinalized"  # "cpu_kernel", "cuda_kernel" or "torch" after finalize
        self.cpu_impl = "auto"  # the CPU kernel's ISA ("scalar", "avx2", ...); tests pin it
        meta = torch.device("meta")
        if from_checkpoint:
            shape = (
                (out_features, in_features // 2) if spec.bits == 4 else (out_features, in_features)
            )
            self.register_buffer("weight", torch.empty(shape, dtype=torch.int8, device=meta))
            scale_shape = (out_features,)
            if spec.group_size:
                scale_shape = (out_features, in_features // spec.group_size)
            self.register_buffer(
                "weight_scale", torch.empty(scale_shape, dtype=torch.float16, device=meta)
            )
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features, device=meta))
            self.register_buffer("weight_scale", None)
        self.register_buffer("bias", torch.empty(out_features, device=meta) if bias else None)

    # ------------------------------------------------------------------ loading
    def _fail(self, what: str) -> QuantFormatError:
        return QuantFormatError(f"{self.name or 'quantized linear'}: {what}")

    def _packed_shape(self) -> tuple[int, int]:
        k = self.in_features // 2 if self.bits == 4 else self.in_features
        return (self.out_features, k)

    def load_weight(self, name: str, tensor: Tensor) -> None:
        """Take one checkpoint tensor of this module ('weight', 'weight_scale' or 'bias')."""
        n, k = self.out_features, self.in_features
        if name == "bias":
            if self.bias is None:
                raise self._fail("has no bias, but the checkpoint has one")
            if tuple(tensor.shape) != (n,) or not tensor.is_floating_point():
                raise self._fail(
                    f"bias must be a float [{n}], got {tensor.dtype} {tuple(tensor.shape)}"
                )
            self.bias = tensor.detach().float().contiguous()
            return
        if name == "weight" and tensor.is_floating_point():
            if self.from_checkpoint:
                raise self._fail(
                    f"the checkpoint is int{self.bits} (quantization_bit) but its weight is "
                    f"{tensor.dtype}, not the packed int8"
                )
            if tuple(tensor.shape) != (n, k):
                raise self._fail(f"weight must be [{n}, {k}], got {tuple(tensor.shape)}")
            per_row = self.group_size == self.in_features  # the seed's scheme, exactly
            q, scale = quantize_weight(
                tensor.detach(), self.bits, None if per_row else self.group_size
            )
            self.weight = pack_int4(q) if self.bits == 4 else q
            self.weight_scale = scale
        elif name == "weight":
            if not self.from_checkpoint:
                raise self._fail(
                    f"expected a full-precision weight to quantize, got {tensor.dtype} "
                    "(is config.json missing quantization_bit?)"
                )
            want = self._packed_shape()
            if tensor.dtype not in (torch.int8, torch.uint8) or tuple(tensor.shape) != want:
                raise self._fail(
                    f"int{self.bits} weight must be int8 {list(want)}, got {tensor.dtype} "
                    f"{list(tensor.shape)} (config quantization_bit {self.bits})"
                )
            self.weight = tensor.detach().view(torch.int8)
        elif name == "weight_scale":
            if not self.from_checkpoint:
                raise self._fail("unexpected weight_scale in a full-precision checkpoint")
            s = tensor.detach()
            if not s.is_floating_point() or s.dim() not in (1, 2) or s.shape[0] != n:
                raise self._fail(
                    f"weight_scale must be float [{n}] or [{n}, groups], got {s.dtype} {list(s.shape)}"
                )
            groups = 1 if s.dim() == 1 else s.shape[1]
            if k % groups or (self.bits == 4 and (k // groups) % 2):
                raise self._fail(f"{groups} scale groups do not divide in_features {k}")
            self.group_size = k // groups
            self.weight_scale = s.reshape(n, groups)
        else:
            raise self._fail(f"unexpected tensor {name!r}")
        if self.weight is not None and self.weight.device.type != "meta":
            self.layout = "seed"

    def finalize(self) -> None:
        """All tensors are in: lay the weight out for this device's kernel."""
        for what, t in (("weight", self.weight), ("weight_scale", self.weight_scale)):
            if t is None or t.device.type == "meta":
                raise self._fail(f"{what} was never loaded")
        if self.bias is not None and self.bias.device.type == "meta":
            raise self._fail("bias was never loaded")
        if self.layout != "seed":
            return  # finalized already
        scale = self.weight_scale.float().reshape(self.out_features, -1)
        device = self.weight.device
        if self.bias is not None:
            self.bias = self.bias.to(device)
        if device.type == "cpu":
            self._finalize_cpu(scale)
        elif device.type == "cuda":
            self._finalize_cuda(scale)
        else:
            self.weight_scale, self.path = scale, "torch"

    def use_cpu_kernel(self) -> bool:
        """Move a CPU layer finalized onto the PyTorch path (kernels not built then) onto the
        kernel, now that it loads; whether it did."""
        if self.path != "torch" or self.layout != "seed" or self.weight.device.type != "cpu":
            return False
        self._finalize_cpu(self.weight_scale)
        return self.path == "cpu_kernel"

    def _finalize_cpu(self, scale: Tensor) -> None:
        from chatglm_serve.kernels.ops import activation_block, cpu_kernel_supports, pack_cpu

        if cpu_kernels_or_none() is None or not cpu_kernel_supports(
            self.in_features, self.group_size
        ):
            self.weight_scale, self.path = scale, "torch"
            return
        q = unpack_int4(self.weight) if self.bits == 4 else self.weight
        self.weight, self.weight_scale = pack_cpu(q, scale, self.bits)
        self.layout, self.path = "cpu_tiles", "cpu_kernel"
        self._act_block = activation_block(self.bits, self.group_size)

    def _finalize_cuda(self, scale: Tensor) -> None:
        from chatglm_serve.kernels.build import KernelUnavailable, load_cuda_kernels
        from chatglm_serve.kernels.ops import pack_cuda

        self.weight_scale, self.path = scale.contiguous(), "torch"
        if self.in_features % 32 or self.group_size % 32:
            return  # the kernels read 32 k per load; odd shapes dequantize per call
        try:
            load_cuda_kernels()
        except KernelUnavailable as e:
            log.warning(
                "%s: CUDA quantized kernels unavailable (%s); dequantizing per call", self.name, e
            )
            return
        q = unpack_int4(self.weight) if self.bits == 4 else self.weight
        self.weight = pack_cuda(q, self.bits)
        self.layout, self.path = "cuda_words", "cuda_kernel"

    def use_torch_fallback(self) -> None:
        """Run through plain PyTorch (dequantize per call), as where no kernel can be built."""
        w, scale = self.seed_tensors()
        self.weight, self.weight_scale = w, scale.float().reshape(self.out_features, -1)
        self.layout, self.path = "seed", "torch"

    # ------------------------------------------------------------------ state dict in the seed's format
    def seed_tensors(self) -> tuple[Tensor, Tensor]:
        """(weight int8 packed as the seed, weight_scale fp16 [N] or [N, G]) from any layout."""
        if self.layout == "cpu_tiles":
            from chatglm_serve.kernels.ops import unpack_cpu

            q, scale = unpack_cpu(
                self.weight, self.weight_scale, self.bits, self.out_features, self.in_features
            )
            w = pack_int4(q) if self.bits == 4 else q
        elif self.layout == "cuda_words":
            from chatglm_serve.kernels.ops import unpack_cuda

            q, scale = unpack_cuda(self.weight, self.bits), self.weight_scale
            w = pack_int4(q) if self.bits == 4 else q
        else:
            w, scale = self.weight, self.weight_scale
        scale = scale.reshape(self.out_features, -1)
        if scale.shape[1] == 1:
            scale = scale[:, 0]
        return w, scale.half()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self.layout == "placeholder":  # what the loader will hand over: the placeholders
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        w, scale = self.seed_tensors()
        destination[prefix + "weight"] = w if keep_vars else w.detach()
        destination[prefix + "weight_scale"] = scale
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        names = ["weight", "weight_scale"] + (["bias"] if self.bias is not None else [])
        for name in names:
            key = prefix + name
            if key in state_dict:
                if name == "weight" and not state_dict[key].is_floating_point():
                    self.from_checkpoint = True
                self.load_weight(name, state_dict[key])
            elif name != "weight_scale" or self.from_checkpoint:
                missing_keys.append(key)
        if not missing_keys:
            self.layout = "seed"
            self.finalize()

    # ------------------------------------------------------------------ compute
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full [out, in] weight this module multiplies by (reference and fallback path)."""
        w, scale = self.seed_tensors()
        q = unpack_int4(w) if self.bits == 4 else w
        return dequantize(q, scale.reshape(self.out_features, -1).float(), dtype)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.path == "cpu_kernel":
            # Straight to the extension, bias fused: this runs 4-5 times per layer per step,
            # where a few microseconds of Python or an extra torch op per call add up.
            if x2.dtype not in (torch.float32, torch.bfloat16):
                x2 = x2.float()
            y = cpu_kernels_or_none().qmm(
                x2.contiguous(),
                self.weight,
                self.weight_scale,
                self.bits,
                self.group_size,
                self._act_block,
                self.out_features,
                CPU_IMPL_IDS[self.cpu_impl],
                self.bias,
            )
        else:
            y = self._other_paths(x2)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*lead, self.out_features)

    def _other_paths(self, x2: Tensor) -> Tensor:
        if self.path == "unfinalized":
            raise RuntimeError(f"{self.name}: finalize() was not called after loading")
        if x2.device != self.weight.device:
            raise RuntimeError(
                f"{self.name}: input on {x2.device}, weight laid out for {self.weight.device}"
            )
        if x2.shape[0] == 0:
            y = x2.new_empty(0, self.out_features)
        elif self.path == "cuda_kernel" and x2.dtype in (torch.float16, torch.bfloat16):
            y = self._cuda_matmul(x2)
        else:
            y = F.linear(x2, self.dequantized_weight(x2.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _cuda_matmul(self, x: Tensor) -> Tensor:
        # GEMV (1-8 rows), tensor-core GEMM or dequantize + cuBLAS: kernels/cuda_qmm.py chooses
        from chatglm_serve.kernels.cuda_qmm import quant_matmul

        return quant_matmul(
            x.contiguous(), self.weight, self.weight_scale, self.bits, self.group_size
        )

    def extra_repr(self) -> str:
        g = "row" if self.group_size == self.in_features else f"group {self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
            f"scale per {g}, bias={self.bias is not None}, path={self.path}"
        )


# ---------------------------------------------------------------------- the swap
def _targets(model: nn.Module, spec: QuantSpec) -> list[str]:
    names = [
        f"transformer.encoder.layers.{i}.{sub}"
        for i in range(len(model.transformer.encoder.layers))
        for sub in LAYER_LINEARS
    ]
    if spec.quantize_output_layer:
        names.append(OUTPUT_LAYER)
    return names


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _quant_for(
    model: nn.Module, name: str, spec: QuantSpec, from_checkpoint: bool
) -> tuple[nn.Linear, QuantLinear]:
    """The linear `name` and an empty QuantLinear of its shape, in the spec for that module."""
    lin = model.get_submodule(name)
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"{name} is {type(lin).__name__}, not nn.Linear (quantized twice?)")
    q = QuantLinear(
        lin.in_features,
        lin.out_features,
        lin.bias is not None,
        spec.for_module(name),
        from_checkpoint,
        name,
    )
    return lin, q


def replace_linears(model: nn.Module, spec: QuantSpec, from_checkpoint: bool) -> list[str]:
    """Swap the transformer linears (and the output layer if the spec says so) for empty
    QuantLinears; nothing full-precision is allocated. Returns the swapped module names."""
    names = _targets(model, spec)
    for name in names:
        _swap(model, name, _quant_for(model, name, spec, from_checkpoint)[1])
    return names


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Quantize an already-loaded model in place, one linear at a time (each full-precision
    weight is released as soon as its quantized copy exists)."""
    for name in _targets(model, spec):
        lin, q = _quant_for(model, name, spec, from_checkpoint=False)
        q.load_weight("weight", lin.weight)
        if lin.bias is not None:
            q.load_weight("bias", lin.bias)
        q.finalize()
        _swap(model, name, q)
    return model


def quantized_modules(model: nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]
