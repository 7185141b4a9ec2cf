"""The fine-tunes an engine serves beside its base model: LoRA adapters and P-Tuning v2 prefixes.

A request names one by its `model` (the vLLM convention); the engine resolves the name once, at
admission, to an `ActiveAdapter` that the sequence carries:
  * LoRA: a slot of the model's LoRASlots (model/lora.py); the runner tells the model each row's
    slot every step, so any mix of adapters and base rows runs as one batch.
  * P-Tuning v2: the prefix keys/values (model/ptuning.py) are written once into KV blocks that
    are pinned (never freed or evicted); the sequence's block table starts with them, its tokens'
    K/V slots are shifted by pre_seq_len while their rotary positions are not.
Every adapter seeds the prefix cache's block hashes with its own key, so two requests share
cached K/V only when they use the same adapter (or both none).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from chatglm_serve.engine.block_manager import BlockManager
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.lora import AdapterError, LoRASlots, LoRAWeights, is_lora_dir, read_lora
from chatglm_serve.model.ptuning import PrefixKV, is_ptuning_dir, read_ptuning

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveAdapter:
    """What a sequence needs of its adapter at run time."""

    name: str
    kind: str  # "lora" or "ptuning"
    hash_seed: int  # first link of its prefix-cache hash chain
    lora_slot: int = -1
    prefix_len: int = 0  # virtual tokens before the sequence's own (P-Tuning v2)
    prefix_blocks: tuple[int, ...] = ()


@dataclass
class AdapterInfo:
    """For listings (/v1/models)."""

    name: str
    kind: str
    path: str
    rank: int | None = None
    pre_seq_len: int | None = None


@dataclass
class _Entry:
    active: ActiveAdapter
    info: AdapterInfo
    pinned: list[int] = field(default_factory=list)


def adapter_kind(path: str | Path) -> str:
    p = Path(path)
    if is_lora_dir(p):
        return "lora"
    if is_ptuning_dir(p):
        return "ptuning"
    raise AdapterError(
        f"{p}: neither a PEFT LoRA directory (adapter_config.json) nor a P-Tuning v2 "
        "checkpoint (config.json with pre_seq_len)"
    )


class AdapterRegistry:
    """Loads, holds and resolves the adapters of one engine."""

    def __init__(self, model: ChatGLMForCausalLM, max_loras: int, max_lora_rank: int) -> None:
        self.model = model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.lora: LoRASlots | None = None  # created with the first LoRA adapter
        self.entries: dict[str, _Entry] = {}
        self.default: ActiveAdapter | None = None  # a P-Tuning checkpoint for base requests
        self._seeds = itertools.count(1)
        self._kv_caches: list[Tensor] | None = None
        self._bm: BlockManager | None = None

    def attach(self, kv_caches: list[Tensor], block_manager: BlockManager) -> None:
        """Where P-Tuning prefixes go (the runner's caches, the engine's block manager)."""
        self._kv_caches = kv_caches
        self._bm = block_manager

    # ---- loading ----
    def read(self, name: str, path: str | Path) -> LoRAWeights | PrefixKV:
        """Read and validate an adapter without installing it (AdapterError when bad)."""
        if not name or name in self.entries:
            raise AdapterError(f"adapter name {name!r} is empty or already in use")
        if adapter_kind(path) == "lora":
            return read_lora(name, path, self.model.config, self.max_lora_rank)
        return read_ptuning(name, path, self.model.config)

    def add(self, name: str, path: str | Path) -> ActiveAdapter:
        """Read, validate and install an adapter under `name`."""
        return self.install(self.read(name, path))

    def install(self, item: LoRAWeights | PrefixKV) -> ActiveAdapter:
        seed = hash(("adapter", item.name, next(self._seeds)))
        if isinstance(item, PrefixKV):
            blocks = self._pin_prefix(item)
            active = ActiveAdapter(
                item.name, "ptuning", seed, prefix_len=item.pre_seq_len, prefix_blocks=blocks
            )
            info = AdapterInfo(item.name, "ptuning", str(item.path), pre_seq_len=item.pre_seq_len)
            self.entries[item.name] = _Entry(active, info, list(blocks))
        else:
            if self.lora is None:
                self.lora = LoRASlots(
                    self.model, self.max_loras, self.max_lora_rank, _activation_dtype(self.model)
                )
                log.info(
                    "LoRA slots: %d x rank %d (%.1f MiB)",
                    self.max_loras,
                    self.max_lora_rank,
                    self.lora.bytes / 2**20,
                )
            slot = self.lora.load(item)
            active = ActiveAdapter(item.name, "lora", seed, lora_slot=slot)
            info = AdapterInfo(item.name, "lora", str(item.path), rank=item.rank)
            self.entries[item.name] = _Entry(active, info)
        log.info("adapter %r (%s) loaded from %s", item.name, active.kind, item.path)
        return active

    def set_default_ptuning(self, prefix: PrefixKV) -> None:
        """Every request that names no adapter gets this P-Tuning v2 prefix."""
        blocks = self._pin_prefix(prefix)
        self.default = ActiveAdapter(
            "(base)",
            "ptuning",
            hash(("adapter", "(base)", next(self._seeds))),
            prefix_len=prefix.pre_seq_len,
            prefix_blocks=blocks,
        )

    def remove(self, name: str) -> None:
        """Unload a LoRA adapter (callers make sure no sequence uses it)."""
        entry = self.entries.get(name)
        if entry is None:
            raise AdapterError(f"adapter {name!r} is not loaded")
        if entry.active.kind != "lora":
            raise AdapterError(f"adapter {name!r}: only LoRA adapters can be unloaded")
        assert self.lora is not None
        self.lora.unload(name)
        del self.entries[name]

    def _pin_prefix(self, prefix: PrefixKV) -> tuple[int, ...]:
        if self._bm is None or self._kv_caches is None:
            raise RuntimeError("AdapterRegistry.attach must come before a P-Tuning adapter")
        bs = self._bm.block_size
        if prefix.pre_seq_len % bs:
            raise AdapterError(
                f"P-Tuning v2 checkpoint {prefix.name!r}: pre_seq_len {prefix.pre_seq_len} is "
                f"not a multiple of the KV block size {bs}; start with a --block-size that "
                "divides it"
            )
        blocks = self._bm.pin(prefix.pre_seq_len // bs)
        slots = (torch.tensor(blocks)[:, None] * bs + torch.arange(bs)).reshape(-1)
        for cache, kv in zip(self._kv_caches, prefix.kv, strict=True):
            _, nb, _, hkv, d = cache.shape
            for j in range(2):
                flat = cache[j].view(nb * bs, hkv, d)
                flat.index_copy_(0, slots.to(cache.device), kv[j].to(cache))
        return tuple(blocks)

    # ---- resolving ----
    def resolve(self, name: str | None) -> ActiveAdapter | None:
        """The adapter a request's model name selects; None = the base (or default prefix)."""
        entry = self.entries.get(name) if name else None
        return entry.active if entry is not None else self.default

    def max_prefix_blocks(self) -> int:
        counts = [len(e.pinned) for e in self.entries.values()]
        if self.default is not None:
            counts.append(len(self.default.prefix_blocks))
        return max(counts, default=0)

    def infos(self) -> list[AdapterInfo]:
        return [e.info for e in self.entries.values()]


def _activation_dtype(model: ChatGLMForCausalLM) -> torch.dtype:
    w = model.transformer.embedding.word_embeddings.weight
    return w.dtype if w.is_floating_point() else torch.float16
