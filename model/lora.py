"""LoRA adapters in the PEFT format, served many at once over one base model.

A PEFT LoRA directory holds `adapter_config.json` (r, lora_alpha, use_rslora, target_modules)
and `adapter_model.safetensors` (or `.bin`) with, per adapted linear, `...<module>.lora_A.weight`
[r, in] and `...<module>.lora_B.weight` [out, r]. The adapted linear computes
y = W x + scale * B (A x), scale = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)).

Serving: every adapter lives in one slot of preallocated stacks (per layer and target,
A [max_loras, max_rank, in] and B [max_loras, out, max_rank], scale folded into B), so memory is
bounded by --max-loras / --max-lora-rank and a load never allocates. Each step the engine says
which slot every row of the flat batch uses; a forward hook on each target linear adds the
low-rank term of the k adapters present at once: x [T, in] times their A stacked [k R, in], a
mask keeping each row's own adapter's R columns (zero for base rows), times their B stacked
[out, k R]. That is three ops per linear whatever the mix (a per-adapter gather / matmul /
scatter-add loop was 6x slower on a busy CPU, where every small op costs a thread hand-off),
for k R extra columns of work per row, so requests for different adapters and for the base
share one batch and one base matmul. The low-rank path runs in the activation dtype whatever the base linear is
(dense, oneDNN-packed, int4/int8 QuantLinear), so a quantized base takes adapters too.

Forward hooks do not change the linears' types, so steps without adapter rows keep every fast
path; a step with adapter rows must not use the one-call C++ decode step (model/cpu_step.py
never calls the modules, so the hooks would not run): `LoRASlots.step` turns it off for that step.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from chatglm_serve.model.config import ChatGLMConfig
from chatglm_serve.model.loader import CheckpointError, _read_shard

if TYPE_CHECKING:
    from collections.abc import Iterator

    from chatglm_serve.model.chatglm import ChatGLMForCausalLM

# the ChatGLM linears an adapter may target, and their module path inside a layer
LORA_TARGETS = {
    "query_key_value": "self_attention.query_key_value",
    "dense": "self_attention.dense",
    "dense_h_to_4h": "mlp.dense_h_to_4h",
    "dense_4h_to_h": "mlp.dense_4h_to_h",
}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?transformer\.encoder\.layers\.(\d+)\."
    r"(self_attention\.query_key_value|self_attention\.dense|mlp\.dense_h_to_4h|mlp\.dense_4h_to_h)"
    r"\.lora_([AB])(?:\.default)?\.weight$"
)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(ValueError):
    """An adapter that cannot serve this base model; the message names the adapter."""


def target_shapes(cfg: ChatGLMConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target linear."""
    h = cfg.hidden_size
    return {
        "query_key_value": (h, cfg.qkv_out_features),
        "dense": (cfg.num_attention_heads * cfg.head_dim, h),
        "dense_h_to_4h": (h, 2 * cfg.ffn_hidden_size),
        "dense_4h_to_h": (cfg.ffn_hidden_size, h),
    }


@dataclass
class LoRAWeights:
    """One adapter read from disk and checked against the base config (fp32, on the CPU)."""

    name: str
    path: Path
    rank: int
    scaling: float
    # (layer, target) -> (A [r, in], B [out, r])
    weights: dict[tuple[int, str], tuple[Tensor, Tensor]] = field(repr=False)


