"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers and breaks streaming/disconnects)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatglm_serve.server.errors import APIError
from chatglm_serve.server.metrics import Metrics

log = logging.getLogger("chatglm_serve.server.access")

_QUIET_PATHS = frozenset({"/health", "/metrics"})
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id(scope: Scope) -> str:
    """The id given to this request by RequestContextMiddleware."""
    return scope.get("state", {}).get("request_id") or uuid.uuid4().hex


class RequestContextMiddleware:
    """x-request-id (the client's when sane, else a new one) on the response and in the access
    log line, and the per-route request counter."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                given = v.decode("latin-1")
                break
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(scope["method"], label, str(status)).inc()
            # Probes (/health every few seconds, /metrics scrapes) only at debug level.
            level = logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO
            log.log(
                level,
                "%s %s %s %d %.1fms",
                rid,
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - start) * 1000,
            )


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body exceeds the limit of {limit} bytes.")


class BodyLimitMiddleware:
    """Refuse bodies over `limit` bytes: early from Content-Length, else (a chunked body with no
    Content-Length, as ChatGPT-Next-Web's proxy sends) by counting as the body streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_413(send, self.limit)
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _send_413(send, self.limit)


async def _send_413(send: Send, limit: int) -> None:
    err = APIError(
        413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large"
    )
    body = json.dumps(err.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class JsonBodyMiddleware:
    """Read every POST body as JSON, whatever its Content-Type says (as the seed's api.py did with
    request.json()): `curl -d '{...}'` sends form-urlencoded, some proxies send none at all."""

    _AS_IS = (b"application/json", b"multipart/")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
            given = next((v for k, v in scope.get("headers", []) if k == b"content-type"), b"")
            if not given.lower().startswith(self._AS_IS) and not given.lower().endswith(b"+json"):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
