"""The built-in chat page at GET /: served by the daemon, driven in headless Chromium.

The browser tests use Playwright for Python with Debian's `chromium` package (never a browser
downloaded by `playwright install`) against the real app and the real engine on the demo model,
under uvicorn on 127.0.0.1. They skip, saying why, when playwright or chromium is missing.
Where the demo model cannot be made to say something (Markdown, HTML, a natural end), the chat
endpoint's stream is replaced in the browser by a canned OpenAI SSE stream.

Screenshots go to artifacts/ (gitignored): web_ui_<what>_1280.png and web_ui_<what>_390.png, the
page at desktop and phone width for each feature tested here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from chatglm_serve.server.app import create_app
from chatglm_serve.server.routes_web import page_info
from tests.engine.harness import INJECTED_FAILURE, fail_step
from tests.server.conftest import LiveServer, settings, wait_idle

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "server" / "static"
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# What a browser needs on a closed network (and in a container, where the sandbox cannot start).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
KEY = "sk-web-ui-test"
STEP_DELAY = 0.01  # seconds added to each engine step: see slow_engine
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
VENDORED = ("marked.umd.js", "purify.min.js")
LICENSES = (
    "LICENSE.marked.md",
    "LICENSE.dompurify-Apache-2.0.txt",
    "LICENSE.dompurify-MPL-2.0.txt",
)


# --- the page as files and routes (no browser needed) -------------------------------------------


# These use the sync TestClient (its own event-loop thread): while Playwright's sync API is
# started, the main thread counts as running an event loop.
@pytest.fixture
def http(make_app):
    def make(**values) -> TestClient:
        return TestClient(make_app(**values))

    return make


def test_get_root_serves_the_page_to_browsers_and_json_to_the_rest(http):
    with http() as c:
        page = c.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.text == (STATIC / "index.html").read_text()
        assets = [("app.js", "text/javascript"), ("style.css", "text/css")]
        assets += [(name, "text/javascript") for name in VENDORED]
        assets += [(name, "text/plain") for name in (*LICENSES, "VENDORED.txt")]
        for name, kind in assets:
            r = c.get(f"/static/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
            assert r.content == (STATIC / name).read_bytes()
        pointer = c.get("/", headers={"Accept": "application/json"})
        assert pointer.headers["content-type"] == "application/json"
        assert pointer.json()["docs"] == "/docs"
        for path in ("/static/index.html", "/static/..%2Fsettings.py", "/static/nope.js"):
            assert c.get(path).status_code == 404
        legacy = c.post("/", json={"prompt": "你好", "max_length": 40})
        assert legacy.status_code == 200 and "response" in legacy.json()  # POST / untouched


def test_info_says_whether_the_demo_model_is_served_and_needs_no_key(http):
    with http(api_keys=[KEY]) as c:
        assert c.get("/v1/models").status_code == 401
        r = c.get("/info")
        assert r.status_code == 200 and r.json() == {"model": "chatglm2-6b", "demo": True}
    real = settings(served_model_name="glm").model_copy(update={"model": "/models/chatglm2-6b"})
    assert page_info(real) == {"model": "glm", "demo": False}


def test_no_web_ui_turns_the_page_off(http):
    with http(web_ui=False) as c:
        r = c.get("/", headers={"Accept": "text/html"})
        assert r.headers["content-type"] == "application/json"
        for name in ("app.js", *VENDORED):
            assert c.get(f"/static/{name}").status_code == 404


def test_no_web_ui_flag():
    from chatglm_serve.server.cli import parse

    assert parse(["--no-web-ui"])[2].web_ui is False
    assert parse([])[2].web_ui is True


def test_page_loads_nothing_from_elsewhere():
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"(https?:)?//[\w.-]+\.\w", text), f"{name} refers to another host"
        assert "@import" not in text and "url(http" not in text
    js = (STATIC / "app.js").read_text()
    # no HTML string is ever parsed into the page by our code: Markdown goes through DOMPurify,
    # which hands back DOM nodes (RETURN_DOM_FRAGMENT)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js
    assert "RETURN_DOM_FRAGMENT: true" in js
    for name in VENDORED:  # the libraries only compute: they reach nothing
        text = (STATIC / name).read_text()
        for call in ("fetch(", "XMLHttpRequest", "import(", "sendBeacon", "WebSocket"):
            assert call not in text, (name, call)


def test_vendored_libraries_are_the_recorded_npm_files_with_their_licenses():
    table = (STATIC / "VENDORED.txt").read_text()
    rows = re.findall(r"^(\S+\.js)\s+(\w+) ([\d.]+)\s+\S+\s+([0-9a-f]{64})$", table, re.M)
    assert sorted(r[0] for r in rows) == sorted(VENDORED)
    for name, package, version, digest in rows:
        data = (STATIC / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, f"{name} is not the recorded file"
        assert f"{version}" in data[:400].decode(), f"{name}: not {package} {version}"
    for name in LICENSES:
        assert name in table and len((STATIC / name).read_text()) > 500, name
    page = (STATIC / "index.html").read_text()
    order = [page.index(f'src="static/{n}"') for n in (*VENDORED, "app.js")]
    assert order == sorted(order), "the libraries load before the page's script"


# --- in the browser --------------------------------------------------------------------------------


# Module scope: Playwright's sync API leaves the main thread looking as if an event loop runs in
# it, which asyncio tests in later modules (and asyncio.run in teardowns) must not see. It asks
# for engine_factory so that the session's engines are shut down after the browser is gone.
@pytest.fixture(scope="module")
def browser(engine_factory):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    pw = sync_api.sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    except Exception as e:
        pw.stop()
        pytest.skip(f"chromium at {CHROMIUM} does not start under playwright: {e}")
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="session")
def slow_engine(engine_factory):
    """The real engine, with each step held back a little so that a reply streams over a
    second or so, as on a real model: long enough to watch it grow and to press Stop."""
    engine = engine_factory(max_model_len=512, kv_cache_tokens=8 * 512)
    runner = engine.engine.runner
    execute = runner.execute

    def paced(batch):
        time.sleep(STEP_DELAY)
        return execute(batch)

    runner.execute = paced
    return engine


@pytest.fixture
def serve(make_app, slow_engine):
    servers: list[LiveServer] = []

    def start(engine=None, **values) -> LiveServer:
        server = LiveServer(make_app(engine or slow_engine, **values)).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def new_page(browser, **options):
    """A page in a fresh context (its own localStorage); page errors and dialogs are recorded
    in page.errors (a dialog is a failure too: the page must never use alert/confirm)."""
    options = {"viewport": DESKTOP, "reduced_motion": "reduce", **options}
    context = browser.new_context(**options)
    p = context.new_page()
    p.errors = []
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    p.on("dialog", lambda d: (p.errors.append(f"dialog: {d.message}"), d.dismiss()))
    p.set_default_timeout(20_000)
    return p


@pytest.fixture
def page(browser):
    p = new_page(browser)
    yield p
    p.context.close()
    assert not p.errors, f"the page raised: {p.errors}"


def open_page(page, server: LiveServer, *, temperature: str | None = "0", max_tokens="40"):
    page.goto(server.url + "/")
    page.wait_for_selector("#input")
    if temperature is not None or max_tokens is not None:
        page.click("#settings summary")
        if temperature is not None:
            page.fill("#temperature", temperature)
        if max_tokens is not None:
            page.fill("#max-tokens", max_tokens)
        page.click("#settings summary")  # folded again: the conversation gets the room


def watch_requests(page) -> list[dict]:
    """Bodies of the chat requests the page sends, in order."""
    bodies: list[dict] = []
    page.on(
        "request",
        lambda r: (
            bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    return bodies


def record_growth(page) -> None:
    """Note the last reply's text each time the page changes it."""
    page.evaluate(
        """() => {
          window.__seen = [];
          new MutationObserver(() => {
            const all = document.querySelectorAll('.msg.assistant');
            if (all.length) window.__seen.push(all[all.length - 1].dataset.raw);
          }).observe(document.getElementById('log'),
                     {childList: true, subtree: true, attributes: true,
                      attributeFilter: ['data-raw']});
        }"""
    )


