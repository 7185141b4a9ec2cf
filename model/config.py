"""ChatGLM configuration, read from a Hugging Face config.json.

One network serves the family: `chatglm2-6b`, `chatglm3-6b(-32k, -base)` and `glm-4-9b-chat(-1m)`
publish it as `model_type: chatglm` (`ChatGLMForConditionalGeneration` keys); `glm-4-9b-chat-hf`
publishes it as transformers' `model_type: glm` (`GlmForCausalLM` keys), read through
model/hf_layout.py into the same fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


class ConfigError(ValueError):
    """A config.json this code cannot serve; the message names the field."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclass
class ChatGLMConfig:
    num_layers: int = 28
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    padded_vocab_size: int = 65024
    seq_length: int = 32768
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    add_qkv_bias: bool = True
    add_bias_linear: bool = False
    post_layer_norm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    torch_dtype: str = "float16"
    eos_token_id: int = 2
    pad_token_id: int = 0
    quantization_bit: int = 0
    rope_ratio: float = 1.0
    model_type: str = "chatglm"
    # "chatglm" (THUDM's keys) or "hf" (transformers' GlmForCausalLM keys, model/hf_layout.py)
    checkpoint_layout: str = "chatglm"
    # Keys present in config.json that we keep but do not interpret.
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def num_kv_heads(self) -> int:
        return (
            self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads
        )

    @property
    def qkv_out_features(self) -> int:
        return (self.num_attention_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a reply: GLM-4's config lists three (eos, <|user|>, <|observation|>)."""
        listed = self.extra.get("eos_token_id")
        if isinstance(listed, list) and listed:
            return [int(i) for i in listed]
        return [self.eos_token_id]

    @property
    def rope_base(self) -> float:
        """ChatGLM3-32k (rope_ratio 50) and GLM-4 (500, 1m: 10000) stretch the rotary base."""
        return 10000.0 * self.rope_ratio

    @property
    def rotary_dim(self) -> int:
        # ChatGLM2 rotates the first half of each head's channels.
        return self.head_dim // 2

    def validate(self) -> None:
        def refuse(name: str, why: str) -> None:
            raise ConfigError(f"config field {name!r}: {why}")

        if self.checkpoint_layout not in ("chatglm", "hf"):
            refuse("checkpoint_layout", f"{self.checkpoint_layout!r} is not 'chatglm' or 'hf'")
        if self.model_type != "chatglm":
            refuse("model_type", f"{self.model_type!r} is not served; expected 'chatglm'")
        if not self.rmsnorm:
            refuse("rmsnorm", "only RMSNorm models (rmsnorm: true) are supported")
        if self.apply_residual_connection_post_layernorm:
            refuse("apply_residual_connection_post_layernorm", "must be false (as in ChatGLM2)")
        if not self.post_layer_norm:
            refuse("post_layer_norm", "must be true (ChatGLM2 has a final RMSNorm)")
        if self.add_bias_linear:
            refuse("add_bias_linear", "must be false (ChatGLM2 linears have no bias)")
        if self.num_attention_heads % self.num_kv_heads:
            refuse(
                "multi_query_group_num",
                f"{self.num_kv_heads} does not divide num_attention_heads {self.num_attention_heads}",
            )
        if self.kv_channels % 4:
            refuse("kv_channels", "must be divisible by 4 (half-head rotary in pairs)")
        if self.quantization_bit not in (0, 4, 8):
            refuse("quantization_bit", f"{self.quantization_bit} is not one of 0, 4, 8")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "padded_vocab_size"):
            if getattr(self, name) <= 0:
                refuse(name, "must be positive")
        parse_dtype(self.torch_dtype)

    @classmethod
    def from_dict(cls, data: dict) -> ChatGLMConfig:
        if data.get("model_type") == "glm":  # glm-4-9b-chat-hf: transformers' field names
            from chatglm_serve.model.hf_layout import chatglm_fields

            data = chatglm_fields(data)
        data = dict(data)
        eos = data.get("eos_token_id")
        if isinstance(eos, list):  # GLM-4: several; the first is eos, the list stays in extra
            if not eos or not all(isinstance(i, int) for i in eos):
                raise ConfigError("config field 'eos_token_id': expected an int or a list of ints")
            data["eos_token_id"] = eos[0]
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        extra = {k: v for k, v in data.items() if k not in known}
        if isinstance(eos, list):
            extra["eos_token_id"] = list(eos)
        if "model_type" not in data:
            raise ConfigError("config field 'model_type': missing; expected 'chatglm'")
        cfg = cls(**kwargs, extra=extra)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> ChatGLMConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"missing model config: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        """The HF config.json form (what the seed's checkpoints carry)."""
        if self.checkpoint_layout == "hf":
            from chatglm_serve.model.hf_layout import hf_config_dict

            return hf_config_dict(self)
        d = asdict(self)
        d.pop("checkpoint_layout")
        extra = d.pop("extra")
        d.update(
            {
                "architectures": ["ChatGLMModel"],
                "auto_map": {
                    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
                    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                },
                "num_hidden_layers": self.num_layers,
                "vocab_size": self.padded_vocab_size,
            }
        )
        if not self.quantization_bit:
            d.pop("quantization_bit")
        if self.rope_ratio == 1.0:
            d.pop("rope_ratio")
        # the seed's configs carry it; chatglm.cpp's converter refuses a config without it
        d["original_rope"] = True
        d.update(extra)
        return d
