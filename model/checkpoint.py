"""Write a model in the Hugging Face `chatglm2-6b` directory format.

Used by the embedded demo model, the benchmarks' checkpoint maker and the tests: every engine
(ours, transformers, llama.cpp, chatglm.cpp) then reads the same files a real download would hold.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from chatglm_serve.model.config import ChatGLMConfig

ROTARY_KEY = "transformer.rotary_pos_emb.inv_freq"


def _shard_names(fmt: str, n: int) -> list[str]:
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    if n == 1:
        return [f"{stem}.{ext}"]
    return [f"{stem}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)]


def _split(state: Mapping[str, Tensor], shards: int) -> list[dict[str, Tensor]]:
    """Split keys in order into `shards` groups of roughly equal bytes."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    target = total / shards
    groups: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > target * 1.05 and len(groups) < shards:
            groups.append({})
            size = 0
        groups[-1][key] = t
        size += nbytes
    while len(groups) < shards:  # more shards asked than tensors allow: split the last group
        big = max((g for g in groups if len(g) > 1), key=len)
        keys = list(big)
        half = {k: big.pop(k) for k in keys[len(keys) // 2 :]}
        groups.insert(groups.index(big) + 1, half)
    return groups


def save_checkpoint(
    model_or_state: torch.nn.Module | Mapping[str, Tensor],
    cfg: ChatGLMConfig,
    out_dir: str | Path,
    fmt: str = "bin",
    shards: int = 1,
    tokenizer_model: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json, weights (sharded with an index json when shards > 1), tokenizer.model."""
    if fmt not in ("bin", "safetensors"):
        raise ValueError(f"fmt must be 'bin' or 'safetensors', not {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model_or_state, torch.nn.Module):
        state = dict(model_or_state.state_dict())
    else:
        state = dict(model_or_state)
    if cfg.checkpoint_layout == "hf":  # glm-4-9b-chat-hf: transformers' Glm names, no rotary key
        from chatglm_serve.model.hf_glm import to_glm_state_dict

        state = to_glm_state_dict({k: v for k, v in state.items() if k != ROTARY_KEY}, cfg)
    elif ROTARY_KEY not in state:
        # THUDM's files carry it at base 10000 (rope_ratio is applied at run time); keep them faithful
        dim = cfg.rotary_dim
        inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        state[ROTARY_KEY] = inv
    state = {
        k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t)
        .detach()
        .cpu()
        .contiguous()
        for k, t in state.items()
    }

    names = _shard_names(fmt, shards)
    groups = _split(state, shards)
    weight_map: dict[str, str] = {}
    for name, group in zip(names, groups, strict=True):
        if fmt == "bin":
            torch.save(group, out / name)
        else:
            from safetensors.torch import save_file

            save_file(group, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    if shards > 1:
        index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / index).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )

    cfg_dict = cfg.to_dict()
    if dtype is not None:
        cfg_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "ChatGLMTokenizer", "padding_side": "left"}, indent=2)
        )
    return out
