"""ChatGLM2's tokenizer: a SentencePiece vocabulary with five special tokens appended after it.

Ids 0..sp_size-1 are the SentencePiece pieces (0 `<unk>` doubling as pad, 1 `<s>`, 2 `</s>`,
then byte-fallback pieces and learned pieces); `[MASK] [gMASK] [sMASK] sop eop` follow at
sp_size..sp_size+4 (64789..64793 for the real chatglm2-6b file). A prompt is `[gMASK] sop`
followed by the whole prompt string encoded in ONE SentencePiece call, so it starts with the
dummy-prefix piece and `\n` is the byte piece `<0x0A>` (id 13).

A chat's earlier replies may instead be spliced in as the ids the model generated for them
(`encode_chat(..., reply_ids=...)`), so a second turn starts with exactly the tokens whose K/V
the first turn left in the prefix cache; the text between replies is then encoded as a
continuation (`encode_continuation`: no dummy-prefix piece).

Special token names typed in user text are encoded as plain text, as ChatGLM2 does: a user
cannot inject `[gMASK]` or `eop`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")

# Encoded in front of a continuation and cut off again: `\n` is a byte-fallback piece, which no
# learned piece contains, so nothing after it can merge with it.
_CONTINUATION_SENTINEL = "\n"


def _round_head(number: int, query: str) -> str:
    """A round of ChatGLM2's chat prompt up to its reply (the reply is followed by `_ROUND_END`)."""
    return f"[Round {number}]\n\n问：{query}\n\n答："


_ROUND_END = "\n\n"


def build_chat_prompt(query: str, history: Sequence[tuple[str, str]] | None = None) -> str:
    """The prompt string exactly as ChatGLM2's `build_prompt` writes it (rounds count from 1)."""
    history = history or []
    prompt = ""
    for i, (old_query, response) in enumerate(history, start=1):
        prompt += _round_head(i, old_query) + response + _ROUND_END
    prompt += _round_head(len(history) + 1, query)
    return prompt


