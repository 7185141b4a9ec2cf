"""Tensor parallel: the shard arithmetic (pure), and real gloo groups of 2 and 4 CPU processes
that must give the single-process logits and serve a chat request end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from chatglm_serve.engine.tp_worker import TPLoadSpec, start_tensor_parallel
from chatglm_serve.model.config import ChatGLMConfig, ConfigError
from chatglm_serve.model.loader import load_checkpoint
from chatglm_serve.model.tensor_parallel import (
    ShardLayout,
    TensorParallel,
    TPGroup,
    check_tensor_parallel,
)
from tests.conftest import tiny_config
from tests.paged import PagedRunner

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------- shard arithmetic


def _qkv_parts(cfg, t, rank, world):
    part = ShardLayout(cfg, rank, world).shard(
        "transformer.encoder.layers.0.self_attention.query_key_value.weight", t
    )
    lay = ShardLayout(cfg, rank, world)
    d = cfg.head_dim
    return part.split([lay.num_heads * d, lay.num_kv_heads * d, lay.num_kv_heads * d])


def test_tp2_splits_query_heads_and_kv_groups_without_duplication():
    cfg = tiny_config()  # 4 query heads in 2 KV groups, head_dim 16
    d = cfg.head_dim
    full = torch.arange(cfg.qkv_out_features, dtype=torch.float32)[:, None].expand(
        -1, cfg.hidden_size
    )
    q_full, k_full, v_full = full.split([4 * d, 2 * d, 2 * d])
    parts = [_qkv_parts(cfg, full, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), q_full)
    assert torch.equal(torch.cat([p[1] for p in parts]), k_full)  # one group each
    assert torch.equal(torch.cat([p[2] for p in parts]), v_full)


def test_tp4_replicates_each_kv_group_for_the_ranks_whose_heads_read_it():
    cfg = tiny_config()
    d = cfg.head_dim
    full = torch.randn(cfg.qkv_out_features, cfg.hidden_size)
    _, k_full, v_full = full.split([4 * d, 2 * d, 2 * d])
    for rank in range(4):
        q, k, v = _qkv_parts(cfg, full, rank, 4)
        group = rank // 2  # query head `rank` is in group rank // (4 heads / 2 groups)
        assert torch.equal(q, full[rank * d : (rank + 1) * d])
        assert torch.equal(k, k_full[group * d : (group + 1) * d])
        assert torch.equal(v, v_full[group * d : (group + 1) * d])


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16, 32])
def test_6b_layout_keeps_every_head_with_its_group(world):
    cfg = ChatGLMConfig()
    heads_per_group = cfg.num_attention_heads // cfg.num_kv_heads  # 16
    seen_heads = []
    for rank in range(world):
        lay = ShardLayout(cfg, rank, world)
        assert lay.num_kv_heads == max(1, 2 // world)
        local_per_group = lay.num_heads // lay.num_kv_heads
        for j in range(lay.num_heads):  # local head j reads local group j // local_per_group
            head = lay.first_head + j
            assert head // heads_per_group == lay.first_kv_head + j // local_per_group
            seen_heads.append(head)
    assert seen_heads == list(range(cfg.num_attention_heads))


def test_mlp_shard_keeps_gate_and_up_halves_paired():
    cfg = tiny_config()  # ffn 96
    f = cfg.ffn_hidden_size
    full = torch.arange(2 * f, dtype=torch.float32)[:, None].expand(-1, cfg.hidden_size)
    key = "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"
    for rank in range(2):
        gate, up = ShardLayout(cfg, rank, 2).shard(key, full).chunk(2)
        lo = rank * f // 2
        assert torch.equal(gate[:, 0], torch.arange(lo, lo + f // 2, dtype=torch.float32))
        assert torch.equal(up[:, 0], torch.arange(f + lo, f + lo + f // 2, dtype=torch.float32))


def test_row_parallel_parts_sum_to_the_full_product():
    cfg = tiny_config()
    w = torch.randn(cfg.hidden_size, cfg.ffn_hidden_size)
    x = torch.randn(3, cfg.ffn_hidden_size)
    key = "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"
    total = sum(
        x[:, r * 48 : (r + 1) * 48] @ ShardLayout(cfg, r, 2).shard(key, w).T for r in range(2)
    )
    torch.testing.assert_close(total, x @ w.T)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        ({}, 3, "num_attention_heads 4"),
        ({"num_attention_heads": 8, "ffn_hidden_size": 100}, 8, "ffn_hidden_size 100"),
        ({"padded_vocab_size": 322}, 4, "padded_vocab_size 322"),
        ({"num_attention_heads": 12, "multi_query_group_num": 3}, 2, "KV groups 3"),
    ],
)
def test_impossible_tp_sizes_are_refused(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        check_tensor_parallel(tiny_config(**overrides), world)


def test_apply_shards_a_loaded_model_and_its_kv_cache_shape(tiny_model, tiny_cfg):
    import copy

    model = TensorParallel(tiny_cfg, TPGroup(1, 2)).apply(copy.deepcopy(tiny_model))
    attn = model.layers[0].self_attention
    assert attn.query_key_value.weight.shape == ((2 + 2 * 1) * 16, 64)
    assert attn.dense.weight.shape == (64, 2 * 16)
    assert model.layers[0].mlp.dense_h_to_4h.weight.shape == (96, 64)
    assert model.transformer.output_layer.weight.shape == (160, 64)
    assert model.kv_cache_shape(8, 16) == (2, 8, 16, 1, 16)  # only this rank's KV group
    assert model.kv_bytes_per_token(torch.float32) * 2 == tiny_model.kv_bytes_per_token(
        torch.float32
    )
    want = tiny_model.transformer.output_layer.weight[160:]
    assert torch.equal(model.transformer.output_layer.weight, want)


def test_quantized_tensor_parallel_is_refused(tiny_cfg):
    from chatglm_serve.model.chatglm import ChatGLMForCausalLM

    with torch.device("meta"):
        model = ChatGLMForCausalLM(tiny_cfg)
    model.layers[0].mlp.dense_h_to_4h.load_weight = lambda *a: None  # what quantized modules have
    with pytest.raises(ConfigError, match="quantization"):
        TensorParallel(tiny_cfg, TPGroup(0, 2)).prepare(model)


# ------------------------------------------------------------------- real process groups


def _steps(model) -> torch.Tensor:
    """Prefills, a chunked prefill after a cached prefix, and batched decodes."""
    r = PagedRunner(model)
    outs = [r.step([(0, list(range(5, 30))), (1, list(range(40, 47)))])]
    outs.append(r.step([(2, list(range(3, 9))), (0, [7]), (1, [9])]))
    outs.append(r.step([(2, list(range(9, 20))), (0, [8]), (1, [10])]))
    for i in range(3):
        outs.append(r.step([(0, [11 + i]), (1, [12 + i]), (2, [13 + i])]))
    return torch.cat(outs)


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_tensor_parallel_matches_single_process_logits(tiny_checkpoints, world):
    path = tiny_checkpoints["safetensors-sharded"]
    want = _steps(load_checkpoint(path, dtype="float32"))
    model, _ = start_tensor_parallel(
        TPLoadSpec(str(path), "float32", num_threads=1, tokenizer=False), world, timeout_s=120
    )
    try:
        assert model.kv_cache_shape(4, 16)[3] == 1  # rank 0 holds one KV group
        assert model.layers[0].self_attention.num_heads == 4 // world
        got = _steps(model)
    finally:
        model.close()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(not p.is_alive() and p.exitcode == 0 for p in model._processes)
    assert not torch.distributed.is_initialized()


def test_bad_requests_are_refused_before_any_process_starts(tiny_checkpoints):
    from chatglm_serve.model.placement import PlacementError

    path = str(tiny_checkpoints["bin-single"])
    with pytest.raises(ConfigError, match="tensor_parallel_size 3 does not divide"):
        start_tensor_parallel(TPLoadSpec(path, tokenizer=False), 3)
    with pytest.raises(PlacementError, match="cuda:7"):
        start_tensor_parallel(TPLoadSpec(path, tokenizer=False), 2, ["cpu", "cuda:7"])
    assert not torch.distributed.is_initialized()


def test_broken_checkpoint_fails_cleanly_without_hanging(tmp_path, tiny_checkpoints):
    import shutil

    from chatglm_serve.model.loader import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["bin-single"], bad)
    state = torch.load(bad / "pytorch_model.bin", weights_only=True)
    del state["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="dense_4h_to_h"):
        start_tensor_parallel(TPLoadSpec(str(bad), "float32", num_threads=1, tokenizer=False), 2)
    assert not torch.distributed.is_initialized()


def test_tensor_parallel_daemon_serves_a_chat_request_end_to_end():
    """--tensor-parallel-size 2 through the daemon's own loader, the engine and HTTP."""
    from chatglm_serve.engine.async_engine import AsyncEngine
    from chatglm_serve.engine.config import EngineArgs, EngineConfig
    from chatglm_serve.server.app import create_app, load_engine
    from chatglm_serve.server.settings import load_settings

    common = {"dtype": "float32", "kv_cache_tokens": 2048, "max_model_len": 256}
    body = {
        "model": "chatglm2-6b",
        "messages": [{"role": "user", "content": "你好，介绍一下你自己"}],
        "temperature": 0,
        "max_tokens": 12,
    }

    async def chat(engine) -> dict:
        app = create_app(load_settings(common, environ={}), engine=engine)
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            return resp.json()

    async def serve(engine):
        try:
            return await chat(engine)
        finally:
            await engine.shutdown(timeout=2)

    tp_engine = load_engine(load_settings({**common, "tensor_parallel_size": 2}, environ={}))
    leader = tp_engine.engine.model
    assert leader.world_size == 2
    got = asyncio.run(serve(tp_engine))
    # shutting the engine down stopped the worker process and left the group
    assert all(not p.is_alive() and p.exitcode == 0 for p in leader._processes)
    assert not torch.distributed.is_initialized()

    single = AsyncEngine.from_args(
        EngineArgs(
            None,
            dtype="float32",
            device="cpu",
            engine=EngineConfig(kv_cache_tokens=2048, max_model_len=256),
        )
    )
    want = asyncio.run(serve(single))
    assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"] > 0
    assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]


