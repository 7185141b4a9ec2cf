"""One generated continuation of a prompt (a request with n > 1 has n of them), and its request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

from chatglm_serve.engine.types import FinishReason, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from chatglm_serve.engine.adapters import ActiveAdapter


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # effective: clipped to what the context leaves
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    adapter: ActiveAdapter | None = None  # a LoRA / P-Tuning v2 adapter (engine/adapters.py)

    @property
    def finished(self) -> bool:
        return all(s.status is SequenceStatus.FINISHED for s in self.seqs)


class Sequence:
    """Token ids (prompt + output so far), KV blocks, and streaming state of one choice."""

    def __init__(
        self,
        seq_id: int,
        request: Request,
        index: int,
        generator: torch.Generator | None,
        detokenizer: Any,
    ) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.token_ids: list[int] = list(request.prompt_ids)
        self.prompt_len = len(request.prompt_ids)
        self.status = SequenceStatus.WAITING
        # KV state: tokens [0, num_computed_tokens) have K/V in block_table's blocks
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the leading full computed blocks
        self.num_cached_tokens = 0  # prefix-cache hit at first admission
        self.admitted_once = False
        # n > 1: siblings wait for the first choice's prompt so they share its cached blocks
        self.leader: Sequence | None = None
        self.generator = generator
        # output state
        self.detokenizer = detokenizer
        self.held_text = ""  # decoded text that might be the start of a stop string
        self.finish_reason: FinishReason | None = None
        self.ended_by_stop_token = False  # its last id is a stop token (no text, not a reply id)
        self.sent_text: list[str] = []  # the text of every output sent so far
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        # since the last output was sent
        self.pending_text = ""
        self.pending_ids: list[int] = []
        self.pending_logprobs: list[TokenLogprob] = []
        # prompt logprobs collected so far (the first token's is None), or None when not asked
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if index == 0 and request.params.prompt_logprobs is not None else None
        )
        self.prompt_logprobs_sent = False
        # the grammar its reply keeps to (engine/guided.py), None = free
        self.guided = request.params.guided.new_state() if request.params.guided else None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def hash_seed(self) -> int | None:
        """First link of this sequence's prefix-cache hash chain (its adapter's; None = base)."""
        a = self.request.adapter
        return None if a is None else a.hash_seed

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def reply_ids(self) -> list[int]:
        """The generated ids that spell the reply: the output without a final stop token."""
        ids = self.output_ids
        return ids[:-1] if self.ended_by_stop_token and ids else ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        """It still lacks some prompt token's logprob (so it must compute, not reuse, K/V)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, {self.status.value}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"blocks={len(self.block_table)})"
        )
