"""Grammar-constrained sampling in the batched sampler (engine/guided.py) on the real engine."""

from __future__ import annotations

import json

import pytest

from chatglm_serve.engine.types import FinishReason, GrammarError, GuidedSpec, SamplingParams
from tests.engine.harness import assert_idle, make_engine, run

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "boolean"}},
    "required": ["n", "b"],
    "additionalProperties": False,
}


def test_constrained_and_free_rows_share_steps(model, tokenizer):
    engine = make_engine(model, tokenizer)
    grammar = engine.compile_grammar(GuidedSpec("json", json.dumps(SCHEMA)))
    prompt = tokenizer.encode("give me json")
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = run(engine, [("alone", prompt, free)])[("alone", 0)].token_ids
    constrained = SamplingParams(temperature=1.0, seed=3, max_tokens=60, guided=grammar, n=3)
    res = run(engine, [("free", prompt, free), ("json", prompt, constrained)])
    # the free row is untouched by its constrained neighbours
    assert res[("free", 0)].token_ids == alone
    for i in range(3):
        r = res[("json", i)]
        assert r.finish_reason is FinishReason.STOP
        value = json.loads(r.text)
        assert set(value) == {"n", "b"} and 0 <= value["n"] <= 99
    assert_idle(engine)


def test_a_complete_grammar_ends_the_reply_whatever_min_tokens_or_ignore_eos(model, tokenizer):
    engine = make_engine(model, tokenizer)
    grammar = engine.compile_grammar(GuidedSpec("choice", json.dumps(["yes", "no"])))
    prompt = tokenizer.encode("yes or no?")
    params = SamplingParams(temperature=0, max_tokens=30, min_tokens=10, guided=grammar)
    r = run(engine, [("a", prompt, params)])[("a", 0)]
    assert r.text in ("yes", "no") and r.finish_reason is FinishReason.STOP
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, guided=grammar)
    r = run(engine, [("b", prompt, params)])[("b", 0)]
    assert r.text in ("yes", "no") and r.finish_reason is FinishReason.STOP
    assert_idle(engine)


def test_compiled_once_per_spec_and_bad_specs_refused(model, tokenizer):
    engine = make_engine(model, tokenizer)
    spec = GuidedSpec("regex", "[a-c]{2}")
    first = engine.compile_grammar(spec)
    assert engine.compile_grammar(GuidedSpec("regex", "[a-c]{2}", param="other")) is first
    with pytest.raises(GrammarError) as e:
        engine.compile_grammar(GuidedSpec("json", '{"type": "object", "if": {}, "then": {}}'))
    assert e.value.param == "response_format" and "if" in e.value.message
    with pytest.raises(GrammarError):
        engine.compile_grammar(GuidedSpec("regex", "(", param="guided_regex"))
    with pytest.raises(Exception, match="guided"):
        engine.add_request("x", [5, 6], SamplingParams(guided="not compiled"))


@pytest.mark.parametrize("family", ["glm4", "chatglm3"])
def test_json_schema_on_the_other_families(tmp_path, family):
    """GLM-4's tiktoken vocabulary (exact token bytes) and ChatGLM3's extra stop tokens."""
    from chatglm_serve.model.loader import load_model_and_tokenizer
    from tests.glm_family import write_member

    path, _ = write_member(tmp_path / family, family, seed=5, seq_length=512)
    model, tok = load_model_and_tokenizer(path, dtype="float32")
    engine = make_engine(model, tok)
    grammar = engine.compile_grammar(GuidedSpec("json", json.dumps(SCHEMA)))
    prompt = tok.encode("json please")
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=60, guided=grammar, n=4)
    res = run(engine, [("j", prompt, params)])
    for i in range(4):
        r = res[("j", i)]
        assert r.finish_reason is FinishReason.STOP, r.text
        value = json.loads(r.text)
        assert set(value) == {"n", "b"} and isinstance(value["b"], bool)
    assert_idle(engine)
