"""Which member of the ChatGLM family a checkpoint directory holds, read from its files.

ChatGLM2-6B, ChatGLM3-6B (-32k, -base) and GLM-4-9B-chat (-1m, -hf) share one network; what tells
them apart is on disk:
  - `model_type: glm` in config.json: the `-hf` GLM-4 layout (transformers' Glm names);
  - `tokenizer.model` as `base64 rank` text lines (tiktoken BPE), or only a byte-level
    `tokenizer.json`: GLM-4;
  - a SentencePiece `tokenizer.model` with the role tokens declared beside it (`<|user|>` in
    tokenizer_config.json or in the shipped tokenization_chatglm.py) or a `chatglm3` model name
    in config.json: ChatGLM3; otherwise ChatGLM2.
The result is logged at load; `--chat-template NAME` overrides the chat format it implies.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatglm_serve.model.chat_format import make_chat_format
from chatglm_serve.model.config import ChatGLMConfig


@dataclass(frozen=True)
class ModelFamily:
    family: str  # "chatglm2" | "chatglm3" | "glm4": the chat format it implies
    member: str  # what /v1/models reports, e.g. "chatglm3-6b-32k", "glm-4-9b-chat-hf"
    tokenizer_file: Path
    evidence: str  # why, for the log line

    def describe(self) -> str:
        return f"{self.member} ({self.family} chat format; {self.evidence})"


def _is_rank_file(path: Path) -> bool:
    """A tiktoken `base64 rank` text file (GLM-4), as opposed to a SentencePiece protobuf."""
    with open(path, "rb") as f:
        head = f.readline(4096)
    parts = head.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _mentions(path: Path, needle: str) -> bool:
    return path.is_file() and needle in path.read_text(encoding="utf-8", errors="replace")


def _member(family: str, cfg: ChatGLMConfig) -> str:
    named = str(cfg.extra.get("_name_or_path") or "").rstrip("/").rsplit("/", 1)[-1]
    if named:
        return named
    if family == "glm4":
        base = "glm-4-9b-chat" + ("-1m" if cfg.seq_length >= 1_000_000 else "")
        return base + ("-hf" if cfg.checkpoint_layout == "hf" else "")
    if family == "chatglm3":
        return "chatglm3-6b" + ("-32k" if cfg.rope_ratio > 1 else "")
    return "chatglm2-6b"


def detect_family(path: str | Path, cfg: ChatGLMConfig | None = None) -> ModelFamily:
    path = Path(path)
    cfg = cfg or ChatGLMConfig.from_json(path)
    sp_or_ranks = path / "tokenizer.model"
    hf_json = path / "tokenizer.json"
    if sp_or_ranks.is_file() and _is_rank_file(sp_or_ranks):
        family, tok, why = "glm4", sp_or_ranks, "tiktoken BPE tokenizer.model"
    elif not sp_or_ranks.is_file() and hf_json.is_file():
        family, tok, why = "glm4", hf_json, "byte-level BPE tokenizer.json"
    elif sp_or_ranks.is_file():
        tok = sp_or_ranks
        name = str(cfg.extra.get("_name_or_path") or "").lower()
        if _mentions(path / "tokenizer_config.json", "<|user|>"):
            family, why = "chatglm3", "role tokens in tokenizer_config.json"
        elif _mentions(path / "tokenization_chatglm.py", "<|observation|>"):
            family, why = "chatglm3", "role tokens in tokenization_chatglm.py"
        elif "chatglm3" in name:
            family, why = "chatglm3", f"config _name_or_path {name!r}"
        else:
            family, why = "chatglm2", "SentencePiece tokenizer.model without role tokens"
    else:
        raise FileNotFoundError(f"missing tokenizer file: {sp_or_ranks} (or tokenizer.json)")
    if cfg.checkpoint_layout == "hf":
        why += ", GlmForCausalLM (-hf) weights"
    return ModelFamily(family, _member(family, cfg), tok, why)


def load_tokenizer(family: ModelFamily, chat_template: str | None = None) -> Any:
    """The family's tokenizer, carrying its chat format (`chat_template` overrides it)."""
    if family.family == "glm4":
        from chatglm_serve.model.tokenizer_glm4 import Glm4Tokenizer

        tok = Glm4Tokenizer.from_file(family.tokenizer_file)
    elif family.family == "chatglm3":
        from chatglm_serve.model.tokenizer_chatglm3 import ChatGLM3Tokenizer

        tok = ChatGLM3Tokenizer(str(family.tokenizer_file))
    else:
        from chatglm_serve.model.tokenizer import ChatGLMTokenizer

        tok = ChatGLMTokenizer(str(family.tokenizer_file))
    tok.chat_format = make_chat_format(chat_template or family.family, tok)
    tok.member = family.member
    return tok


def chat_format_of(tokenizer: Any):
    """The chat format a tokenizer was loaded with (its family's own when none was set)."""
    fmt = getattr(tokenizer, "chat_format", None)
    if fmt is None:
        fmt = make_chat_format(getattr(tokenizer, "family", "chatglm2"), tokenizer)
        # a tokenizer that takes no attributes gets it rebuilt on each call
        with contextlib.suppress(AttributeError):
            tokenizer.chat_format = fmt
    return fmt