def ask(page, text: str) -> None:
    """Type a question and press Enter; wait for the reply to finish (stats or an error)."""
    done = page.locator(".msg.assistant .meta:not(:empty), .msg.error")
    n = done.count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    done.nth(n).wait_for()


def last_reply(page) -> str:
    """The last reply as the model wrote it (the page shows it rendered from Markdown)."""
    return page.locator(".msg.assistant").last.get_attribute("data-raw")


def user_texts(page) -> list[str]:
    return page.locator(".msg.user .content").all_text_contents()


def titles(page) -> list[str]:
    return page.locator("#conversations .conv-title").all_text_contents()


def stored(page) -> list[dict]:
    """The conversations in the page's localStorage, most recent first."""
    return page.evaluate(
        """() => Object.keys(localStorage)
              .filter((k) => k.startsWith('chatglm-serve.chat.'))
              .map((k) => JSON.parse(localStorage.getItem(k)))
              .sort((a, b) => b.updated - a.updated)"""
    )


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the page"
        time.sleep(0.02)


def wait_idle_page(page) -> None:
    page.wait_for_selector("body:not(.busy)")


def api_answer(server: LiveServer, messages: list[dict], **params) -> dict:
    body = {"messages": messages, "temperature": 0, "top_p": 0.8, "max_tokens": 40, **params}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def canned_stream(reply: str, finish: str = "stop", completion_tokens: int = 12) -> str:
    """An OpenAI SSE body that streams `reply` in small pieces, as the daemon writes it."""
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    chunks += [
        {"choices": [{"index": 0, "delta": {"content": reply[i : i + 7]}}]}
        for i in range(0, len(reply), 7)
    ]
    chunks += [
        {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": completion_tokens,
                "total_tokens": 5 + completion_tokens,
            },
        },
    ]
    return "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in chunks) + "data: [DONE]\r\n\r\n"


