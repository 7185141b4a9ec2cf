"""OpenAI chat messages (+ tools, tool_choice) -> the role turns of ChatGLM3 / GLM-4.

Each message becomes one turn of its role; a `tool` message becomes the `<|observation|>` turn
the model reads a tool's result from; an assistant message's `tool_calls` become the assistant
turns that made them (metadata line = the function's name, content = the arguments as that model
writes them). Offered tools are announced in a system turn first, as THUDM's API servers do;
`tool_choice: "none"` leaves them out, a named function keeps only that one and opens the reply
with its name, so the model writes its arguments. Requests that cannot be served are refused
here, once, with a 400 naming the parameter. ChatGLM2 keeps server/prompt.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from chatglm_serve.model.chat_format import Turn
from chatglm_serve.server.errors import APIError
from chatglm_serve.server.protocol import ChatCompletionRequest, NamedToolChoice


@dataclass
class RolePrompt:
    turns: list[Turn]
    reply_prefix: str  # text after <|assistant|> the model continues from ("name\n" or "")
    tools: dict[str, dict | None] | None  # name -> parameters schema; None = tool calls off
    forced: str | None  # the function tool_choice names


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, code="invalid_value", param=param)


def check_tools_supported(body: ChatCompletionRequest, chat_format: str) -> None:
    """ChatGLM2 has no tool format: `tools` (and tool turns) are a 400, not silently ignored."""
    if body.tools:
        raise _bad(
            "tools",
            f"This model ({chat_format} chat format) has no tool-call format; "
            "tools are served for ChatGLM3 and GLM-4 checkpoints.",
        )
    if body.tool_choice not in (None, "none"):
        raise _bad("tool_choice", "tool_choice needs tools, which this model does not support.")
    if any(m.role == "tool" or m.tool_calls for m in body.messages):
        raise _bad(
            "messages",
            f"This model ({chat_format} chat format) has no tool-call format; "
            "messages with role 'tool' or tool_calls are served for ChatGLM3 and GLM-4.",
        )


def _arguments(text: str) -> dict | str:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def role_prompt(body: ChatCompletionRequest, chat_format) -> RolePrompt:
    """The turns of a ChatGLM3 / GLM-4 prompt (`chat_format`: model/chat_format.RoleChatFormat)."""
    choice = body.tool_choice
    tools = body.tools or []
    if choice is not None and not tools and choice != "none":
        raise _bad("tool_choice", "tool_choice is only allowed when tools are specified.")
    if choice == "required":
        raise _bad(
            "tool_choice",
            "tool_choice 'required' is not supported; use 'auto' or name a function.",
        )
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise _bad("tools", "tool function names must be unique.")
    forced = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if forced is not None and forced not in names:
        raise _bad("tool_choice", f"tool_choice names {forced!r}, which is not in tools.")

    turns: list[Turn] = []
    offered = None
    if tools and choice != "none":
        functions = [t.function for t in tools if forced is None or t.function.name == forced]
        turns.append(
            chat_format.tools_turn(
                [f.model_dump(exclude_none=True, exclude={"strict"}) for f in functions]
            )
        )
        offered = {f.name: f.parameters for f in functions}
    for i, m in enumerate(body.messages):
        if m.role in ("system", "developer"):
            turns.append(Turn("system", m.text()))
        elif m.role == "user":
            turns.append(Turn("user", m.text()))
        elif m.role == "tool":
            turns.append(Turn("observation", m.text()))
        else:
            if m.text() or not m.tool_calls:
                turns.append(Turn("assistant", m.text()))
            for call in m.tool_calls or []:
                args = _arguments(call.function.arguments)
                if isinstance(args, dict):
                    meta, content = chat_format.tool_call_text(call.function.name, args)
                else:  # arguments the model wrote as invalid JSON: kept as written
                    meta, content = call.function.name, args
                turns.append(Turn("assistant", content, meta))
        if i == len(body.messages) - 1 and m.role == "assistant":
            raise _bad(
                "messages",
                "The last message must not be the assistant's (the model answers the turn "
                "after it: user, tool or system).",
            )
    return RolePrompt(turns, f"{forced}\n" if forced else "", offered, forced)
