"""The app factory: routes, middleware, error shapes, and the model's life (lifespan)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.middleware.cors import CORSMiddleware

from chatglm_serve.server.auth import ApiKeyAuth
from chatglm_serve.server.errors import install_error_handlers
from chatglm_serve.server.metrics import Metrics
from chatglm_serve.server.middleware import (
    BodyLimitMiddleware,
    JsonBodyMiddleware,
    RequestContextMiddleware,
)
from chatglm_serve.server.routes_completions import build_completions_router
from chatglm_serve.server.routes_legacy import build_legacy_router
from chatglm_serve.server.routes_openai import build_openai_router
from chatglm_serve.server.routes_web import index_response, make_web_router
from chatglm_serve.server.settings import Settings, engine_args, load_settings
from chatglm_serve.server.state import ServerState

if TYPE_CHECKING:
    from chatglm_serve.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)

VERSION = "0.1.0"


def load_engine(settings: Settings) -> AsyncEngine:
    """Load the model and start the engine (blocking; minutes for a real checkpoint)."""
    from chatglm_serve.engine.async_engine import AsyncEngine

    return AsyncEngine.from_args(engine_args(settings))


def adopt_model_name(settings: Settings, engine: AsyncEngine) -> None:
    """Answer as the checkpoint's detected family member (glm-4-9b-chat, chatglm3-6b-32k...)
    unless a served name was set explicitly (--served-model-name)."""
    member = getattr(engine, "model_member", None)
    if member and "served_model_name" not in settings.model_fields_set:
        settings.served_model_name = member


def describe(engine: AsyncEngine, settings: Settings, seconds: float) -> str:
    """The start-up line: what was loaded, where, how big, and the KV capacity."""
    parts = [
        f"model {settings.model or '(embedded demo)'} served as {settings.served_model_name!r}"
    ]
    summary = getattr(engine, "model_summary", None)
    if summary is not None:
        parts.append(summary.line())
    parts.append(
        f"KV cache {getattr(engine, 'kv_capacity_tokens', '?')} tokens, "
        f"max_model_len {engine.max_model_len}, "
        f"up to {getattr(engine, 'max_concurrent_seqs', '?')} concurrent sequences"
    )
    parts.append(f"loaded in {seconds:.1f}s")
    return "; ".join(parts)


def create_app(
    settings: Settings | None = None,
    engine: AsyncEngine | None = None,
    *,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """An app serving `engine`, or the model `settings` names (loaded once, at start-up).

    The load runs in a thread started by the lifespan, so the port is open at once and /health
    answers 503 until the model is in. `on_fatal` is told if the load fails (the CLI exits).
    """
    settings = settings or load_settings()
    if engine is not None:
        adopt_model_name(settings, engine)
    state = ServerState(settings=settings, engine=engine)
    metrics = Metrics(lambda: state.engine.stats() if state.engine is not None else None)
    auth = ApiKeyAuth(settings.api_key_values())

    async def load() -> None:
        start = time.perf_counter()
        try:
            loaded = await asyncio.to_thread(load_engine, settings)
        except Exception as e:
            state.load_error = f"{type(e).__name__}: {e}"
            log.error("model load failed: %s", state.load_error, exc_info=True)
            if on_fatal is not None:
                on_fatal(e)
            return
        loaded.start()
        adopt_model_name(settings, loaded)
        state.engine, state.owns_engine = loaded, True
        log.info("ready: %s", describe(loaded, settings, time.perf_counter() - start))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader: asyncio.Task | None = None
        if state.engine is None:
            loader = asyncio.create_task(load())
        else:
            state.engine.start()
        try:
            yield
        finally:
            state.draining = True
            if loader is not None and not loader.done():
                log.info("shutdown during model load: waiting for the load to end")
                await asyncio.shield(loader)
            if state.owns_engine and state.engine is not None:
                await state.engine.shutdown(timeout=settings.shutdown_timeout)

    app = FastAPI(
        title="chatglm-serve",
        version=VERSION,
        description="ChatGLM2 behind an OpenAI-compatible API (and the seed's legacy POST /).",
        lifespan=lifespan,
    )
    app.state.server = state
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(build_openai_router(state, metrics, auth))
    app.include_router(build_completions_router(state, metrics, auth))
    app.include_router(build_legacy_router(state, auth))

    @app.get("/health", tags=["ops"])
    async def health() -> dict:
        state.ready_engine()  # 503 while loading, after a failed load, or when shutting down
        return {"status": "ok", "model": settings.served_model_name}

    metrics_deps = [] if settings.metrics_public else [Depends(auth)]

    @app.get("/metrics", tags=["ops"], dependencies=metrics_deps, response_class=PlainTextResponse)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # GET /: the web chat page for a browser when web_ui is on and the page is installed
    # (server/routes_web.py), else a JSON pointer to /docs. POST / is the legacy API above.
    app.include_router(make_web_router(settings, serve_index=False))

    @app.get("/", include_in_schema=False)
    async def root(request: Request) -> Response:
        return index_response(request, settings.web_ui)

    # Outermost last: request id (on every answer) > CORS (preflights) > body size > JSON body.
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id"],
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    app.openapi = _documenting_our_400(app.openapi)
    return app


def _documenting_our_400(generate: Callable[[], dict]) -> Callable[[], dict]:
    """FastAPI documents invalid requests as 422 {"detail": [...]}; the error handlers answer 400
    in OpenAI's shape, so the schema says that (clients and schema fuzzers read it)."""
    fixed = False

    def openapi() -> dict:
        nonlocal fixed
        schema = generate()  # built once, then cached by FastAPI
        if not fixed:
            error = {"$ref": "#/components/schemas/ErrorResponse"}
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    responses = op.get("responses", {})
                    if responses.pop("422", None) is not None:
                        responses.setdefault(
                            "400",
                            {
                                "description": "Invalid request",
                                "content": {"application/json": {"schema": error}},
                            },
                        )
            components = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            fixed = True
        return schema

    return openapi
