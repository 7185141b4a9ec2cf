"""Optional API keys: `Authorization: Bearer KEY`, compared in constant time, never logged."""

from __future__ import annotations

import hmac

from fastapi import Request

from chatglm_serve.server.errors import APIError


class ApiKeyAuth:
    """A FastAPI dependency; with no keys configured every request passes."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def accepts(self, authorization: str | None) -> bool:
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        # Compare against every key, without stopping at a match, so timing says nothing of which.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        return ok

    async def __call__(self, request: Request) -> None:
        if not self.accepts(request.headers.get("authorization")):
            raise APIError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
