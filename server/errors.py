"""Every error leaves as OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Clients (openai-python first) retry 408/409/429/5xx, so the status code is part of the contract:
bad input is always a 4xx (a retried 5xx would generate twice), overload is 429 and not-ready is
503, both with Retry-After.
"""

from __future__ import annotations

import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatglm_serve.engine.types import EngineError, EngineOverloadedError, PromptTooLongError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to answer with; raised anywhere in a request's handling."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.retry_after = retry_after

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def from_engine_error(e: EngineError) -> APIError:
    """The HTTP meaning of an engine refusal."""
    if isinstance(e, EngineOverloadedError):
        return APIError(429, e.message, code=e.code, retry_after=e.retry_after)
    if isinstance(e, PromptTooLongError):
        return APIError(400, e.message, code=e.code, param=e.param or "messages")
    if e.code == "internal_error":  # a failed forward pass: our fault, not the request's
        return APIError(500, e.message, code=e.code)
    if e.code in ("shutting_down", "unavailable", "not_ready"):
        return APIError(503, e.message, code=e.code, retry_after=5)
    return APIError(400, e.message, code=e.code, param=e.param)


def not_ready(reason: str = "The model is still loading; retry shortly.") -> APIError:
    return APIError(503, reason, code="not_ready", retry_after=5)


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down.", code="shutting_down", retry_after=5)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {first.get('msg', '')}".strip(), None
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        text = f"Missing required parameter: {param!r}." if param else "Missing request body."
    else:
        text = f"Invalid value for {param!r}: {msg}." if param else f"Invalid request: {msg}."
    if len(errors) > 1:
        text += f" ({len(errors) - 1} more error(s))"
    return text, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, code="invalid_value", param=param).response()

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        return from_engine_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
            code = "not_found"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
            code = "method_not_allowed"
        elif exc.status_code == 413:
            message, code = str(exc.detail), "request_too_large"
        else:
            message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
            code = None
        err = APIError(exc.status_code, message, code=code)
        return JSONResponse(
            err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, "Internal server error.", code="internal_error").response()
