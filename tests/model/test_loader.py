"""Loading HF-format checkpoint directories, and refusing broken ones by name."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from chatglm_serve.model.config import ChatGLMConfig, ConfigError
from chatglm_serve.model.loader import CheckpointError, load_checkpoint, weight_files
from tests.paged import PagedRunner

LAYOUTS = ["bin-sharded", "safetensors-sharded", "bin-single", "safetensors-single"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loads_each_layout_exactly(tiny_checkpoints, tiny_model, layout):
    model = load_checkpoint(tiny_checkpoints[layout], dtype="float32")
    state = model.state_dict()
    for key, want in tiny_model.state_dict().items():
        assert state[key].dtype == torch.float32
        torch.testing.assert_close(state[key], want.to(torch.float16).float(), rtol=0, atol=0)
    assert not any(p.is_meta for p in model.parameters())


def test_dtype_defaults_to_config(tiny_checkpoints):
    model = load_checkpoint(tiny_checkpoints["bin-sharded"])  # config says float16
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    model = load_checkpoint(tiny_checkpoints["bin-sharded"], dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_auto_serves_fp16_in_bf16_on_a_cpu_with_our_kernels(
    tiny_checkpoints, monkeypatch, tmp_path
):
    from chatglm_serve.engine.config import EngineArgs
    from chatglm_serve.engine.load import load_model
    from chatglm_serve.kernels import cpu_decode
    from chatglm_serve.model import loader
    from chatglm_serve.model.demo import demo_checkpoint_dir

    path = tmp_path / "fp16"  # config says float16; the daemon's load needs a tokenizer too
    shutil.copytree(tiny_checkpoints["safetensors-single"], path)
    shutil.copy(demo_checkpoint_dir(tmp_path / "demo") / "tokenizer.model", path)
    monkeypatch.setattr(cpu_decode, "cpu_has_avx2", lambda: True)
    # the choice reads the CPU's features, never the kernels (a first start builds them later)
    monkeypatch.setattr(cpu_decode, "allowed_isas", lambda: pytest.fail("asked the kernels"))
    model = load_checkpoint(path, dtype="auto", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _tok = load_model(EngineArgs(model=str(path), device="cpu"))  # what the daemon does
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # what it says, and what it leaves alone: an explicit dtype, fp32 configs, other devices
    assert loader.serving_dtype(torch.float32, torch.device("cpu")) == torch.float32
    assert loader.serving_dtype(torch.float16, torch.device("meta")) == torch.float16
    assert loader.serving_dtype(torch.float16, None) == torch.float16
    model = load_checkpoint(path, dtype="float16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    # a CPU our kernels cannot run on keeps fp16 (bf16 would be no faster there)
    monkeypatch.setattr(cpu_decode, "cpu_has_avx2", lambda: False)
    model = load_checkpoint(path, dtype="auto", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_loaded_model_runs_like_the_source(tiny_checkpoints, tiny_model):
    model = load_checkpoint(tiny_checkpoints["safetensors-sharded"], dtype="float32")
    ids = list(range(5, 30))
    got = PagedRunner(model).step([(0, ids)])
    src = tiny_model.__class__.random(tiny_model.config, seed=0)
    src.load_state_dict({k: v.half().float() for k, v in tiny_model.state_dict().items()})
    torch.testing.assert_close(got, PagedRunner(src).step([(0, ids)]))


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite_bin(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_missing_tensor_is_named(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["bin-single"], tmp_path)
    key = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    _rewrite_bin(d / "pytorch_model.bin", lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.mlp\.dense_4h_to_h"):
        load_checkpoint(d)


def test_extra_tensor_is_named(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["bin-single"], tmp_path)
    _rewrite_bin(
        d / "pytorch_model.bin", lambda s: s.update({"transformer.bogus.weight": torch.ones(2)})
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer\.bogus\.weight'"):
        load_checkpoint(d)


def test_wrong_shape_is_named(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["bin-single"], tmp_path)
    key = "transformer.encoder.layers.0.self_attention.dense.weight"
    _rewrite_bin(d / "pytorch_model.bin", lambda s: s.update({key: torch.zeros(3, 3)}))
    with pytest.raises(
        CheckpointError, match=r"layers\.0\.self_attention\.dense\.weight.*shape \(3, 3\)"
    ):
        load_checkpoint(d)


def test_missing_shard_is_named(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["bin-sharded"], tmp_path)
    (d / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00003\.bin"):
        load_checkpoint(d)


def test_corrupt_shard_is_named(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["safetensors-sharded"], tmp_path)
    shard = d / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors"):
        load_checkpoint(d)


def test_truncated_bin_is_named(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["bin-sharded"], tmp_path)
    shard = d / "pytorch_model-00003-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"pytorch_model-00003-of-00003\.bin"):
        load_checkpoint(d)


def test_no_weights_and_no_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    with pytest.raises(CheckpointError, match="no weights"):
        weight_files(tmp_path)


@pytest.mark.parametrize(
    "field,value",
    [
        ("model_type", "llama"),
        ("rmsnorm", False),
        ("quantization_bit", 3),
        ("add_bias_linear", True),
    ],
)
def test_unservable_config_names_the_field(tiny_cfg, field, value):
    data = tiny_cfg.to_dict()
    data[field] = value
    with pytest.raises(ConfigError, match=field):
        ChatGLMConfig.from_dict(data)


def test_config_round_trips_hf_fields(tiny_cfg):
    data = tiny_cfg.to_dict()
    for name in (
        "num_layers",
        "padded_vocab_size",
        "multi_query_group_num",
        "kv_channels",
        "seq_length",
    ):
        assert name in data
    assert ChatGLMConfig.from_dict(data).to_dict() == data


# The config.json shipped with THUDM/chatglm2-6b (the int4 repo adds "quantization_bit": 4).
REAL_6B_CONFIG = {
    "_name_or_path": "THUDM/chatglm2-6b",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "original_rope": True,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 32768,
    "use_cache": True,
    "torch_dtype": "float16",
    "transformers_version": "4.27.1",
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def test_reads_the_real_chatglm2_6b_config():
    cfg = ChatGLMConfig.from_dict(REAL_6B_CONFIG)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim) == (28, 4096, 2, 128)
    assert cfg.qkv_out_features == 4608 and cfg.rotary_dim == 64
    assert cfg.quantization_bit == 0 and cfg.extra["original_rope"] is True
    int4 = ChatGLMConfig.from_dict({**REAL_6B_CONFIG, "quantization_bit": 4})
    assert int4.quantization_bit == 4


def test_on_the_fly_int4_uses_groups_of_128_where_shapes_allow(tmp_path):
    from chatglm_serve.model.chatglm import ChatGLMForCausalLM
    from chatglm_serve.model.checkpoint import save_checkpoint
    from chatglm_serve.model.quantize import quantized_modules
    from tests.conftest import tiny_config

    cfg = tiny_config(hidden_size=128, ffn_hidden_size=256, num_attention_heads=8)
    save_checkpoint(ChatGLMForCausalLM.random(cfg, seed=1), cfg, tmp_path / "c")
    grouped = load_checkpoint(tmp_path / "c", quantize=4)
    assert {m.group_size for m in quantized_modules(grouped)} == {128}
    row = load_checkpoint(tmp_path / "c", quantize=8)
    assert len(quantized_modules(row)) == 4 * cfg.num_layers + 1  # and the head (on a CPU)
    assert all(m.group_size == m.in_features for m in quantized_modules(row))


def test_int4_checkpoint_with_quantized_head_round_trips(tmp_path, tiny_model, tiny_cfg):
    from chatglm_serve.model.checkpoint import save_checkpoint
    from chatglm_serve.model.quantize import QuantSpec, quantize_model

    src = tiny_model.__class__.random(tiny_cfg, seed=7, std=0.1)
    quantize_model(src, QuantSpec(bits=4, group_size=32, quantize_output_layer=True))
    cfg4 = dataclasses.replace(tiny_cfg, quantization_bit=4)
    save_checkpoint(src, cfg4, tmp_path / "q", fmt="safetensors", shards=2)
    loaded = load_checkpoint(tmp_path / "q")
    assert hasattr(loaded.transformer.output_layer, "weight_scale")
    ids = list(range(3, 40))
    torch.testing.assert_close(
        PagedRunner(loaded).step([(0, ids)]), PagedRunner(src).step([(0, ids)])
    )
