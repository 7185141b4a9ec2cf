"""A ChatGLM3 / GLM-4 reply -> OpenAI content or tool call, as the text streams in.

Both models open a reply with a metadata line after `<|assistant|>`: empty for a plain answer, the
function's name for a tool call. GLM-4 then writes the arguments as JSON; ChatGLM3 writes
```python\\ntool_call(key=value, ...)\\n``` (PROMPT.md), read here with `ast` (never eval).

The parser holds the first line back only while it can still become a declared tool's name, so
plain answers stream as before. A tool call is held until the reply ends: only then can its
arguments be checked (JSON object, the schema's required keys). A valid call is released as
`tool_calls` (streamed: the name, then the arguments in the pieces the model wrote them) with
finish_reason "tool_calls"; an invalid one comes back as the text the model wrote, so a bad
generation is the client's to see, never a server error.
"""

from __future__ import annotations

import ast
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object's text
    pieces: list[str]  # `arguments` as the model produced it, piece by piece (for streaming)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _chatglm3_arguments(text: str) -> dict | None:
    """`tool_call(a=1, b="x")` (optionally in a ```python fence) -> {"a": 1, "b": "x"}."""
    body = text.strip()
    if body.startswith("```"):
        lines = body.split("\n")
        if len(lines) < 2 or not lines[-1].strip().startswith("```"):
            return None
        body = "\n".join(lines[1:-1]).strip()
    try:
        call = ast.parse(body, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
        return None
    if call.func.id != "tool_call" or call.args:
        return None
    args: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            return None
        try:
            args[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, SyntaxError, TypeError):
            return None
    return args


def _fits_schema(args: Any, schema: dict | None) -> bool:
    """The arguments a function can be called with: an object holding the required keys, no
    undeclared ones where the schema forbids them."""
    if not isinstance(args, dict):
        return False
    schema = schema or {}
    if any(k not in args for k in schema.get("required", [])):
        return False
    props = schema.get("properties")
    if schema.get("additionalProperties") is False and isinstance(props, dict):
        return all(k in props for k in args)
    return True


class ReplyParser:
    """One choice's reply text in, what the client sees out (see the module doc).

    tools: {name: parameters schema} offered to the model (None: tool calls are off);
    forced: the name the prompt already opened the call with (tool_choice naming a function).
    """

    def __init__(
        self,
        chat_format: str,
        tools: dict[str, dict | None] | None,
        forced: str | None = None,
        segment_id: int | None = None,
    ) -> None:
        self.chat_format = chat_format
        self.tools = tools
        # <|assistant|> inside a reply opens a new segment with its own metadata line: ChatGLM3
        # may answer "Let me look that up." and then call a tool (PROMPT.md)
        self.segment_id = segment_id
        self._state = "call" if forced else ("meta" if tools else "lead")
        self._name = forced
        self._forced = forced is not None
        self._held = ""  # text not released yet
        self._pieces: list[str] = []  # the call's text, as fed

    def feed(self, text: str, token_ids: Sequence[int] = ()) -> str:
        """Add reply text (and the ids it came from); returns the content to send now."""
        out = self._feed(text)
        opens_segment = self.segment_id is not None and self.segment_id in token_ids
        if opens_segment and self.tools and self._state in ("content", "lead"):
            out += self._held.lstrip() if self._state == "lead" else ""
            self._state, self._held = "meta", ""
        return out

    def _feed(self, text: str) -> str:
        if not text:
            return ""
        if self._state == "content":
            return text
        if self._state == "call":
            self._pieces.append(text)
            return ""
        self._held += text
        if self._state == "lead":  # no tools: drop the (empty) metadata line's whitespace
            out = self._held.lstrip()
            if out:
                self._state, self._held = "content", ""
            return out
        return self._meta()

    def _meta(self) -> str:
        held = self._held
        line, newline, rest = held.partition("\n")
        name = line.strip()
        if newline:
            if name and name in self.tools:
                self._state, self._name, self._held = "call", name, ""
                self._pieces = [rest] if rest else []
                return ""
            if not name:  # a plain answer: its text starts after the empty metadata line
                self._state, self._held = "lead", ""
                return self._feed(rest)
            self._state, self._held = "content", ""
            return held.lstrip()
        if any(t.startswith(name) for t in self.tools):
            return ""  # may still be a tool's name
        self._state, self._held = "content", ""
        return held.lstrip()

    def finish(self) -> tuple[str, ToolCall | None]:
        """End of the reply: (content still to send, the tool call if the reply is a valid one)."""
        state, held = self._state, self._held
        self._state, self._held = "content", ""
        if state != "call":
            return (held.lstrip(), None)
        raw = "".join(self._pieces)
        call = self._tool_call(raw)
        if call is not None:
            return "", call
        # not a valid call: the model's own text, metadata line included
        return (raw if self._forced else f"{self._name}\n{raw}"), None

    def _tool_call(self, raw: str) -> ToolCall | None:
        name = self._name
        assert name is not None
        schema = (self.tools or {}).get(name)
        if self.chat_format == "chatglm3":
            args = _chatglm3_arguments(raw)
            if args is None or not _fits_schema(args, schema):
                return None
            text = json.dumps(args, ensure_ascii=False)
            return ToolCall(name, text, [text])
        try:
            args = json.loads(raw)
        except ValueError:
            return None
        if not _fits_schema(args, schema):
            return None
        # GLM-4 writes JSON: the arguments are its text, in the pieces it was generated in
        pieces = [p for p in self._pieces if p]
        lead = len(raw) - len(raw.lstrip())
        trail = len(raw.rstrip())
        out, pos = [], 0
        for p in pieces:
            a, b = max(pos, lead), min(pos + len(p), trail)
            if b > a:
                out.append(raw[a:b])
            pos += len(p)
        return ToolCall(name, raw.strip(), out)


class PassThrough:
    """ChatGLM2's replies: text as generated, never a tool call."""

    def feed(self, text: str, token_ids: Sequence[int] = ()) -> str:
        return text

    def finish(self) -> tuple[str, ToolCall | None]:
        return "", None
