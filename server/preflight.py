"""Checks made before anything slow starts, so a typo fails at once with a plain message: the
model directory (before minutes of loading) and the listening port (before the model loads)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

# The Hugging Face chatglm2-6b layout (model/loader.py reads these; only names are checked here,
# the loader checks contents).
_WEIGHTS = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "model.safetensors",
    "pytorch_model.bin",
)


def model_dir_problem(model: str | None) -> str | None:
    """What keeps `model` from being a checkpoint directory, in words; None if nothing (or the
    embedded demo model)."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if not path.exists():
        return f"--model {model}: the directory does not exist"
    if not path.is_dir():
        return f"--model {model}: not a directory (give the checkpoint's directory)"
    missing = [name for name in ("config.json", "tokenizer.model") if not (path / name).is_file()]
    if not any((path / name).is_file() for name in _WEIGHTS):
        missing.append("weights (" + " or ".join(_WEIGHTS) + ")")
    if missing:
        return (
            f"--model {model}: not a ChatGLM2 checkpoint directory (Hugging Face chatglm2-6b "
            f"layout); missing: {', '.join(missing)}"
        )
    return None


class PortInUse(OSError):
    """The address to listen on is taken (or not ours to take); the message says which."""


def bind_listener(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), as uvicorn would bind it, for uvicorn to serve on.

    Bound before the model loads, so a port already in use fails at once instead of after
    minutes of loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"port {port} on {host} is already in use (another chatglm-serve?); "
                "stop it or choose another with --port"
            ) from None
        raise PortInUse(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
