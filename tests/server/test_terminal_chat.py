"""The terminal chat as a user drives it: a real `chatglm-serve chat` process on a pseudo-terminal
(typing, Ctrl-C at the prompt and mid-reply, readline history, `clear`), and turns that fail
(wrong key, no daemon) kept out of the history; --url with /v1."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import signal
import sys
import time

import pytest

from chatglm_serve.server.terminal_chat import WELCOME, chat_loop, http_reply
from tests.daemon import free_port
from tests.server.test_cli import ROOT, _env, recording, scripted

ANSWER = "ChatGLM："


# x86-64 / aarch64 syscall numbers of select, pselect6, poll and ppoll (CPython's readline
# loop calls select(); glibc may issue any of these)
_SELECT_CALLS = {"23", "270", "7", "271"} if os.uname().machine == "x86_64" else {"72", "73"}


class Terminal:
    """`python -m chatglm_serve chat ARGS` with a pty as its controlling terminal (stdin and
    stdout), stderr to a file: what it prints to each can be told apart."""

    def __init__(self, args: list[str], stderr_path: str) -> None:
        env = _env()
        env["TERM"] = "xterm"
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once
            try:
                err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(err, 2)
                os.chdir(ROOT)
                os.execvpe(
                    sys.executable, [sys.executable, "-m", "chatglm_serve", "chat", *args], env
                )
            finally:
                os._exit(127)
        self.out = b""
        self.status: int | None = None

    def text(self) -> str:
        return self.out.decode("utf-8", "replace")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not chunk:
            return False
        self.out += chunk
        return True

    def expect(self, needle: str, start: int = 0, timeout: float = 120) -> int:
        """Wait until `needle` appears after character `start`; -> the index just past it."""
        deadline = time.monotonic() + timeout
        while True:
            i = self.text().find(needle, start)
            if i >= 0:
                return i + len(needle)
            if time.monotonic() > deadline or not self._read(0.2):
                raise AssertionError(f"{needle!r} not seen; output so far:\n{self.text()}")

    def more(self, start: int, chars: int, timeout: float = 60) -> None:
        """Wait until at least `chars` characters came after index `start`."""
        deadline = time.monotonic() + timeout
        while len(self.text()) < start + chars:
            if time.monotonic() > deadline or not self._read(0.2):
                raise AssertionError(f"no output after {start}:\n{self.text()}")

    def waiting_for_input(self, timeout: float = 60) -> None:
        """Wait until the chat's main thread sits in select() on the terminal, as it does
        once a prompt is up. Why: CPython's readline checks for a signal only when select()
        is interrupted, so a Ctrl-C that lands between the prompt being written and select()
        being entered is noticed only at the next key (a person would press it again). A
        machine typing the instant the prompt shows, on a loaded CI host, hits that window."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.05)
            try:
                with open(f"/proc/{self.pid}/syscall") as f:
                    nr = f.read().split()[0]
            except OSError:  # no /proc/PID/syscall here (or no permission): give it a moment
                time.sleep(1.0)
                return
            if nr in _SELECT_CALLS:
                return
        raise AssertionError(f"the chat never waited for input:\n{self.text()}")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._read(0.05) and len(self.out) < 10**7:
                    pass
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        raise AssertionError(f"chat did not exit; output:\n{self.text()}")

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminal(tmp_path):
    made: list[Terminal] = []

    def start(*args: str) -> Terminal:
        t = Terminal(["--config", "configs/tiny.yaml", *args], str(tmp_path / "stderr"))
        made.append(t)
        return t

    yield start
    for t in made:
        t.close()


def _clean(text: str) -> None:
    for bad in ("Traceback", "CancelledError", "KeyboardInterrupt"):
        assert bad not in text, text


def test_ctrl_c_at_the_first_prompt_exits_cleanly(terminal, tmp_path):
    t = terminal()
    t.expect("用户：")
    t.waiting_for_input()
    t.type("\x03")
    assert t.wait() == 0
    _clean(t.text())
    _clean((tmp_path / "stderr").read_text())


def test_a_session_ctrl_c_mid_reply_history_clear_and_exit(terminal, tmp_path):
    # greedy with no length limit: the demo model's reply runs to the end of its context, so
    # there is time to interrupt it
    t = terminal("--temperature", "0")
    at = t.expect("用户：")
    assert WELCOME in t.text()
    t.type("你好\r")
    at = t.expect(ANSWER, at)
    t.more(at, 4)  # some of the reply has arrived
    t.type("\x03")  # Ctrl-C mid-reply: the reply stops, the chat goes on
    at = t.expect("用户：", at)
    # readline: Up recalls the last line, Ctrl-A / Ctrl-E move, Backspace deletes
    t.type("\x1b[A\x01abc\x05\x7f\r")  # "你好" -> "abc你"
    at = t.expect(ANSWER, at)
    t.more(at, 4)
    t.type("\x03")
    at = t.expect("用户：", at)
    t.type("\x1b[A")  # the edited line is what was sent (and kept in the history)
    at = t.expect("abc你", at)
    t.type("\x15")  # Ctrl-U: drop it again
    t.type("clear\r")
    at = t.expect("\x1b[2J", at)  # the screen is cleared as the seed's `clear` does
    at = t.expect(WELCOME, at)
    at = t.expect("用户：", at)
    t.waiting_for_input()
    t.type("\x03")  # Ctrl-C at the prompt: the chat ends
    assert t.wait() == 0
    _clean(t.text())
    err = (tmp_path / "stderr").read_text()
    _clean(err)
    assert "用户：" not in err and ANSWER not in err  # the prompt and replies go to stdout


def _run(reply, lines):
    out: list[str] = []
    chat_loop(reply, asyncio.run, read=scripted(lines), write=out.append, flush=lambda: None)
    return "".join(out)


def test_a_failed_turn_is_shown_and_not_kept(live):
    srv = live(api_keys=["sk-right"])
    reply, calls = recording(http_reply(srv.url, "sk-wrong", 0, None, 4))
    out = _run(reply, ["q1", "q2"])
    assert out.count("[error] HTTP 401") == 2 and "--api-key" in out
    assert calls[1][1] == []  # q1 failed, so q2 has no history


def test_unreachable_daemon_is_an_error_not_a_traceback():
    port = free_port()  # closed again: nothing listens there
    reply, calls = recording(http_reply(f"http://127.0.0.1:{port}", None, 0, None, 4))
    out = _run(reply, ["q1", "q2"])
    assert out.count("[error] cannot reach the daemon") == 2
    assert calls[1][1] == []


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/", "/v1/chat/completions"])
def test_url_with_or_without_v1(live, suffix):
    srv = live()
    reply, calls = recording(http_reply(srv.url + suffix, None, 0, None, 4))
    out = _run(reply, ["你好", "再来"])
    assert "[error]" not in out and out.count(ANSWER) == 2
    assert calls[1][1] and calls[1][1][0][0] == "你好"  # the first turn is in the history
