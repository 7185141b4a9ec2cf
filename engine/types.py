"""What goes into the engine (a request's sampling parameters) and what comes out (outputs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # ChatGLM's: divide positive / multiply negative seen logits
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None  # None = up to the rest of the context; 0 = score the prompt
    min_tokens: int = 0  # vLLM extension: stop conditions ignored before this many tokens
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # on top of the model's eos
    ignore_eos: bool = False  # vLLM extension, for benchmarks of random-weight models
    n: int = 1
    logprobs: int | None = None  # None = off; k >= 0 = chosen token's logprob + top-k
    # token id -> added to its logit before sampling (OpenAI's logit_bias, -100..100)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # None = off; k >= 0 = each prompt token's logprob (the first: None) + top-k, computed in
    # the forward that prefills the prompt (engine/prompt_logprobs.py); sent with choice 0
    prompt_logprobs: int | None = None
    # a compiled grammar the reply must match (engine/guided.py, AsyncEngine.compile_grammar);
    # None = free text
    guided: Any = None


class EngineError(Exception):
    """A request the engine refuses (e.g. prompt longer than the context). Reaches its caller only."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class PromptTooLongError(EngineError):
    def __init__(self, prompt_tokens: int, max_model_len: int):
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens, "
            f"but the prompt has {prompt_tokens} tokens.",
            code="context_length_exceeded",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len


class EngineOverloadedError(EngineError):
    """The waiting queue is full; the caller should retry later (HTTP 429 + Retry-After)."""

    def __init__(self, retry_after: float = 1.0):
        super().__init__("The server is overloaded; retry later.", code="overloaded")
        self.retry_after = retry_after


@dataclass(frozen=True)
class GuidedSpec:
    """What a reply must match. kind "json": `source` is a JSON schema as JSON text; "regex": a
    regular expression; "choice": a JSON list of the allowed strings. `param` names the request
    field it came from, for the 400 when it cannot be compiled (not part of the cache key)."""

    kind: str
    source: str
    param: str = "response_format"

    def key(self) -> tuple[str, str]:
        return (self.kind, self.source)


class GrammarError(EngineError):
    """A constraint the library cannot compile: the client's error (400), with the reason."""

    def __init__(self, message: str, param: str = "response_format") -> None:
        super().__init__(message, code="invalid_grammar", param=param)


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob)


@dataclass
class RequestMetrics:
    """Timings of one choice (time.monotonic() seconds), sent with its last output."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    def time_per_output_token(self, completion_tokens: int) -> float | None:
        if self.first_token_time is None or self.finished_time is None or completion_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (completion_tokens - 1)


@dataclass
class RequestOutput:
    """One step's news for one choice of a request (n > 1 gives one stream per index)."""

    request_id: str
    index: int  # choice index, 0..n-1
    text: str  # new text since the last output (never half a UTF-8 character, never a stop string)
    token_ids: list[int]  # new token ids since the last output
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far for this choice
    logprobs: list[TokenLogprob] | None = None  # for the new tokens, when asked
    # the prompt's tokens (the first None: nothing predicts it), on choice 0's first output
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: RequestMetrics | None = None  # on the last output of each index


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prompt_tokens_total: int = 0  # prompt tokens of finished-or-admitted requests
    prompt_tokens_computed: int = 0  # prefilled (not served from the prefix cache)
    generation_tokens_total: int = 0
    requests_finished: int = 0
    # added by the engine (all optional for readers of the fields above)
    prompt_tokens_cached: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    kv_capacity_tokens: int = 0
    time_to_first_token_sum: float = 0.0  # seconds, over first tokens produced
    time_to_first_token_count: int = 0
    time_per_output_token_sum: float = 0.0  # seconds, over finished choices with >= 2 tokens
    time_per_output_token_count: int = 0
    gpu_memory_allocated_bytes: int | None = (
        None  # torch's allocator, this process's GPUs; None on CPU
    )

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
