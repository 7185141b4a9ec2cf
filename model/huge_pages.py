"""The CPU decode weights in one buffer on transparent huge pages, in the order a step reads them.

A CPU decode step streams every weight once, so its speed is the memory's read rate. With the
usual 4 KiB pages that stream also walks page tables: a 2 MiB page holds what 512 small ones do,
and on a 2-vCPU EPYC (THP on "madvise", the common default) an int4 batch-1 step of the medium
model ran ~5% faster with PyTorch's own huge-page allocation (THP_MEM_ALLOC_ENABLE=1; its 2 MiB
threshold leaves most linears out). Here the linears' decode weights (packed panels, bf16 tiles,
int4/int8 tiles and their scales, the output layer) are copied into one anonymous mapping advised
MADV_HUGEPAGE, back to back in step order, and the modules keep views into it. Each original is
freed as soon as its copy exists, so resident memory grows by at most one tensor while gathering.

The CPU KV cache goes on huge pages too (`zeros`).

Where huge pages cannot be had (not Linux, THP "never", Python without mmap.madvise), nothing
changes.
"""

from __future__ import annotations

import logging
import math
import mmap

import torch
from torch import Tensor, nn

from chatglm_serve.model.cpu_linear import PackedLinear, SmallBatchLinear
from chatglm_serve.model.quantize import QuantLinear

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line


def huge_page_buffer(nbytes: int) -> Tensor | None:
    """uint8 [nbytes] on memory advised for transparent huge pages (2 MiB aligned), or None."""
    if nbytes <= 0 or not hasattr(mmap, "MADV_HUGEPAGE") or not _thp_possible():
        return None
    try:
        # anonymous mappings are page aligned, huge pages need 2 MiB: map one more and skip ahead
        # private: a shared anonymous mapping is shmem, whose huge pages are a separate switch
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=flags)
        buf = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the mapping alive
        start = -buf.data_ptr() % HUGE_PAGE
        mm.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    except (OSError, ValueError) as e:
        log.debug("no huge pages for the decode weights: %s", e)
        return None
    return buf[start : start + nbytes]


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """torch.zeros on memory advised for huge pages where that can be had (the CPU KV cache: a
    decode step reads each sequence's keys and values as 512-byte pieces spread over the whole
    cache, and on 4 KiB pages most of those reads also miss the TLB; 16 sequences x 96
    positions x 16 layers of decode attention on a Zen 3 EPYC took ~15% less time on 2 MiB
    pages). Zeroed here, as torch.zeros does, so the memory is committed now, not mid-serving."""
    buf = huge_page_buffer(math.prod(shape) * dtype.itemsize)
    if buf is None:
        return torch.zeros(shape, dtype=dtype)
    return buf.zero_().view(dtype).view(shape)


def _thp_possible() -> bool:
    """False where the kernel says transparent huge pages are off ("[never]")."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every large CPU decode weight, in the order a step reads them."""
    mods = []
    for layer in model.transformer.encoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        mods += [attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h]
    mods.append(model.transformer.output_layer)
    slots = []
    for mod in mods:
        if isinstance(mod, PackedLinear) and type(mod) is not PackedLinear:  # panels, bf16 tiles
            slots.append((mod, "packed"))
        elif isinstance(mod, QuantLinear) and mod.path == "cpu_kernel":
            slots += [(mod, "weight"), (mod, "weight_scale")]
        elif type(mod) is SmallBatchLinear:
            slots.append((mod, "weight"))
    return [
        (m, a)
        for m, a in slots
        if getattr(m, a).device.type == "cpu" and not getattr(m, a).is_mkldnn
    ]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def gather_decode_weights(model: nn.Module) -> int:
    """Move the model's CPU decode weights into one huge-page buffer (see the module doc);
    returns the bytes moved (0: nothing to move, or no huge pages here). Call once the weights
    are final (after quantizing and packing); weights already gathered stay where they are."""
    # (module, attribute) only, no tensors: each original must be freed as soon as it is copied
    slots = [(m, a) for m, a in _slots(model) if not getattr(getattr(m, a), "_huge_pages", False)]
    spans = [(_nbytes(getattr(m, a)) + ALIGN - 1) // ALIGN * ALIGN for m, a in slots]
    total = sum(spans)
    if total < HUGE_PAGE:
        return 0
    arena = huge_page_buffer(total)
    if arena is None:
        return 0
    model.__dict__.pop("_cpu_step_plan", None)  # it holds the originals (model/cpu_step.py)
    at = 0
    for (mod, attr), span in zip(slots, spans, strict=True):
        old = getattr(mod, attr)
        new = arena[at : at + _nbytes(old)].view(old.dtype).view(old.shape)
        new.copy_(old)
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=False)
        new._huge_pages = True
        setattr(mod, attr, new)  # buffers and parameters stay registered as such
        at += span
    log.info("CPU decode weights on huge pages: %.1f MiB in one buffer", total / 2**20)
    return total
