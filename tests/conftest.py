"""Session-wide fixtures: tiny HF-format checkpoints written once per test session."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.checkpoint import save_checkpoint
from chatglm_serve.model.config import ChatGLMConfig


def tiny_config(**overrides) -> ChatGLMConfig:
    base = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=96,
        kv_channels=16,
        num_attention_heads=4,
        multi_query_attention=True,
        multi_query_group_num=2,
        padded_vocab_size=320,
        seq_length=512,
        torch_dtype="float32",
    )
    base.update(overrides)
    return ChatGLMConfig(**base)


@pytest.fixture(scope="session")
def tiny_cfg() -> ChatGLMConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg) -> ChatGLMForCausalLM:
    return ChatGLMForCausalLM.random(tiny_cfg, seed=7, std=0.1)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_model, tiny_cfg) -> dict[str, Path]:
    """The same weights in each layout the loader must read, stored as fp16 like the real files."""
    root = tmp_path_factory.mktemp("ckpt")
    state = {k: v.to(torch.float16) for k, v in tiny_model.state_dict().items()}
    layouts = {
        "bin-sharded": ("bin", 3),
        "safetensors-sharded": ("safetensors", 2),
        "bin-single": ("bin", 1),
        "safetensors-single": ("safetensors", 1),
    }
    cfg16 = dataclasses.replace(tiny_cfg, torch_dtype="float16")
    return {
        name: save_checkpoint(state, cfg16, root / name, fmt=fmt, shards=n)
        for name, (fmt, n) in layouts.items()
    }
