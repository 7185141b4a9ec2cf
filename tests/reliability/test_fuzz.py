"""Bad input never hurts the daemon: schemathesis over its own OpenAPI schema, then hand-written
malformed bodies, all against the real daemon on 127.0.0.1. Every answer is a 4xx in OpenAI's
error shape or a valid response; there is no 5xx; afterwards the daemon is healthy and idle.

The long run of the same fuzzer: bench/fuzz_long.py.
"""

from __future__ import annotations

import json

import httpx
import pytest

from chatglm_serve.server.app import create_app
from tests.reliability.conftest import USER, assert_error, error_of
from tests.reliability.fuzzing import fuzz
from tests.server.conftest import LiveServer, settings, wait_idle

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 128
# Per operation and mode (positive, negative): ~300 requests, ~20 s on 2 cores.
EXAMPLES = 60


@pytest.fixture(scope="module")
def fuzzed(engine_factory):
    engine = engine_factory(max_num_seqs=16, max_model_len=CONTEXT, kv_cache_tokens=64 * CONTEXT)
    with LiveServer(create_app(settings(api_keys=[KEY]), engine=engine)) as server:
        yield server, engine


def assert_healthy(server: LiveServer, engine) -> None:
    """Health answers, a normal request is served, and the engine holds nothing."""
    wait_idle(engine, timeout=30)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
    wait_idle(engine, timeout=30)


def test_schemathesis_finds_no_5xx_and_no_broken_answer(fuzzed):
    server, engine = fuzzed
    result = fuzz(server.url, max_examples=EXAMPLES, headers=AUTH, seed=0)
    print(result.summary())  # the figures, for -s runs and the README
    assert not result.problems, "\n\n".join(result.problems[:10])
    assert result.server_errors == 0
    # every operation of the schema was exercised, the legacy POST / among them
    ops = set(result.per_operation)
    assert {"POST /", "POST /v1/chat/completions", "GET /v1/models", "GET /health"} <= ops
    assert result.per_operation["POST /v1/chat/completions"] >= EXAMPLES
    # both kinds of answer were seen: the fuzzer got past validation, and was refused too
    assert result.statuses[200] > 0 and result.statuses[400] > 0
    assert_healthy(server, engine)


def _chat(**fields) -> bytes:
    return json.dumps({"messages": USER, **fields}).encode()


U = json.dumps(USER[0]).encode()
MB = 1 << 20
OK = 200

