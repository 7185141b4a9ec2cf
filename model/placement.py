"""Layer-split placement: which device holds the embedding, each layer, the final norm, the head.

The planner is a pure function of module sizes (bytes) and a device list, so it is tested without
any device. The model is a pipeline (embedding -> layers -> final norm -> output layer), so each
device gets one contiguous run of it and activations cross each device boundary once per step.
Among contiguous splits the planner picks the one with the smallest largest share of weight
bytes (the embedding and the output layer are each as big as two layers of the 6B model, so they
are counted, not assumed free). The final norm always travels with the output layer.

Mixed lists (`cuda:0,cpu`) are for a model bigger than the accelerator: the CPU is overflow and
holds only what the accelerators' weight budgets (free memory, less room for the KV cache) cannot.
An explicit device map (YAML `device_map`) is used as given.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from chatglm_serve.model.config import ChatGLMConfig, parse_dtype

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
FINAL_NORM = "final_layernorm"
OUTPUT_LAYER = "output_layer"

_LAYER_KEY = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.")
_PREFIXES = {
    "transformer.embedding.": EMBEDDING,
    "transformer.encoder.final_layernorm.": FINAL_NORM,
    "transformer.output_layer.": OUTPUT_LAYER,
}


def _per_unit(record: ModuleSizes | PlacementPlan, unit: str) -> int:
    """The value a record (sizes or stages, one per unit) holds for one placement unit."""
    if unit == EMBEDDING:
        return record.embedding
    if unit == FINAL_NORM:
        return record.final_norm
    if unit == OUTPUT_LAYER:
        return record.output_layer
    return record.layers[int(unit.split(".")[1])]


class PlacementError(ValueError):
    """A device list, device map or budget the model cannot be placed with; the message says why."""


def layer_name(i: int) -> str:
    return f"layers.{i}"


def unit_of_key(key: str) -> str:
    """The placement unit a checkpoint / state-dict key belongs to (`layers.N`, `embedding`, ...)."""
    m = _LAYER_KEY.match(key)
    if m:
        return layer_name(int(m.group(1)))
    for prefix, unit in _PREFIXES.items():
        if key.startswith(prefix):
            return unit
    if key.startswith("transformer.rotary_pos_emb."):
        return layer_name(0)  # positions' cos/sin are computed where the first layer runs
    raise PlacementError(f"tensor {key!r} belongs to no placement unit")


@dataclass(frozen=True)
class ModuleSizes:
    """Weight bytes of each placement unit."""

    embedding: int
    layers: tuple[int, ...]
    final_norm: int
    output_layer: int

    @property
    def total(self) -> int:
        return self.embedding + sum(self.layers) + self.final_norm + self.output_layer

    def of(self, unit: str) -> int:
        return _per_unit(self, unit)

    def units(self) -> list[str]:
        return [
            EMBEDDING,
            *(layer_name(i) for i in range(len(self.layers))),
            FINAL_NORM,
            OUTPUT_LAYER,
        ]


def module_sizes(model: nn.Module, dtype: torch.dtype | str | None = None) -> ModuleSizes:
    """Bytes per unit of a model (a meta-device one works); floating tensors counted at `dtype`."""
    elem = None if dtype is None else torch.empty((), dtype=parse_dtype(dtype)).element_size()
    n_layers = len(model.transformer.encoder.layers)
    sizes = {u: 0 for u in [EMBEDDING, FINAL_NORM, OUTPUT_LAYER]}
    layers = [0] * n_layers
    for key, t in model.state_dict(keep_vars=True).items():
        size = elem if (elem is not None and t.is_floating_point()) else t.element_size()
        nbytes = t.numel() * size
        unit = unit_of_key(key)
        if unit.startswith("layers."):
            layers[int(unit.split(".")[1])] += nbytes
        else:
            sizes[unit] += nbytes
    return ModuleSizes(sizes[EMBEDDING], tuple(layers), sizes[FINAL_NORM], sizes[OUTPUT_LAYER])


def config_sizes(
    cfg: ChatGLMConfig,
    dtype: torch.dtype | str | None = None,
    quantize: int | None = None,
    group_size: int | None = None,
) -> ModuleSizes:
    """Sizes of the model a config describes, from a meta-device instance (no memory used)."""
    from chatglm_serve.model.chatglm import ChatGLMForCausalLM

    with torch.device("meta"):
        model = ChatGLMForCausalLM(cfg)
    bits = cfg.quantization_bit or quantize
    if bits:
        from chatglm_serve.model.quantize import QuantSpec, replace_linears

        spec = QuantSpec(bits=bits, group_size=None if cfg.quantization_bit else group_size)
        replace_linears(model, spec, from_checkpoint=bool(cfg.quantization_bit))
    return module_sizes(model, dtype or cfg.torch_dtype)


# ------------------------------------------------------------------------------------ devices


def normalize_device(device: str | torch.device) -> str:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", 0)
    return str(d)


def parse_devices(
    devices: str | Sequence[str] | None = None, num_gpus: int | None = None
) -> list[str]:
    """`cuda:0,cuda:1` / a list / `num_gpus=N` (cuda:0..N-1) -> normalized device strings."""
    if devices and num_gpus:
        raise PlacementError("give either a device list or a number of GPUs, not both")
    if num_gpus:
        if num_gpus < 1:
            raise PlacementError(f"num_gpus must be >= 1, not {num_gpus}")
        return [f"cuda:{i}" for i in range(num_gpus)]
    if isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()]
    out = []
    for d in devices or []:
        try:
            out.append(normalize_device(d.strip()))
        except RuntimeError as e:
            raise PlacementError(f"not a device: {d!r} ({e})") from None
    if not out:
        raise PlacementError("no devices given")
    return out


def check_devices_exist(devices: Sequence[str]) -> None:
    """Refuse, by name, a device this machine does not have (before anything is loaded)."""
    for d in devices:
        dev = torch.device(d)
        if dev.type == "cuda":
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if dev.index >= n:
                raise PlacementError(
                    f"device {d} requested but this machine has {n} CUDA device(s)"
                )
        elif dev.type == "mps" and not torch.backends.mps.is_available():
            raise PlacementError(f"device {d} requested but MPS is not available")


def accelerator_weight_budgets(
    devices: Sequence[str], memory_utilization: float = 0.9, kv_share: float = 0.25
) -> dict[str, int]:
    """Weight bytes each CUDA device may take: free memory * utilization, less `kv_share` of it
    left for the KV cache and activations. Needed for mixed GPU/CPU plans (how much spills)."""
    budgets = {}
    for d in dict.fromkeys(devices):
        dev = torch.device(d)
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            budgets[d] = int(free * memory_utilization * (1.0 - kv_share))
    return budgets


# ------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class PlacementPlan:
    """Where each unit lives. `devices` is the listed order; units name an index into it, so
    `cpu,cpu` is two pipeline stages even though both are the same device."""

    devices: tuple[str, ...]
    embedding: int
    layers: tuple[int, ...]
    final_norm: int
    output_layer: int
    sizes: ModuleSizes

    def stage_of(self, unit: str) -> int:
        return _per_unit(self, unit)

    def device_of(self, unit: str) -> str:
        return self.devices[self.stage_of(unit)]

    def device_for(self, key: str) -> torch.device:
        """The loader's hook: the device of a checkpoint tensor, by its key."""
        return torch.device(self.device_of(unit_of_key(key)))

    def units_per_stage(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in self.devices]
        for unit in self.sizes.units():
            out[self.stage_of(unit)].append(unit)
        return out

    def bytes_per_stage(self) -> list[int]:
        out = [0] * len(self.devices)
        for unit in self.sizes.units():
            out[self.stage_of(unit)] += self.sizes.of(unit)
        return out

    def bytes_per_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dev, nbytes in zip(self.devices, self.bytes_per_stage(), strict=True):
            out[dev] = out.get(dev, 0) + nbytes
        return out

    def num_boundaries(self) -> int:
        """Device changes along the pipeline: activation copies per forward pass."""
        devs = [self.device_of(u) for u in self.sizes.units()]
        return sum(a != b for a, b in itertools.pairwise(devs))

    def to_device_map(self) -> dict[str, str]:
        """The explicit form (what `device_map` in the YAML config accepts), ranges compressed."""
        out = {EMBEDDING: self.device_of(EMBEDDING)}
        run_start = 0
        n = len(self.layers)
        for i in range(1, n + 1):
            if i == n or self.layers[i] != self.layers[run_start]:
                name = (
                    layer_name(run_start) if i - 1 == run_start else f"layers.{run_start}-{i - 1}"
                )
                out[name] = self.devices[self.layers[run_start]]
                run_start = i
        out[FINAL_NORM] = self.device_of(FINAL_NORM)
        out[OUTPUT_LAYER] = self.device_of(OUTPUT_LAYER)
        return out

    def describe(self) -> str:
        """The start-up log's table: each device, what it holds, how many bytes."""
        lines = [
            f"placement plan: {len(self.sizes.layers)} layers over {len(self.devices)} device(s), "
            f"{_fmt_bytes(self.sizes.total)} of weights, {self.num_boundaries()} device boundary(ies)"
        ]
        width = max(len(d) for d in self.devices)
        for stage, (dev, units, nbytes) in enumerate(
            zip(self.devices, self.units_per_stage(), self.bytes_per_stage(), strict=True)
        ):
            share = nbytes / self.sizes.total if self.sizes.total else 0.0
            what = _describe_units(units) or "(nothing)"
            lines.append(
                f"  [{stage}] {dev:<{width}}  {_fmt_bytes(nbytes):>10}  {share:6.1%}  {what}"
            )
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _describe_units(units: list[str]) -> str:
    parts: list[str] = []
    layers = [int(u.split(".")[1]) for u in units if u.startswith("layers.")]
    if EMBEDDING in units:
        parts.append("embedding")
    # contiguous runs of layers, e.g. "layers 0-13"
    start = prev = None
    for i in [*layers, None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(f"layer {start}" if start == prev else f"layers {start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    if FINAL_NORM in units:
        parts.append("final norm")
    if OUTPUT_LAYER in units:
        parts.append("output layer")
    return ", ".join(parts)


def _is_overflow(device: str) -> bool:
    return torch.device(device).type == "cpu"


def plan_placement(
    sizes: ModuleSizes,
    devices: Sequence[str],
    device_map: Mapping[str, str] | None = None,
    budgets: Mapping[str, int] | None = None,
) -> PlacementPlan:
    """The placement plan for `sizes` over `devices` (in pipeline order).

    device_map: an explicit assignment (see `parse_device_map`), used as given.
    budgets: the most weight bytes a device may hold (per device name, shared by repeated
    entries of one device); a device without one is unlimited. When the list mixes CPU and
    accelerators, the CPU takes only what the accelerators' budgets leave over.
    """
    if device_map:
        return _plan_from_map(sizes, device_map, devices)
    devices = tuple(normalize_device(d) for d in devices)
    if not devices:
        raise PlacementError("no devices given")
    # planning units: embedding, each layer, then the final norm glued to the output layer
    weights = [sizes.embedding, *sizes.layers, sizes.final_norm + sizes.output_layer]
    budgets = {normalize_device(k): v for k, v in (budgets or {}).items()}
    caps = [_stage_cap(d, devices, budgets) for d in devices]
    mixed = any(_is_overflow(d) for d in devices) and not all(_is_overflow(d) for d in devices)
    overflow = [mixed and _is_overflow(d) for d in devices]
    cuts = _partition(weights, caps, overflow)
    if cuts is None:
        have = ", ".join(
            f"{d}: {_fmt_bytes(budgets[d])}" for d in dict.fromkeys(devices) if d in budgets
        )
        raise PlacementError(
            f"the model's {_fmt_bytes(sizes.total)} of weights do not fit the devices' budgets "
            f"({have}); add devices (or cpu as overflow) or quantize"
        )
    stage_of_unit = []
    for stage, (a, b) in enumerate(itertools.pairwise(cuts)):
        stage_of_unit.extend([stage] * (b - a))
    n = len(sizes.layers)
    head = stage_of_unit[n + 1]
    return PlacementPlan(
        devices=devices,
        embedding=stage_of_unit[0],
        layers=tuple(stage_of_unit[1 : n + 1]),
        final_norm=head,
        output_layer=head,
        sizes=sizes,
    )


def _stage_cap(device: str, devices: tuple[str, ...], budgets: Mapping[str, int]) -> float:
    if device not in budgets:
        return float("inf")
    # a device listed twice shares its budget between its stages
    return budgets[device] / devices.count(device)


def _partition(weights: list[int], caps: list[float], overflow: list[bool]) -> list[int] | None:
    """Cut points [0, c1, ..., m] of a contiguous split of `weights` over the stages.

    Minimizes, in order: bytes on overflow stages, the largest primary stage, the largest
    overflow stage. For a fixed limit on stage size, the least overflow is a shortest-path DP
    over (units placed, stages used); the limits are found by binary search over the possible
    stage sizes (every contiguous sum), since the least overflow only falls as limits grow.
    """
    m, k = len(weights), len(caps)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")

    def solve(primary_limit: float, overflow_limit: float) -> tuple[float, list[int]]:
        # best[j][i]: least overflow bytes with units [0, i) on stages [0, j)
        best = [[inf] * (m + 1) for _ in range(k + 1)]
        back = [[0] * (m + 1) for _ in range(k + 1)]
        best[0][0] = 0
        for j in range(k):
            limit = min(caps[j], overflow_limit if overflow[j] else primary_limit)
            for i in range(m + 1):
                if best[j][i] == inf:
                    continue
                for e in range(i, m + 1):
                    size = prefix[e] - prefix[i]
                    if size > limit:
                        break
                    cost = best[j][i] + (size if overflow[j] else 0)
                    # ties go to the later cut: earlier stages fill first
                    if cost < best[j + 1][e] or (cost == best[j + 1][e] and i > back[j + 1][e]):
                        best[j + 1][e] = cost
                        back[j + 1][e] = i
        cuts = [m]
        for j in range(k, 0, -1):
            cuts.append(back[j][cuts[-1]])
        return best[k][m], cuts[::-1]

    least, _ = solve(inf, inf)
    if least == inf:
        return None
    candidates = sorted({prefix[e] - prefix[i] for i in range(m + 1) for e in range(i, m + 1)})

    def smallest(ok) -> float:
        lo, hi = 0, len(candidates) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if ok(candidates[mid]):
                hi = mid
            else:
                lo = mid + 1
        return candidates[lo]

    p = smallest(lambda lim: solve(lim, inf)[0] <= least)
    o = smallest(lambda lim: solve(p, lim)[0] <= least) if any(overflow) else inf
    return solve(p, o)[1]


# ------------------------------------------------------------------------------- explicit maps

_RANGE = re.compile(r"^layers\.(\d+)(?:-(\d+))?$")
_ALIASES = {
    "embedding": EMBEDDING,
    "transformer.embedding": EMBEDDING,
    "transformer.embedding.word_embeddings": EMBEDDING,
    "final_layernorm": FINAL_NORM,
    "final_norm": FINAL_NORM,
    "transformer.encoder.final_layernorm": FINAL_NORM,
    "output_layer": OUTPUT_LAYER,
    "transformer.output_layer": OUTPUT_LAYER,
}


def parse_device_map(device_map: Mapping[str, str], num_layers: int) -> dict[str, str]:
    """An explicit map -> {unit: device} covering every unit.

    Keys: `embedding`, `layers.N`, a range `layers.A-B` (inclusive), `final_layernorm`,
    `output_layer`, or the Hugging Face module names the seed's `load_model_on_gpus` uses
    (`transformer.encoder.layers.N`, `transformer.output_layer`, ...). The seed's
    `transformer.rotary_pos_emb` entry is accepted and ignored (it follows layer 0).
    """
    out: dict[str, str] = {}

    def put(unit: str, device: str, key: str) -> None:
        if unit in out and out[unit] != device:
            raise PlacementError(
                f"device_map: {unit} assigned twice ({out[unit]} and {device} via {key!r})"
            )
        out[unit] = device

    for key, device in device_map.items():
        try:
            dev = normalize_device(str(device))
        except RuntimeError:
            raise PlacementError(f"device_map[{key!r}]: not a device: {device!r}") from None
        k = key.strip()
        if k == "transformer.rotary_pos_emb":
            continue
        if k.startswith("transformer.encoder.layers."):
            k = k[len("transformer.encoder.") :]
        if k in _ALIASES:
            put(_ALIASES[k], dev, key)
            continue
        m = _RANGE.match(k)
        if not m:
            raise PlacementError(
                f"device_map: unknown key {key!r}; expected embedding, layers.N, layers.A-B, "
                "final_layernorm or output_layer"
            )
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if not 0 <= a <= b < num_layers:
            raise PlacementError(f"device_map: {key!r} is outside layers 0-{num_layers - 1}")
        for i in range(a, b + 1):
            put(layer_name(i), dev, key)
    units = [EMBEDDING, *(layer_name(i) for i in range(num_layers)), FINAL_NORM, OUTPUT_LAYER]
    missing = [u for u in units if u not in out]
    if missing:
        raise PlacementError(f"device_map leaves unplaced: {_describe_units(missing)}")
    return out


def _plan_from_map(
    sizes: ModuleSizes, device_map: Mapping[str, str], devices: Sequence[str] | None
) -> PlacementPlan:
    placed = parse_device_map(device_map, len(sizes.layers))
    order = [normalize_device(d) for d in devices or []]
    for dev in placed.values():
        if dev not in order:
            order.append(dev)
    index = {d: order.index(d) for d in order}
    stages = {u: index[d] for u, d in placed.items()}
    n = len(sizes.layers)
    return PlacementPlan(
        devices=tuple(order),
        embedding=stages[EMBEDDING],
        layers=tuple(stages[layer_name(i)] for i in range(n)),
        final_norm=stages[FINAL_NORM],
        output_layer=stages[OUTPUT_LAYER],
        sizes=sizes,
    )


# --------------------------------------------------------------------------------- loading


def plan_for_checkpoint(
    path: str | Path | None,
    devices: Sequence[str] | None,
    dtype: torch.dtype | str | None = None,
    quantize: int | None = None,
    group_size: int | None = None,
    device_map: Mapping[str, str] | None = None,
    budgets: Mapping[str, int] | None = None,
) -> PlacementPlan:
    """The plan for a checkpoint directory (None = the embedded demo model), from its config."""
    if path is None:
        from chatglm_serve.model.demo import demo_checkpoint_dir

        path = demo_checkpoint_dir()
    cfg = ChatGLMConfig.from_json(Path(path))
    if dtype == "auto":
        dtype = None
    sizes = config_sizes(cfg, dtype, quantize=quantize, group_size=group_size)
    if budgets is None and not device_map:
        budgets = accelerator_weight_budgets(devices or [])
    return plan_placement(sizes, devices or [], device_map=device_map, budgets=budgets)


def load_placed(
    path: str | Path | None,
    devices: str | Sequence[str] | None,
    dtype: torch.dtype | str | None = None,
    quantize: int | None = None,
    group_size: int | None = None,
    device_map: Mapping[str, str] | None = None,
    budgets: Mapping[str, int] | None = None,
):
    """(model, tokenizer, plan): plan the split, log it, and stream each tensor to its device."""
    from chatglm_serve.model.loader import load_model_and_tokenizer

    devices = parse_devices(devices) if devices or not device_map else []
    check_devices_exist(devices)
    if device_map:
        check_devices_exist([normalize_device(str(d)) for d in device_map.values()])
    plan = plan_for_checkpoint(path, devices, dtype, quantize, group_size, device_map, budgets)
    log.info("%s", plan.describe())
    model, tokenizer = load_model_and_tokenizer(
        path,
        dtype=dtype,
        device=plan.devices[plan.embedding],
        quantize=quantize,
        group_size=group_size,
        device_for=plan.device_for,
    )
    return model, tokenizer, plan
