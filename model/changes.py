"""A count of changes to module tensors and structure in this process, for cheap cache checks.

The CPU decode step keeps a plan of the tensors it reads (model/cpu_step.py). Checking each
step that every module, parameter and packed weight is still the one the plan holds touched
~100 modules' dicts right after the step's weights had flushed the caches: ~0.18 ms of a 2.9 ms
int4 batch-1 step on the EPYC (same-process A/B: +5.5% without the check). Instead the plan
notes this count when it is checked and checks again only when the count moved.

The count moves on every parameter, buffer or submodule assignment of any module (torch's
process-wide registration hooks: the only way to see `setattr` on torch's own modules) and on
any attribute assignment of our packed and quantized linears (`note_change`, from their
`__setattr__`: `packed`, `path`, `cpu_impl` are plain attributes). In-place copies into existing
tensors (`load_state_dict`'s default) need no note: the plan holds those same tensors.
"""

from __future__ import annotations

from torch.nn.modules import module as _module

_count = [0]


def note_change(*_args: object) -> None:
    """Something a cached view of a model may depend on changed (returns None: as a torch
    registration hook it keeps the value being registered)."""
    _count[0] += 1


def change_count() -> int:
    return _count[0]


_module.register_module_parameter_registration_hook(note_change)
_module.register_module_buffer_registration_hook(note_change)
_module.register_module_module_registration_hook(note_change)
