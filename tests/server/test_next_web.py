"""What ChatGPT-Next-Web (v2.15.8) sends: its memory (summarize) request, and no max_tokens."""

from __future__ import annotations

import pytest

from tests.server.conftest import MAX_MODEL_LEN, sse_json, wait_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

SUMMARIZE = (
    "Summarize the discussion briefly in 200 words or less to use as a prompt for future context."
)
# Next-Web's summarizeSession body: the conversation, a trailing system message, stream true,
# its config's sampling fields, and no max_tokens (it sends one only for "vision" model names).
MEMORY_REQUEST = {
    "messages": [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你的吗？"},
        {"role": "user", "content": "讲一个关于猫的故事"},
        {"role": "assistant", "content": "从前有一只猫，它住在一座山上。"},
        {"role": "system", "content": SUMMARIZE},
    ],
    "stream": True,
    "model": "gpt-4o-mini",
    "temperature": 0.5,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "top_p": 1,
}


async def test_memory_request_ending_with_a_system_message_streams_a_reply(make_app, engine):
    import httpx

    app = make_app(default_max_tokens=8)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json=MEMORY_REQUEST)
    assert r.status_code == 200, r.text
    chunks, done = sse_json(r.text)
    assert done and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert not any("error" in ch for ch in chunks)
    # the instruction is the query; the two exchanges are the history
    msgs = MEMORY_REQUEST["messages"]
    expected = engine.tokenizer.encode_chat(
        SUMMARIZE,
        [(msgs[0]["content"], msgs[1]["content"]), (msgs[2]["content"], msgs[3]["content"])],
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json={**MEMORY_REQUEST, "stream": False})
    assert r.json()["usage"]["prompt_tokens"] == len(expected)
    wait_idle(engine)


async def _completion_tokens(app, path: str, body: dict) -> int | str:
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.post(path, json=body)
    assert r.status_code == 200, r.text
    if path == "/":
        return r.json()["response"]
    return r.json()["usage"]["completion_tokens"]


async def test_default_max_tokens_applies_only_when_a_request_sets_none(make_app, engine):
    body = {"messages": [{"role": "user", "content": "你好"}], "ignore_eos": True}
    capped = make_app(default_max_tokens=5)
    assert await _completion_tokens(capped, "/v1/chat/completions", body) == 5
    # an explicit limit wins over the default, either way
    assert await _completion_tokens(capped, "/v1/chat/completions", {**body, "max_tokens": 9}) == 9
    assert await _completion_tokens(
        capped, "/v1/chat/completions", {**body, "max_length": 30}
    ) == 30 - len(engine.tokenizer.encode_chat("你好", []))
    # without the setting: up to the end of the context
    uncapped = make_app()
    prompt = len(engine.tokenizer.encode_chat("你好", []))
    assert await _completion_tokens(uncapped, "/v1/chat/completions", body) == (
        MAX_MODEL_LEN - prompt
    )
    wait_idle(engine)


async def test_default_max_tokens_caps_the_legacy_api_without_max_length(make_app, engine):
    from chatglm_serve.server.routes_legacy import DEFAULT_MAX_LENGTH, legacy_reply_limit
    from chatglm_serve.server.settings import load_settings

    capped = load_settings({"default_max_tokens": 7}, environ={})
    plain = load_settings({}, environ={})
    assert legacy_reply_limit(None, 10, capped) == 7
    assert legacy_reply_limit(None, 10, plain) == DEFAULT_MAX_LENGTH - 10
    assert legacy_reply_limit(50, 10, capped) == 40  # the request's own max_length wins
    # and through the route: the reply stops within 7 generated tokens
    before = engine.stats().generation_tokens_total
    await _completion_tokens(make_app(default_max_tokens=7), "/", {"prompt": "你好", "history": []})
    wait_idle(engine)
    assert 1 <= engine.stats().generation_tokens_total - before <= 7
