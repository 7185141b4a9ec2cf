"""What a new user sees from the command line: help with defaults, flags that fit the command,
and plain errors (no traceback) for a wrong --model or a port already in use."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from chatglm_serve.server.cli import parse
from tests.server.test_cli import ROOT, _env


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per flag's help


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["serve", "--help"]])
def test_top_level_help_shows_the_daemons_flags_with_defaults(capsys, argv):
    out = _help(capsys, argv)
    assert "chatglm-serve [serve] [flags]" in out
    assert "--port PORT" in out and "(default: 8000; env CHATGLM_PORT)" in out
    assert "--default-max-tokens" in out and "chatglm-serve chat --help" in out


def test_chat_help_lists_what_the_chat_uses(capsys):
    out = _help(capsys, ["chat", "--help"])
    for flag in ("--port", "--host", "--cors-origin", "--web-ui", "--served-model-name"):
        assert flag not in out, flag
    assert "--api-key KEY" in out and "the key to send" in out
    for flag, words in (
        ("--temperature", "sampling temperature"),
        ("--top-p", "nucleus"),
        ("--max-tokens", "longest reply"),
    ):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(flag))
        assert words in line, line
    assert "--model DIR" in out and "--quantize" in out


def test_model_flags_with_url_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["chat", "--url", "http://127.0.0.1:8000", "--model", "/m", "--quantize", "4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--model, --quantize: no effect with --url" in err


def test_missing_model_directory_says_so(capsys):
    for argv in (["--model", "/nonexistent"], ["chat", "--model", "/nonexistent"]):
        with pytest.raises(SystemExit) as e:
            parse(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--model /nonexistent: the directory does not exist" in err
        assert "Traceback" not in err


def test_directory_that_is_not_a_checkpoint_says_what_is_missing(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        parse(["--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert "not a ChatGLM2 checkpoint directory" in err
    assert "tokenizer.model" in err and "pytorch_model.bin" in err and "config.json" not in err


def test_port_in_use_fails_at_once_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = [sys.executable, "-m", "chatglm_serve", "--config", "configs/tiny.yaml"]
        p = subprocess.run(
            [*daemon, "--port", str(port)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=_env(),
            timeout=120,
        )
    assert p.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in p.stderr
    assert "DEMO model" not in p.stderr  # nothing was loaded
    assert "Traceback" not in p.stderr
