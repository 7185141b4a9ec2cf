"""The built-in chat page: `GET /` for a browser, its two assets under `/static/`.

The files ship inside the package (server/static/) and are read with importlib.resources, so an
installed wheel serves them with no build step and nothing fetched from elsewhere. The page talks
only to /v1/chat/completions; it is public (it holds no data), and the API behind it keeps its own
authentication.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

# The only files served: a fixed map, so no request path ever reaches the filesystem.
_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Revalidate each load: a daemon upgrade must not leave a browser running an old page.
_NO_CACHE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def static_file(name: str) -> bytes | None:
    """A packaged page file's bytes, or None when it is not installed."""
    try:
        return (resources.files("chatglm_serve.server.static") / name).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def wants_html(request: Request) -> bool:
    """A browser navigation (Accept names text/html); API clients and curl get JSON instead."""
    return "text/html" in request.headers.get("accept", "").lower()


def index_pointer() -> JSONResponse:
    """What `GET /` answers a non-browser (or when the page is off)."""
    return JSONResponse(
        {
            "message": "chatglm-serve: OpenAI-compatible API under /v1 (POST /v1/chat/completions); "
            "the seed's API is POST /.",
            "docs": "/docs",
            "models": "/v1/models",
        }
    )


def index_response(request: Request, web_ui: bool) -> Response:
    """`GET /`: the chat page for a browser when enabled and installed, else the JSON pointer."""
    if web_ui and wants_html(request):
        page = static_file("index.html")
        if page is not None:
            return Response(page, media_type="text/html; charset=utf-8", headers=_NO_CACHE)
    return index_pointer()


def make_web_router(web_ui: bool, *, serve_index: bool = True) -> APIRouter:
    """Routes of the page. serve_index=False when the app answers `GET /` itself (it calls
    index_response); the assets are served either way, and only while the page is on."""
    router = APIRouter(include_in_schema=False)

    if serve_index:

        @router.get("/")
        async def index(request: Request) -> Response:
            return index_response(request, web_ui)

    @router.get("/static/{name}")
    async def asset(name: str) -> Response:
        media_type = _ASSETS.get(name)
        body = static_file(name) if web_ui and media_type else None
        if body is None:
            return JSONResponse(
                {
                    "error": {
                        "message": f"No such file: /static/{name}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "not_found",
                    }
                },
                status_code=404,
            )
        return Response(body, media_type=media_type, headers=_NO_CACHE)

    return router
