"""The wire format of /v1/completions (OpenAI's legacy text completions) and of vLLM's
/tokenize, /detokenize and /tokenizer_info."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from chatglm_serve.server.protocol import ChatMessage, SamplingExtras, StreamOptions, _encodable
from chatglm_serve.server.structured import GuidedFields

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(GuidedFields, SamplingExtras):
    model_config = ConfigDict(extra="ignore")

    # a string, several strings, token ids, or several lists of token ids (one choice set each)
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    model: str | None = None
    suffix: str | None = None  # refused: ChatGLM has no fill-in-the-middle
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # OpenAI's default; 0 = score only
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1, le=16)] = 1
    best_of: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    user: str | None = None
    # vLLM extensions (and those of SamplingExtras)
    add_special_tokens: bool = True  # ChatGLM's `[gMASK] sop` in front of a text prompt
    return_tokens_as_token_ids: bool = False  # logprobs tokens as "token_id:<id>"

    # what routes_openai.sampling_params reads besides the fields above
    max_length: None = None
    top_logprobs: None = None

    @field_validator("prompt")
    @classmethod
    def _unicode(cls, v):
        if isinstance(v, str):
            return _encodable(v)
        for p in v:
            if isinstance(p, str):
                _encodable(p)
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("not supported (ChatGLM has no fill-in-the-middle)")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("only best_of == n is supported")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def reply_budget(self) -> int | None:
        return self.max_tokens


class TokenizeRequest(BaseModel):
    """vLLM's: a text prompt, or chat messages through the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @field_validator("prompt")
    @classmethod
    def _unicode(cls, v: str | None) -> str | None:
        return v if v is None else _encodable(v)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str