def play(page, body: str) -> None:
    """Answer the page's chat requests with this SSE body from now on."""
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
    )


def screenshots(page, name: str, *, show: str | None = None, drawer: bool = False) -> None:
    """artifacts/web_ui_<name>_1280.png and _390.png: the page at desktop and phone width.
    show: a selector scrolled into view first; drawer: open the conversation list at phone
    width (it is a drawer there)."""
    ARTIFACTS.mkdir(exist_ok=True)
    size = page.viewport_size
    for width, viewport in ((1280, DESKTOP), (390, PHONE)):
        page.set_viewport_size(viewport)
        if drawer and width == 390:
            page.click("#open-sidebar")
        if show:
            page.locator(show).last.scroll_into_view_if_needed()
        page.evaluate(
            "() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))"
        )
        page.screenshot(path=str(ARTIFACTS / f"web_ui_{name}_{width}.png"))
        if drawer and width == 390:
            page.click("#scrim", position={"x": 380, "y": 400})
    page.set_viewport_size(size)


def contrast(fg: str, bg: str) -> float:
    """WCAG contrast ratio of two CSS rgb()/rgba() colours (opaque)."""

    def luminance(css: str) -> float:
        r, g, b = (int(v) / 255 for v in re.findall(r"[\d.]+", css)[:3])
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


# --- the exchange ---------------------------------------------------------------------------------


def test_reply_streams_into_the_page_and_equals_the_api_answer(page, serve):
    server = serve()
    bodies = watch_requests(page)
    open_page(page, server)
    assert page.locator("#model-name").text_content() == "chatglm2-6b"
    record_growth(page)
    page.fill("#input", "你好")
    page.press("#input", "Shift+Enter")  # a new line, not a send
    page.type("#input", "Tell me about <b>yourself</b>")
    assert page.input_value("#input") == "你好\nTell me about <b>yourself</b>"
    assert page.locator(".msg").count() == 0
    ask(page, page.input_value("#input"))

    question = "你好\nTell me about <b>yourself</b>"
    assert bodies == [
        {
            "messages": [{"role": "user", "content": question}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 40,
            "top_p": 0.8,
            "temperature": 0,
            "model": "chatglm2-6b",
        }
    ]
    expected = api_answer(server, [{"role": "user", "content": question}])
    answer = expected["choices"][0]["message"]["content"]
    assert last_reply(page) == answer
    assert page.locator(".msg.assistant .content").last.text_content().strip()
    assert page.locator(".msg.user .content").text_content() == question  # as text, not markup
    assert page.locator("#log b").count() == 0

    seen = [s for s in page.evaluate("window.__seen") if s]
    partial = [s for s in dict.fromkeys(seen) if s != answer]
    assert len(partial) >= 2, "the reply was shown growing, not only at the end"
    assert all(answer.startswith(s) for s in partial)

    tokens = expected["usage"]["completion_tokens"]
    stats = page.locator("#stats").text_content()
    assert re.match(rf"{tokens} tokens? · [\d.]+ tokens/s", stats), stats
    assert page.locator(".msg.assistant .meta").last.text_content() == stats

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_ui_exchange.png"), full_page=True)


def test_second_turn_sends_the_first_as_history(page, serve):
    server = serve()
    bodies = watch_requests(page)
    open_page(page, server)
    page.click("#settings summary")
    page.fill("#system-prompt", "Answer briefly.")
    ask(page, "first question")
    first = last_reply(page)
    ask(page, "second question")
    second = last_reply(page)

    history = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "second question"},
    ]
    assert [b["messages"] for b in bodies] == [history[:2], history]
    assert second == api_answer(server, history)["choices"][0]["message"]["content"]
    assert page.locator(".msg").count() == 4


