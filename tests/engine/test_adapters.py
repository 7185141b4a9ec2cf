"""LoRA adapters and P-Tuning v2 prefixes served beside the base model, batched together."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from chatglm_serve.engine.types import EngineError, SamplingParams
from chatglm_serve.model.chatglm import ChatGLMForCausalLM, apply_rotary_
from chatglm_serve.model.lora import AdapterError, merge_lora, read_lora
from chatglm_serve.model.quantize import QuantLinear, QuantSpec, quantize_model, quantized_modules
from tests.adapters_util import write_peft_lora, write_ptuning
from tests.engine.harness import make_engine, run
from tests.paged import PagedRunner

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(model) -> ChatGLMForCausalLM:
    """The engine tests' tiny model, built afresh: the shared one may have been repacked for
    CPU decode by an engine, and the merged references need its plain weights."""
    return ChatGLMForCausalLM.random(model.config, seed=1234, std=0.5)


@pytest.fixture()
def base(model) -> ChatGLMForCausalLM:
    """A private copy of the engine tests' tiny model (adapters hook its linears)."""
    return copy.deepcopy(model)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("lora")
    cfg = model.config
    return {
        "qkv-only": write_peft_lora(root / "a", cfg, r=4, targets=["query_key_value"], seed=1),
        "all": write_peft_lora(root / "b", cfg, r=8, alpha=16, seed=2),
        "rs-bin": write_peft_lora(
            root / "c", cfg, r=2, alpha=4, rslora=True, seed=3, fmt="bin",
            targets=["dense", "dense_4h_to_h"],
        ),
    }  # fmt: skip


def merged(model: ChatGLMForCausalLM, path) -> ChatGLMForCausalLM:
    """The base with the adapter merged into its weights (W + scale * B @ A)."""
    m = copy.deepcopy(model)
    merge_lora(m, read_lora("ref", path, m.config, max_rank=64))
    return m


def serve(model, tokenizer, reqs: list[tuple[str | None, list[int]]], steps: int, stagger=0, **kw):
    """Greedy token ids of each (adapter, prompt), submitted to one engine (request i at step
    i * stagger)."""
    return serve_on(make_engine(model, tokenizer, **kw), reqs, steps, stagger)


def serve_on(engine, reqs: list[tuple[str | None, list[int]]], steps: int, stagger=0):
    real_add = engine.add_request
    engine.add_request = lambda rid, ids, params: real_add(
        rid, ids, params, adapter=reqs[int(rid[1:])][0]
    )
    params = SamplingParams(max_tokens=steps, **GREEDY)
    res = run(engine, [(f"r{i}", p, params) for i, (_, p) in enumerate(reqs)], stagger=stagger)
    bm = engine.block_manager
    bm.check_consistency()
    assert bm.num_free_blocks + len(bm.pinned) == bm.num_blocks, "KV blocks leaked"
    return [res[(f"r{i}", 0)].token_ids for i in range(len(reqs))]


def served(model, tokenizer, prompt: list[int], steps: int) -> list[int]:
    """The greedy reply of a model served alone (the engine samples only the tokenizer's ids,
    not the padded rows of the output layer, so a plain argmax is no reference)."""
    return serve(copy.deepcopy(model), tokenizer, [(None, prompt)], steps)[0]


def prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode_chat(f"question {i}: how are things {i * 7}?") for i in range(n)]


def test_lora_scaling_follows_peft(loras, model):
    assert read_lora("x", loras["all"], model.config, 16).scaling == 16 / 8
    assert read_lora("x", loras["rs-bin"], model.config, 16).scaling == 4 / math.sqrt(2)


def test_adapters_batched_with_base_equal_merged_checkpoints(base, model, tokenizer, loras):
    """Three adapters and the base in one batch; each row equals the same batch served by a
    checkpoint with that row's adapter merged into its weights."""
    names = [None, "qkv-only", "all", None, "rs-bin", "all", "qkv-only", None]
    ps = prompts(tokenizer, len(names))
    got = serve(base, tokenizer, list(zip(names, ps, strict=True)), 8, adapters=loras_arg(loras))
    want = {None: serve(copy.deepcopy(model), tokenizer, [(None, p) for p in ps], 8)}
    for n in loras:
        want[n] = serve(merged(model, loras[n]), tokenizer, [(None, p) for p in ps], 8)
    for i, name in enumerate(names):
        assert got[i] == want[name][i], (i, name)
        if name is not None:  # the adapter changes the output: the comparison proves something
            assert got[i] != want[None][i]


def loras_arg(loras) -> dict[str, str]:
    return {k: str(v) for k, v in loras.items()}


