"""`chatglm-serve [serve] [flags]` runs the daemon; `chatglm-serve chat` is the seed's cli_demo.

Every setting has a flag (see server/settings.py for what each one means); flags win over
CHATGLM_* environment variables, which win over the `--config` YAML file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from chatglm_serve.server.preflight import PortInUse, bind_listener, model_dir_problem
from chatglm_serve.server.settings import (
    ENV_PREFIX,
    REPEATABLE,
    Settings,
    SettingsError,
    flag_for,
    load_settings,
)

log = logging.getLogger("chatglm_serve.server")


# Settings only the daemon uses; `chat` has no flag for them (it loads a model in-process or talks
# to a daemon with --url).
SERVE_ONLY = frozenset(
    {
        "served_model_name",
        "model_aliases",
        "strict_model_name",
        "host",
        "port",
        "api_keys",
        "cors_origins",
        "web_ui",
        "metrics_public",
        "max_body_bytes",
        "shutdown_timeout",
        "max_queue",
        "default_max_tokens",
    }
)
# What still means something for `chat --url` (the daemon there has its own model settings).
_WITH_URL = frozenset({"log_level"})


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if default is None or default == [] or default == {}:
        shown = "unset"
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    else:
        shown = str(default)
    return f"(default: {shown}; env {ENV_PREFIX}{name.upper()})"


def _add_settings_flags(
    parser: argparse.ArgumentParser, exclude: frozenset[str] = frozenset()
) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="YAML settings file (e.g. configs/tiny.yaml); also CHATGLM_CONFIG.",
    )
    for name, field in Settings.model_fields.items():
        if name in exclude:
            continue
        # SUPPRESS: only flags actually given override the environment and the YAML file
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        kwargs["help"] = f"{field.description} {_default_text(name)}".replace("%", "%%")
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
    serve = sub.add_parser(
        "serve",
        help="run the HTTP daemon (the default)",
        usage="chatglm-serve [serve] [flags]",
        description="Run the HTTP daemon (`serve` is the default command, so `chatglm-serve "
        "[flags]` is the same). Flags win over CHATGLM_* environment variables, which win over "
        "the --config YAML file. The terminal chat has its own flags: chatglm-serve chat --help.",
    )
    _add_settings_flags(serve)
    chat = sub.add_parser(
        "chat",
        help="chat in the terminal (in-process model, or --url of a running daemon)",
        usage="chatglm-serve chat [--url URL [--api-key KEY]] [flags]",
        description="The seed's cli_demo: type a message, the reply streams in. `clear` starts "
        "over, `stop` (or Ctrl-D, or Ctrl-C at the prompt) quits, Ctrl-C during a reply stops "
        "the reply. Without --url the model is loaded in this process (the model flags below); "
        "with --url it talks to a running daemon, and the model flags are refused.",
    )
    remote = chat.add_argument_group("a running daemon")
    remote.add_argument(
        "--url",
        help="the daemon's base URL, e.g. http://127.0.0.1:8000 (…/v1 works too)",
    )
    remote.add_argument(
        "--api-key",
        dest="chat_api_key",
        metavar="KEY",
        help="the key to send to the daemon (Authorization: Bearer KEY); default: the first of "
        "CHATGLM_API_KEYS, else none",
    )
    sampling = chat.add_argument_group("sampling (either way)")
    sampling.add_argument(
        "--temperature",
        metavar="T",
        type=float,
        default=None,
        help="sampling temperature, 0 = greedy (default: 0.8, ChatGLM2's own)",
    )
    sampling.add_argument(
        "--top-p",
        metavar="P",
        type=float,
        default=None,
        help="nucleus sampling probability mass (default: 0.8, ChatGLM2's own)",
    )
    sampling.add_argument(
        "--max-tokens",
        metavar="N",
        type=int,
        default=None,
        help="longest reply in tokens (default: up to the end of the context; with --url the "
        "daemon's --default-max-tokens)",
    )
    _add_settings_flags(chat.add_argument_group("the model, loaded in this process"), SERVE_ONLY)
    return parser


def parse(argv: Sequence[str] | None = None) -> tuple[str, argparse.Namespace, Settings]:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `serve` is the default command, so `chatglm-serve --help` shows the daemon's flags
    if not argv or argv[0] not in ("serve", "chat"):
        argv = ["serve", *argv]
    parser = build_parser()
    ns = parser.parse_args(argv)
    command = ns.command or "serve"
    given = {k: v for k, v in vars(ns).items() if k in Settings.model_fields}
    if command == "chat" and ns.url:
        useless = sorted(set(given) - _WITH_URL)
        if useless:
            flags = ", ".join(flag_for(n) for n in useless)
            parser.error(
                f"{flags}: no effect with --url (the daemon at {ns.url} uses its own model "
                "and settings); drop them, or drop --url to load the model here"
            )
    try:
        settings = load_settings(given, config_file=getattr(ns, "config", None))
    except (SettingsError, ValidationError) as e:
        parser.error(str(e))
    if command == "serve" or not ns.url:
        problem = model_dir_problem(settings.model)
        if problem:
            parser.exit(2, f"chatglm-serve: error: {problem}\n")
    return command, ns, settings


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
    try:
        sock = bind_listener(settings.host, settings.port)
    except PortInUse as e:
        print(f"chatglm-serve: error: {e}", file=sys.stderr)
        return 1
    # uvicorn names its address only when it binds the socket itself; this one is ours, so say
    # it here (with --port 0 it is the only place the chosen port is told)
    host, port = sock.getsockname()[:2]
    log.info("running on http://%s:%d", f"[{host}]" if ":" in host else host, port)
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
            # Stop admitting at once and start draining the engine now: uvicorn waits for open
            # connections before it runs the lifespan's shutdown, so a stream still running at
            # the deadline must be ended by the engine (finish_reason "abort", then [DONE])
            # before uvicorn's own grace period (shutdown_timeout + 5 s) cuts it mid-stream.
            if not state.draining:
                log.info("signal %s: draining (up to %.0fs)", sig, settings.shutdown_timeout)
                if state.engine is not None:
                    self._drain = asyncio.ensure_future(
                        state.engine.drain(settings.shutdown_timeout)
                    )
            state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # ours (configure_logging) for every logger
        access_log=False,  # RequestContextMiddleware logs each request with its id
        timeout_graceful_shutdown=settings.stream_grace() + 2,  # after the streams' own end
        lifespan="on",
    )
    server = Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down. A drain that
    # completed is a clean exit (status 0, as service managers expect), so the re-raised
    # SIGTERM / SIGINT meets a handler that only lets the process return.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 1 if failed else 0


# --- chat ---------------------------------------------------------------------------------------


def chat(ns: argparse.Namespace, settings: Settings) -> int:
    from chatglm_serve.server.terminal_chat import (
        chat_loop,
        clear_terminal,
        engine_reply,
        http_reply,
        terminal_reader,
    )

    configure_logging("warning" if settings.log_level == "info" else settings.log_level)
    loop_io = {"read": terminal_reader(), "clear_screen": clear_terminal}
    try:
        with asyncio.Runner() as runner:
            if ns.url:
                keys = settings.api_key_values()
                key = ns.chat_api_key or (keys[0] if keys else None)
                reply = http_reply(ns.url, key, ns.temperature, ns.top_p, ns.max_tokens)
                chat_loop(reply, runner.run, **loop_io)
                return 0
            from chatglm_serve.server.app import load_engine

            engine = load_engine(settings)
            engine.start()
            try:
                max_tokens = settings.reply_limit(ns.max_tokens)
                reply = engine_reply(engine, ns.temperature, ns.top_p, max_tokens)
                chat_loop(reply, runner.run, **loop_io)
            finally:
                runner.run(engine.shutdown(timeout=5))
    except KeyboardInterrupt:  # while loading or shutting down: leave quietly
        sys.stdout.write("\n")
        return 130
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
