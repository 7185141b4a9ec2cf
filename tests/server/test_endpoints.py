"""Every endpoint and error of the daemon, through httpx's ASGI transport and the real engine."""

from __future__ import annotations

import asyncio
import datetime
import json

import httpx
import pytest

from chatglm_serve.engine.types import SamplingParams
from chatglm_serve.server.app import create_app
from chatglm_serve.server.protocol import ChatCompletion, ChatCompletionChunk
from tests.engine.harness import fail_step
from tests.server.conftest import MAX_MODEL_LEN, settings, sse_json, wait_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

USER = [{"role": "user", "content": "你好，请介绍一下你自己"}]
GREEDY = {"temperature": 0, "max_tokens": 24}


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


async def engine_greedy(engine, ids: list[int], max_tokens: int) -> str:
    parts = []
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    async for out in engine.generate(ids, params, f"direct-{id(parts)}"):
        parts.append(out.text)
    return "".join(parts)


# --- chat completions ----------------------------------------------------------------------------


async def test_chat_completion_shape_and_usage(client, engine):
    r = await client.post(
        "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": USER, **GREEDY}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    ChatCompletion.model_validate(body)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    assert body["model"] == "chatglm2-6b"  # any asked name is answered with the served one
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    ids = engine.tokenizer.encode_chat(USER[0]["content"], [])
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(ids)
    assert 1 <= usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert r.headers["x-request-id"]


async def test_greedy_over_http_equals_engine_greedy(client, engine):
    messages = [
        {"role": "system", "content": "你是一个助手。"},
        {"role": "user", "content": "第一轮"},
        {"role": "assistant", "content": "好的"},
        {"role": "user", "content": "讲个故事"},
    ]
    r = await client.post("/v1/chat/completions", json={"messages": messages, **GREEDY})
    text = r.json()["choices"][0]["message"]["content"]
    ids = engine.tokenizer.encode_chat("你是一个助手。讲个故事", [("第一轮", "好的")])
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    assert text == await engine_greedy(engine, ids, 24)
    assert text  # the demo model says something


async def test_stream_chunks_and_done(client):
    r = await client.post("/v1/chat/completions", json={"messages": USER, "stream": True, **GREEDY})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "event:" not in r.text  # plain data: lines, as openai-python and Next-Web expect
    chunks, done = sse_json(r.text)
    assert done
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"][0]["delta"] == {}
    middle = chunks[1:-1]
    assert middle and all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert len({c["id"] for c in chunks}) == 1


async def test_stream_joined_equals_non_stream_greedy(client):
    body = {"messages": USER, **GREEDY}
    plain = (await client.post("/v1/chat/completions", json=body)).json()
    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks, _ = sse_json(r.text)
    joined = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert joined == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


async def test_stream_include_usage(client):
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": USER,
            "stream": True,
            "stream_options": {"include_usage": True},
            **GREEDY,
        },
    )
    chunks, done = sse_json(r.text)
    assert done
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["total_tokens"] == (
        last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    )
    assert all(c["usage"] is None for c in chunks[:-1])
    n_content = sum(1 for c in chunks[:-1] if c["choices"][0]["delta"].get("content"))
    assert 1 <= n_content <= last["usage"]["completion_tokens"]


async def test_n_seed_and_logprobs(client):
    body = {
        "messages": USER,
        "n": 2,
        "seed": 7,
        "temperature": 1.0,
        "max_tokens": 8,
        "logprobs": True,
        "top_logprobs": 2,
    }
    a = (await client.post("/v1/chat/completions", json=body)).json()
    b = (await client.post("/v1/chat/completions", json=body)).json()
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert [c["message"] for c in a["choices"]] == [c["message"] for c in b["choices"]]  # seeded
    for c in a["choices"]:
        content = c["logprobs"]["content"]
        assert content and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
        assert "".join(t["token"] for t in content).strip()
    completion = sum(1 for c in a["choices"] for _ in c["logprobs"]["content"])
    assert a["usage"]["completion_tokens"] == completion