def test_stop_mid_reply_aborts_the_request_in_the_engine(page, serve, slow_engine):
    server = serve()
    open_page(page, server, max_tokens=None)  # the default 8192: the whole context
    assert page.input_value("#max-tokens") == "8192"
    assert page.input_value("#top-p") == "0.8"
    before = slow_engine.stats()
    page.fill("#input", "Write a very long story")
    page.press("#input", "Enter")
    wait_until(lambda: len(page.locator(".msg.assistant .content").text_content()) > 5)
    assert slow_engine.stats().running == 1
    assert page.is_disabled("#send") and page.is_enabled("#stop")
    page.click("#stop")

    wait_idle(slow_engine)
    after = slow_engine.stats()
    generated = after.generation_tokens_total - before.generation_tokens_total
    room = slow_engine.max_model_len - len(
        slow_engine.tokenizer.encode_chat("Write a very long story", [])
    )
    assert generated < room // 2, "the request was cut short, not run to its end"
    assert after.requests_finished == before.requests_finished + 1
    page.wait_for_selector(".msg.assistant .meta:not(:empty)")
    meta = page.locator(".msg.assistant .meta").text_content()
    assert re.fullmatch(r"≈?\d+ tokens? · .* · stopped by you", meta), meta
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    # a stopped reply stays in the conversation as far as it got
    (conv,) = stored(page)
    assert conv["messages"][1]["content"] == last_reply(page) and last_reply(page)


# --- Markdown -------------------------------------------------------------------------------------

MARKDOWN_REPLY = (
    "## Steps\n\n"
    "1. first\n"
    "2. second\n\n"
    "| name | value |\n|---|---|\n| a | 1 |\n| b | 2 |\n\n"
    "```python\nprint('hi')\n```\n\n"
    "Some **bold**, `inline code`, [a link](https://example.com/docs), "
    "[a trap](javascript:alert(1)) and ![a picture](https://example.com/p.png)."
)


