"""Reliability fixtures: the real daemon (uvicorn on 127.0.0.1) over the real engine on the demo
model, sized small so abuse (fuzzing, overload, disconnect storms) stays fast on 2 CPU cores.

The server tests' fixtures are reused as they are (imported here, so pytest registers them for
this directory too).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import pytest

from chatglm_serve.server.app import create_app
from tests.server.conftest import (  # noqa: F401  (fixtures, registered by import)
    LiveServer,
    engine_factory,
    model_and_tokenizer,
    settings,
    wait_idle,
)

USER = [{"role": "user", "content": "你好，请介绍一下你自己"}]
ERROR_KEYS = {"message", "type", "param", "code"}


def error_of(r: httpx.Response) -> dict:
    """The OpenAI error object of a 4xx/5xx answer (fails if the body is not that shape)."""
    try:
        body = r.json()
    except json.JSONDecodeError as e:
        raise AssertionError(f"{r.status_code} body is not JSON: {r.text[:200]!r}") from e
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    return err


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = error_of(r)
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture
def daemon(engine_factory) -> Iterator[Callable[..., LiveServer]]:  # noqa: F811
    """Start live daemons: daemon(engine=None, **settings); stopped after the test."""
    servers: list[LiveServer] = []

    def start(engine=None, **values) -> LiveServer:
        server = LiveServer(create_app(settings(**values), engine=engine or engine_factory()))
        servers.append(server.__enter__())
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)
