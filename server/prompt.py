"""OpenAI chat messages -> ChatGLM2's (query, history), as the seed's openai_api.py builds them.

ChatGLM2 has no system role: the seed prepends a leading system message to the final user query
(plain concatenation, no separator) and pairs earlier user/assistant turns into history. We keep
that, and make the irregular shapes real clients send well-defined instead of dropping history:
consecutive messages of one side are joined with a newline, an assistant turn with no user turn
before it pairs with an empty query, and a system (or developer) message after the start is
treated as user text. That includes a system message that ends the conversation: it is an
instruction for the next reply (ChatGPT-Next-Web's memory request ends with a system
"Summarize the discussion briefly..."), so it joins the last user turn, or becomes the query
when an assistant turn comes before it.
"""

from __future__ import annotations

from chatglm_serve.server.errors import APIError
from chatglm_serve.server.protocol import ChatMessage

_INSTRUCTION_ROLES = ("system", "developer")


def messages_to_chat(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    """-> (query, history) for ChatGLMTokenizer.encode_chat; APIError 400 when there is nothing
    to answer (the conversation ends with an assistant turn, or has no user message at all)."""
    if not messages or messages[-1].role == "assistant":
        raise APIError(
            400,
            "The last message must have role 'user' (or 'system'/'developer', an instruction for "
            "the reply); ChatGLM2 does not continue an assistant turn.",
            code="invalid_value",
            param="messages",
        )
    if not any(m.role == "user" for m in messages):
        raise APIError(
            400,
            "The messages need at least one message with role 'user'.",
            code="invalid_value",
            param="messages",
        )
    i = 0
    system_parts: list[str] = []
    while i < len(messages) and messages[i].role in _INSTRUCTION_ROLES:
        system_parts.append(messages[i].text())
        i += 1
    system = "\n".join(system_parts)

    # Fold the rest into alternating turns: ("user", text) / ("assistant", text).
    turns: list[list[str]] = []
    for m in messages[i:]:
        side = "assistant" if m.role == "assistant" else "user"
        if turns and turns[-1][0] == side:
            turns[-1][1] += "\n" + m.text()
        else:
            turns.append([side, m.text()])

    # the last turn is the user's (checked above); turns now end in assistant
    query = turns.pop()[1]
    history: list[tuple[str, str]] = []
    pending_user: str | None = None
    for side, text in turns:
        if side == "user":
            pending_user = text
        else:
            history.append((pending_user or "", text))
            pending_user = None
    return system + query, history