def test_replies_are_rendered_as_markdown_with_copy_buttons(page, serve):
    server = serve()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    play(page, canned_stream(MARKDOWN_REPLY))
    open_page(page, server)
    ask(page, "show me some markdown")
    msg = page.locator(".msg.assistant").last
    assert msg.get_attribute("data-raw") == MARKDOWN_REPLY
    assert msg.locator("h2").text_content() == "Steps"
    assert msg.locator("ol > li").all_text_contents() == ["first", "second"]
    assert msg.locator("th").all_text_contents() == ["name", "value"]
    assert msg.locator("td").all_text_contents() == ["a", "1", "b", "2"]
    assert msg.locator("strong").text_content() == "bold"
    assert msg.locator(":not(pre) > code").text_content() == "inline code"
    code = msg.locator(".code-block pre code")
    assert code.text_content() == "print('hi')"
    assert code.get_attribute("data-lang") == "python"
    assert msg.locator(".code-head span").text_content() == "python"
    link = msg.locator("a", has_text="a link")
    assert link.get_attribute("href") == "https://example.com/docs"
    assert link.get_attribute("target") == "_blank"
    assert "noopener" in link.get_attribute("rel")
    # a javascript: link loses its target; an image becomes a link (nothing loads from elsewhere)
    assert msg.locator("a", has_text="a trap").get_attribute("href") is None
    assert msg.locator("img").count() == 0
    assert msg.locator("a", has_text="a picture").get_attribute("href").endswith("/p.png")

    msg.locator(".copy-code").click()
    wait_until(lambda: msg.locator(".copy-code").text_content() == "Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "print('hi')"
    msg.locator("[data-action=copy]").click()
    wait_until(lambda: page.evaluate("navigator.clipboard.readText()") == MARKDOWN_REPLY)
    screenshots(page, "markdown", show=".msg.assistant")


def test_copy_works_without_the_clipboard_api(page, serve):
    """Over plain http from another machine (not a secure context) the browser has no
    navigator.clipboard: Copy falls back to a selection copy and still says so."""
    server = serve()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.add_init_script("delete Navigator.prototype.clipboard")
    play(page, canned_stream("```sh\nls -l\n```"))
    open_page(page, server)
    assert page.evaluate("navigator.clipboard") is None
    ask(page, "a command")
    page.click(".copy-code")
    wait_until(lambda: page.locator(".copy-code").text_content() == "Copied")
    reader = page.context.new_page()  # a page of the same browser that has the clipboard API
    reader.goto(server.url + "/static/VENDORED.txt")
    assert reader.evaluate("navigator.clipboard.readText()") == "ls -l"


def test_model_text_is_never_markup(page, serve):
    """Model output with raw HTML and a fenced block: the HTML is shown as text, never run."""
    server = serve()
    reply = (
        'Hi <img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>\n'
        "```python\nprint('<b>x</b>')\n```\n"
        '<div onclick="window.__pwned=3">a block</div>\n\nafter'
    )
    play(page, canned_stream(reply))
    open_page(page, server)
    ask(page, "say something dangerous")
    msg = page.locator(".msg.assistant").last
    assert (
        msg.locator(".content img, .content script, .content b, .content div[onclick]").count() == 0
    )
    assert page.evaluate("window.__pwned") is None
    assert msg.locator("pre code").text_content() == "print('<b>x</b>')"
    assert msg.locator("pre code").get_attribute("data-lang") == "python"
    text = msg.locator(".content").text_content()
    assert '<img src=x onerror="window.__pwned=1">' in text
    assert "<script>window.__pwned=2</script>" in text
    assert '<div onclick="window.__pwned=3">a block</div>' in text
    assert text.rstrip().endswith("after")
    assert page.locator("#stats").text_content().startswith("12 tokens")


# --- conversations kept in the browser ----------------------------------------------------------


def test_conversations_are_listed_switched_and_survive_a_reload(page, serve):
    server = serve()
    bodies = watch_requests(page)
    open_page(page, server)
    assert page.locator("#no-conversations").is_visible() and titles(page) == []
    ask(page, "first chat question")
    first_reply = last_reply(page)
    assert titles(page) == ["first chat question"]

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#empty-hint").is_visible()
    assert page.locator("#stats").text_content() == ""
    ask(page, "second chat question")
    assert bodies[-1]["messages"] == [{"role": "user", "content": "second chat question"}]
    assert titles(page) == ["second chat question", "first chat question"]
    assert page.locator(".conv.active .conv-title").text_content() == "second chat question"

    page.click(".conv-title >> text=first chat question")
    assert user_texts(page) == ["first chat question"] and last_reply(page) == first_reply
    ask(page, "a follow-up")
    assert bodies[-1]["messages"] == [
        {"role": "user", "content": "first chat question"},
        {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "a follow-up"},
    ]
    assert titles(page) == ["first chat question", "second chat question"]  # latest first

    page.reload()
    page.wait_for_selector(".msg.assistant .meta:not(:empty)")
    assert user_texts(page) == ["first chat question", "a follow-up"]
    assert page.locator("#stats").text_content() == page.locator(".msg .meta").last.text_content()
    assert titles(page) == ["first chat question", "second chat question"]
    assert page.input_value("#temperature") == "0"  # the settings are kept too
    convs = stored(page)
    assert [c["title"] for c in convs] == titles(page)
    assert [m["role"] for m in convs[0]["messages"]] == ["user", "assistant"] * 2
    assert convs[0]["messages"][1]["content"] == first_reply
    screenshots(page, "conversations", drawer=True)

    # Another tab of the same browser: a new chat is open, the list is all there.
    other = page.context.new_page()
    other.goto(server.url + "/")
    other.wait_for_selector("#conversations .conv")
    assert other.locator(".msg").count() == 0
    assert other.locator("#conversations .conv-title").all_text_contents() == titles(page)


def test_a_new_chat_mid_reply_stops_it_and_keeps_it_in_its_own_conversation(
    page, serve, slow_engine
):
    server = serve()
    open_page(page, server, max_tokens=None)
    page.fill("#input", "Write a very long story")
    page.press("#input", "Enter")
    wait_until(lambda: len(last_reply(page) or "") > 5)
    page.click("#new-chat")
    wait_idle(slow_engine)  # the request was aborted in the engine
    wait_idle_page(page)
    assert page.locator(".msg").count() == 0  # nothing of it drawn into the new chat
    wait_until(lambda: len(stored(page)) == 1)
    (old,) = stored(page)
    assert old["title"] == "Write a very long story"
    assert old["messages"][1]["meta"]["finish"] == "stopped" and old["messages"][1]["content"]
    page.click(".conv-title >> text=Write a very long story")
    assert page.locator(".msg.assistant .finish").text_content() == "stopped by you"


def test_rename_and_delete_a_conversation(page, serve):
    server = serve()
    open_page(page, server, max_tokens="5")
    ask(page, "alpha")
    page.click("#new-chat")
    ask(page, "beta")
    assert titles(page) == ["beta", "alpha"]

    row = page.locator(".conv", has_text="alpha")
    row.hover()
    row.locator(".conv-rename").click()
    page.fill(".conv-rename-input", "Renamed chat")
    page.press(".conv-rename-input", "Enter")
    assert titles(page) == ["beta", "Renamed chat"]  # a rename does not reorder the list
    row = page.locator(".conv", has_text="beta")
    row.hover()  # Rename and Delete show on the row under the pointer
    row.locator(".conv-rename").click()
    page.fill(".conv-rename-input", "not this")
    page.press(".conv-rename-input", "Escape")
    assert titles(page) == ["beta", "Renamed chat"]
    assert [(c["title"], c["named"]) for c in stored(page)] == [
        ("beta", False),
        ("Renamed chat", True),
    ]

    row.hover()
    row.locator(".conv-delete").click()  # asks first
    assert page.locator(".conv.confirming .conv-question").text_content() == "Delete “beta”?"
    screenshots(page, "conversation_delete", drawer=True)
    page.click(".conv-keep")
    assert titles(page) == ["beta", "Renamed chat"]
    page.locator(".conv", has_text="beta").hover()
    page.locator(".conv", has_text="beta").locator(".conv-delete").click()
    page.click(".conv-confirm")
    # the open conversation was deleted: the next one opens
    assert titles(page) == ["Renamed chat"]
    assert user_texts(page) == ["alpha"]
    page.reload()
    page.wait_for_selector("#conversations .conv")
    assert titles(page) == ["Renamed chat"] and [c["title"] for c in stored(page)] == titles(page)


def test_regenerate_the_last_reply(page, serve):
    server = serve()
    bodies = watch_requests(page)
    open_page(page, server)
    ask(page, "q1")
    r1 = last_reply(page)
    ask(page, "q2")
    regenerate = page.locator("[data-action=regenerate]:visible")
    assert regenerate.count() == 1  # only under the last reply
    regenerate.click()
    wait_until(lambda: len(bodies) == 3)
    page.wait_for_selector(".msg.assistant[data-index='3'] .meta:not(:empty)")
    assert bodies[2]["messages"] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": r1},
        {"role": "user", "content": "q2"},
    ]
    assert page.locator(".msg").count() == 4  # replaced, not added
    (conv,) = stored(page)
    assert len(conv["messages"]) == 4
    assert conv["messages"][3]["content"] == last_reply(page)
    assert (
        last_reply(page)
        == (api_answer(server, bodies[2]["messages"])["choices"][0]["message"]["content"])
    )


