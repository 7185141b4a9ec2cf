"""Server test fixtures: the real engine on the embedded demo model, apps, and live servers.

Every endpoint test drives the real AsyncEngine (the demo ChatGLM2 checkpoint: 2 layers, random
weights, the real SentencePiece tokenizer and detokenizer), never a stand-in.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import uvicorn

from chatglm_serve.engine.async_engine import AsyncEngine
from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.model.loader import load_model_and_tokenizer
from chatglm_serve.server.app import create_app
from chatglm_serve.server.settings import Settings, load_settings

# Small context so "max_tokens past the context" and "no max_tokens" runs are quick.
MAX_MODEL_LEN = 256


@pytest.fixture(scope="session")
def model_and_tokenizer():
    return load_model_and_tokenizer(None, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def engine_factory(model_and_tokenizer) -> Iterator[Callable[..., AsyncEngine]]:
    """AsyncEngines sharing the demo model (each with its own KV cache), shut down at the end."""
    made: list[AsyncEngine] = []
    model, tokenizer = model_and_tokenizer

    def make(**config) -> AsyncEngine:
        base = dict(
            max_num_seqs=32, kv_cache_tokens=32 * MAX_MODEL_LEN, max_model_len=MAX_MODEL_LEN
        )
        base.update(config)
        engine = AsyncEngine(model, tokenizer, EngineConfig(**base))
        engine.start()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        asyncio.run(engine.shutdown(timeout=2))


@pytest.fixture(scope="session")
def engine(engine_factory) -> AsyncEngine:
    return engine_factory()


def settings(**values) -> Settings:
    return load_settings(values, environ={})


@pytest.fixture
def make_app(engine):
    def make(engine_=None, **values):
        return create_app(settings(**values), engine=engine_ or engine)

    return make


@pytest.fixture
async def client(make_app):
    app = make_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
        yield c


def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Until the engine holds no request and no KV block (or fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order (comments and blank lines skipped)."""
    return [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]


def sse_json(text: str) -> tuple[list[dict], bool]:
    """(parsed chunks, whether [DONE] ended it)."""
    events = sse_events(text)
    done = bool(events) and events[-1] == "[DONE]"
    return [json.loads(e) for e in events if e != "[DONE]"], done


class LiveServer:
    """The app under a real uvicorn on 127.0.0.1 (a socket bound here, so no port race)."""

    def __init__(self, app) -> None:
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so; without it
        # every keep-alive answer waits 40 ms for the client's delayed ACK (Nagle).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", log_config=None, lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture
def live(make_app):
    """Start live servers of apps made with make_app(**settings); stopped after the test."""
    servers: list[LiveServer] = []

    def start(engine_=None, **values) -> LiveServer:
        server = LiveServer(make_app(engine_, **values)).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)