def test_decode_steps_mix_adapters(base, model, tokenizer, loras):
    """Staggered arrivals: prefill chunks and decode steps hold rows of several adapters and
    the base at once."""
    names = ["all", None, "rs-bin", "all", None, "qkv-only"]
    reqs = list(zip(names, prompts(tokenizer, len(names)), strict=True))
    got = serve(base, tokenizer, reqs, 8, stagger=2, adapters=loras_arg(loras))
    for n in {*names}:
        ref = copy.deepcopy(model) if n is None else merged(model, loras[n])
        want = serve(ref, tokenizer, [(None, p) for _, p in reqs], 8, stagger=2)
        assert [g for g, m in zip(got, names, strict=True) if m == n] == [
            w for w, m in zip(want, names, strict=True) if m == n
        ], n


def test_prefix_cache_never_shared_between_adapters(base, model, tokenizer, loras):
    engine = make_engine(base, tokenizer, adapters={"all": str(loras["all"])})
    p = tokenizer.encode_chat("the same long prompt for everyone, " * 4)
    params = SamplingParams(max_tokens=4, **GREEDY)
    first = run(engine, [("base1", p, params)])
    engine.add_request("lora1", p, params, adapter="all")
    lora = run(engine, [])
    second = run(engine, [("base2", p, params)])
    # the base's second request hits the cache; the adapter's found none of the base's blocks
    assert second[("base2", 0)].outputs[-1].metrics.num_cached_tokens > 0
    assert lora[("lora1", 0)].outputs[-1].metrics.num_cached_tokens == 0
    assert lora[("lora1", 0)].token_ids == served(merged(model, loras["all"]), tokenizer, p, 4)
    assert first[("base1", 0)].token_ids == second[("base2", 0)].token_ids


def _bad(tmp_path, cfg, kind: str):
    d = write_peft_lora(tmp_path / kind, cfg, r=4, seed=5)
    if kind == "shape":  # an adapter made for a wider base
        other = dict(cfg.to_dict(), hidden_size=cfg.hidden_size * 2)
        write_peft_lora(d, type(cfg).from_dict(other), r=4)
    elif kind == "target":
        conf = json.loads((d / "adapter_config.json").read_text())
        conf["target_modules"] = ["q_proj", "v_proj"]
        (d / "adapter_config.json").write_text(json.dumps(conf))
    elif kind == "missing":
        (d / "adapter_model.safetensors").unlink()
    elif kind == "rank":
        write_peft_lora(d, cfg, r=32)
    return d


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("shape", "shape"),
        ("target", "unknown target"),
        ("missing", "missing weights"),
        ("rank", "max-lora-rank"),
    ],
)
def test_bad_adapter_refused_at_start_with_its_name(base, tokenizer, tmp_path, kind, words):
    d = _bad(tmp_path, base.config, kind)
    with pytest.raises(AdapterError) as e:
        make_engine(base, tokenizer, adapters={f"bad-{kind}": str(d)})
    assert f"bad-{kind}" in str(e.value) and words in str(e.value)


def test_runtime_load_and_unload(base, model, tokenizer, loras, tmp_path):
    engine = make_engine(base, tokenizer, max_loras=1)
    with pytest.raises(EngineError) as e:
        engine.load_adapter("broken", str(_bad(tmp_path, base.config, "target")))
    assert e.value.param == "lora_path"
    engine.load_adapter("x", str(loras["qkv-only"]))
    assert [a.name for a in engine.adapter_infos()] == ["x"]
    with pytest.raises(EngineError, match="slots"):  # max_loras=1
        engine.load_adapter("y", str(loras["all"]))
    p = prompts(tokenizer, 1)[0]
    engine.add_request("r", p, SamplingParams(max_tokens=4, **GREEDY), adapter="x")
    with pytest.raises(EngineError, match="in use"):
        engine.unload_adapter("x")
    res = run(engine, [])
    assert res[("r", 0)].token_ids == served(merged(model, loras["qkv-only"]), tokenizer, p, 4)
    engine.unload_adapter("x")
    engine.load_adapter("y", str(loras["all"]))  # its slot is free again
    engine.add_request("s", p, SamplingParams(max_tokens=4, **GREEDY), adapter="y")
    res = run(engine, [])
    assert res[("s", 0)].token_ids == served(merged(model, loras["all"]), tokenizer, p, 4)