async def test_max_tokens_past_the_context_is_clipped_not_refused(client, engine):
    """Next-Web's max_tokens 4000 against a 256-token context: reply up to the end, "length"."""
    ids = engine.tokenizer.encode_chat(USER[0]["content"], [])
    for extra in ({"max_tokens": 4000}, {}):  # and no max_tokens = up to the rest of the context
        r = await client.post(
            "/v1/chat/completions", json={"messages": USER, "ignore_eos": True, **extra}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == MAX_MODEL_LEN - len(ids)


async def test_prompt_longer_than_the_context_is_400_with_both_numbers(client, engine):
    long = "你好 " * 400
    n = len(engine.tokenizer.encode_chat(long, []))
    assert n > MAX_MODEL_LEN
    for stream in (False, True):
        r = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": long}], "stream": stream},
        )
        err = assert_openai_error(r, 400, "context_length_exceeded")
        assert str(n) in err["message"] and str(MAX_MODEL_LEN) in err["message"]


async def test_stop_and_min_tokens_extensions(client):
    base = {"messages": USER, "temperature": 0, "max_tokens": 24}
    full = (await client.post("/v1/chat/completions", json=base)).json()
    text = full["choices"][0]["message"]["content"]
    stop = text[5:8]
    assert stop
    cut = (await client.post("/v1/chat/completions", json={**base, "stop": [stop]})).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    mt = (
        await client.post(
            "/v1/chat/completions",
            json={**base, "max_tokens": 10, "min_tokens": 10, "ignore_eos": True},
        )
    ).json()
    assert mt["usage"]["completion_tokens"] == 10


# --- refusals in the OpenAI shape ----------------------------------------------------------------


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": USER, "temperature": "warm"}, "temperature"),
        ({"messages": USER, "max_tokens": -1}, "max_tokens"),
        ({"messages": USER, "n": 100}, "n"),
        ({"messages": USER, "stream": "sometimes"}, "stream"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
        ({}, "messages"),
    ],
)
async def test_bad_input_is_400_never_422_or_5xx(client, body, param):
    r = await client.post("/v1/chat/completions", json=body)
    err = assert_openai_error(r, 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


async def test_invalid_json_and_non_object_bodies_are_400(client):
    for content in (b"{not json", b"[1, 2]", b""):
        r = await client.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
        assert_openai_error(r, 400)


async def test_last_message_not_user_is_400(client):
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": [*USER, {"role": "assistant", "content": "hi"}]},
    )
    assert assert_openai_error(r, 400)["param"] == "messages"


async def test_unknown_fields_are_ignored(client):
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": USER,
            "max_tokens": 2,
            "parallel_tool_calls": False,
            "metadata": {"a": 1},
        },
    )
    assert r.status_code == 200


async def test_unknown_path_and_method(client):
    assert_openai_error(await client.get("/v1/nothing"), 404, "not_found")
    assert_openai_error(await client.get("/v1/chat/completions"), 405)


async def test_billing_endpoints_are_a_clean_404(client):
    for path in ("/dashboard/billing/subscription", "/dashboard/billing/usage?start_date=x"):
        assert_openai_error(await client.get(path), 404, "not_supported")


