"""chatglm-serve: ChatGLM behind an OpenAI-compatible API, and the same engine from Python.

    from chatglm_serve import ChatGLM, SamplingParams
    with ChatGLM.load("/models/chatglm2-6b") as glm:    # ChatGLM.load() = the embedded demo
        response, history = glm.chat("你好", history=[])

The sources keep the project's top-level folders (server/, model/, kernels/, engine/); they are
installed as subpackages of this one package, never as top-level `model`, `server`, ... (which
would shadow other distributions, e.g. Hugging Face's `kernels`). In a wheel they sit inside this
folder. In a source checkout they sit beside it, so the package's search path reaches them there.
Those folders carry no `__init__.py` on purpose: a checkout on sys.path (the tests run from its
root) must never turn them into top-level packages.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

_here = Path(__file__).resolve().parent
if not (_here / "engine").is_dir() and (_here.parent / "engine" / "llm_engine.py").is_file():
    __path__.append(str(_here.parent))  # a source checkout (editable install, or run in place)

if TYPE_CHECKING:
    from chatglm_serve.engine.config import EngineArgs, EngineConfig
    from chatglm_serve.engine.llm import ChatGLM
    from chatglm_serve.engine.types import SamplingParams

__version__ = "0.1.0"
__all__ = ["ChatGLM", "EngineArgs", "EngineConfig", "SamplingParams", "__version__"]

# Imported on first use: the daemon's HTTP side (chatglm_serve.server) never loads torch.
_EXPORTS = {
    "ChatGLM": "chatglm_serve.engine.llm",
    "EngineArgs": "chatglm_serve.engine.config",
    "EngineConfig": "chatglm_serve.engine.config",
    "SamplingParams": "chatglm_serve.engine.types",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'chatglm_serve' has no attribute {name!r}")
