"""Stop strings in a text stream: never emit one, even when it arrives split across tokens.

Text that could still become the start of a stop string is held back until the next token
decides it; when a stop string completes, the stream is cut right before it.
"""

from __future__ import annotations


def find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest occurrence of any stop string in text, or -1."""
    best = -1
    for s in stops:
        i = text.find(s)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def split_stream(text: str, stops: list[str], final: bool) -> tuple[str, str, bool]:
    """(emit, hold, stopped) for text not yet emitted.

    final: no more text will come, so nothing needs holding back.
    """
    if not stops:
        return text, "", False
    i = find_stop(text, stops)
    if i != -1:
        return text[:i], "", True
    if final:
        return text, "", False
    k = partial_stop_len(text, stops)
    return (text[: len(text) - k], text[len(text) - k :], False) if k else (text, "", False)
