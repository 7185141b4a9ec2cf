"""Our weights on transformers' independent implementation of the same architecture.

transformers' `GlmForCausalLM` (model_type `glm`) is ChatGLM2's network written by other hands:
half-head interleaved rotary (partial_rotary_factor 0.5), 2 KV heads, attention bias. Mapping our
checkpoint onto it gives the reference logits the tests compare against, and the seed-style
baseline the benchmarks measure.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from chatglm_serve.model.config import ChatGLMConfig


def glm_config(cfg: ChatGLMConfig, dtype: torch.dtype = torch.float32):
    from transformers import GlmConfig

    return GlmConfig(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.layernorm_epsilon,
        max_position_embeddings=cfg.seq_length,
        attention_bias=cfg.add_qkv_bias,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": cfg.rope_base,
            "partial_rotary_factor": 0.5,
        },
        dtype=dtype,
    )


def to_glm_state_dict(state: Mapping[str, Tensor], cfg: ChatGLMConfig) -> dict[str, Tensor]:
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    out = {
        "model.embed_tokens.weight": state["transformer.embedding.word_embeddings.weight"],
        "model.norm.weight": state["transformer.encoder.final_layernorm.weight"],
        "lm_head.weight": state["transformer.output_layer.weight"],
    }
    for i in range(cfg.num_layers):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        qkv_w = state[src + "self_attention.query_key_value.weight"]
        for name, part in zip("qkv", qkv_w.split([q, kv, kv]), strict=True):
            out[f"{dst}self_attn.{name}_proj.weight"] = part
        if cfg.add_qkv_bias:
            qkv_b = state[src + "self_attention.query_key_value.bias"]
            for name, part in zip("qkv", qkv_b.split([q, kv, kv]), strict=True):
                out[f"{dst}self_attn.{name}_proj.bias"] = part
        out[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.dense.weight"]
        out[dst + "mlp.gate_up_proj.weight"] = state[src + "mlp.dense_h_to_4h.weight"]
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.dense_4h_to_h.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[
            src + "post_attention_layernorm.weight"
        ]
    return out


def glm_from_state(
    state: Mapping[str, Tensor], cfg: ChatGLMConfig, dtype: torch.dtype = torch.float32
):
    """A transformers GlmForCausalLM holding our weights."""
    from transformers import GlmForCausalLM

    with torch.device("meta"):
        ref = GlmForCausalLM(glm_config(cfg, dtype))
    ref.load_state_dict(to_glm_state_dict(state, cfg), strict=True, assign=True)
    # rotary inv_freq buffers were created on meta: rebuild them on the real device
    rotary = ref.model.rotary_emb
    inv_freq, scaling = rotary.compute_default_rope_parameters(rotary.config, device="cpu")
    rotary.inv_freq = inv_freq
    rotary.original_inv_freq = inv_freq
    rotary.attention_scaling = scaling
    return ref.to(dtype).eval()
