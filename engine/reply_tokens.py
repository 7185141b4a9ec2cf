"""The token ids of recent replies, by their text: so a chat's next turn can reuse them.

A client sends a chat's earlier replies back as text. Re-tokenizing that text often gives other
ids than the model generated (a model may emit a non-canonical tokenization: "ab" as "a" "b"),
and then the next turn's prompt leaves the prefix cache two tokens into the first reply. So when
a request finishes, the engine records reply text -> the generated ids that spell it, and chat
prompts are encoded with the known replies spliced in as those ids
(`ChatGLMTokenizer.encode_chat(..., reply_ids=map.lookup)`), as the seed's
`stream_chat(past_key_values=...)` continues from the generated ids.

Only ids whose decode is exactly the text are recorded, so a spliced prompt always spells the
conversation the client sent. Bounded: the `capacity` most recently recorded or used replies;
0 records nothing. Thread-safe (recorded on the engine's step thread, read by HTTP handlers).
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence

# A finished reply's last few ids may spell text its client never got (a stop string's start,
# an incomplete UTF-8 character when aborted): up to this many are dropped to match the text.
_MAX_TRIM = 8


class ReplyTokenMap:
    """Reply text -> generated token ids, least recently used dropped first."""

    def __init__(self, capacity: int, decode: Callable[[list[int]], str]) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._decode = decode
        self._map: OrderedDict[str, array] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._map)

    def lookup(self, text: str) -> list[int] | None:
        """The ids recorded for exactly this text, or None."""
        with self._lock:
            ids = self._map.get(text)
            if ids is None:
                return None
            self._map.move_to_end(text)
            return ids.tolist()

    def record(self, text: str, ids: Sequence[int]) -> bool:
        """Remember the ids of a reply as returned to its client; True if recorded.

        `ids` are the generated ids without the stop token. Recorded: the longest of ids and
        its prefixes down to `_MAX_TRIM` ids shorter whose decode is exactly `text`. A reply
        with surrounding whitespace is also recorded stripped (the seed's chat() and POST /
        return it stripped), with its whitespace-only end pieces cut, when that decodes exactly.
        """
        if self.capacity == 0 or not text:
            return False
        ids = [int(i) for i in ids]
        spelled = self._spelling(text, ids)
        if spelled is None:
            return False
        self._put(text, spelled)
        stripped = text.strip()
        if stripped and stripped != text:
            inner = self._strip_ids(spelled)
            if self._decode(inner) == stripped:
                self._put(stripped, inner)
        return True

    def clear(self) -> None:
        with self._lock:
            self._map.clear()

    def _spelling(self, text: str, ids: list[int]) -> list[int] | None:
        for k in range(len(ids), max(0, len(ids) - _MAX_TRIM) - 1, -1):
            decoded = self._decode(ids[:k])
            if decoded == text:
                return ids[:k]
            if len(decoded) < len(text):  # shorter prefixes only spell less
                return None
        return None

    def _strip_ids(self, ids: list[int]) -> list[int]:
        i, j = 0, len(ids)
        while i < j and not self._decode([ids[i]]).strip():
            i += 1
        while j > i and not self._decode([ids[j - 1]]).strip():
            j -= 1
        return ids[i:j]

    def _put(self, text: str, ids: list[int]) -> None:
        with self._lock:
            self._map[text] = array("i", ids)
            self._map.move_to_end(text)
            while len(self._map) > self.capacity:
                self._map.popitem(last=False)