def _dequantized(q: ChatGLMForCausalLM) -> ChatGLMForCausalLM:
    deq = copy.deepcopy(q)
    for name, mod in list(deq.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.dequantized_weight()
            if mod.bias is not None:
                lin.bias.data = mod.bias.float()
            parent, _, attr = name.rpartition(".")
            setattr(deq.get_submodule(parent), attr, lin)
    return deq


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_over_quantized_base(model, tokenizer, loras, bits):
    """The low-rank term is added in the activation dtype over an int8/int4 base: what the
    adapter changes in the logits is what it changes over the dequantized base with the adapter
    merged, up to the quantized kernels' rounding; base rows in the same batch are untouched."""
    q = quantize_model(copy.deepcopy(model), QuantSpec(bits=bits))
    deq = _dequantized(q)
    ps = prompts(tokenizer, 3)
    # served: adapter and base rows batched over the quantized base (its CPU kernels)
    names = ["all", None, "all"]
    got = serve(
        copy.deepcopy(q), tokenizer, list(zip(names, ps, strict=True)), 4, adapters=loras_arg(loras)
    )
    base_only = serve(copy.deepcopy(q), tokenizer, [(None, p) for p in ps], 4)
    assert got[1] == base_only[1] and got[0] != base_only[0]
    engine = make_engine(q, tokenizer, adapters={"all": str(loras["all"])})
    lora = engine.adapters.lora
    lora_slot = engine.adapters.resolve("all").lora_slot

    def logits(m, prompt, slot=-1):
        with lora.step([slot] * len(prompt)):
            return PagedRunner(m).step([(0, prompt)])[-1]

    # the quantized linears on their dequantize-and-matmul path: the base rounds as `deq` does
    for mod in quantized_modules(q):
        mod.use_torch_fallback()
    ref = merged(deq, loras["all"])
    for p in ps:
        got, want = logits(q, p, lora_slot), logits(ref, p)
        assert (got - logits(q, p)).abs().max() > 1.0  # the adapter matters
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


# ---- P-Tuning v2 ----


def _seed_prefix(path, cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The seed's get_prompt(): encoder output viewed [P, 2L, Hkv, D], permuted, split in
    pairs: layer i's past key is entry 2i, its value 2i + 1."""
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    conf = json.loads((path / "config.json").read_text())
    p = {k.removeprefix("transformer.prefix_encoder."): v.float() for k, v in state.items()}
    out = p["embedding.weight"]
    if conf["prefix_projection"]:
        hid = torch.tanh(F.linear(out, p["trans.0.weight"], p["trans.0.bias"]))
        out = F.linear(hid, p["trans.2.weight"], p["trans.2.bias"])
    pkv = out.view(1, conf["pre_seq_len"], cfg.num_layers * 2, cfg.num_kv_heads, cfg.head_dim)
    pairs = pkv.permute([2, 1, 0, 3, 4]).split(2)
    return [(kv[0, :, 0], kv[1, :, 0]) for kv in pairs]  # [P, Hkv, D] each


@torch.inference_mode()
def dense_prefix_greedy(model, prefix, prompt: list[int], steps: int, vocab: int) -> list[int]:
    """Greedy decoding by a dense reference: every layer attends over cat(prefix K/V, the
    sequence's K/V), the mask all ones over the prefix and causal after it, positions 0.. for the
    real tokens (the seed's get_masks / get_position_ids with pre_seq_len)."""
    t = model.transformer
    ids, out = list(prompt), []
    for _ in range(steps):
        n = len(ids)
        x = t.embedding(torch.tensor(ids))
        rot = t.rotary_pos_emb.rotation(torch.arange(n))
        for layer, (pk, pv) in zip(t.encoder.layers, prefix, strict=True):
            a = layer.self_attention
            hq, hkv, d = a.num_heads, a.num_kv_heads, a.head_dim
            qkv = a.query_key_value(layer.input_layernorm(x))
            apply_rotary_(qkv[:, : (hq + hkv) * d].view(n, hq + hkv, d), rot)
            q = qkv[:, : hq * d].view(n, hq, d)
            k = torch.cat([pk, qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d)])
            v = torch.cat([pv, qkv[:, (hq + hkv) * d :].view(n, hkv, d)])
            k, v = (z.repeat_interleave(hq // hkv, dim=1) for z in (k, v))
            P = pk.shape[0]
            allowed = torch.ones(n, P + n, dtype=torch.bool)
            allowed[:, P:] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            scores = torch.einsum("qhd,khd->hqk", q, k) * a.scale
            probs = scores.masked_fill(~allowed, -torch.inf).softmax(-1)
            o = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, hq * d)
            x = a.dense(o) + x
            x = layer.mlp(layer.post_attention_layernorm(x)) + x
        logits = model.compute_logits(t.encoder.final_layernorm(x)[-1:])
        ids.append(int(logits[:, :vocab].argmax(-1)))
        out.append(ids[-1])
    return out


@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_equals_dense_prefix_attention(base, model, tokenizer, tmp_path, projection):
    cfg = model.config
    pt = write_ptuning(tmp_path / "pt", cfg, pre_seq_len=8, projection=projection, seed=11)
    lora = write_peft_lora(tmp_path / "lora", cfg, r=4, seed=12)
    engine = make_engine(base, tokenizer, block_size=4, adapters={"pt": str(pt), "lo": str(lora)})
    ps = prompts(tokenizer, 5)
    names = ["pt", None, "pt", "lo", "pt"]
    for i, (name, p) in enumerate(zip(names, ps, strict=True)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=6, **GREEDY), adapter=name)
    res = run(engine, [])
    prefix = _seed_prefix(pt, cfg)
    for i, (name, p) in enumerate(zip(names, ps, strict=True)):
        if name == "pt":
            want = dense_prefix_greedy(model, prefix, p, 6, tokenizer.vocab_size)
            assert want != served(model, tokenizer, p, 6)  # the prefix matters
        elif name == "lo":
            want = served(merged(model, lora), tokenizer, p, 6)
        else:
            want = served(model, tokenizer, p, 6)
        assert res[(f"r{i}", 0)].token_ids == want, (i, name)
    bm = engine.block_manager
    assert len(bm.pinned) == 2  # 8 virtual tokens in 2 shared blocks of 4, computed once
    assert bm.num_free_blocks == bm.num_blocks - 2
    bm.check_consistency()


def test_ptuning_default_checkpoint_and_prefix_cache(base, model, tokenizer, tmp_path):
    pt = write_ptuning(tmp_path / "pt", model.config, pre_seq_len=16, projection=True, seed=3)
    engine = make_engine(base, tokenizer, block_size=8, ptuning_checkpoint=str(pt))
    p = tokenizer.encode_chat("the same long prompt for everyone, " * 3)
    params = SamplingParams(max_tokens=5, **GREEDY)
    want = dense_prefix_greedy(model, _seed_prefix(pt, model.config), p, 5, tokenizer.vocab_size)
    first = run(engine, [("a", p, params)])
    second = run(engine, [("b", p, params)])  # served from the prefix cache this time
    assert second[("b", 0)].outputs[-1].metrics.num_cached_tokens > 0
    assert first[("a", 0)].token_ids == want == second[("b", 0)].token_ids


def test_ptuning_refuses_mismatched_checkpoint(base, tokenizer, tmp_path):
    other = type(base.config).from_dict(dict(base.config.to_dict(), num_layers=3))
    pt = write_ptuning(tmp_path / "pt", other, pre_seq_len=8)
    with pytest.raises(AdapterError, match="'wrong'.*another base"):
        make_engine(base, tokenizer, block_size=4, adapters={"wrong": str(pt)})
    pt = write_ptuning(tmp_path / "pt2", base.config, pre_seq_len=6)
    with pytest.raises(AdapterError, match="multiple of the KV block size"):
        make_engine(base, tokenizer, block_size=4, adapters={"six": str(pt)})


def test_python_api_selects_adapters(tmp_path):
    from chatglm_serve.engine.config import EngineConfig
    from chatglm_serve.engine.llm import ChatGLM

    probe = ChatGLM.load(None, dtype="float32", device="cpu", config=EngineConfig(num_blocks=64))
    d = write_peft_lora(tmp_path / "l", probe.model.config, r=4, seed=9, std=0.5)
    probe.close()
    llm = ChatGLM.load(
        None,
        dtype="float32",
        device="cpu",
        config=EngineConfig(num_blocks=64, adapters={"tuned": str(d)}),
    )
    greedy = dict(do_sample=False, max_length=64, ignore_eos=True)
    base, _ = llm.chat("你好", **greedy)
    tuned, _ = llm.chat("你好", adapter="tuned", **greedy)
    again = llm.generate("你好", SamplingParams(max_tokens=8, **GREEDY), adapter="tuned")
    plain = llm.generate("你好", SamplingParams(max_tokens=8, **GREEDY))
    assert base != tuned and again[0].outputs[0].token_ids != plain[0].outputs[0].token_ids
    with pytest.raises(EngineError, match="not loaded"):
        llm.chat("你好", adapter="nope", **greedy)


def test_preemption_under_kv_pressure_keeps_adapters_exact(base, model, tokenizer, tmp_path):
    """Too few KV blocks: sequences of a P-Tuning prefix, a LoRA and the base are preempted and
    recomputed; the pinned prefix blocks stay, every reply equals the unpressured one."""
    cfg = model.config
    pt = write_ptuning(tmp_path / "pt", cfg, pre_seq_len=8, seed=4)
    lo = write_peft_lora(tmp_path / "lo", cfg, r=4, seed=5)
    adapters = {"pt": str(pt), "lo": str(lo)}
    names = ["pt", "lo", None, "pt", "lo", None]
    reqs = list(zip(names, prompts(tokenizer, len(names)), strict=True))
    kw = dict(block_size=4, adapters=adapters, max_num_batched_tokens=64)
    roomy = serve(copy.deepcopy(model), tokenizer, reqs, 24, num_blocks=256, **kw)
    engine = make_engine(base, tokenizer, num_blocks=44, **kw)
    tight = serve_on(engine, reqs, 24)
    assert engine.scheduler.num_preemptions > 0
    assert tight == roomy
