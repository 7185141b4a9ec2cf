"""`chatglm-serve chat` (in-process and --url) and `chatglm-serve` as a process: start-up,
answering, and a graceful SIGTERM that lets a running stream finish."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from chatglm_serve.server.terminal_chat import WELCOME, chat_loop, engine_reply, http_reply
from tests.daemon import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]


def scripted(lines: list[str]):
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def recording(reply):
    calls = []

    async def wrapped(query, history):
        calls.append((query, list(history)))
        async for text in reply(query, history):
            yield text

    return wrapped, calls


def run_chat(reply, lines: list[str]) -> str:
    out: list[str] = []
    chat_loop(reply, asyncio.run, read=scripted(lines), write=out.append, flush=lambda: None)
    return "".join(out)


@pytest.mark.parametrize("backend", ["in-process", "url"])
def test_chat_streams_keeps_history_clear_and_stop(backend, engine, live):
    if backend == "url":
        srv = live(api_keys=["sk-chat"])
        reply = http_reply(srv.url, "sk-chat", temperature=0, top_p=None, max_tokens=12)
    else:
        reply = engine_reply(engine, temperature=0, top_p=None, max_tokens=12)
    reply, calls = recording(reply)
    out = run_chat(reply, ["你好", "继续", "clear", "", "再见", "stop", "never read"])
    assert [q for q, _ in calls] == ["你好", "继续", "再见"]
    first_reply = out.split("ChatGLM：")[1].split("\n")[0]
    assert first_reply
    assert calls[1][1] == [("你好", first_reply)]  # history kept
    assert calls[2][1] == []  # `clear` emptied it
    assert out.count(WELCOME) == 2 and out.count("ChatGLM：") == 3


def test_ctrl_c_stops_the_reply_not_the_session(engine):
    reply, calls = recording(engine_reply(engine, temperature=0, top_p=None, max_tokens=None))
    pieces = []

    async def interrupted_after_a_few(query, history):
        async for text in reply(query, history):
            pieces.append(text)
            yield text
            if len(pieces) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C mid-reply
                await asyncio.sleep(1)  # the handler cancels us here

    out = run_chat(interrupted_after_a_few, ["你好", "再来", "stop"])
    assert [q for q, _ in calls] == ["你好", "再来"]
    assert calls[1][1] == [("你好", "".join(pieces[:3]))]  # the partial reply is kept
    assert out.count("ChatGLM：") == 2


def test_chat_over_http_equals_in_process_greedy(engine, live):
    srv = live()
    outs = []
    for reply in (
        http_reply(srv.url, None, temperature=0, top_p=None, max_tokens=16),
        engine_reply(engine, temperature=0, top_p=None, max_tokens=16),
    ):
        outs.append(run_chat(reply, ["讲个故事"]))
    assert outs[0] == outs[1] and "ChatGLM：" in outs[0]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATGLM_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if "CHATGLM_SERVE_CACHE" in os.environ:
        env["CHATGLM_SERVE_CACHE"] = os.environ["CHATGLM_SERVE_CACHE"]
    return env


def test_chat_command_in_a_terminal_session():
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatglm_serve",
            "chat",
            "--config",
            "configs/tiny.yaml",
            "--max-tokens",
            "8",
        ],
        input="你好\nstop\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert WELCOME in p.stdout and "ChatGLM：" in p.stdout


def _new_request_during_drain(url: str) -> str | int:
    """What a new client gets once SIGTERM has arrived: the listener may already be closed
    (connection refused), else the app answers 503. Polls until one of them is seen."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            r = httpx.post(
                url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                timeout=10,
            )
        except httpx.ConnectError:
            return "connection refused"
        if r.status_code == 503:
            return 503
        time.sleep(0.05)  # the signal has not been handled yet
    return "still served"


# 20 s: the stream normally runs to its length; 0 s: the engine drains it at once (ends it with
# finish_reason "abort"), which must still close the stream properly before uvicorn gives up.
@pytest.mark.parametrize("shutdown_timeout", ["20", "0"])
def test_serve_process_and_graceful_sigterm(shutdown_timeout):
    port = free_port()
    env = _env()
    env["CHATGLM_MAX_MODEL_LEN"] = "2048"  # env var under the flags, over the YAML
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatglm_serve",
            "--config",
            "configs/tiny.yaml",
            "--port",
            str(port),
            "--shutdown-timeout",
            shutdown_timeout,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 120)
        models = httpx.get(url + "/v1/models").json()
        assert models["data"][0]["id"] == "chatglm2-6b"

        body = {
            "messages": [{"role": "user", "content": "你好"}],
            "stream": True,
            "ignore_eos": True,
            "max_tokens": 200,
        }
        finish, done, refused = None, False, None
        with (
            httpx.Client(timeout=60) as c,
            c.stream("POST", url + "/v1/chat/completions", json=body) as r,
        ):
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                choice = json.loads(data)["choices"][0]
                if choice["delta"].get("content") and refused is None:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                    refused = _new_request_during_drain(url)
                finish = choice["finish_reason"] or finish
        # the running stream is not cut: it runs to its length or, past the shutdown timeout,
        # the server drains it; either way it ends as a stream should
        assert done and finish in ("length", "abort"), (done, finish, refused, proc.poll())
        # while it drained, new work was turned away
        assert refused in ("connection refused", 503)
        assert proc.wait(timeout=120) == 0  # a completed drain is a clean exit
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
        err = proc.stderr.read()
        assert "ready: model (embedded demo)" in err and "KV cache" in err
        assert "draining" in err and "Application shutdown complete" in err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
