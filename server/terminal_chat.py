"""`chatglm-serve chat`: the seed's cli_demo, on the in-process engine or a daemon's --url.

The loop reads each line outside any event loop (plain `input()`, with readline's line editing
and history where Python has it), then runs the reply on one long-lived asyncio.Runner. So
Ctrl-C at the prompt is an ordinary KeyboardInterrupt (the chat ends), and Ctrl-C during a reply
is the Runner's: it cancels the reply (which aborts the engine request, or closes the HTTP
stream so the daemon aborts it) and the session goes on.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

WELCOME = "欢迎使用 ChatGLM2-6B 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"
PROMPT = "\n用户："
ANSWER = "\nChatGLM："

Reply = Callable[[str, list[tuple[str, str]]], AsyncIterator[str]]
Run = Callable[[Awaitable[Any]], Any]  # runs a coroutine to its end (asyncio.Runner.run)


class ChatError(Exception):
    """A turn that failed (daemon unreachable, refused, an error mid-reply); shown, not kept."""


def engine_reply(
    engine: Any, temperature: float | None, top_p: float | None, max_tokens: int | None
) -> Reply:
    from chatglm_serve.engine.types import EngineError, SamplingParams
    from chatglm_serve.server.tools import PassThrough, ReplyParser

    async def reply(query: str, history: list[tuple[str, str]]) -> AsyncIterator[str]:
        ids = engine.encode_chat(query, history)
        fmt = engine.chat_format
        # ChatGLM3 / GLM-4 replies open with an (empty) metadata line: not shown
        parser = ReplyParser(fmt.name, None) if fmt.supports_tools else PassThrough()
        params = SamplingParams(
            temperature=0.8 if temperature is None else temperature,
            top_p=0.8 if top_p is None else top_p,
            max_tokens=max_tokens,
        )
        try:
            async for out in engine.generate(ids, params, f"chat-{uuid.uuid4().hex}"):
                text = parser.feed(out.text)
                if text:
                    yield text
        except EngineError as e:
            raise ChatError(e.message) from None

    return reply


def api_base(url: str) -> str:
    """The daemon's root from what a user may type: the root, …/v1, or the full endpoint."""
    base = url.strip().rstrip("/")
    for suffix in ("/chat/completions", "/v1"):
        base = base.removesuffix(suffix)
    return base


def _error_message(status: int, body: str, endpoint: str) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.strip()[:200] or "no details"
    hint = ""
    if status == 401:
        hint = " (pass the daemon's key with --api-key, or set CHATGLM_API_KEYS)"
    elif status == 404:
        hint = f" ({endpoint} not found: is --url the daemon's address?)"
    return f"HTTP {status}: {message}{hint}"


def http_reply(
    url: str,
    api_key: str | None,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
) -> Reply:
    import httpx

    endpoint = api_base(url) + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def reply(query: str, history: list[tuple[str, str]]) -> AsyncIterator[str]:
        messages = []
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": query})
        body: dict[str, Any] = {"messages": messages, "stream": True}
        for key, value in (
            ("temperature", temperature),
            ("top_p", top_p),
            ("max_tokens", max_tokens),
        ):
            if value is not None:
                body[key] = value
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0)) as client,
                client.stream("POST", endpoint, json=body, headers=headers) as resp,
            ):
                if resp.status_code != 200:
                    await resp.aread()
                    raise ChatError(_error_message(resp.status_code, resp.text, endpoint))
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise ChatError(event["error"].get("message", "error"))
                    for choice in event.get("choices", []):
                        text = choice.get("delta", {}).get("content")
                        if text:
                            yield text
        except httpx.TransportError as e:
            raise ChatError(
                f"cannot reach the daemon at {endpoint}: {e or type(e).__name__}"
            ) from None

    return reply


async def _print_reply(
    texts: AsyncIterator[str],
    parts: list[str],
    write: Callable[[str], Any],
    flush: Callable[[], Any],
) -> None:
    async for text in texts:
        parts.append(text)
        write(text)
        flush()


def chat_loop(
    reply: Reply,
    run: Run,
    read: Callable[[str], str] = input,
    write: Callable[[str], Any] = sys.stdout.write,
    flush: Callable[[], Any] = sys.stdout.flush,
    clear_screen: Callable[[], Any] = lambda: None,
) -> None:
    """Stream each reply, keep the history; `clear` empties it (and the screen), `stop`, end of
    input or Ctrl-C at the prompt end the chat, Ctrl-C during a reply ends the reply."""
    history: list[tuple[str, str]] = []
    write(WELCOME + "\n")
    while True:
        try:
            query = read(PROMPT)
        except (EOFError, KeyboardInterrupt):
            write("\n")
            flush()
            return
        if query.strip() == "stop":
            return
        if query.strip() == "clear":
            history = []
            clear_screen()
            write(WELCOME + "\n")
            continue
        if not query.strip():
            continue
        write(ANSWER)
        flush()
        parts: list[str] = []
        try:
            run(_print_reply(reply(query, history), parts, write, flush))
        except KeyboardInterrupt:  # Ctrl-C: this reply stops here; what came is kept
            pass
        except ChatError as e:  # the turn failed: say why, keep the session, not the turn
            write(f"\n[error] {e}\n")
            flush()
            continue
        write("\n")
        flush()
        history.append((query, "".join(parts)))


def terminal_reader() -> Callable[[str], str]:
    """input() with readline's line editing and history where available. Without readline,
    CPython's input() writes its prompt to stderr on a terminal, so the prompt is written here."""
    try:
        import readline  # noqa: F401  (importing it is what makes input() use it)
    except ImportError:

        def read(prompt: str) -> str:
            sys.stdout.write(prompt)
            sys.stdout.flush()
            return input()

        return read
    return input


def clear_terminal() -> None:
    """What the seed's `clear` does (os.system("clear"/"cls")), without a subprocess on POSIX."""
    if not sys.stdout.isatty():
        return
    if os.name == "nt":
        os.system("cls")
    else:
        sys.stdout.write("\x1b[H\x1b[2J\x1b[3J")  # home, clear screen, clear scrollback
        sys.stdout.flush()
