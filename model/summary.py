"""A loaded model in a few numbers (parameters, bytes, dtypes, devices) for logs and the API."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSummary:
    """What a loaded model is, for logs and /v1/models, without touching its tensors again."""

    params: int  # parameter count (quantized weights count their logical elements)
    bytes: int  # parameters and buffers as held
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]

    def line(self) -> str:
        size = self.bytes / 2**30
        held = f"{size:.2f} GiB" if size >= 1 else f"{self.bytes / 2**20:.1f} MiB"
        return (
            f"{self.params / 1e6:.1f}M params, {held} {'/'.join(self.dtypes)} "
            f"on {','.join(self.devices)}"
        )


def summarize(model: torch.nn.Module) -> ModelSummary:
    params = list(model.parameters())
    tensors = params + list(model.buffers())
    return ModelSummary(
        params=sum(p.numel() for p in params),
        bytes=sum(t.numel() * t.element_size() for t in tensors),
        dtypes=tuple(sorted({str(p.dtype).removeprefix("torch.") for p in params})),
        devices=tuple(sorted({str(t.device) for t in tensors})),
    )
