"""The daemon under a real uvicorn on 127.0.0.1, driven by the real clients' code paths:
openai-python, a ChatGPT-Next-Web replay, and streaming clients that hang up mid-stream."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.engine.harness import INJECTED_FAILURE, fail_step
from tests.server.conftest import MAX_MODEL_LEN, wait_idle

KEY = "sk-test-key"
USER = [{"role": "user", "content": "你好，请介绍一下你自己"}]


@pytest.fixture
def server(live):
    return live(api_keys=[KEY])


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


# --- openai-python -------------------------------------------------------------------------------


def test_openai_non_stream(oai, engine):
    r = oai.chat.completions.create(
        model="gpt-4o-mini", messages=USER, temperature=0, max_tokens=20
    )
    assert r.object == "chat.completion" and r.model == "chatglm2-6b"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    n = len(engine.tokenizer.encode_chat(USER[0]["content"], []))
    assert r.usage.prompt_tokens == n
    assert r.usage.total_tokens == n + r.usage.completion_tokens


def test_openai_stream_joined_equals_non_stream_greedy(oai):
    kwargs = dict(model="chatglm2-6b", messages=USER, temperature=0, max_tokens=30)
    plain = oai.chat.completions.create(**kwargs)
    stream = oai.chat.completions.create(**kwargs, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert joined == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_openai_include_usage(oai):
    chunks = list(
        oai.chat.completions.create(
            model="x",
            messages=USER,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_errors_become_the_right_exception(oai, server, engine):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "你好 " * 400}]
        )
    assert e.value.code == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in e.value.message
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="x", messages=USER, temperature=5)
    with pytest.raises(openai.BadRequestError):  # also when streaming: refused before the stream
        oai.chat.completions.create(model="x", messages=USER, temperature=5, stream=True)
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="x", messages=USER)
    assert [m.id for m in oai.models.list()] == ["chatglm2-6b"]


def test_openai_error_mid_stream_raises_api_error(live, engine_factory):
    """A failure after the stream started (injected: the real engine never fails on demand)
    arrives as an error chunk, which openai-python raises as APIError."""
    engine = engine_factory()
    fail_step(engine.engine.runner, at=4)
    srv = live(engine)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    got = []
    with pytest.raises(openai.APIError, match=INJECTED_FAILURE):
        for chunk in client.chat.completions.create(
            model="x", messages=USER, stream=True, max_tokens=50, extra_body={"ignore_eos": True}
        ):
            got.append(chunk)
    assert got  # the error came after the stream had started
    assert client.chat.completions.create(model="x", messages=USER, max_tokens=2).choices


# --- ChatGPT-Next-Web replay ---------------------------------------------------------------------

NEXT_WEB_SYSTEM = (
    "\nYou are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2023-10\n"
    "Current model: gpt-4o-mini\nCurrent time: Thu Jan 02 2025 10:00:00 GMT+0800\n"
    "Latex inline: \\(x^2\\) \nLatex block: $$e=mc^2$$\n\n"
)
NEXT_WEB_TITLE = (
    "Please generate a four to five word title summarizing our conversation without any lead-in, "
    "punctuation, quotation marks, periods, symbols, bold text, or additional text. Remove "
    "enclosing quotation marks."
)


def chunked(payload: dict):
    raw = json.dumps(payload).encode()
    for i in range(0, len(raw), 64):
        yield raw[i : i + 64]


def next_web_headers() -> dict[str, str]:
    # What its server-side proxy forwards: its key as a bearer token, JSON, no Content-Length.
    return {
        "Authorization": f"Bearer {KEY}",
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
    }


def next_web_stream(base_url: str, payload: dict) -> tuple[str, str | None]:
    """Read the stream the way Next-Web does: check ok + content type, then per `data:` line
    stop at [DONE], else JSON-parse and take choices[0].delta.content. (The finish reason is
    noted for the test only; Next-Web ignores it.)"""
    text, finish = "", None
    with httpx.Client(timeout=60) as c:
        request = c.build_request(
            "POST",
            base_url + "/v1/chat/completions",
            content=chunked(payload),
            headers=next_web_headers(),
        )
        assert "content-length" not in request.headers
        response = c.send(request, stream=True)
        try:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                choices = event.get("choices") or []
                delta = (choices[0].get("delta") or {}).get("content") if choices else None
                text += delta or ""
                finish = (choices[0].get("finish_reason") if choices else None) or finish
        finally:
            response.close()
    return text, finish


def next_web_title(base_url: str, payload: dict, conversation: list[dict]) -> httpx.Response:
    """Its title request: the conversation (without its injected system prompt) plus the topic
    prompt, not streamed, otherwise the same request fields."""
    body = {**payload, "messages": [*conversation, {"role": "user", "content": NEXT_WEB_TITLE}]}
    body["stream"] = False
    with httpx.Client(timeout=60) as c:
        return c.post(
            base_url + "/v1/chat/completions", content=chunked(body), headers=next_web_headers()
        )


@pytest.mark.parametrize("shape", ["default-model", "custom-model"])
def test_next_web_replay(server, engine, shape):
    sampling = {"temperature": 0.5, "presence_penalty": 0, "frequency_penalty": 0, "top_p": 1}
    if shape == "default-model":  # its own system prompt and max_tokens 4000
        messages = [{"role": "system", "content": NEXT_WEB_SYSTEM}, *USER]
        payload = {"messages": messages, "stream": True, "model": "gpt-4o-mini", **sampling}
        payload["max_tokens"] = 4000
    else:  # CUSTOM_MODELS: no system message, no max_tokens
        payload = {"messages": USER, "stream": True, "model": "chatglm2-6b", **sampling}
    reply, finish = next_web_stream(server.url, payload)
    assert reply and finish in ("stop", "length")

    conversation = [*USER, {"role": "assistant", "content": reply}]
    r = next_web_title(server.url, payload, conversation)
    n = len(engine.encode_chat(NEXT_WEB_TITLE, [(USER[0]["content"], reply)]))
    if n >= MAX_MODEL_LEN:
        # The demo model's reply used up the context, so the conversation itself no longer
        # fits: the one refusal allowed, naming both numbers (a real reply ends much sooner).
        assert r.status_code == 400, r.text
        assert str(n) in r.text and str(MAX_MODEL_LEN) in r.text
        conversation[1]["content"] = reply[:40]
        r = next_web_title(server.url, payload, conversation)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    assert isinstance(r.json()["choices"][0]["message"]["content"], str)


def test_next_web_browser_mode_preflight(live):
    srv = live(cors_origins=["*"], api_keys=[KEY])
    r = httpx.options(
        srv.url + "/v1/chat/completions",
        headers={
            "Origin": "https://app.nextchat.dev",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-requested-with",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "https://app.nextchat.dev")
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    for path in ("/dashboard/billing/subscription", "/dashboard/billing/usage"):
        r = httpx.get(srv.url + path, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_supported"


def test_stream_headers_arrive_while_the_request_still_queues(live, engine_factory):
    """Next-Web gives up when headers take over 60 s: they must not wait for the queue."""
    engine = engine_factory(max_num_seqs=1, max_model_len=2048, kv_cache_tokens=4096)
    srv = live(engine)
    long = {"messages": USER, "ignore_eos": True, "max_tokens": 2000}
    url = srv.url + "/v1/chat/completions"
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", url, json={**long, "stream": True}) as a,
    ):
        assert a.status_code == 200
        lines = a.iter_lines()
        while '"content":"' not in next(lines) or engine.stats().running < 1:
            pass  # the first request now holds the only running slot
        with c.stream("POST", url, json={**long, "stream": True}) as b:
            assert b.status_code == 200
            assert b.headers["content-type"].startswith("text/event-stream")
            assert engine.stats().waiting == 1  # headers came while it queues
            first = next(line for line in b.iter_lines() if line.startswith("data:"))
            assert '"role":"assistant"' in first
    wait_idle(engine)


# --- clients hanging up --------------------------------------------------------------------------


def test_twenty_streams_disconnected_mid_stream_leave_the_engine_idle(live, engine_factory):
    engine = engine_factory(max_model_len=2048, kv_cache_tokens=24 * 2048)
    server = live(engine, api_keys=[KEY])
    max_tokens = 2000
    body = json.dumps(
        {"messages": USER, "stream": True, "ignore_eos": True, "max_tokens": max_tokens}
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    before = engine.stats().generation_tokens_total

    def hang_up_mid_stream(results: list, i: int) -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
            s.sendall(request)
            seen = b""
            while seen.count(b'"content":"') < 3:  # a few tokens of content received
                data = s.recv(4096)
                if not data:
                    break
                seen += data
            results[i] = seen
        # leaving the with-block closes the socket mid-stream

    results: list = [None] * 20
    threads = [threading.Thread(target=hang_up_mid_stream, args=(results, i)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(r and r.startswith(b"HTTP/1.1 200") and b"[DONE]" not in r for r in results)
    wait_idle(engine, timeout=30)  # nothing running or waiting, KV back to empty
    s = engine.stats()
    assert (s.running, s.waiting, s.kv_blocks_used) == (0, 0, 0)
    # ...because they were aborted, not because they ran to the end
    assert s.generation_tokens_total - before < 20 * max_tokens // 4
    # and the server still answers
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": USER, "max_tokens": 4},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 200


def test_non_stream_client_disconnect_aborts(live, engine_factory):
    engine = engine_factory(max_model_len=2048, kv_cache_tokens=4096)
    server = live(engine)
    max_tokens = 2000
    body = json.dumps({"messages": USER, "ignore_eos": True, "max_tokens": max_tokens}).encode()
    before = engine.stats().generation_tokens_total
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        deadline = time.monotonic() + 10
        while engine.stats().generation_tokens_total - before < 5:
            assert time.monotonic() < deadline
            time.sleep(0.002)
    wait_idle(engine, timeout=30)
    assert engine.stats().generation_tokens_total - before < max_tokens // 2
