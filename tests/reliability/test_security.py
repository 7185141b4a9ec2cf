"""Nobody gets in uninvited: with API keys configured every route but the public ones refuses a
missing or wrong key (401, OpenAI's error shape); keys are compared in constant time and never
logged; bodies are size-limited (413); CORS answers only the configured origins.
"""

from __future__ import annotations

import hmac
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from chatglm_serve.server.app import create_app
from tests.reliability.conftest import USER, assert_error, settings

KEYS = ["sk-first-9f8e7d6c5b4a", "sk-second-0a1b2c3d4e5f"]
WRONG = [
    None,  # no Authorization header
    "Bearer",
    "Bearer sk-wrong-1234567890",
    f"Bearer {KEYS[0]}x",  # one character more
    f"Bearer {KEYS[0][:-1]}",  # one character less
    f"Bearer {KEYS[0].upper()}",
    f"Basic {KEYS[0]}",
    KEYS[0],  # no scheme
]
# Reachable without a key: the probe, the page a browser loads before it has a key (and its
# /info: the served name, demo or not), the docs.
PUBLIC = {
    (path, "GET")
    for path in ("/health", "/", "/static/{name}", "/info", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
}  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]


def all_routes(routes):
    """(path, method) of every route, through included routers (kept nested by newer FastAPI)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from all_routes(inner.routes)
            continue
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                yield route.path, method


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "x", path)


@pytest.mark.parametrize("metrics_public", [False, True])
def test_every_route_but_the_public_ones_needs_a_key(daemon, metrics_public):
    server = daemon(api_keys=KEYS, metrics_public=metrics_public)
    app = server.server.config.app
    routes = sorted(set(all_routes(app.routes)))
    public = PUBLIC | ({("/metrics", "GET")} if metrics_public else set())
    guarded = [(p, m) for p, m in routes if (p, m) not in public]
    assert {("/v1/chat/completions", "POST"), ("/", "POST"), ("/v1/models", "GET")} <= set(guarded)
    assert (("/metrics", "GET") in guarded) is not metrics_public
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path, method in guarded:
            body = {"messages": USER, "max_tokens": 1} if method == "POST" else None
            for auth in WRONG:
                headers = {} if auth is None else {"Authorization": auth}
                r = c.request(method, concrete(path), json=body, headers=headers)
                err = assert_error(r, 401, "invalid_api_key")
                assert not any(k in err["message"] or k in str(r.headers) for k in KEYS)
            for key in KEYS:  # each configured key opens it
                r = c.request(method, concrete(path), json=body, headers=bearer(key))
                assert r.status_code != 401, (path, method, r.text)
        for path, _ in public:
            if "{" not in path:
                assert c.get(path).status_code == 200, path


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_compared_in_constant_time_against_every_key(daemon, monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("chatglm_serve.server.auth.hmac.compare_digest", spy)
    server = daemon(api_keys=KEYS)
    for given, status in ((KEYS[0], 200), (KEYS[1], 200), ("sk-wrong", 401)):
        calls.clear()
        r = httpx.get(server.url + "/v1/models", headers=bearer(given), timeout=10)
        assert r.status_code == status
        # every configured key was compared by hmac.compare_digest, even after a match
        assert sorted(calls) == sorted((given.encode(), k.encode()) for k in KEYS)


def test_keys_never_reach_the_logs(tmp_path):
    """The real daemon (CLI, debug logging) serves requests with right and wrong keys; neither
    appears anywhere in what it writes, from start-up to shutdown."""
    wrong = "sk-wrong-abcdef123456"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CHATGLM_API_KEYS": KEYS[0],  # one from the environment, one from a flag
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path / "daemon.log"
    cmd = [sys.executable, "-m", "chatglm_serve", "serve", "--port", "0", "--api-key", KEYS[1]]
    cmd += ["--log-level", "debug", "--max-model-len", "128", "--kv-cache-tokens", "2048"]
    cmd += ["--max-body-bytes", "4096"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = wait_for_url(log, proc)
            with httpx.Client(base_url=url, timeout=30) as c:
                chat = {"messages": USER, "max_tokens": 4}
                for key in (*KEYS, wrong):
                    h = bearer(key)
                    c.post("/v1/chat/completions", json=chat, headers=h)
                    c.post("/v1/chat/completions", json={**chat, "stream": True}, headers=h)
                    c.post("/v1/chat/completions", json={"messages": []}, headers=h)  # 400
                    c.post("/v1/chat/completions", content=b"x" * 10_000, headers=h)  # 413
                    c.post("/", json={"prompt": "hi", "max_length": 20}, headers=h)
                    c.get("/v1/models", headers=h)
                    c.get("/metrics", headers=h)
                    c.get("/health", headers={**h, "x-request-id": "probe-1"})
                    c.get("/v1/models", headers={"Authorization": key})  # no scheme: 401
                    c.get("/nowhere", headers=h)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "POST /v1/chat/completions 200" in text and "probe-1" in text  # it did log requests
    for secret in (*KEYS, wrong):
        assert secret not in text
        assert secret[3:] not in text  # not even without its prefix


def wait_for_url(log: Path, proc: subprocess.Popen) -> str:
    """The daemon's address, from uvicorn's start-up line (port 0: the OS picked one)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        text = log.read_text(encoding="utf-8", errors="replace")
        m = re.search(r"running on (http://127\.0\.0\.1:\d+)", text, re.IGNORECASE)
        if m and "ready:" in text:
            return m.group(1)
        time.sleep(0.1)
    raise AssertionError(f"daemon did not start:\n{log.read_text()}")


