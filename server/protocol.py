"""The wire format: OpenAI chat completion requests/responses/chunks, the seed's legacy API, errors.

Requests ignore unknown fields (as OpenAI does, so newer clients keep working) but refuse wrong
types and out-of-range values; the error handlers turn those refusals into 400s.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from chatglm_serve.server.structured import GuidedFields

# --- requests -----------------------------------------------------------------------------------


def _encodable(v: str) -> str:
    """Text for the tokenizer. JSON may escape a lone UTF-16 surrogate ("\\ud800"): a Python str
    but not UTF-8, which the tokenizer fails on (a 500); refused here as the client's error."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid Unicode at position {e.start} (a lone surrogate)") from None
    return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _unicode(cls, v: str) -> str:
        return _encodable(v)


class FunctionCallIn(BaseModel):
    name: str
    arguments: str = ""


class ToolCallIn(BaseModel):
    """An earlier assistant turn's tool call, sent back by the client."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    # "developer" is OpenAI's newer name for a system message; "tool" carries a tool's result.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(
                        f"content part {i} has type {kind!r}; only 'text' parts are supported"
                    )
        return v

    @field_validator("content")
    @classmethod
    def _unicode(cls, v: Any) -> Any:
        return _encodable(v) if isinstance(v, str) else v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionSpec(BaseModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingExtras(BaseModel):
    """Fields chat and completion requests share: stop strings, logit_bias and vLLM's
    sampling extensions."""

    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    # token id (a JSON string key) -> bias added to its logit before sampling, as OpenAI's
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    # vLLM extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]


# + response_format (server/structured.py), stop and vLLM's extras (SamplingExtras)
class ChatCompletionRequest(GuidedFields, SamplingExtras):
    model_config = ConfigDict(extra="ignore")

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    # The seed's openai_api.py took max_length (prompt + reply); kept for its clients.
    max_length: Annotated[int, Field(ge=1)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # tool calls (ChatGLM3, GLM-4): server/chat_turns.py and server/tools.py
    tools: Annotated[list[ToolSpec], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def reply_budget(self) -> int | None:
        """The asked reply length limit (max_completion_tokens wins over max_tokens)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class LegacyRequest(BaseModel):
    """The seed's api.py body. Falsy values mean "the default", as the seed's `x if x else d`."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    history: list[Annotated[list[str], Field(min_length=2, max_length=2)]] | None = None
    max_length: int | None = None
    top_p: float | None = None
    temperature: float | None = None

    @field_validator("prompt")
    @classmethod
    def _unicode(cls, v: str) -> str:
        return _encodable(v)

    @field_validator("history")
    @classmethod
    def _unicode_history(cls, v: list[list[str]] | None) -> list[list[str]] | None:
        for turn in v or []:
            for text in turn:
                _encodable(text)
        return v

    @field_validator("max_length")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError("max_length must be >= 0")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p_range(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError("top_p must be in [0, 1]")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature_range(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        return v


# --- responses ----------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatglm-serve"
    # the checkpoint's family member and chat format, as detected at load (vLLM puts the
    # model path in `root`); None while the engine is still loading
    root: str | None = None
    chat_template: str | None = None
    parent: str | None = None  # a fine-tune's base model (LoRA / P-Tuning v2); None for the base


class LoadLoRARequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's shape)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1)


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=128)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LegacyResponse(BaseModel):
    response: str
    history: list[list[str]]
    status: int = 200
    time: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
