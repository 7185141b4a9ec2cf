"""Linear layers with weights reordered once for oneDNN, for half-precision decode on a CPU.

A plain bf16 `F.linear` on a CPU reads its weight at roughly half the memory bandwidth a
decode step could use (batch-1 decode is a matrix-vector product: every weight byte is read
once per token). oneDNN's blocked layout, made once at load time, reads it at nearly the full
bandwidth and is as fast for prefill chunks, so half-precision CPU serving packs the
transformer's linears. fp32 is not packed: MKL's plain sgemv is already the faster one there.

The packed weight is an opaque oneDNN tensor that replaces the dense one (no second copy in
memory); `weight` and the state dict give a dense copy back on request.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# oneDNN picks its blocking for this many rows; measured fastest for 1 row and for 512
BATCH_HINT = 512


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

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    @property
    def weight(self) -> Tensor:
        """A dense copy of the weight (for inspection and saving; forward never makes one)."""
        return self.packed.to_dense()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, self.in_features).to(self.dtype), self.packed, self.bias, "none", [], ""
        )
        return y.view(*lead, self.out_features)

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
                self.packed = torch.ops.mkldnn._reorder_linear_weight(
                    w.detach().to(self.dtype), BATCH_HINT
                )
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
            f"bias={self.bias is not None}, {str(self.dtype).removeprefix('torch.')} oneDNN-packed"
        )


def pack_linears(model: nn.Module) -> list[str]:
    """Replace every plain nn.Linear whose weight can be packed; returns their names.

    Subclasses (tensor-parallel linears) and quantized linears are left alone.
    """
    names = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not can_pack(module.weight):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear.from_linear(module))
        names.append(name)
    return names
