"""The built-in chat page: `GET /` for a browser, its assets under `/static/`, and `GET /info`.

The files ship inside the package (server/static/) and are read with importlib.resources, so an
installed wheel serves them with no build step and nothing fetched from elsewhere (marked and
DOMPurify are vendored there, see server/static/VENDORED.txt). The page talks to
/v1/chat/completions and /v1/models; it is public (it holds no data), and the API behind it keeps
its own authentication. `GET /info` is public too: what the page shows before any key is given
(the served name, and whether it is the embedded demo model).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from chatglm_serve.server.settings import Settings

_JS = "text/javascript; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
# The only files served: a fixed map, so no request path ever reaches the filesystem.
_ASSETS = {
    "app.js": _JS,
    "style.css": "text/css; charset=utf-8",
    "marked.umd.js": _JS,
    "purify.min.js": _JS,
    "VENDORED.txt": _TEXT,
    "LICENSE.marked.md": _TEXT,
    "LICENSE.dompurify-Apache-2.0.txt": _TEXT,
    "LICENSE.dompurify-MPL-2.0.txt": _TEXT,
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


def page_info(settings: Settings) -> dict:
    """`GET /info`: what the page needs before it may call the API. demo is true when no
    checkpoint was given and the daemon serves its embedded demo model (random weights)."""
    return {"model": settings.served_model_name, "demo": settings.model is None}


def make_web_router(settings: Settings, *, serve_index: bool = True) -> APIRouter:
    """Routes of the page. serve_index=False when the app answers `GET /` itself (it calls
    index_response); the assets are served either way, and only while the page is on."""
    router = APIRouter(include_in_schema=False)
    web_ui = settings.web_ui
    info = page_info(settings)

    if serve_index:

        @router.get("/")
        async def index(request: Request) -> Response:
            return index_response(request, web_ui)

    @router.get("/info")
    async def server_info() -> JSONResponse:
        return JSONResponse(info, headers=_NO_CACHE)

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
