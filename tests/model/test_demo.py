"""The embedded default model: built once, same path as a real checkpoint, says it is a demo."""

from __future__ import annotations

import logging

import torch

from chatglm_serve.model.demo import demo_checkpoint_dir
from chatglm_serve.model.loader import load_model_and_tokenizer, weight_files


def test_demo_is_an_hf_directory_built_once(tmp_path):
    d = demo_checkpoint_dir(tmp_path)
    assert (d / "config.json").is_file() and (d / "tokenizer.model").is_file()
    assert len(weight_files(d)) == 2  # sharded, with an index, like the real download
    mtime = (d / "config.json").stat().st_mtime_ns
    assert demo_checkpoint_dir(tmp_path) == d
    assert (d / "config.json").stat().st_mtime_ns == mtime  # cached, not rebuilt


def test_demo_is_deterministic_and_tiny(tmp_path):
    a = demo_checkpoint_dir(tmp_path / "a")
    b = demo_checkpoint_dir(tmp_path / "b")
    assert a.name == b.name
    total = sum(f.stat().st_size for f in a.iterdir())
    assert total < 8 * 2**20
    for fa in sorted(a.glob("*.safetensors")):
        assert fa.read_bytes() == (b / fa.name).read_bytes()


def test_no_model_loads_demo_and_logs_it(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CHATGLM_SERVE_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        model, tok = load_model_and_tokenizer(None)
    assert "DEMO model" in caplog.text
    assert model.config.padded_vocab_size >= tok.vocab_size
    ids = tok.encode_chat("你好")
    assert ids[:2] == [tok.gmask_token_id, tok.sop_token_id]
    assert next(model.parameters()).dtype == torch.float32