# (name, path, raw body, status): raw bytes, so invalid JSON and invalid UTF-8 can be sent.
MALFORMED = [
    # not JSON, or not an object
    ("invalid json", "/v1/chat/completions", b"{not json", 400),
    ("truncated json", "/v1/chat/completions", b'{"messages": [' + U, 400),
    ("empty body", "/v1/chat/completions", b"", 400),
    ("array body", "/v1/chat/completions", b"[]", 400),
    ("null body", "/v1/chat/completions", b"null", 400),
    ("string body", "/v1/chat/completions", b'"hello"', 400),
    ("deeply nested", "/v1/chat/completions", b'{"messages":' + b"[" * 100_000, 400),
    ("NaN", "/v1/chat/completions", b'{"messages":[' + U + b'],"temperature":NaN}', 400),
    ("Infinity", "/v1/chat/completions", b'{"messages":[' + U + b'],"top_p":Infinity}', 400),
    # wrong types
    ("messages a string", "/v1/chat/completions", b'{"messages":"hi"}', 400),
    ("message a number", "/v1/chat/completions", b'{"messages":[1]}', 400),
    ("content a number", "/v1/chat/completions", b'{"messages":[{"role":"user","content":5}]}', 400),
    ("content an object", "/v1/chat/completions", b'{"messages":[{"role":"user","content":{}}]}', 400),
    ("text part no text", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400),
    ("image part", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400),
    ("temperature a string", "/v1/chat/completions", _chat(temperature="warm"), 400),
    ("stream a string", "/v1/chat/completions", _chat(stream="sometimes"), 400),
    ("stop a number", "/v1/chat/completions", _chat(stop=5), 400),
    ("too many stops", "/v1/chat/completions", _chat(stop=["a"] * 17), 400),
    ("fractional max_tokens", "/v1/chat/completions", _chat(max_tokens=2.5), 400),
    ("stop_token_ids strings", "/v1/chat/completions", _chat(stop_token_ids=["a"]), 400),
    # huge numbers
    ("max_tokens 1e400", "/v1/chat/completions", b'{"messages":[' + U + b'],"max_tokens":1e400}', 400),
    ("max_tokens 5000 digits", "/v1/chat/completions", b'{"messages":[' + U + b'],"max_tokens":' + b"9" * 5000 + b"}", 400),
    ("seed 2**64", "/v1/chat/completions", _chat(seed=2**64, max_tokens=2), 400),
    ("seed -2**63-1", "/v1/chat/completions", _chat(seed=-(2**63) - 1, max_tokens=2), 400),
    ("n 10**30", "/v1/chat/completions", _chat(n=10**30), 400),
    ("temperature 1e308", "/v1/chat/completions", _chat(temperature=1e308), 400),
    ("presence_penalty -1e308", "/v1/chat/completions", _chat(presence_penalty=-1e308), 400),
    ("top_logprobs 10**9", "/v1/chat/completions", _chat(logprobs=True, top_logprobs=10**9), 400),
    # ...and the huge numbers that are fine: clipped to the context, or harmless
    ("max_tokens 10**30", "/v1/chat/completions", _chat(max_tokens=10**30, temperature=0), OK),
    ("max_length 10**30", "/v1/chat/completions", _chat(max_length=10**30, temperature=0), OK),
    ("seed 2**63-1, n 16", "/v1/chat/completions", _chat(seed=2**63 - 1, n=16, max_tokens=2), OK),
    ("top_k 2**70", "/v1/chat/completions", _chat(top_k=2**70, max_tokens=2), OK),
    ("stop_token_ids 2**70", "/v1/chat/completions", _chat(stop_token_ids=[2**70, -(2**70)], max_tokens=2), OK),
    ("repetition_penalty 1e308", "/v1/chat/completions", _chat(repetition_penalty=1e308, max_tokens=2), OK),
    ("min_tokens 10**30", "/v1/chat/completions", _chat(min_tokens=10**30, ignore_eos=True), OK),
    # negative or zero lengths
    ("max_tokens -1", "/v1/chat/completions", _chat(max_tokens=-1), 400),
    ("max_tokens 0", "/v1/chat/completions", _chat(max_tokens=0), 400),
    ("max_completion_tokens -5", "/v1/chat/completions", _chat(max_completion_tokens=-5), 400),
    ("max_length -1", "/v1/chat/completions", _chat(max_length=-1), 400),
    ("min_tokens -1", "/v1/chat/completions", _chat(min_tokens=-1), 400),
    ("n 0", "/v1/chat/completions", _chat(n=0), 400),
    # empty or odd conversations
    ("empty messages", "/v1/chat/completions", _chat(messages=[]), 400),
    ("no messages", "/v1/chat/completions", b"{}", 400),
    ("message without role", "/v1/chat/completions", _chat(messages=[{"content": "x"}]), 400),
    ("only a system message", "/v1/chat/completions", _chat(messages=[{"role": "system", "content": "x"}]), 400),
    ("last message assistant", "/v1/chat/completions", _chat(messages=[*USER, {"role": "assistant", "content": "x"}]), 400),
    ("empty content", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": ""}], max_tokens=2), OK),
    ("null content", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": None}], max_tokens=2), OK),
    # unknown roles
    ("role wizard", "/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "x"}]), 400),
    ("role tool", "/v1/chat/completions", _chat(messages=[{"role": "tool", "content": "x"}]), 400),
    ("role null", "/v1/chat/completions", _chat(messages=[{"role": None, "content": "x"}]), 400),
    # 1 MB strings
    ("1 MB content", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "字" * MB}]), 400),
    ("1 MB content streamed", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "ab " * (MB // 3)}], stream=True), 400),
    ("1 MB stop string", "/v1/chat/completions", _chat(stop=["x" * MB], max_tokens=8), OK),
    ("1 MB model name", "/v1/chat/completions", _chat(model="m" * MB, max_tokens=2), OK),
    ("1 MB user field", "/v1/chat/completions", _chat(user="u" * MB, max_tokens=2), OK),
    # invalid UTF-8 and invalid Unicode
    ("invalid UTF-8", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"\xff\xfe"}]}', 400),
    ("overlong UTF-8", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"\xc0\xaf"}]}', 400),
    ("UTF-8 encoded surrogate", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"\xed\xa0\x80"}]}', 400),
    ("escaped lone surrogate", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"a\\ud800b"}]}', 400),
    ("lone surrogate in a text part", "/v1/chat/completions", b'{"messages":[{"role":"user","content":[{"type":"text","text":"\\udfff"}]}]}', 400),
    ("lone surrogate in a stop string", "/v1/chat/completions", _chat(stop="\ud800", max_tokens=4), OK),
    ("NUL in content", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "a\x00b"}], max_tokens=2), OK),
    # the seed's legacy API
    ("legacy: no prompt", "/", b'{"history":[]}', 400),
    ("legacy: prompt a number", "/", b'{"prompt":5}', 400),
    ("legacy: history a string", "/", b'{"prompt":"x","history":"x"}', 400),
    ("legacy: half a turn", "/", b'{"prompt":"x","history":[["a"]]}', 400),
    ("legacy: max_length -1", "/", b'{"prompt":"x","max_length":-1}', 400),
    ("legacy: max_length 1e400", "/", b'{"prompt":"x","max_length":1e400}', 400),
    ("legacy: temperature 3", "/", b'{"prompt":"x","temperature":3}', 400),
    ("legacy: top_p NaN", "/", b'{"prompt":"x","top_p":NaN}', 400),
    ("legacy: 1 MB prompt", "/", json.dumps({"prompt": "字" * MB}).encode(), 400),
    ("legacy: lone surrogate", "/", b'{"prompt":"\\ud800"}', 400),
    ("legacy: lone surrogate in history", "/", b'{"prompt":"x","history":[["\\udc00","y"]]}', 400),
    ("legacy: invalid UTF-8", "/", b'{"prompt":"\xff"}', 400),
    ("legacy: invalid json", "/", b"{prompt", 400),
    ("legacy: max_length 10**30", "/", b'{"prompt":"x","max_length":' + b"1" + b"0" * 30 + b"}", OK),
]  # fmt: skip