def test_edit_and_resend_a_user_message(page, serve):
    server = serve()
    bodies = watch_requests(page)
    open_page(page, server)
    ask(page, "q1")
    ask(page, "q2")
    first = page.locator(".msg.user").first
    first.locator("[data-action=edit]").click()
    assert page.input_value(".edit-input") == "q1"
    page.fill(".edit-input", "not sent")
    page.press(".edit-input", "Escape")  # cancel: nothing changes
    assert user_texts(page) == ["q1", "q2"] and len(bodies) == 2

    first.locator("[data-action=edit]").click()
    page.fill(".edit-input", "q1, edited")
    screenshots(page, "edit", show=".msg.user.editing")
    page.press(".edit-input", "Enter")
    wait_until(lambda: len(bodies) == 3)
    page.wait_for_selector(".msg.assistant[data-index='1'] .meta:not(:empty)")
    assert bodies[2]["messages"] == [{"role": "user", "content": "q1, edited"}]
    assert user_texts(page) == ["q1, edited"]  # what came after the edited message is gone
    (conv,) = stored(page)
    assert [m["content"] for m in conv["messages"]] == ["q1, edited", last_reply(page)]


# --- the demo banner, why a reply ended, errors -----------------------------------------------------


def test_the_demo_model_is_announced(page, serve, slow_engine):
    server = serve()
    with page.expect_response("**/info"):
        open_page(page, server, temperature=None, max_tokens="5")
    banner = page.locator("#demo-banner")
    banner.wait_for(state="visible")
    assert "random weights, replies are gibberish" in banner.text_content()
    ask(page, "hello demo")
    screenshots(page, "demo_banner")

    real = settings().model_copy(update={"model": "/models/chatglm2-6b"})
    with LiveServer(create_app(real, engine=slow_engine)) as real_server:
        with page.expect_response("**/info"):
            page.goto(real_server.url + "/")
        page.wait_for_selector("#model-name:not(:empty)")
        assert banner.is_hidden()


