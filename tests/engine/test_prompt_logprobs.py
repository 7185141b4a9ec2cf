"""Prompt logprobs from the prefill forward, and max_tokens 0 (score only), on the real engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chatglm_serve.engine.types import FinishReason, SamplingParams
from chatglm_serve.model.hf_glm import glm_from_state
from tests.engine.harness import assert_idle, make_engine, run


@pytest.fixture(scope="module")
def reference(model):
    return glm_from_state(model.state_dict(), model.config)


def reference_logprobs(ref, ids: list[int], vocab: int) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, by transformers' GlmForCausalLM, over the tokenizer's
    vocabulary (the output layer's padding rows are no tokens: the engine never offers them)."""
    with torch.inference_mode():
        logits = ref(torch.tensor([ids])).logits[0, :, :vocab].float()
    lps = torch.log_softmax(logits, dim=-1)
    return lps[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


@pytest.mark.parametrize("chunk", [256, 7])  # one prefill, and chunked prefill
def test_prompt_logprobs_match_transformers(model, tokenizer, reference, chunk):
    engine = make_engine(model, tokenizer, max_num_batched_tokens=max(chunk, 16), max_num_seqs=16)
    if chunk < 16:
        engine.scheduler.config = dataclasses.replace(engine.config, max_num_batched_tokens=chunk)
    ids = prompt(tokenizer, "the quick brown fox jumps over the lazy dog again and again")
    params = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=3)
    res = run(engine, [("a", ids, params)])[("a", 0)]
    assert res.finish_reason is FinishReason.LENGTH and res.token_ids == []
    lps = next(o.prompt_logprobs for o in res.outputs if o.prompt_logprobs is not None)
    assert len(lps) == len(ids) and lps[0] is None
    assert [lp.token_id for lp in lps[1:]] == ids[1:]
    ours = torch.tensor([lp.logprob for lp in lps[1:]])
    torch.testing.assert_close(
        ours, reference_logprobs(reference, ids, tokenizer.vocab_size), atol=1e-4, rtol=0
    )
    for lp in lps[1:]:
        assert len(lp.top) == 3
        assert lp.top[0][2] >= lp.logprob - 1e-6  # the best is at least the actual token's
    assert_idle(engine)


def test_cached_prefix_is_recomputed_for_prompt_logprobs(model, tokenizer, reference):
    engine = make_engine(model, tokenizer)
    ids = prompt(tokenizer, "a shared prefix that fills more than a couple of blocks of tokens")
    warm = run(engine, [("warm", ids, SamplingParams(temperature=0, max_tokens=2))])
    assert warm[("warm", 0)].finish_reason is FinishReason.LENGTH
    assert engine.block_manager.cached  # the prompt's blocks are in the prefix cache
    res = run(engine, [("b", ids, SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=0))])
    lps = next(o.prompt_logprobs for o in res[("b", 0)].outputs if o.prompt_logprobs)
    ours = torch.tensor([lp.logprob for lp in lps[1:]])
    torch.testing.assert_close(
        ours, reference_logprobs(reference, ids, tokenizer.vocab_size), atol=1e-4, rtol=0
    )
    # a request without prompt logprobs still takes the prefix from the cache
    before = engine.get_stats().prompt_tokens_cached
    run(engine, [("c", ids, SamplingParams(temperature=0, max_tokens=1))])
    assert engine.get_stats().prompt_tokens_cached > before
    assert_idle(engine)


def test_prompt_logprobs_beside_other_requests_and_generation(model, tokenizer, reference):
    """Scored and free requests share steps; generation after a scored prompt is unchanged."""
    engine = make_engine(model, tokenizer, max_num_batched_tokens=32)
    ids = prompt(tokenizer, "one two three four five six seven eight nine ten eleven twelve")
    other = prompt(tokenizer, "something else entirely")
    greedy = SamplingParams(temperature=0, max_tokens=5)
    scored = dataclasses.replace(greedy, prompt_logprobs=1, n=2)
    res = run(engine, [("o", other, greedy), ("s", ids, scored), ("p", ids, greedy)], stagger=1)
    assert res[("s", 0)].token_ids == res[("p", 0)].token_ids == res[("s", 1)].token_ids
    sent = [o.prompt_logprobs for o in res[("s", 0)].outputs if o.prompt_logprobs is not None]
    assert len(sent) == 1  # once, on choice 0
    assert all(o.prompt_logprobs is None for o in res[("s", 1)].outputs)
    ours = torch.tensor([lp.logprob for lp in sent[0][1:]])
    torch.testing.assert_close(
        ours, reference_logprobs(reference, ids, tokenizer.vocab_size), atol=1e-4, rtol=0
    )
    assert_idle(engine)


def test_max_tokens_zero_needs_no_room_and_is_validated(model, tokenizer):
    engine = make_engine(model, tokenizer, max_model_len=32)
    ids = list(range(3, 35))[:32]
    res = run(engine, [("full", ids, SamplingParams(max_tokens=0, prompt_logprobs=0))])
    assert res[("full", 0)].finish_reason is FinishReason.LENGTH
    with pytest.raises(Exception, match="maximum context length"):
        engine.add_request("x", ids, SamplingParams(max_tokens=1))
    with pytest.raises(Exception, match="prompt_logprobs"):
        engine.add_request("y", ids[:4], SamplingParams(prompt_logprobs=21))
    assert_idle(engine)
