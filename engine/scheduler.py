"""Iteration-level scheduling: which sequences run in the next forward pass, and how many tokens.

Every step, each running sequence that has finished its prompt decodes one token; sequences still
prefilling get the next chunk of their prompt from what is left of the per-step token budget;
then waiting sequences are admitted, oldest first, while there are free sequence slots, budget
and KV blocks for their whole prompt (less what the prefix cache already holds). When a running
sequence needs a new block and none is free, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed (cheaply, when its
blocks are still in the prefix cache) once there is room again.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

from chatglm_serve.engine.block_manager import BlockManager
from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last token (so a new one is sampled)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens

    @property
    def prompt_logprob_rows(self) -> tuple[int, int]:
        """(first position, count) of this chunk's rows whose logits score a prompt token the
        sequence still needs a logprob for (engine/prompt_logprobs.py); count 0 = none."""
        seq = self.seq
        if not seq.wants_prompt_logprobs:
            return 0, 0
        start = seq.num_computed_tokens
        first = max(start, len(seq.prompt_logprobs) - 1)  # type: ignore[arg-type]
        last = min(start + self.num_new_tokens, seq.prompt_len - 1)
        return first, max(0, last - first)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order, oldest first
        self.num_preemptions = 0
        # keep a few blocks free when admitting, so running sequences can grow without thrashing
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and give back its blocks (finish or abort)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self.bm.free(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # 1. decodes, oldest first; make room by preempting the newest when blocks run out
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed != 1:
                continue
            while not self.bm.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.bm.append_slots(seq)
            out.scheduled.append(ScheduledSeq(seq, 1))
            budget -= 1

        # 2. prompts being prefilled in chunks (their blocks were allocated at admission)
        for seq in self.running:
            if budget <= 0:
                break
            n = seq.num_uncomputed
            if n > 1:
                n = min(n, budget)
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n

        # 3. admit waiting sequences in arrival order (none if this step had to preempt)
        while (
            self.waiting
            and not out.preempted
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            leader = seq.leader
            if (
                leader is not None
                and not leader.is_finished
                and (
                    leader.status is not SequenceStatus.RUNNING
                    or leader.num_computed_tokens < leader.prompt_len
                )
            ):
                break  # an n > 1 sibling waits until the first choice's prompt is cached
            reserve = self.watermark_blocks if self.running else 0
            if not self.bm.allocate(seq, reserve=reserve):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out
