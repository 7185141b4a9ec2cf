"""`chatglm-serve [serve] [flags]` runs the daemon; `chatglm-serve chat` is the seed's cli_demo.

Every setting has a flag (see server/settings.py for what each one means); flags win over
CHATGLM_* environment variables, which win over the `--config` YAML file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import types
import typing
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from pydantic import ValidationError

from chatglm_serve.server.settings import (
    REPEATABLE,
    Settings,
    SettingsError,
    flag_for,
    load_settings,
)

log = logging.getLogger("chatglm_serve.server")

WELCOME = "欢迎使用 ChatGLM2-6B 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="YAML settings file (e.g. configs/tiny.yaml); also CHATGLM_CONFIG.",
    )
    for name, field in Settings.model_fields.items():
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        kwargs["help"] = field.description
        ann = field.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        literal = next((a for a in args if typing.get_origin(a) is typing.Literal), None)
        if typing.get_origin(ann) is typing.Literal:
            literal = ann
        if ann is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name in REPEATABLE:
            kwargs["action"] = "append"
            kwargs["metavar"] = {"api_keys": "KEY", "cors_origins": "ORIGIN"}.get(name, "NAME")
        elif literal is not None:
            choices = typing.get_args(literal)
            kwargs["choices"] = choices
            kwargs["type"] = type(choices[0])
        elif int in args or ann is int:
            kwargs["type"] = int
        elif float in args or ann is float:
            kwargs["type"] = float
        if name == "model":
            kwargs["metavar"] = "DIR"
        parser.add_argument(flag_for(name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatglm-serve",
        description="Serve ChatGLM2 behind an OpenAI-compatible API. "
        "Commands: serve (default), chat (interactive terminal chat).",
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the HTTP daemon (the default)")
    _add_settings_flags(serve)
    chat = sub.add_parser(
        "chat", help="chat in the terminal (in-process model, or --url of a running daemon)"
    )
    _add_settings_flags(chat)
    chat.add_argument("--url", help="a running daemon's base URL, e.g. http://127.0.0.1:8000")
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    return parser


def parse(argv: Sequence[str] | None = None) -> tuple[str, argparse.Namespace, Settings]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "chat", "-h", "--help"):
        argv = ["serve", *argv]
    parser = build_parser()
    ns = parser.parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if k in Settings.model_fields}
    try:
        settings = load_settings(given, config_file=getattr(ns, "config", None))
    except (SettingsError, ValidationError) as e:
        parser.error(str(e))
    return ns.command or "serve", ns, settings


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --- serve --------------------------------------------------------------------------------------


def serve(settings: Settings) -> int:
    import uvicorn

    from chatglm_serve.server.app import create_app

    configure_logging(settings.log_level)
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    state = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
            # Stop admitting at once; uvicorn then stops accepting, lets running requests (and
            # streams, see shutdown_grace_period) finish, and the lifespan shuts the engine.
            if not state.draining:
                log.info("signal %s: draining (up to %.0fs)", sig, settings.shutdown_timeout)
            state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # ours (configure_logging) for every logger
        access_log=False,  # RequestContextMiddleware logs each request with its id
        timeout_graceful_shutdown=settings.shutdown_timeout + 5,
        lifespan="on",
    )
    server = Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down. A drain that
    # completed is a clean exit (status 0, as service managers expect), so the re-raised
    # SIGTERM / SIGINT meets a handler that only lets the process return.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 1 if failed else 0


# --- chat ---------------------------------------------------------------------------------------

Reply = Callable[[str, list[tuple[str, str]]], AsyncIterator[str]]


def engine_reply(
    engine: Any, temperature: float | None, top_p: float | None, max_tokens: int | None
) -> Reply:
    from chatglm_serve.engine.types import SamplingParams
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
        async for out in engine.generate(ids, params, f"chat-{uuid.uuid4().hex}"):
            text = parser.feed(out.text)
            if text:
                yield text

    return reply


def http_reply(
    url: str,
    api_key: str | None,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
) -> Reply:
    import httpx

    endpoint = url.rstrip("/") + "/v1/chat/completions"
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
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0)) as client,
            client.stream("POST", endpoint, json=body, headers=headers) as resp,
        ):
            if resp.status_code != 200:
                await resp.aread()
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(event["error"].get("message", "error"))
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        yield text

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


async def chat_loop(
    reply: Reply,
    read: Callable[[str], str] = input,
    write: Callable[[str], Any] = sys.stdout.write,
    flush: Callable[[], Any] = sys.stdout.flush,
) -> None:
    """The seed's cli_demo: stream each reply, keep history; `clear` empties it, `stop` quits."""
    history: list[tuple[str, str]] = []
    write(WELCOME + "\n")
    while True:
        try:
            query = read("\n用户：")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n")
            return
        if query.strip() == "stop":
            return
        if query.strip() == "clear":
            history = []
            write(WELCOME + "\n")
            continue
        if not query.strip():
            continue
        write("\nChatGLM：")
        flush()
        parts: list[str] = []

        task = asyncio.ensure_future(_print_reply(reply(query, history), parts, write, flush))
        interrupted: list[bool] = []

        def stop_reply(task: asyncio.Future = task, interrupted: list[bool] = interrupted) -> None:
            interrupted.append(True)
            task.cancel()

        undo = _on_sigint(stop_reply)  # Ctrl-C stops this reply, as in the seed
        try:
            await task
        except asyncio.CancelledError:
            if not interrupted:
                raise
        except Exception as e:  # a daemon error: show it and keep the session
            write(f"\n[error] {e}")
        finally:
            undo()
        write("\n")
        history.append((query, "".join(parts)))


def _on_sigint(callback: Callable[[], Any]) -> Callable[[], None]:
    """Route Ctrl-C to `callback` until the returned undo is called (no-op where unsupported)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, callback)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        return lambda: None

    def undo() -> None:
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    return undo


def chat(ns: argparse.Namespace, settings: Settings) -> int:
    configure_logging("warning" if settings.log_level == "info" else settings.log_level)

    async def run() -> None:
        if ns.url:
            keys = settings.api_key_values()
            reply = http_reply(
                ns.url, keys[0] if keys else None, ns.temperature, ns.top_p, ns.max_tokens
            )
            await chat_loop(reply)
            return
        from chatglm_serve.server.app import load_engine

        engine = await asyncio.to_thread(load_engine, settings)
        engine.start()
        try:
            await chat_loop(engine_reply(engine, ns.temperature, ns.top_p, ns.max_tokens))
        finally:
            await engine.shutdown(timeout=5)

    asyncio.run(run())
    return 0


def tp_worker_rank(settings: Settings) -> int:
    """Under torchrun with tensor parallel, ranks other than 0 serve no HTTP: they mirror rank
    0's forward passes until it stops them. Returns their exit code."""
    from chatglm_serve.engine.tp_worker import TPLoadSpec, start_tensor_parallel

    configure_logging(settings.log_level)
    dtype = None if settings.dtype == "auto" else settings.dtype
    devices = settings.devices or [f"cuda:{i}" for i in range(settings.num_gpus or 0)]
    start_tensor_parallel(
        TPLoadSpec(settings.model, dtype, tokenizer=False),
        settings.tensor_parallel_size,
        devices or None,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    command, ns, settings = parse(argv)
    if settings.tensor_parallel_size > 1:
        from chatglm_serve.engine.tp_worker import torchrun_rank

        run = torchrun_rank()
        if run is not None and run[0] != 0:
            return tp_worker_rank(settings)
    if command == "chat":
        return chat(ns, settings)
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