def test_why_a_reply_ended_is_shown(page, serve):
    server = serve()
    open_page(page, server, max_tokens="5")
    ask(page, "a long answer please")
    asked = [{"role": "user", "content": "a long answer please"}]
    assert api_answer(server, asked, max_tokens=5)["choices"][0]["finish_reason"] == "length"
    finish = page.locator(".msg.assistant .finish")
    assert finish.last.text_content() == "cut off: length limit reached"
    assert "finish-length" in finish.last.get_attribute("class")
    assert page.locator("#stats").text_content().endswith("cut off: length limit reached")

    # The demo model rarely ends by itself within a test's budget: a natural end is played.
    play(page, canned_stream("A short, complete answer.", finish="stop"))
    ask(page, "a short answer please")
    assert finish.last.text_content() == "complete"
    screenshots(page, "finish_reason", show=".msg.assistant")
    page.reload()  # kept with the conversation
    page.wait_for_selector(".msg.assistant .finish")
    assert finish.all_text_contents() == ["cut off: length limit reached", "complete"]


def test_server_errors_are_shown_as_errors_not_as_replies(page, serve, engine_factory):
    server = serve()
    open_page(page, server, temperature="5")  # out of range: the server answers 400
    ask(page, "too hot")
    error = page.locator(".msg.error").last
    assert error.locator(".who").text_content() == "Error"
    assert error.get_attribute("role") == "alert"
    assert error.locator(".error-text").text_content().startswith("Error 400")
    assert "temperature" in error.text_content()
    assert page.locator(".msg.assistant").count() == 0, "no empty reply under the model's name"
    assert page.locator(".msg.user.dropped").count() == 1
    assert page.input_value("#input") == "too hot"  # given back for another try
    assert stored(page) == []  # a failed turn is not part of the conversation
    screenshots(page, "error")

    # An error after the stream started (injected: the real engine never fails on demand).
    failing = engine_factory(max_model_len=256, kv_cache_tokens=4 * 256)
    fail_step(failing.engine.runner, at=6, delay=STEP_DELAY)
    server2 = serve(failing)
    open_page(page, server2)
    ask(page, "fail midway")
    reply = page.locator(".msg.assistant").last
    assert "dropped" in reply.get_attribute("class")
    assert reply.get_attribute("data-raw"), "the text before the error stays visible"
    assert INJECTED_FAILURE not in reply.text_content()
    assert INJECTED_FAILURE in page.locator(".msg.error .error-text").last.text_content()
    # the error comes after the partial reply, in its own block
    assert page.locator("#log > .msg").last.get_attribute("class") == "msg error"


def test_a_429_is_shown_with_its_retry_hint(page, serve):
    """Filling the real engine's queue on cue is racy; the server's 429 answer (its body and
    Retry-After, as server/errors.py writes them) is played to the page instead."""
    server = serve()
    error = {
        "error": {
            "message": "The server is overloaded; retry later.",
            "type": "rate_limit_error",
            "param": None,
            "code": "overloaded",
        }
    }
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=429, json=error, headers={"Retry-After": "2", "Content-Type": "application/json"}
        ),
    )
    open_page(page, server)
    ask(page, "busy?")
    text = page.locator(".msg.error .error-text").last.text_content()
    assert text == "Error 429: The server is overloaded; retry later. (retry after 2 s)"


# --- the API key ----------------------------------------------------------------------------------


def test_the_page_asks_for_the_api_key_once(page, serve):
    server = serve(api_keys=[KEY])
    open_page(page, server, temperature=None, max_tokens="5")
    form = page.locator("#key-form")
    form.wait_for(state="visible")
    assert "protected by an API key" in page.locator("#key-message").text_content()
    # locked: nothing can be typed or sent until a key is given
    assert page.is_disabled("#input") and page.is_disabled("#send")

    page.fill("#api-key", "sk-wrong")
    page.click("#key-save")
    wait_until(lambda: "did not accept" in page.locator("#key-message").text_content())
    message = page.locator("#key-message").text_content()
    assert message == (
        "The server did not accept that key. Check it for typos (keys are case-sensitive) "
        "and enter it again."
    )
    assert form.is_visible() and page.is_disabled("#input") and page.is_disabled("#send")
    # the button keeps its label on one line at desktop width
    lines = page.evaluate(
        """() => { const r = document.createRange();
                   r.selectNodeContents(document.getElementById('key-save'));
                   return new Set([...r.getClientRects()].map((b) => Math.round(b.top))).size; }"""
    )
    assert lines == 1
    screenshots(page, "api_key")

    page.fill("#api-key", KEY)
    page.click("#key-save")
    form.wait_for(state="hidden")
    assert page.is_enabled("#input") and page.is_enabled("#send")
    wait_until(lambda: page.locator("#model-name").text_content() == "chatglm2-6b")
    ask(page, "hello with a key")
    assert page.locator(".msg.error").count() == 0 and last_reply(page)
    assert page.evaluate("sessionStorage.getItem('chatglm-serve.api-key')") == KEY

    page.reload()  # same browser session: not asked again
    wait_until(lambda: page.locator("#model-name").text_content() == "chatglm2-6b")
    assert form.is_hidden() and page.is_enabled("#input")