async def test_strict_model_name(make_app):
    app = make_app(strict_model_name=True, model_aliases=["glm2"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": USER})
        assert assert_openai_error(r, 404, "model_not_found")["param"] == "model"
        for name in ("chatglm2-6b", "glm2"):
            r = await c.post(
                "/v1/chat/completions", json={"model": name, "messages": USER, "max_tokens": 2}
            )
            assert r.status_code == 200 and r.json()["model"] == "chatglm2-6b"


async def test_models_list_and_get(make_app):
    app = make_app(served_model_name="glm", model_aliases=["a1", "a2"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        body = (await c.get("/v1/models")).json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["glm", "a1", "a2"]
        assert all(m["object"] == "model" for m in body["data"])
        assert (await c.get("/v1/models/a2")).json()["id"] == "a2"
        assert_openai_error(await c.get("/v1/models/gpt-4"), 404, "model_not_found")


async def test_api_keys(make_app):
    app = make_app(api_keys=["sk-right"], metrics_public=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        body = {"messages": USER, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-right"}):
            r = await c.post("/v1/chat/completions", json=body, headers=headers)
            err = assert_openai_error(r, 401, "invalid_api_key")
            assert "sk-right" not in err["message"]
        assert_openai_error(await c.get("/v1/models"), 401)
        assert_openai_error(await c.post("/", json={"prompt": "x"}), 401)
        assert_openai_error(await c.get("/metrics"), 401)
        ok = {"Authorization": "Bearer sk-right"}
        assert (await c.post("/v1/chat/completions", json=body, headers=ok)).status_code == 200
        assert (await c.get("/metrics", headers=ok)).status_code == 200
        assert (await c.get("/health")).status_code == 200  # probes need no key


async def test_queue_full_is_429_with_retry_after(make_app, engine_factory):
    engine = engine_factory(max_num_seqs=1, max_queue=1, max_model_len=2048, kv_cache_tokens=4096)
    app = make_app(engine)
    long = {"messages": USER, "ignore_eos": True, "max_tokens": 2000}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        running = asyncio.create_task(c.post("/v1/chat/completions", json=long))
        while engine.stats().running < 1:
            await asyncio.sleep(0.005)
        waiting = asyncio.create_task(c.post("/v1/chat/completions", json=long))
        while engine.stats().waiting < 1:
            await asyncio.sleep(0.005)
        for stream in (False, True):
            r = await c.post("/v1/chat/completions", json={**long, "stream": stream})
            assert_openai_error(r, 429, "overloaded")
            assert int(r.headers["retry-after"]) >= 1
        for task in (running, waiting):
            task.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
    await asyncio.to_thread(wait_idle, engine)


async def test_draining_and_loading_are_503(make_app):
    app = make_app()
    app.state.server.draining = True
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json={"messages": USER})
        assert_openai_error(r, 503, "shutting_down")
        assert r.headers["retry-after"]
        assert_openai_error(await c.get("/health"), 503, "shutting_down")


async def test_health_503_until_loaded_then_200(monkeypatch, tmp_path):
    """The lifespan loads the model in the background: 503 (not ready) first, then 200."""
    import chatglm_serve.server.app as app_module

    gate = asyncio.Event()
    loaded_engine = {}
    real_load = app_module.load_engine

    def slow_load(s):
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(30)
        loaded_engine["e"] = real_load(s)
        return loaded_engine["e"]

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(app_module, "load_engine", slow_load)
    app = create_app(settings(max_model_len=128, kv_cache_tokens=2048, max_num_seqs=2))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c,
    ):
        assert_openai_error(await c.get("/health"), 503, "not_ready")
        assert_openai_error(
            await c.post("/v1/chat/completions", json={"messages": USER}), 503, "not_ready"
        )
        gate.set()
        for _ in range(500):
            if (await c.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.02)
        assert (await c.get("/health")).json()["status"] == "ok"
        r = await c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3})
        assert r.status_code == 200
    assert not loaded_engine["e"].is_running  # the lifespan shut down the engine it loaded


async def test_failed_load_is_503_with_the_reason(tmp_path):
    failures = []
    app = create_app(settings(model=str(tmp_path / "missing")), on_fatal=failures.append)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c,
    ):
        for _ in range(500):
            if failures:
                break
            await asyncio.sleep(0.01)
        err = assert_openai_error(await c.get("/health"), 503, "load_failed")
        assert "missing" in err["message"]


# --- request bodies ------------------------------------------------------------------------------


async def test_form_content_type_still_reads_json(client):
    """`curl -d '{...}'` labels the body form-urlencoded; the seed read it as JSON anyway."""
    raw = json.dumps({"prompt": "你好", "max_length": 40})
    r = await client.post(
        "/", content=raw, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 200, r.text


async def test_chunked_body_without_content_length(client):
    """ChatGPT-Next-Web's proxy sends the body chunked, with no Content-Length."""
    raw = json.dumps({"messages": USER, "max_tokens": 3}).encode()

    async def body():
        for i in range(0, len(raw), 7):
            yield raw[i : i + 7]

    request = client.build_request("POST", "/v1/chat/completions", content=body())
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    r = await client.send(request)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


async def test_body_size_limit(make_app):
    app = make_app(max_body_bytes=2048)
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()

    async def chunked():
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        assert_openai_error(await c.post("/v1/chat/completions", content=big), 413)
        r = await c.post("/v1/chat/completions", content=chunked())
        assert_openai_error(r, 413, "request_too_large")


# --- legacy POST / -------------------------------------------------------------------------------


async def test_legacy_api(client, engine):
    before = engine.stats().generation_tokens_total
    r = await client.post(
        "/", json={"prompt": "你好", "history": [["在吗", "在的"]], "max_length": 0, "top_p": None}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"response", "history", "status", "time"}
    assert body["status"] == 200
    datetime.datetime.strptime(body["time"], "%Y-%m-%d %H:%M:%S")
    assert body["history"] == [["在吗", "在的"], ["你好", body["response"]]]
    assert body["response"] == body["response"].strip()
    # max_length counts the prompt: 3 tokens of room here
    n = len(engine.tokenizer.encode_chat("你好", []))
    before = engine.stats().generation_tokens_total
    r = await client.post("/", json={"prompt": "你好", "max_length": n + 3})
    assert r.status_code == 200 and r.json()["history"] == [["你好", r.json()["response"]]]
    await asyncio.sleep(0.05)
    assert 1 <= engine.stats().generation_tokens_total - before <= 3


# --- a chat's second turn and the prefix cache ----------------------------------------------------

Q1 = "Tell me how the engine batches requests, and what the scheduler does."
Q2 = "Why?"


def _counter(metrics_text: str, name: str) -> float:
    line = next(ln for ln in metrics_text.splitlines() if ln.startswith(f"chatglm_{name}_total "))
    return float(line.split()[-1])


async def _prompt_token_counters(c: httpx.AsyncClient) -> tuple[float, float]:
    text = (await c.get("/metrics")).text
    return _counter(text, "prompt_tokens_computed"), _counter(text, "prompt_tokens_cached")


def _assert_turn_two_reused_turn_one(engine, reply: str, computed: float, cached: float) -> int:
    """The turn-2 prompt is turn 1's prompt + the reply's generated ids + the new text, and
    only the new text (and the reply's last token, if never computed) was computed."""
    p1 = engine.tokenizer.encode_chat(Q1, [])
    reply_ids = engine.engine.reply_tokens.lookup(reply)
    assert reply_ids is not None and engine.tokenizer.decode(reply_ids) == reply
    new_text = engine.tokenizer.encode_continuation(f"\n\n[Round 2]\n\n问：{Q2}\n\n答：")
    p2 = engine.encode_chat(Q2, [(Q1, reply)])
    assert p2 == p1 + reply_ids + new_text
    assert computed + cached == len(p2)
    assert computed <= len(new_text) + 1, (computed, len(new_text), len(p2))
    return len(p2)


async def test_second_turn_over_openai_reuses_the_first_reply_from_the_cache(
    make_app, engine_factory
):
    engine = engine_factory()
    app = make_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        # turn 1 streamed, as chat clients do; the client keeps the joined text
        turn1 = {"messages": [{"role": "user", "content": Q1}], "stream": True}
        r = await c.post("/v1/chat/completions", json={**turn1, "temperature": 0, "max_tokens": 40})
        chunks, done = sse_json(r.text)
        assert done
        reply = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
        assert reply
        before = await _prompt_token_counters(c)
        messages = [*turn1["messages"], {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": Q2})
        r = await c.post("/v1/chat/completions", json={"messages": messages, **GREEDY})
        assert r.status_code == 200, r.text
        after = await _prompt_token_counters(c)
        computed, cached = after[0] - before[0], after[1] - before[1]
        n = _assert_turn_two_reused_turn_one(engine, reply, computed, cached)
        assert r.json()["usage"]["prompt_tokens"] == n
        # a reply the client edited is encoded as text: the cache is left inside the reply
        edited = [*messages[:1], {"role": "assistant", "content": "Edited: " + reply}, messages[2]]
        before = await _prompt_token_counters(c)
        r = await c.post("/v1/chat/completions", json={"messages": edited, **GREEDY})
        assert r.status_code == 200, r.text
        ids = engine.tokenizer.encode_chat(Q2, [(Q1, "Edited: " + reply)])
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        after = await _prompt_token_counters(c)
        assert after[1] - before[1] <= len(engine.tokenizer.encode_chat(Q1, []))


async def test_second_turn_over_legacy_api_reuses_the_first_reply_from_the_cache(
    make_app, engine_factory
):
    engine = engine_factory()
    app = make_app(engine)
    p1 = engine.tokenizer.encode_chat(Q1, [])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.post("/", json={"prompt": Q1, "history": [], "max_length": len(p1) + 40})
        assert r.status_code == 200, r.text
        history = r.json()["history"]
        reply = history[0][1]  # as the seed returns it: stripped
        assert reply
        before = engine.stats()
        r = await c.post("/", json={"prompt": Q2, "history": history, "max_length": 250})
        assert r.status_code == 200, r.text
        after = engine.stats()
    _assert_turn_two_reused_turn_one(
        engine,
        reply,
        after.prompt_tokens_computed - before.prompt_tokens_computed,
        after.prompt_tokens_cached - before.prompt_tokens_cached,
    )


async def test_legacy_bad_body(client):
    assert_openai_error(await client.post("/", json={"history": []}), 400)
    assert_openai_error(await client.post("/", json={"prompt": "x", "history": [["a"]]}), 400)


# --- ops -----------------------------------------------------------------------------------------


async def test_cors_preflight_and_headers(make_app):
    app = make_app(cors_origins=["http://chat.example"], api_keys=["sk-k"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.options(
            "/v1/chat/completions",
            headers={
                "Origin": "http://chat.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://chat.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = await c.post(
            "/v1/chat/completions",
            json={"messages": USER, "max_tokens": 2},
            headers={"Origin": "http://chat.example", "Authorization": "Bearer sk-k"},
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://chat.example"
        r = await c.options(
            "/v1/chat/completions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in r.headers


async def test_request_id(client):
    r = await client.get("/v1/models", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await client.get("/v1/nope", headers={"x-request-id": "bad id\twith junk"})
    assert r.status_code == 404 and r.headers["x-request-id"] not in ("", "bad id\twith junk")


async def test_metrics(client):
    await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
    await client.get("/v1/nope")
    text = (await client.get("/metrics")).text
    assert (
        'chatglm_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}'
        in text
    )
    assert 'route="unmatched",status="404"' in text
    for name in (
        "chatglm_requests_waiting",
        "chatglm_requests_running",
        "chatglm_kv_cache_usage_ratio",
        "chatglm_generation_tokens_total",
        "chatglm_time_to_first_token_seconds_count",
        "chatglm_inter_token_latency_seconds_count",
    ):
        assert name in text, name
    ttft = next(
        ln for ln in text.splitlines() if ln.startswith("chatglm_time_to_first_token_seconds_count")
    )
    assert float(ttft.split()[-1]) >= 1


async def test_root_points_to_docs_when_no_page(make_app):
    app = make_app(web_ui=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.get("/", headers={"accept": "text/html"})
        assert r.status_code == 200 and r.json()["docs"] == "/docs"
        assert (await c.get("/docs")).status_code == 200
        assert "/v1/chat/completions" in (await c.get("/openapi.json")).json()["paths"]


async def test_error_after_the_stream_started_is_an_error_chunk_then_done(make_app, engine_factory):
    """A forward pass that fails mid-stream (made to fail here: the real engine never does so on
    demand) reaches the client as an error event and [DONE], and the server keeps serving."""
    engine = engine_factory()
    fail_step(engine.engine.runner, at=5)
    app = make_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"messages": USER, "stream": True, "ignore_eos": True, "max_tokens": 50},
        )
        assert r.status_code == 200
        chunks, done = sse_json(r.text)
        assert done
        assert any(c.get("choices") and c["choices"][0]["delta"].get("content") for c in chunks)
        err = chunks[-1]["error"]
        assert err["code"] == "internal_error" and err["type"]
        r = await c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3})
        assert r.status_code == 200
    await asyncio.to_thread(wait_idle, engine)
