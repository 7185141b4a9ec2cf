"""Our ChatGLM2 against transformers' independent GlmForCausalLM, and the paged cache against itself."""

from __future__ import annotations

import pytest
import torch

from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.hf_glm import glm_from_state
from tests.conftest import tiny_config
from tests.paged import PagedRunner


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_cfg):
    return glm_from_state(tiny_model.state_dict(), tiny_cfg)


def _prompt(n: int, seed: int, vocab: int = 320) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def test_logits_match_transformers_glm(tiny_model, reference):
    ids = _prompt(57, seed=1)
    ours = PagedRunner(tiny_model).step([(0, ids)])
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ours.abs().mean() > 0.1  # a real signal, not two zero tensors


def test_greedy_continuation_matches_transformers(tiny_model, reference):
    prompt = _prompt(11, seed=2)
    ours = PagedRunner(tiny_model).greedy(0, prompt, steps=32)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert ours == out[0, len(prompt) :].tolist()
    assert len(set(ours)) > 1


def test_incremental_decode_equals_full_forward(tiny_model):
    ids = _prompt(40, seed=3)
    full = PagedRunner(tiny_model).step([(0, ids)])
    runner = PagedRunner(tiny_model)
    parts = [runner.step([(0, ids[:13])])]  # a prefill, then a chunk after a cached prefix
    parts.append(runner.step([(0, ids[13:30])]))
    parts += [runner.step([(0, [t])]) for t in ids[30:]]  # then one token at a time
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=1e-5)


def test_mixed_batch_equals_each_alone(tiny_model):
    prompts = [_prompt(n, seed=10 + n) for n in (5, 23, 1, 40)]
    alone = [PagedRunner(tiny_model).step([(0, p)])[-1] for p in prompts]
    runner = PagedRunner(tiny_model)
    logits = runner.step([(i, p) for i, p in enumerate(prompts) if len(p) > 1] + [(2, prompts[2])])
    order = [0, 1, 3, 2]
    ends = torch.tensor([5, 23, 40, 1]).cumsum(0) - 1
    for row, i in zip(ends.tolist(), order, strict=True):
        torch.testing.assert_close(logits[row], alone[i], atol=1e-5, rtol=1e-5)

    # now a batch mixing a new prefill with decodes of sequences of different lengths
    nxt = [int(logits[row].argmax()) for row in ends.tolist()]
    fresh = _prompt(9, seed=99)
    mixed = runner.step([(4, fresh)] + [(i, [t]) for i, t in zip(order, nxt, strict=True)])
    for k, i in enumerate(order):
        solo = PagedRunner(tiny_model)
        solo.step([(0, prompts[i])])
        expect = solo.step([(0, [nxt[k]])])[-1]
        torch.testing.assert_close(mixed[9 + k], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        mixed[8], PagedRunner(tiny_model).step([(0, fresh)])[-1], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(tiny_model, tiny_cfg, dtype):
    half = ChatGLMForCausalLM.random(tiny_cfg, dtype=dtype, seed=0)
    half.load_state_dict({k: v.to(dtype) for k, v in tiny_model.state_dict().items()})
    ids = _prompt(20, seed=5)
    ref = PagedRunner(tiny_model).step([(0, ids)])
    out = PagedRunner(half).step([(0, ids)])
    assert out.dtype == torch.float32
    assert next(half.parameters()).dtype == dtype
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert cos.min() > 0.99


def test_kv_cache_holds_only_kv_groups(tiny_model, tiny_cfg):
    shape = tiny_model.kv_cache_shape(num_blocks=4, block_size=16)
    assert shape == (2, 4, 16, tiny_cfg.multi_query_group_num, tiny_cfg.kv_channels)
    assert tiny_model.kv_bytes_per_token(torch.float16) == 2 * 2 * 2 * 16 * 2


def test_random_builds_any_shape_without_a_file():
    cfg = tiny_config(num_layers=3, hidden_size=128, num_attention_heads=8, kv_channels=16)
    m = ChatGLMForCausalLM.random(cfg, dtype=torch.bfloat16, seed=3)
    assert len(m.layers) == 3
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in m.parameters())
    qkv = m.layers[0].self_attention.query_key_value
    assert qkv.weight.shape == ((8 + 2 * 2) * 16, 128) and qkv.bias is not None
