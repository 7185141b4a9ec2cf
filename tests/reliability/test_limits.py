"""Context limits, as documented: a prompt that leaves no room for a reply is refused with a 400
that states both lengths (before any stream starts); a reply budget beyond what fits (max_tokens,
max_completion_tokens, the seed's max_length) is not an error but clipped to the rest of the
context, and the answer then finishes with "length".
"""

from __future__ import annotations

import json

import httpx
import pytest

from chatglm_serve.server.app import create_app
from tests.reliability.conftest import assert_error
from tests.server.conftest import LiveServer, settings, wait_idle

CONTEXT = 64


@pytest.fixture(scope="module")
def served(engine_factory):
    engine = engine_factory(max_num_seqs=8, max_model_len=CONTEXT, kv_cache_tokens=16 * CONTEXT)
    with LiveServer(create_app(settings(), engine=engine)) as server:
        yield server, engine


def text_of(engine, tokens: int) -> str:
    """A user message whose chat prompt is exactly `tokens` tokens long."""
    for k in range(max(0, tokens - 40), tokens + 1):  # ~15 tokens of chat template, 1 per 字
        if len(engine.tokenizer.encode_chat("字" * k, [])) == tokens:
            return "字" * k
    raise AssertionError(f"no message of {tokens} prompt tokens")


def chat(server, content: str, **fields) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], **fields}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def stream_usage(r: httpx.Response) -> tuple[int, list[str | None]]:
    """(completion tokens from the usage chunk, finish reasons by choice) of an SSE answer."""
    events = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finish: dict[int, str | None] = {}
    for c in chunks:
        for choice in c["choices"]:
            if choice["finish_reason"] is not None:
                finish[choice["index"]] = choice["finish_reason"]
    return chunks[-1]["usage"]["completion_tokens"], [finish[i] for i in sorted(finish)]


@pytest.mark.parametrize(
    "n", [CONTEXT, CONTEXT + 1, 5000], ids=["no room left", "one past", "far past"]
)
@pytest.mark.parametrize("stream", [False, True])
def test_prompt_at_or_past_the_context_is_400_with_both_lengths(served, n, stream):
    server, engine = served
    content = text_of(engine, n)
    r = chat(server, content, stream=stream, max_tokens=1)
    err = assert_error(r, 400, "context_length_exceeded")
    assert err["param"] == "messages"
    assert f"maximum context length is {CONTEXT} tokens" in err["message"]
    assert f"the prompt has {n} tokens" in err["message"]
    wait_idle(engine)


def test_legacy_prompt_or_history_past_the_context_is_400_with_both_lengths(served):
    server, engine = served
    long = text_of(engine, CONTEXT + 3)
    for body in ({"prompt": long}, {"prompt": "x", "history": [[long, "y"]]}):
        r = httpx.post(server.url + "/", json=body, timeout=30)
        err = assert_error(r, 400, "context_length_exceeded")
        n = len(
            engine.tokenizer.encode_chat(
                body["prompt"], [tuple(t) for t in body.get("history", [])]
            )
        )
        assert str(CONTEXT) in err["message"] and str(n) in err["message"]


def test_the_longest_prompt_that_fits_gets_one_token(served):
    server, engine = served
    r = chat(server, text_of(engine, CONTEXT - 1), max_tokens=50, ignore_eos=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"] == {
        "prompt_tokens": CONTEXT - 1,
        "completion_tokens": 1,
        "total_tokens": CONTEXT,
    }
    assert body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "budget",
    [
        {"max_tokens": 10**9},
        {"max_completion_tokens": CONTEXT * 10},
        {"max_tokens": 5, "max_completion_tokens": 10**6},  # max_completion_tokens wins
        {"max_length": 10**6},  # the seed's openai_api.py: prompt + reply
        {},  # no budget: the rest of the context
    ],
    ids=["max_tokens", "max_completion_tokens", "both", "max_length", "none"],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_budget_beyond_the_context_is_clipped_to_what_fits(served, budget, stream):
    server, engine = served
    prompt = 20
    fields = {**budget, "ignore_eos": True, "n": 2, "stream": stream}
    if stream:
        fields["stream_options"] = {"include_usage": True}
    r = chat(server, text_of(engine, prompt), **fields)
    assert r.status_code == 200, r.text
    room = CONTEXT - prompt
    if stream:
        completion, finish = stream_usage(r)
    else:
        completion = r.json()["usage"]["completion_tokens"]
        finish = [c["finish_reason"] for c in r.json()["choices"]]
    assert completion == 2 * room  # both choices, each clipped to the room left
    assert finish == ["length", "length"]
    wait_idle(engine)


def test_a_budget_that_fits_is_kept(served):
    server, engine = served
    r = chat(server, text_of(engine, 20), max_tokens=7, ignore_eos=True)
    assert r.json()["usage"]["completion_tokens"] == 7
    # max_length counts the prompt too: 25 - 20 = 5 tokens of reply
    r = chat(server, text_of(engine, 20), max_length=25, ignore_eos=True)
    assert r.json()["usage"]["completion_tokens"] == 5


def test_legacy_max_length_beyond_the_context_is_clipped(served):
    server, engine = served
    prompt = text_of(engine, 20)
    before = engine.stats().generation_tokens_total
    r = httpx.post(server.url + "/", json={"prompt": prompt, "max_length": 10**6}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["history"] == [[prompt, r.json()["response"]]]
    wait_idle(engine)
    # at most the rest of the context (the demo model may end earlier with its eos)
    assert 1 <= engine.stats().generation_tokens_total - before <= CONTEXT - 20