def test_torchrun_launch_matches_single_process(tiny_checkpoints):
    path = tiny_checkpoints["bin-sharded"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "tests/engine/tp_torchrun_main.py"), str(path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[[")]
    assert len(rows) == 1, proc.stdout
    got = torch.tensor(rows[0])

    r = PagedRunner(load_checkpoint(path, dtype="float32"))
    want = [r.step([(0, list(range(5, 30)))])[-1]]
    for i in range(3):
        want.append(r.step([(0, [40 + i])])[-1])
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)


def test_torchrun_m_chatglm_serve_serves_http_from_rank_0(tmp_path):
    """`torchrun -m chatglm_serve --tensor-parallel-size 2`, as the README says, from a folder
    that is not the checkout (the installed package, not the source tree, is what runs)."""
    import signal

    from tests.daemon import free_port, wait_healthy

    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("CHATGLM_")
    }
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "chatglm_serve", "--tensor-parallel-size", "2", "--dtype", "float32",
        "--port", str(port), "--max-model-len", "256",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 180, what="the torchrun daemon")
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL tensor parallel needs 2 CUDA devices",
)
def test_nccl_tensor_parallel_matches_single_gpu(tiny_checkpoints):
    path = tiny_checkpoints["safetensors-sharded"]
    want = _steps(load_checkpoint(path, dtype="float32", device="cuda:0"))
    model, _ = start_tensor_parallel(
        TPLoadSpec(str(path), "float32", tokenizer=False), 2, ["cuda:0", "cuda:1"]
    )
    try:
        got = _steps(model)
    finally:
        model.close()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