def test_request_bodies_are_size_limited(daemon):
    limit = 4096
    server = daemon(api_keys=KEYS, max_body_bytes=limit)
    with httpx.Client(base_url=server.url, headers=bearer(KEYS[0]), timeout=30) as c:
        big = b'{"messages": [{"role": "user", "content": "' + b"x" * limit + b'"}]}'
        for path in ("/v1/chat/completions", "/"):
            err = assert_error(c.post(path, content=big), 413, "request_too_large")
            assert str(limit) in err["message"]

            def chunks():  # no Content-Length: counted as it streams in
                for i in range(0, len(big), 512):
                    yield big[i : i + 512]

            assert_error(c.post(path, content=chunks()), 413, "request_too_large")
        # a body just under the limit is read (and refused for what it says, not its size)
        fits = b'{"messages": [{"role": "user", "content": "' + b"x" * (limit - 100) + b'"}]}'
        assert_error(c.post("/v1/chat/completions", content=fits), 400, "context_length_exceeded")
        # a 413 needs no key: the size is checked before anything reads the body
        r = httpx.post(server.url + "/v1/chat/completions", content=big, timeout=30)
        assert_error(r, 413)
        assert c.get("/health").status_code == 200


ALLOWED = "http://chat.example"


def preflight(c: httpx.Client, origin: str) -> httpx.Response:
    return c.options(
        "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )


def test_cors_answers_only_the_configured_origins(daemon):
    server = daemon(api_keys=KEYS, cors_origins=[ALLOWED])
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = preflight(c, ALLOWED)  # a browser's preflight carries no key
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ALLOWED
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        for evil in ("http://evil.example", "http://chat.example.evil.example", "null"):
            r = preflight(c, evil)
            assert r.status_code >= 400
            assert "access-control-allow-origin" not in r.headers
        body = {"messages": USER, "max_tokens": 2}
        r = c.post(
            "/v1/chat/completions", json=body, headers={"Origin": ALLOWED, **bearer(KEYS[0])}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
        r = c.post(
            "/v1/chat/completions",
            json=body,
            headers={"Origin": "http://evil.example", **bearer(KEYS[0])},
        )
        assert "access-control-allow-origin" not in r.headers  # the browser withholds it
        # CORS never stands in for the key
        r = c.post("/v1/chat/completions", json=body, headers={"Origin": ALLOWED})
        assert_error(r, 401, "invalid_api_key")


def test_no_cors_unless_configured(daemon):
    server = daemon()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = preflight(c, ALLOWED)
        assert_error(r, 405)
        assert "access-control-allow-origin" not in r.headers
        r = c.get("/v1/models", headers={"Origin": ALLOWED})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_settings_never_show_a_key():
    s = settings(api_keys=KEYS)
    for text in (repr(s), str(s), s.model_dump_json()):
        assert not any(k in text for k in KEYS)
    app = create_app(s, engine=None)
    assert not any(k in str(app.openapi()) for k in KEYS)
