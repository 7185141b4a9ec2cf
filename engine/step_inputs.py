"""A step's integer inputs moved to the device in one copy.

An eager step needs five small int64 tensors on the GPU (token ids, positions, KV slots, context
lengths, block tables). Copied one by one, each is its own pinned allocation and its own
host-to-device transfer, a few microseconds of launch each, per step. Here they are written into
one reusable host buffer (pinned where the device is a GPU) and moved with a single copy; the
tensors handed back are views of that one device tensor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class StepInputs:
    """Reusable staging for a step's int64 inputs; `pin` for a CUDA device."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._host: Tensor | None = None
        self._copied: torch.cuda.Event | None = None  # the last copy out of the host buffer
        self.copies = 0  # host-to-device copies made (tests and profiling)

    def _buffer(self, total: int) -> np.ndarray:
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the buffer
            self._copied = None
        if self._host is None or self._host.numel() < total:
            size = max(total, 1024, 2 * (0 if self._host is None else self._host.numel()))
            self._host = torch.empty(size, dtype=torch.int64, pin_memory=self.pin)
        return self._host.numpy()

    def upload(self, parts: list[list[int] | np.ndarray], device: torch.device) -> list[Tensor]:
        """The parts (lists or int64 arrays) as int64 tensors on `device`, each of its part's
        shape, all views of one tensor made by one copy."""
        arrays = [np.asarray(p, dtype=np.int64) for p in parts]
        sizes = [a.size for a in arrays]
        total = sum(sizes)
        host = self._buffer(total)
        at = 0
        for a, n in zip(arrays, sizes, strict=True):
            host[at : at + n] = a.reshape(-1)
            at += n
        src = self._host[:total]
        if device.type == "cpu":
            dev = src.clone()  # the buffer is refilled next step
        else:
            dev = src.to(device, non_blocking=self.pin)
            if self.pin:
                self._copied = torch.cuda.Event()
                self._copied.record(torch.cuda.current_stream(device))
        self.copies += 1
        return [t.view(a.shape) for t, a in zip(dev.split(sizes), arrays, strict=True)]