def test_a_message_refused_for_want_of_a_key_is_sent_once_the_key_is_given(page, serve):
    """The page learned of no key at first (here the models probe is answered 200, as before a
    daemon restarted with --api-key): the chat request's 401 takes the turn back, locks the
    page and sends the message once the key is given."""
    server = serve(api_keys=[KEY])
    models = {"object": "list", "data": [{"id": "chatglm2-6b", "object": "model"}]}
    page.route("**/v1/models", lambda route: route.fulfill(status=200, json=models), times=1)
    open_page(page, server, temperature=None, max_tokens="5")
    wait_until(lambda: page.locator("#model-name").text_content() == "chatglm2-6b")
    assert page.is_enabled("#input")
    page.fill("#input", "queued question")
    page.press("#input", "Enter")
    page.locator("#key-form").wait_for(state="visible")
    assert page.is_disabled("#input") and page.locator(".msg").count() == 0
    page.fill("#api-key", KEY)
    page.click("#key-save")
    page.wait_for_selector(".msg.assistant .meta:not(:empty)")
    assert user_texts(page) == ["queued question"]


# --- language, contrast, widths --------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["dark", "light"])
def test_language_and_send_button_contrast(browser, serve, scheme):
    server = serve()
    page = new_page(browser, color_scheme=scheme)
    try:
        open_page(page, server, max_tokens="8")
        wait_until(lambda: page.locator("#model-name").text_content() == "chatglm2-6b")
        assert page.evaluate("document.documentElement.lang") == "en"
        labels = [page.locator(s).text_content() for s in ("#send", "#stop", "#new-chat")]
        assert labels == ["Send", "Stop", "+ New chat"]  # the interface is in English
        assert page.is_enabled("#send")
        for sel in ("#send", "#key-save"):
            colors = page.eval_on_selector(
                sel, "(e) => [getComputedStyle(e).color, getComputedStyle(e).backgroundColor]"
            )
            assert contrast(*colors) >= 4.5, (sel, scheme, colors)
        ask(page, "colours")
        screenshots(page, f"{scheme}_mode", show=".msg.assistant")
        assert not page.errors
    finally:
        page.context.close()


def test_usable_at_phone_width(browser, serve):
    server = serve()
    page = new_page(browser, viewport={"width": 375, "height": 720}, is_mobile=True, has_touch=True)
    try:
        open_page(page, server)
        ask(page, "A question from a phone, long enough to wrap over several lines of the screen")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        for sel in (
            "#input",
            "#send",
            "#stop",
            "#new-chat-bar",
            "#open-sidebar",
            "#settings summary",
        ):
            box = page.locator(sel).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, sel
        for sel in (".msg.user", ".msg.assistant"):
            box = page.locator(sel).last.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 375, sel
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_ui_phone.png"), full_page=True)
        assert page.locator("#sidebar").is_hidden()  # a drawer at this width
        page.tap("#open-sidebar")
        page.locator("#sidebar").wait_for(state="visible")
        box = page.locator("#sidebar").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375
        # no hover on a touch screen: Rename and Delete are shown on every row
        assert (
            page.locator(".conv-rename").is_visible() and page.locator(".conv-delete").is_visible()
        )
        page.screenshot(path=str(ARTIFACTS / "web_ui_phone_drawer.png"))
        page.tap("#new-chat")  # opens a new chat and closes the drawer
        page.locator("#sidebar").wait_for(state="hidden")
        assert page.locator(".msg").count() == 0
        assert not page.errors
    finally:
        page.context.close()


def test_settings_come_from_the_ui_defaults(browser, serve):
    """The seed's web demo values: max length 8192, top_p 0.8, temperature 0.95."""
    server = serve()
    page = new_page(browser)
    try:
        bodies = watch_requests(page)
        page.goto(server.url + "/")
        page.click("#settings summary")
        page.fill("#max-tokens", "3")  # the rest stay as the page starts
        ask(page, "defaults")
        sent = bodies[0]
        assert (sent["top_p"], sent["temperature"]) == (0.8, 0.95)
        assert page.evaluate("document.getElementById('max-tokens').defaultValue") == "8192"
    finally:
        page.context.close()