class ChatGLMTokenizer:
    """Encode/decode for ChatGLM2 on top of a `tokenizer.model` SentencePiece file."""

    # the names appended after the SentencePiece vocabulary, in id order
    special_token_names: tuple[str, ...] = SPECIAL_TOKENS
    family = "chatglm2"

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from e
        self._setup(sp, str(path))

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> ChatGLMTokenizer:
        """From a serialized SentencePiece model (what `tokenizer.model` holds)."""
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_proto)
        except RuntimeError as e:
            raise ValueError(f"not a SentencePiece model ({e})") from e
        self = cls.__new__(cls)
        self._setup(sp, "<bytes>")
        return self

    def _setup(self, sp: spm.SentencePieceProcessor, source: str) -> None:
        self._sp = sp
        self.source = source
        self.sp_vocab_size: int = sp.get_piece_size()
        self.bos_token_id: int = sp.bos_id()
        self.eos_token_id: int = sp.eos_id()
        # ChatGLM2 pads with the unknown piece.
        self.pad_token_id: int = sp.unk_id()
        if min(self.bos_token_id, self.eos_token_id, self.pad_token_id) < 0:
            raise ValueError(f"{source}: the SentencePiece model lacks <unk>, <s> or </s>")
        self.special_tokens: dict[str, int] = {
            name: self.sp_vocab_size + i for i, name in enumerate(self.special_token_names)
        }
        self.mask_token_id = self.special_tokens["[MASK]"]
        self.gmask_token_id = self.special_tokens["[gMASK]"]
        self.smask_token_id = self.special_tokens["[sMASK]"]
        self.sop_token_id = self.special_tokens["sop"]
        self.eop_token_id = self.special_tokens["eop"]
        self.vocab_size: int = self.sp_vocab_size + len(self.special_token_names)
        # Ids without text of their own: skipped by decode(skip_special_tokens=True).
        self._special_ids = frozenset(
            [i for i in range(self.sp_vocab_size) if sp.is_control(i)]
            + [self.pad_token_id, *self.special_tokens.values()]
        )
        self._anchor_id, self._anchor_text = self._find_anchor()
        self._sentinel_ids = self._find_sentinel()

    def _find_anchor(self) -> tuple[int, str]:
        """A plain piece to decode in front of a segment that continues earlier text.

        SentencePiece drops the leading space of the first word of a decode (the dummy prefix);
        mid-text that space is real. Decoding [anchor, *ids] and cutting off the anchor's text
        gives the mid-text surface of ids, whatever the library's rule for the first word is.
        """
        sp = self._sp
        space_piece = next(
            (i for i in range(self.sp_vocab_size) if sp.id_to_piece(i).startswith("▁")), None
        )
        for i in range(self.sp_vocab_size):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
                continue
            text = sp.decode([i])
            if not text or text.startswith(" ") or "\ufffd" in text:
                continue
            if space_piece is not None:
                mid_surface = sp.id_to_piece(space_piece).replace("▁", " ")
                if sp.decode([i, space_piece]) != text + mid_surface:
                    continue
            return i, text
        raise ValueError(f"{self.source}: no plain piece in the SentencePiece vocabulary")

    def _find_sentinel(self) -> list[int] | None:
        """The ids of `_CONTINUATION_SENTINEL` encoded alone, when it is a safe sentinel.

        It is when it ends in the `<0x0A>` byte piece and no piece of the vocabulary contains a
        newline: then the ids of sentinel + text always start with exactly these ids, and what
        follows is text tokenized from a piece boundary, with no dummy prefix (it was used up
        by the sentinel). Without one (a vocabulary that learned newlines) nothing is spliced.
        """
        sp = self._sp
        ids = sp.encode(_CONTINUATION_SENTINEL)
        if not ids or not sp.is_byte(ids[-1]) or sp.id_to_piece(ids[-1]) != "<0x0A>":
            return None
        if any("\n" in piece for piece in sp.id_to_piece(list(range(self.sp_vocab_size)))):
            return None
        return ids

    # -- encoding --------------------------------------------------------------------------

    @property
    def prefix_token_ids(self) -> list[int]:
        """`[gMASK] sop`: every ChatGLM2 prompt starts with these."""
        return [self.gmask_token_id, self.sop_token_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        return self.prefix_token_ids + ids if add_special_tokens else ids

    def encode_text(self, text: str) -> list[int]:
        """One SentencePiece call on text alone (a chat turn's piece): its own dummy prefix."""
        return self._sp.encode(text) if text else []

    def build_chat_prompt(
        self, query: str, history: Sequence[tuple[str, str]] | None = None
    ) -> str:
        return build_chat_prompt(query, history)

    def encode_continuation(self, text: str) -> list[int] | None:
        """Ids of `text` where it follows earlier text at a piece boundary: no dummy-prefix piece.

        SentencePiece puts a dummy-prefix `▁` in front of every text it encodes; mid-prompt
        there is none. `text` is encoded behind a sentinel (`\\n`, a byte piece nothing merges
        with) whose ids are then cut off. None when this tokenizer has no safe sentinel.
        """
        if self._sentinel_ids is None:
            return None
        return self._encode_after(self._sentinel_ids, text)

    def _encode_after(self, sentinel_ids: list[int], text: str) -> list[int]:
        ids = self._sp.encode(_CONTINUATION_SENTINEL + text)
        assert ids[: len(sentinel_ids)] == sentinel_ids, "nothing merges with a safe sentinel"
        return ids[len(sentinel_ids) :]

    def encode_chat(
        self,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        reply_ids: Callable[[str], Sequence[int] | None] | None = None,
    ) -> list[int]:
        """ChatGLM2's chat prompt's ids: `[gMASK] sop` + the whole prompt in ONE SentencePiece call.

        Encoding the turns separately would add a dummy-prefix piece per turn and change the
        ids, so by default this is exactly ChatGLM2's encoding. With `reply_ids`, a lookup
        reply text -> the ids the model generated for it (None if unknown), each known
        history reply is spliced in as those ids instead of being re-tokenized (generated
        ids often differ from the text's own tokenization): the text up to that round's
        "答：" is encoded as before, the reply's ids follow, and the text after it is encoded
        as a continuation. Where the generated ids are the reply's own tokenization, the
        result equals the default encoding; an unknown reply (e.g. edited by the client) is
        encoded as text.
        """
        history = list(history or [])
        sentinel = self._sentinel_ids
        found = [reply_ids(r) for _, r in history] if reply_ids and sentinel else []
        if sentinel is None or not any(ids is not None for ids in found):
            return self.encode(build_chat_prompt(query, history))
        out = list(self.prefix_token_ids)
        text = ""  # not encoded yet
        at_start = True  # the prompt's first text gets the dummy prefix; later text continues
        for i, ((old_query, response), ids) in enumerate(zip(history, found, strict=True), 1):
            text += _round_head(i, old_query)
            if ids is None:
                text += response + _ROUND_END
                continue
            out += self._sp.encode(text) if at_start else self._encode_after(sentinel, text)
            out += ids
            text, at_start = _ROUND_END, False
        return out + self._encode_after(sentinel, text + _round_head(len(history) + 1, query))

    # -- decoding --------------------------------------------------------------------------

    def is_special(self, token_id: int) -> bool:
        """True for ids with no text of their own: the five appended tokens, SentencePiece
        control pieces (<s>, </s>), pad/<unk>, and ids past the vocabulary (the model's output
        layer is padded beyond it)."""
        return token_id in self._special_ids or token_id >= self.sp_vocab_size

    def special_text(self, token_id: int) -> str:
        """What decode(skip_special_tokens=False) shows for a special id; "" past the vocab."""
        return self.id_to_piece(token_id) if token_id < self.vocab_size else ""

    def decode_segment(self, ids: Sequence[int], *, at_start: bool) -> str:
        """Decode ids that are all ordinary SentencePiece ids (no `is_special` ones).

        at_start=True decodes them as the beginning of a text (the dummy-prefix space of the
        first word is dropped); at_start=False as a continuation of earlier text.
        """
        if not ids:
            return ""
        if at_start:
            return self._sp.decode(list(ids))
        return self._sp.decode([self._anchor_id, *ids])[len(self._anchor_text) :]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"negative token id {min(ids)}")
        if skip_special_tokens:
            return self.decode_segment([i for i in ids if not self.is_special(i)], at_start=True)
        # Specials split the text into SentencePiece segments; a segment after visible text
        # continues it (keeps its leading space).
        out: list[str] = []
        segment: list[int] = []
        started = False  # has any text been produced yet
        for i in ids:
            if not self.is_special(i):
                segment.append(i)
                continue
            out += [self.decode_segment(segment, at_start=not started), self.special_text(i)]
            started = started or any(out[-2:])
            segment = []
        out.append(self.decode_segment(segment, at_start=not started))
        return "".join(out)

    # -- vocabulary ------------------------------------------------------------------------

    def id_to_piece(self, token_id: int) -> str:
        if 0 <= token_id < self.sp_vocab_size:
            return self._sp.id_to_piece(token_id)
        if self.sp_vocab_size <= token_id < self.vocab_size:
            return self.special_token_names[token_id - self.sp_vocab_size]
        raise IndexError(f"token id {token_id} outside the vocabulary [0, {self.vocab_size})")

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece or special token name; unknown pieces map to <unk> (0)."""
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        return self._sp.piece_to_id(piece)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ChatGLMTokenizer({self.source!r}, vocab_size={self.vocab_size})"
