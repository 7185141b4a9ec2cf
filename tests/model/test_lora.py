"""The batched low-rank path itself: per-row adapters, padded ranks, key spellings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.lora import AdapterError, LoRASlots, read_lora
from tests.adapters_util import write_peft_lora


@pytest.fixture()
def model(tiny_cfg) -> ChatGLMForCausalLM:
    return ChatGLMForCausalLM.random(tiny_cfg, seed=3, std=0.1)


def test_rows_get_their_own_adapter(model, tmp_path):
    cfg = model.config
    loras = [
        read_lora("a", write_peft_lora(tmp_path / "a", cfg, r=2, seed=1), cfg, 8),
        read_lora("b", write_peft_lora(tmp_path / "b", cfg, r=8, rslora=True, seed=2), cfg, 8),
    ]
    slots = LoRASlots(model, max_loras=3, max_rank=8, dtype=torch.float32)
    ids = [slots.load(x) for x in loras]
    lin = model.layers[1].mlp.dense_h_to_4h
    x = torch.randn(5, cfg.hidden_size)
    rows = [ids[0], -1, ids[1], ids[0], -1]
    with torch.no_grad():
        plain = lin(x)
        model.use_decode_stack = True
        with slots.step(rows):
            assert model.use_decode_stack is False  # the C++ decode step skips hooks
            got = lin(x)
        assert model.use_decode_stack is True
        want = plain.clone()
        for i, s in enumerate(rows):
            if s >= 0:
                a, b = loras[s].weights[(1, "dense_h_to_4h")]
                want[i] += loras[s].scaling * (b @ (a @ x[i]))
        assert lin(x).equal(plain)  # outside a step: the base alone
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain)


def test_slots_are_bounded_and_reusable(model, tmp_path):
    cfg = model.config
    d = write_peft_lora(tmp_path / "a", cfg, r=4)
    slots = LoRASlots(model, max_loras=1, max_rank=4, dtype=torch.float32)
    slots.load(read_lora("a", d, cfg, 4))
    with pytest.raises(AdapterError, match="max-loras"):
        slots.load(read_lora("b", d, cfg, 4))
    slots.unload("a")
    assert slots.load(read_lora("b", d, cfg, 4)) == 0


def test_key_spellings_of_other_trainers(model, tmp_path):
    """Keys without the PEFT `base_model.model.` prefix, or with the adapter name `default`
    left in (older peft), name the same weights."""
    cfg = model.config
    d = write_peft_lora(tmp_path / "a", cfg, r=4, targets=["dense"])
    want = read_lora("a", d, cfg, 8).weights
    state = load_file(str(d / "adapter_model.safetensors"))
    for i, k in enumerate(list(state)):
        new = k.removeprefix("base_model.model.")
        if i % 2:
            new = new.replace(".lora_A.", ".lora_A.default.").replace(
                ".lora_B.", ".lora_B.default."
            )
        state[new] = state.pop(k)
    save_file(state, str(d / "adapter_model.safetensors"))
    got = read_lora("a", d, cfg, 8).weights
    assert got.keys() == want.keys()
    assert all(got[k][0].equal(want[k][0]) and got[k][1].equal(want[k][1]) for k in got)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["output_layer"]}, "modules_to_save"),
        ({"r": "x"}, "integer r"),
    ],
)
def test_unsupported_configs_are_named(model, tmp_path, change, words):
    d = write_peft_lora(tmp_path / "a", model.config, r=4)
    conf = json.loads((d / "adapter_config.json").read_text()) | change
    (d / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(AdapterError, match=words) as e:
        read_lora("mine", d, model.config, 8)
    assert "'mine'" in str(e.value)
