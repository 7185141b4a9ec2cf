"""Chat formats of the ChatGLM family: messages (and tools) -> prompt ids, and the stop ids.

- `chatglm2`: the seed's `[Round N]\\n\\n问：...\\n\\n答：` text, one SentencePiece call
  (model/tokenizer.py); no system role, no tools.
- `chatglm3` and `glm4`: `[gMASK] sop`, then each message as its role token, a metadata line and
  the content, each part encoded on its own (as THUDM's `build_single_message` does), then
  `<|assistant|>`. A reply ends at eos, `<|user|>` or `<|observation|>`. A tool call is an
  assistant turn whose metadata line is the function name; its result comes back as an
  `<|observation|>` turn. The two differ in how tools are announced in the system turn (ChatGLM3:
  PROMPT.md's English preamble and a JSON list; GLM-4: its chat template's `# 可用工具` section)
  and in how the model writes the arguments (model-side parsing is server/tools.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

CHAT_FORMATS = ("chatglm2", "chatglm3", "glm4")

# ChatGLM3's openai_api_demo announces tools with this sentence, then the JSON list (PROMPT_en.md).
CHATGLM3_TOOLS_PREAMBLE = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)
# GLM-4's chat template: the system turn it writes when tools are given.
GLM4_TOOLS_PREAMBLE = (
    "你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
GLM4_TOOL_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


class ChatFormatError(ValueError):
    """A chat format this tokenizer cannot write (e.g. role turns on a ChatGLM2 vocabulary)."""


@dataclass
class Turn:
    """One message of a role-token chat: role is system / user / assistant / observation."""

    role: str
    content: str
    metadata: str = ""


class ChatGLM2Format:
    name = "chatglm2"
    supports_tools = False
    segment_token_id = None

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        self.stop_token_ids = [] if eos is None else [eos]  # empty: the model config's eos

    def encode_chat(
        self,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        reply_ids: Callable[[str], Sequence[int] | None] | None = None,
    ) -> list[int]:
        from chatglm_serve.model.tokenizer import ChatGLMTokenizer

        return ChatGLMTokenizer.encode_chat(self.tokenizer, query, history, reply_ids=reply_ids)


class RoleChatFormat:
    """ChatGLM3's and GLM-4's format (see the module doc)."""

    supports_tools = True

    def __init__(self, tokenizer: Any, name: str) -> None:
        if not hasattr(tokenizer, "role_token_id"):
            raise ChatFormatError(
                f"chat template {name!r} needs the role tokens <|user|> <|assistant|>; "
                f"this checkpoint's tokenizer ({tokenizer.family}) has none"
            )
        self.tokenizer = tokenizer
        self.name = name
        # <|assistant|> generated inside a reply starts a new segment (text, then a tool call)
        self.segment_token_id = tokenizer.role_token_id("assistant")
        self.stop_token_ids = [
            tokenizer.eos_token_id,
            tokenizer.role_token_id("user"),
            tokenizer.role_token_id("observation"),
        ]

    def tools_turn(self, tools: list[dict]) -> Turn:
        """The system turn announcing `tools` (OpenAI `function` objects: name, parameters...)."""
        if self.name == "chatglm3":
            listed = json.dumps(tools, indent=4, ensure_ascii=False)
            return Turn("system", CHATGLM3_TOOLS_PREAMBLE + "\n" + listed)
        text = GLM4_TOOLS_PREAMBLE
        for fn in tools:
            text += f"\n\n## {fn['name']}\n\n{json.dumps(fn, indent=4, ensure_ascii=False)}"
            text += GLM4_TOOL_SUFFIX
        return Turn("system", text)

    def tool_call_text(self, name: str, arguments: dict) -> tuple[str, str]:
        """(metadata, content) of an assistant turn calling `name`, as the model writes it."""
        if self.name == "chatglm3":
            args = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
            return name, f"```python\ntool_call({args})\n```"
        return name, json.dumps(arguments, ensure_ascii=False)

    def encode_turns(self, turns: Sequence[Turn], reply_prefix: str = "") -> list[int]:
        """`[gMASK] sop`, each turn, `<|assistant|>` (+ `reply_prefix`, e.g. a forced
        tool-call metadata line `name\\n`)."""
        tok = self.tokenizer
        ids = list(tok.prefix_token_ids)
        for t in turns:
            ids.append(tok.role_token_id(t.role))
            ids += tok.encode_text(f"{t.metadata}\n")
            ids += tok.encode_text(t.content)
        ids.append(tok.role_token_id("assistant"))
        if reply_prefix:
            ids += tok.encode_text(reply_prefix)
        return ids

    def encode_chat(
        self,
        query: str,
        history: Sequence[tuple[str, str]] | Sequence[dict] | None = None,
        reply_ids: Callable[[str], Sequence[int] | None] | None = None,
    ) -> list[int]:
        """The seed-style (query, history) chat: history as (query, response) pairs, or as
        THUDM's ChatGLM3 / GLM-4 `chat()` history of {role, content, metadata} dicts.

        `reply_ids` is accepted for the engine's interface; replies are re-encoded as text
        here (their generated ids start with the metadata line, so they are not spliced)."""
        turns: list[Turn] = []
        for item in history or []:
            if isinstance(item, dict):
                turns.append(
                    Turn(item["role"], item.get("content") or "", item.get("metadata", ""))
                )
            else:
                q, a = item
                turns += [Turn("user", q), Turn("assistant", a)]
        turns.append(Turn("user", query))
        return self.encode_turns(turns)


ChatFormat = ChatGLM2Format | RoleChatFormat


def make_chat_format(name: str, tokenizer: Any) -> ChatFormat:
    if name == "chatglm2":
        return ChatGLM2Format(tokenizer)
    if name in ("chatglm3", "glm4"):
        return RoleChatFormat(tokenizer, name)
    raise ChatFormatError(f"unknown chat template {name!r}; expected one of {list(CHAT_FORMATS)}")
