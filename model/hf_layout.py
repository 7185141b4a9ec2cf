"""The `glm-4-9b-chat-hf` checkpoint layout: transformers' `GlmForCausalLM` names for our network.

THUDM publishes GLM-4-9B-chat twice: with its own `ChatGLMForConditionalGeneration` keys (fused
`query_key_value`, `transformer.encoder.layers.N`) and as `-hf`, in transformers' Glm names
(`model.layers.N.self_attn.q_proj` / `k_proj` / `v_proj`, `mlp.gate_up_proj`, `lm_head`) with a
`model_type: glm` config. Both hold the same tensors, so we read the `-hf` one into our fields and
keys here (fusing q/k/v back into one matrix) and keep a single model class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from torch import Tensor

from chatglm_serve.model.config import ChatGLMConfig, ConfigError

_BASE_THETA = 10000.0  # ChatGLM's rotary base before rope_ratio

_TOP = {
    "model.embed_tokens.weight": "transformer.embedding.word_embeddings.weight",
    "model.norm.weight": "transformer.encoder.final_layernorm.weight",
    "lm_head.weight": "transformer.output_layer.weight",
}
_LAYER = {
    "self_attn.o_proj.weight": "self_attention.dense.weight",
    "mlp.gate_up_proj.weight": "mlp.dense_h_to_4h.weight",
    "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def chatglm_fields(hf: dict) -> dict:
    """A `model_type: glm` config.json -> the ChatGLMConfig fields it means."""

    def need(name: str):
        if name not in hf:
            raise ConfigError(f"config field {name!r}: missing (model_type 'glm')")
        return hf[name]

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    kv_heads = hf.get("num_key_value_heads", heads)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", _BASE_THETA))
    partial = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
    if partial != 0.5:
        raise ConfigError(f"config field 'partial_rotary_factor': {partial}; ChatGLM rotates 0.5")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"config field 'rope_scaling': {rope!r} is not served")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config field 'hidden_act': {hf['hidden_act']!r}; expected 'silu'")
    known = {
        "num_attention_heads",
        "hidden_size",
        "num_key_value_heads",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
        "partial_rotary_factor",
        "hidden_act",
        "num_hidden_layers",
        "intermediate_size",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "attention_bias",
        "torch_dtype",
        "dtype",
        "model_type",
    }
    out = {k: v for k, v in hf.items() if k not in known}
    out.update(
        model_type="chatglm",
        checkpoint_layout="hf",
        num_layers=need("num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=need("intermediate_size"),
        kv_channels=hf.get("head_dim") or hidden // heads,
        num_attention_heads=heads,
        multi_query_attention=kv_heads != heads,
        multi_query_group_num=kv_heads,
        padded_vocab_size=need("vocab_size"),
        seq_length=hf.get("max_position_embeddings", 131072),
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-5),
        add_qkv_bias=hf.get("attention_bias", True),
        torch_dtype=hf.get("torch_dtype") or hf.get("dtype") or "bfloat16",
        rope_ratio=float(theta) / _BASE_THETA,
        original_architectures=hf.get("architectures"),
    )
    out.pop("architectures", None)
    return out


def hf_config_dict(cfg: ChatGLMConfig) -> dict:
    """The `-hf` config.json of a config (what the published glm-4-9b-chat-hf carries)."""
    extra = {k: v for k, v in cfg.extra.items() if k != "original_architectures"}
    return {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "attention_bias": cfg.add_qkv_bias,
        "attention_dropout": 0.0,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.ffn_hidden_size,
        "max_position_embeddings": cfg.seq_length,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": cfg.layernorm_epsilon,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": False,
        "torch_dtype": cfg.torch_dtype,
        "vocab_size": cfg.padded_vocab_size,
        "eos_token_id": cfg.eos_token_ids if len(cfg.eos_token_ids) > 1 else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        **{k: v for k, v in extra.items() if k != "eos_token_id"},
    }


QKVParts = dict[tuple[int, str], dict[str, Tensor]]


def from_hf_keys(
    items: Iterable[tuple[str, Tensor]], pending: QKVParts
) -> Iterator[tuple[str, Tensor]]:
    """(hf key, tensor) -> (our key, tensor). A layer's q/k/v leave as one fused tensor once all
    three are read; parts still waiting stay in `pending` (shared across shards: the caller
    checks it is empty at the end). Unknown keys pass through, so the loader names them."""
    import torch

    for key, tensor in items:
        if key in _TOP:
            yield _TOP[key], tensor
            continue
        m = _LAYER_KEY.fullmatch(key)
        if m is None:
            yield key, tensor
            continue
        layer, rest = int(m.group(1)), m.group(2)
        prefix = f"transformer.encoder.layers.{layer}."
        if rest in _LAYER:
            yield prefix + _LAYER[rest], tensor
            continue
        q = _QKV.fullmatch(rest)
        if q is None:
            yield key, tensor
            continue
        part, kind = q.groups()
        got = pending.setdefault((layer, kind), {})
        got[part] = tensor
        if len(got) == 3:
            del pending[(layer, kind)]
            fused = torch.cat([got["q"], got["k"], got["v"]], dim=0)
            yield f"{prefix}self_attention.query_key_value.{kind}", fused


def missing_parts(pending: QKVParts) -> list[str]:
    """The hf keys whose q/k/v siblings were read but which never came."""
    return [
        f"model.layers.{layer}.self_attn.{p}_proj.{kind}"
        for (layer, kind), got in sorted(pending.items())
        for p in "qkv"
        if p not in got
    ]
