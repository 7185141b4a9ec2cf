"""GLM-4's tokenizer: a tiktoken byte-level BPE (`tokenizer.model`) and 14 special tokens after it.

The file holds one `base64(token bytes) rank` line per token (151,329 for glm-4-9b-chat); the
specials `<|endoftext|> [MASK] [gMASK] [sMASK] <sop> <eop> <|system|> <|user|> <|assistant|>
<|observation|>` and four image/video markers take the next ids (151329..151342). Text is split
with the cl100k-style pattern GLM-4 publishes and merged by the `tiktoken` library. The `-hf`
checkpoints ship the same vocabulary as a `tokenizer.json` (byte-level BPE with GPT-2's byte to
character map); we read its ranks back into the same tiktoken encoding.

Special token names typed in user text encode as plain text (tiktoken `disallowed_special=()`).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken

PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)


def read_rank_file(path: str | os.PathLike) -> dict[bytes, int]:
    """GLM-4's `tokenizer.model`: `base64 rank` lines -> {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a `base64 rank` line ({e})") from None
    if not ranks:
        raise ValueError(f"{path}: no tokens")
    return ranks


def write_rank_file(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    lines = [
        f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])
    ]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def ranks_from_tokenizer_json(data: dict) -> tuple[dict[bytes, int], dict[str, int]]:
    """A byte-level BPE tokenizer.json -> ({token bytes: rank}, {special name: id})."""
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError("tokenizer.json: expected a byte-level BPE model with a vocab")
    byte_of = {c: b for b, c in gpt2_byte_chars().items()}
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    ranks = {}
    for token, rank in model["vocab"].items():
        if token in specials:
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = rank
        except KeyError:
            raise ValueError(f"tokenizer.json: token {token!r} is not byte-level") from None
    return ranks, specials


class Glm4Tokenizer:
    """Encode/decode for GLM-4 (duck-compatible with ChatGLMTokenizer for the engine)."""

    family = "glm4"

    def __init__(
        self,
        ranks: dict[bytes, int],
        specials: dict[str, int] | None = None,
        source: str = "<ranks>",
    ) -> None:
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError(f"{source}: token ranks are not 0..{n - 1}")
        if specials is None:
            specials = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        missing = [
            t for t in ("<|endoftext|>", "[gMASK]", "<sop>", "<|user|>") if t not in specials
        ]
        if missing:
            raise ValueError(f"{source}: special token(s) {missing} missing")
        self.source = source
        self.special_tokens = dict(specials)
        self._enc = tiktoken.Encoding(
            name=f"glm4:{source}",
            pat_str=PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self._names = {i: name for name, i in self.special_tokens.items()}
        self.bpe_vocab_size = n
        self.vocab_size: int = max(n, max(self.special_tokens.values()) + 1)
        self.eos_token_id: int = self.special_tokens["<|endoftext|>"]
        self.pad_token_id: int = self.eos_token_id
        self.gmask_token_id = self.special_tokens["[gMASK]"]
        self.sop_token_id = self.special_tokens["<sop>"]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Glm4Tokenizer:
        path = Path(path)
        if path.name == "tokenizer.json":
            ranks, specials = ranks_from_tokenizer_json(json.loads(path.read_text("utf-8")))
            return cls(ranks, specials, str(path))
        return cls(read_rank_file(path), None, str(path))

    # -- encoding --------------------------------------------------------------------------

    @property
    def prefix_token_ids(self) -> list[int]:
        """`[gMASK] <sop>`: every GLM-4 prompt starts with these."""
        return [self.gmask_token_id, self.sop_token_id]

    def encode_text(self, text: str) -> list[int]:
        return self._enc.encode(text, disallowed_special=()) if text else []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.encode_text(text)
        return self.prefix_token_ids + ids if add_special_tokens else ids

    def role_token_id(self, role: str) -> int:
        return self.special_tokens[f"<|{role}|>"]

    def encode_chat(self, query, history=None, reply_ids=None) -> list[int]:
        """The prompt ids of GLM-4's chat format (model/chat_format.py)."""
        from chatglm_serve.model.family import chat_format_of

        return chat_format_of(self).encode_chat(query, history, reply_ids=reply_ids)

    # -- decoding --------------------------------------------------------------------------

    def is_special(self, token_id: int) -> bool:
        return token_id in self._names or token_id >= self.bpe_vocab_size

    def special_text(self, token_id: int) -> str:
        return self._names.get(token_id, "")

    def decode_segment(self, ids: Sequence[int], *, at_start: bool) -> str:
        """Plain BPE ids -> text (byte-level: no start-of-text rule, so `at_start` is moot)."""
        return self._enc.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"negative token id {min(ids)}")
        out: list[str] = []
        segment: list[int] = []
        for i in ids:
            if not self.is_special(i):
                segment.append(i)
                continue
            out.append(self.decode_segment(segment, at_start=False))
            segment = []
            if not skip_special_tokens:
                out.append(self.special_text(i))
        out.append(self.decode_segment(segment, at_start=False))
        return "".join(out)

    # -- vocabulary ------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """A token's exact bytes (what a grammar matches; engine/guided.py)."""
        return self._enc.decode_single_token_bytes(token_id)

    def id_to_piece(self, token_id: int) -> str:
        if token_id in self._names:
            return self._names[token_id]
        if 0 <= token_id < self.bpe_vocab_size:
            return self._enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
        raise IndexError(f"token id {token_id} outside the vocabulary [0, {self.vocab_size})")

    def piece_to_id(self, piece: str) -> int:
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        return self._enc.encode_single_token(piece.encode("utf-8"))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Glm4Tokenizer({self.source!r}, vocab_size={self.vocab_size})"
