"""Write fine-tunes in their published formats (random weights) for the adapter tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from chatglm_serve.model.config import ChatGLMConfig
from chatglm_serve.model.lora import LORA_TARGETS, target_shapes

ALL_TARGETS = list(LORA_TARGETS)


def write_peft_lora(
    path: Path,
    cfg: ChatGLMConfig,
    *,
    r: int = 4,
    alpha: float = 8.0,
    targets: list[str] | None = None,
    rslora: bool = False,
    seed: int = 0,
    fmt: str = "safetensors",
    std: float = 0.3,
) -> Path:
    """A PEFT LoRA directory as `model.save_pretrained` writes it: adapter_config.json and
    adapter_model.safetensors (or .bin) with `base_model.model.<module>.lora_{A,B}.weight`."""
    targets = targets or ALL_TARGETS
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "THUDM/chatglm2-6b",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.1,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": rslora,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)
    shapes = target_shapes(cfg)
    state = {}
    for i in range(cfg.num_layers):
        for t in targets:
            fan_in, fan_out = shapes[t]
            key = f"base_model.model.transformer.encoder.layers.{i}.{LORA_TARGETS[t]}"
            state[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) * std
            state[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * std
    if fmt == "safetensors":
        save_file(state, str(path / "adapter_model.safetensors"))
    else:
        torch.save(state, path / "adapter_model.bin")
    return path


def write_ptuning(
    path: Path,
    cfg: ChatGLMConfig,
    *,
    pre_seq_len: int = 8,
    projection: bool = False,
    seed: int = 0,
    std: float = 4.0,
) -> Path:
    """A ChatGLM2-6B `ptuning/` checkpoint: the model's config.json with pre_seq_len and
    prefix_projection, and pytorch_model.bin holding only transformer.prefix_encoder.*."""
    path.mkdir(parents=True, exist_ok=True)
    conf = cfg.to_dict() | {"pre_seq_len": pre_seq_len, "prefix_projection": projection}
    (path / "config.json").write_text(json.dumps(conf, indent=2))
    kv = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
    gen = torch.Generator().manual_seed(seed)
    p = "transformer.prefix_encoder."
    state = {p + "embedding.weight": torch.randn(pre_seq_len, kv, generator=gen) * std}
    if projection:
        h = cfg.hidden_size
        state |= {
            p + "trans.0.weight": torch.randn(h, kv, generator=gen) * 0.2,
            p + "trans.0.bias": torch.randn(h, generator=gen) * 0.2,
            p + "trans.2.weight": torch.randn(kv, h, generator=gen) * std,
            p + "trans.2.bias": torch.randn(kv, generator=gen) * 0.2,
        }
    torch.save({k: v.half() for k, v in state.items()}, path / "pytorch_model.bin")
    return path
