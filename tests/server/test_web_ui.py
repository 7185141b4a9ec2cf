"""The built-in chat page at GET /: served by the daemon, driven in headless Chromium.

The browser tests use Playwright for Python with Debian's `chromium` package (never a browser
downloaded by `playwright install`) against the real app and the real engine on the demo model,
under uvicorn on 127.0.0.1. They skip, saying why, when playwright or chromium is missing.
A screenshot of a finished exchange is saved as artifacts/web_ui_exchange.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.engine.harness import INJECTED_FAILURE, fail_step
from tests.server.conftest import LiveServer, wait_idle

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
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            r = c.get(f"/static/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
            assert r.content == (STATIC / name).read_bytes()
        pointer = c.get("/", headers={"Accept": "application/json"})
        assert pointer.headers["content-type"] == "application/json"
        assert pointer.json()["docs"] == "/docs"
        for path in ("/static/index.html", "/static/..%2Fsettings.py", "/static/nope.js"):
            assert c.get(path).status_code == 404
        legacy = c.post("/", json={"prompt": "你好", "max_length": 40})
        assert legacy.status_code == 200 and "response" in legacy.json()  # POST / untouched


def test_no_web_ui_turns_the_page_off(http):
    with http(web_ui=False) as c:
        r = c.get("/", headers={"Accept": "text/html"})
        assert r.headers["content-type"] == "application/json"
        assert c.get("/static/app.js").status_code == 404


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
    # model text goes in as text only: no HTML-parsing sinks anywhere in the page's code
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js


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


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    p.set_default_timeout(20_000)
    yield p
    context.close()
    assert not errors, f"the page raised: {errors}"


def open_page(page, server: LiveServer, *, temperature: str | None = "0", max_tokens="40"):
    page.goto(server.url + "/")
    page.wait_for_selector("#input")
    if temperature is not None or max_tokens is not None:
        page.click("#settings summary")
        if temperature is not None:
            page.fill("#temperature", temperature)
        if max_tokens is not None:
            page.fill("#max-tokens", max_tokens)


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
            const all = document.querySelectorAll('.msg.assistant .content');
            if (all.length) window.__seen.push(all[all.length - 1].textContent);
          }).observe(document.getElementById('log'),
                     {childList: true, subtree: true, characterData: true});
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
    return page.locator(".msg.assistant .content").last.text_content()


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the page"
        time.sleep(0.02)


def api_answer(server: LiveServer, messages: list[dict], **params) -> dict:
    body = {"messages": messages, "temperature": 0, "top_p": 0.8, "max_tokens": 40, **params}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


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
    assert "```" not in answer  # (fences would be shown as blocks, not as these characters)
    assert last_reply(page) == answer
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


def test_clear_empties_the_conversation(page, serve):
    server = serve()
    bodies = watch_requests(page)
    open_page(page, server)
    ask(page, "remember this")
    assert page.locator(".msg").count() == 2
    page.click("#clear")
    assert page.locator(".msg").count() == 0
    assert page.locator("#stats").text_content() == ""
    ask(page, "a fresh start")
    assert bodies[-1]["messages"] == [{"role": "user", "content": "a fresh start"}]


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
    assert page.locator(".msg.assistant .meta").text_content().startswith("stopped")
    assert page.is_enabled("#send") and page.is_disabled("#stop")


def test_the_page_asks_for_the_api_key_once(page, serve):
    server = serve(api_keys=[KEY])
    open_page(page, server, temperature=None, max_tokens="5")
    form = page.locator("#key-form")
    form.wait_for(state="visible")
    assert "needs an API key" in page.locator("#key-message").text_content()

    page.fill("#api-key", "sk-wrong")
    page.click("#key-save")
    wait_until(lambda: "refused" in page.locator("#key-message").text_content())
    assert form.is_visible()

    page.fill("#api-key", KEY)
    page.click("#key-save")
    form.wait_for(state="hidden")
    wait_until(lambda: page.locator("#model-name").text_content() == "chatglm2-6b")
    ask(page, "hello with a key")
    assert page.locator(".msg.error").count() == 0 and last_reply(page)
    assert page.evaluate("sessionStorage.getItem('chatglm-serve.api-key')") == KEY

    page.reload()  # same browser session: not asked again
    wait_until(lambda: page.locator("#model-name").text_content() == "chatglm2-6b")
    assert form.is_hidden()


def test_a_message_sent_before_the_key_is_sent_once_the_key_is_given(page, serve):
    server = serve(api_keys=[KEY])
    open_page(page, server, temperature=None, max_tokens="5")
    page.locator("#key-form").wait_for(state="visible")
    page.fill("#input", "queued question")
    page.press("#input", "Enter")  # answered 401: the page takes the turn back and asks
    page.fill("#api-key", KEY)
    page.click("#key-save")
    page.wait_for_selector(".msg.assistant .meta:not(:empty)")
    assert page.locator(".msg.user .content").all_text_contents() == ["queued question"]


def test_server_errors_are_shown_in_the_conversation(page, serve, engine_factory):
    server = serve()
    open_page(page, server, temperature="5")  # out of range: the server answers 400
    ask(page, "too hot")
    error = page.locator(".msg.error .error-text").last.text_content()
    assert error.startswith("Error 400") and "temperature" in error
    assert page.input_value("#input") == "too hot"  # given back for another try

    # An error after the stream started (injected: the real engine never fails on demand).
    failing = engine_factory(max_model_len=256, kv_cache_tokens=4 * 256)
    fail_step(failing.engine.runner, at=6, delay=STEP_DELAY)
    server2 = serve(failing)
    open_page(page, server2)
    ask(page, "fail midway")
    reply = page.locator(".msg.assistant").last
    assert INJECTED_FAILURE in reply.locator(".error-text").text_content()
    assert reply.locator(".content").text_content(), "the text before the error stays visible"


def test_model_text_is_never_markup(page, serve):
    """Model output with HTML and a fenced block. The demo model cannot be made to say this, so
    the chat endpoint's stream is replaced in the browser by a canned OpenAI SSE stream."""
    server = serve()
    reply = (
        'Hi <img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>\n'
        "```python\nprint('<b>x</b>')\n```\nafter"
    )
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    chunks += [
        {"choices": [{"index": 0, "delta": {"content": reply[i : i + 7]}}]}
        for i in range(0, len(reply), 7)
    ]
    chunks += [
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}},
    ]
    body = "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in chunks) + "data: [DONE]\r\n\r\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
    )
    open_page(page, server)
    ask(page, "say something dangerous")
    msg = page.locator(".msg.assistant").last
    assert msg.locator("img, script, b").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert msg.locator("pre code").text_content() == "print('<b>x</b>')"
    assert msg.locator("pre code").get_attribute("data-lang") == "python"
    texts = msg.locator(".text").all_text_contents()
    assert texts == [
        'Hi <img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>\n',
        "after",
    ]
    assert page.locator("#stats").text_content().startswith("12 tokens")


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


def test_usable_at_phone_width(browser, serve):
    server = serve()
    context = browser.new_context(
        viewport={"width": 375, "height": 720}, is_mobile=True, has_touch=True
    )
    page = context.new_page()
    try:
        open_page(page, server)
        ask(page, "A question from a phone, long enough to wrap over several lines of the screen")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        for sel in ("#input", "#send", "#stop", "#clear", "#settings summary"):
            box = page.locator(sel).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, sel
        for sel in (".msg.user", ".msg.assistant"):
            box = page.locator(sel).last.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 375, sel
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_ui_phone.png"), full_page=True)
    finally:
        context.close()


def test_settings_come_from_the_ui_defaults(browser, serve):
    """The seed's web demo values: max length 8192, top_p 0.8, temperature 0.95."""
    server = serve()
    context = browser.new_context()
    page = context.new_page()
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
        context.close()
