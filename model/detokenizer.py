"""Incremental detokenization for streaming: ids in, text out as soon as it is final.

Decoding piece by piece is wrong for SentencePiece: the first word of a decode loses its
dummy-prefix space, and a character spelled in byte-fallback pieces (every emoji, rare CJK) is
invalid until its last byte arrives. So we keep a small window of ids not yet turned into
final text and re-decode only that window each step:
  - the window is decoded as a continuation of the text so far (SentencePiece's start-of-text
    rule applies only while nothing has been emitted yet);
  - if its text ends in U+FFFD the last character may still be incomplete: hold it back;
  - otherwise emit it and start a new, empty window.
The window holds at most a few ids (one UTF-8 character is at most 4 bytes), so a step costs
O(1), not O(length of the text). The concatenation of everything emitted, after flush(), equals
tokenizer.decode(all ids) with the same skip_special_tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from chatglm_serve.model.tokenizer import ChatGLMTokenizer

_REPLACEMENT = "\ufffd"
# A window longer than this that still ends in U+FFFD holds invalid bytes, not just one
# incomplete character (at most 4 bytes): cut off its final part (see _cut_final_prefix).
_MAX_HELD = 8


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text chunks, one push per id."""

    def __init__(self, tokenizer: ChatGLMTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._window: list[int] = []  # ids whose text is not emitted yet
        self._started = False  # has any text been emitted (SentencePiece start-of-text rule)
        self._chunks: list[str] = []
        self._finished = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completed ("" if none yet)."""
        if self._finished:
            raise RuntimeError("push() after flush(): the stream has ended")
        token_id = int(token_id)
        if token_id < 0:
            raise ValueError(f"negative token id {token_id}")
        self.token_ids.append(token_id)
        tok = self.tokenizer
        if tok.is_special(token_id):
            if self.skip_special_tokens:
                return ""
            # A special ends the SentencePiece segment: whatever the window holds is final.
            return self._emit(self._drain() + tok.special_text(token_id))
        self._window.append(token_id)
        text = tok.decode_segment(self._window, at_start=not self._started)
        if not text.endswith(_REPLACEMENT):
            # Before any text, keep the window from the start: SentencePiece's dummy-prefix
            # rule may still apply to the next piece (e.g. after a lone leading "▁").
            if text or self._started:
                self._window = []
            return self._emit(text)
        if len(self._window) > _MAX_HELD:
            return self._emit(self._cut_final_prefix(text))
        return ""

    def extend(self, token_ids: Iterable[int]) -> str:
        """push() each id; return the text they completed together."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: return what is still held (a trailing invalid byte becomes U+FFFD)."""
        if self._finished:
            return ""
        self._finished = True
        return self._emit(self._drain())

    def _drain(self) -> str:
        text = self.tokenizer.decode_segment(self._window, at_start=not self._started)
        self._window = []
        return text

    def _emit(self, text: str) -> str:
        if text:
            self._chunks.append(text)
            self._started = True
        return text

    def _cut_final_prefix(self, text: str) -> str:
        """Split a long held window at a character boundary at least 3 ids before its end.

        Only invalid bytes keep a window growing. A byte whose decoding starts 4 or more bytes
        before the end cannot change any more (no UTF-8 character is longer), so the text up
        to a boundary there is final. The boundary is confirmed by decoding both halves: a
        split inside a character would turn it into U+FFFD and change the text.
        """
        tok = self.tokenizer
        window = self._window
        for cut in range(len(window) - 3, len(window) - 8, -1):
            head = tok.decode_segment(window[:cut], at_start=not self._started)
            if not head:
                continue
            tail = tok.decode_segment(window[cut:], at_start=False)
            if head + tail == text:
                self._window = window[cut:]
                return head
        return ""