def is_lora_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def read_lora(name: str, path: str | Path, cfg: ChatGLMConfig, max_rank: int) -> LoRAWeights:
    """Read and validate a PEFT LoRA directory; AdapterError naming `name` when it cannot serve
    a base of config `cfg` (missing file, unknown target, wrong shape, rank over max_rank)."""
    path = Path(path)

    def bad(why: str) -> AdapterError:
        return AdapterError(f"LoRA adapter {name!r} ({path}): {why}")

    if not path.is_dir():
        raise bad("not a directory")
    try:
        conf = json.loads((path / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise bad(f"missing {ADAPTER_CONFIG}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise bad(f"unreadable {ADAPTER_CONFIG} ({e})") from None
    if not isinstance(conf, dict):
        raise bad(f"{ADAPTER_CONFIG} is not a JSON object")
    if str(conf.get("peft_type", "LORA")).upper() != "LORA":
        raise bad(f"peft_type {conf.get('peft_type')!r} is not LORA")
    for key, ok in (
        ("fan_in_fan_out", lambda v: not v),
        ("bias", lambda v: v in (None, "none")),
        ("modules_to_save", lambda v: not v),
        ("use_dora", lambda v: not v),
        ("rank_pattern", lambda v: not v),
        ("alpha_pattern", lambda v: not v),
    ):
        if not ok(conf.get(key)):
            raise bad(f"{key}={conf.get(key)!r} is not supported")
    try:
        r = int(conf["r"])
        alpha = float(conf.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError):
        raise bad("adapter_config.json needs an integer r (and a number lora_alpha)") from None
    if r < 1:
        raise bad(f"r={r} must be >= 1")
    if r > max_rank:
        raise bad(f"rank {r} exceeds --max-lora-rank {max_rank}")
    targets = conf.get("target_modules") or []
    if isinstance(targets, list):
        unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in LORA_TARGETS]
        if unknown:
            raise bad(f"unknown target module(s) {unknown}; ChatGLM's are {sorted(LORA_TARGETS)}")
    scaling = alpha / (math.sqrt(r) if conf.get("use_rslora") else r)

    file = next((path / f for f in ADAPTER_WEIGHTS if (path / f).is_file()), None)
    if file is None:
        raise bad(f"missing weights: expected {' or '.join(ADAPTER_WEIGHTS)}")
    shapes = target_shapes(cfg)
    halves: dict[tuple[int, str], dict[str, Tensor]] = {}
    try:
        for key, tensor in _read_shard(file):
            m = _KEY.match(key)
            if m is None:
                raise bad(f"unexpected tensor {key!r} (unknown target or not a LoRA weight)")
            layer, module, ab = int(m.group(1)), m.group(2).rsplit(".", 1)[-1], m.group(3)
            if layer >= cfg.num_layers:
                raise bad(f"{key}: layer {layer} but the base has {cfg.num_layers} layers")
            fan_in, fan_out = shapes[module]
            want = (r, fan_in) if ab == "A" else (fan_out, r)
            if tuple(tensor.shape) != want:
                raise bad(
                    f"{key}: shape {tuple(tensor.shape)}, the base model needs {want} "
                    "(an adapter for another base?)"
                )
            halves.setdefault((layer, module), {})[ab] = tensor.float()
    except CheckpointError as e:
        raise bad(str(e)) from None
    if not halves:
        raise bad(f"{file.name} holds no LoRA weights")
    weights = {}
    for (layer, module), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise bad(f"layer {layer} {module}: lora_A and lora_B must both be present")
        weights[(layer, module)] = (ab["A"], ab["B"])
    return LoRAWeights(name, path, r, scaling, weights)


def merge_lora(model: ChatGLMForCausalLM, lora: LoRAWeights) -> None:
    """W += scale * B @ A in place (dense linears only): the reference the tests compare with."""
    with torch.no_grad():
        for (layer, module), (a, b) in lora.weights.items():
            lin = model.layers[layer].get_submodule(LORA_TARGETS[module])
            lin.weight += (lora.scaling * (b @ a)).to(lin.weight)


@dataclass
class _StepPlan:
    """One step's adapter rows, shared by every hooked linear (built once per device)."""

    slots: Tensor | None  # the slots present (None = every slot, in order)
    mask: Tensor | None  # [T, k * max_rank]: 1 where the row's own slot's rank columns are


class LoRASlots:
    """The adapters resident on the model, and the hooks that apply them per step."""

    def __init__(
        self, model: ChatGLMForCausalLM, max_loras: int, max_rank: int, dtype: torch.dtype
    ) -> None:
        if max_loras < 1 or max_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be >= 1")
        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.names: list[str | None] = [None] * max_loras
        self.ranks = [0] * max_loras
        shapes = target_shapes(model.config)
        # (layer, target) -> (A [max_loras, R, in], B [out, max_loras, R]) on the layer's device
        self.stacks: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        self._row_slots: list[int] = []
        self._plans: dict[torch.device, _StepPlan] = {}
        self._handles = []
        for i, layer in enumerate(model.layers):
            device = layer.input_layernorm.weight.device
            for target, path in LORA_TARGETS.items():
                fan_in, fan_out = shapes[target]
                a = torch.zeros(max_loras, max_rank, fan_in, dtype=dtype, device=device)
                b = torch.zeros(fan_out, max_loras, max_rank, dtype=dtype, device=device)
                self.stacks[(i, target)] = (a, b)
                lin = layer.get_submodule(path)
                self._handles.append(lin.register_forward_hook(self._hook(a, b)))

    @property
    def bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.stacks.values())

    def slot_of(self, name: str) -> int | None:
        return self.names.index(name) if name in self.names else None

    def load(self, lora: LoRAWeights) -> int:
        """Copy an adapter into a free slot; its slot index."""
        if lora.name in self.names:
            raise AdapterError(f"LoRA adapter {lora.name!r} is already loaded")
        if None not in self.names:
            raise AdapterError(
                f"LoRA adapter {lora.name!r}: all {self.max_loras} slots are in use (--max-loras)"
            )
        if lora.rank > self.max_rank:
            raise AdapterError(
                f"LoRA adapter {lora.name!r}: rank {lora.rank} exceeds --max-lora-rank "
                f"{self.max_rank}"
            )
        slot = self.names.index(None)
        with torch.no_grad():
            for (layer, target), (a_all, b_all) in self.stacks.items():
                a_all[slot].zero_()
                b_all[:, slot].zero_()
                ab = lora.weights.get((layer, target))
                if ab is not None:  # ranks below max_rank: zero rows/columns add exact zeros
                    a, b = ab
                    a_all[slot, : lora.rank].copy_(a)
                    b_all[:, slot, : lora.rank].copy_(b * lora.scaling)
        self.names[slot] = lora.name
        self.ranks[slot] = lora.rank
        return slot

    def unload(self, name: str) -> None:
        slot = self.slot_of(name)
        if slot is None:
            raise AdapterError(f"LoRA adapter {name!r} is not loaded")
        self.names[slot] = None
        self.ranks[slot] = 0

    @contextmanager
    def step(self, row_slots: list[int]) -> Iterator[None]:
        """Within: the target linears add each row's adapter (slot; -1 = none) to their output."""
        if all(r < 0 for r in row_slots):
            yield
            return
        self._row_slots, self._plans = list(row_slots), {}
        stack_on = self.model.use_decode_stack
        self.model.use_decode_stack = False  # the C++ decode step would skip the hooks
        try:
            yield
        finally:
            self.model.use_decode_stack = stack_on
            self._row_slots, self._plans = [], {}

    def _plan(self, device: torch.device) -> _StepPlan:
        plan = self._plans.get(device)
        if plan is None:
            rows = self._row_slots
            used = sorted({r for r in rows if r >= 0})
            R = self.max_rank
            slots = None if len(used) == self.max_loras else torch.tensor(used, device=device)
            cols = used if slots is not None else list(range(self.max_loras))
            mask = None
            if len(cols) > 1 or any(r < 0 for r in rows):
                m = torch.zeros(len(rows), len(cols), R, dtype=self.dtype)
                where = {s: j for j, s in enumerate(cols)}
                for i, r in enumerate(rows):
                    if r >= 0:
                        m[i, where[r]] = 1
                mask = m.view(len(rows), -1).to(device)
            plan = _StepPlan(slots, mask)
            self._plans[device] = plan
        return plan

    def _hook(self, a_all: Tensor, b_all: Tensor):
        fan_in, fan_out = a_all.shape[-1], b_all.shape[0]

        def add_lora(_module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            if not self._row_slots:
                return out
            x = args[0]
            if x.dtype != self.dtype:
                x = x.to(self.dtype)
            plan = self._plan(x.device)
            a, b = a_all, b_all
            if plan.slots is not None:
                a, b = a.index_select(0, plan.slots), b.index_select(1, plan.slots)
            xa = x @ a.view(-1, fan_in).T  # [T, k R]
            if plan.mask is not None:
                xa.mul_(plan.mask)
            bt = b.view(fan_out, -1).T
            if out.dtype == xa.dtype and out.dim() == 2:
                return out.addmm_(xa, bt)  # one op: out += xa @ B^T
            return out.add_((xa @ bt).to(out.dtype))

        return add_lora

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