@pytest.mark.parametrize("name,path,body,status", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_body(fuzzed, name, path, body, status):
    server, _ = fuzzed
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(server.url + path, content=body, headers=headers, timeout=60)
    if status == OK:
        assert r.status_code == 200, r.text[:300]
        if path == "/":
            assert isinstance(r.json()["response"], str)
        else:
            assert r.json()["object"] == "chat.completion"
    else:
        err = assert_error(r, status)
        assert err["type"] == "invalid_request_error"


def test_prompt_too_long_names_both_lengths_even_for_1mb(fuzzed):
    server, engine = fuzzed
    body = _chat(messages=[{"role": "user", "content": "字" * MB}])
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers=AUTH, timeout=60)
    err = assert_error(r, 400, "context_length_exceeded")
    n = len(engine.tokenizer.encode_chat("字" * MB, []))
    assert str(CONTEXT) in err["message"] and str(n) in err["message"]


def test_odd_paths_and_methods_are_4xx_in_the_error_shape(fuzzed):
    server, _ = fuzzed
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        for path in ("/v1/models/%ff", "/v1/models/%00", "/v1/models/" + "a" * 10_000):
            assert_error(c.get(path), 404, "model_not_found")
        for path in ("/static/..%2F..%2Fetc%2Fpasswd", "/v1/nothing", "/%ED%A0%80"):
            assert_error(c.get(path), 404)
        for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
            assert_error(c.request(method, "/v1/chat/completions"), 405)
        # a multipart Content-Type is read as such, not as JSON: still a clean 400
        r = c.post(
            "/v1/chat/completions",
            content=b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nb\r\n--x--\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        )
        error_of(r)
        assert r.status_code == 400


def test_daemon_healthy_after_the_abuse(fuzzed):
    assert_healthy(*fuzzed)
