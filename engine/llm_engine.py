"""The synchronous engine core: requests in, one batched step at a time, outputs out.

`step()` schedules, runs one forward pass over every scheduled sequence, samples the rows that
need a token, and turns each new token into a RequestOutput: text delta through the incremental
detokenizer, stop strings held back and cut, stop tokens, max_tokens and the context limit.
Nothing here knows about threads or asyncio; AsyncEngine drives this from its own thread.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import gc
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from chatglm_serve.engine.adapters import AdapterInfo, AdapterRegistry, adapter_kind
from chatglm_serve.engine.block_manager import BlockManager
from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.engine.guided import CompiledGrammar, GrammarCompiler
from chatglm_serve.engine.kernel_warmup import BackgroundKernelBuild
from chatglm_serve.engine.model_runner import ModelRunner, plan_kv_cache
from chatglm_serve.engine.prompt_logprobs import score_rows
from chatglm_serve.engine.reply_tokens import ReplyTokenMap
from chatglm_serve.engine.sampler import Sampler, SamplingRow
from chatglm_serve.engine.scheduler import ScheduledSeq, Scheduler
from chatglm_serve.engine.sequence import Request, Sequence, SequenceStatus
from chatglm_serve.engine.stop import split_stream
from chatglm_serve.engine.types import (
    EngineError,
    EngineOverloadedError,
    EngineStats,
    FinishReason,
    GuidedSpec,
    PromptTooLongError,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.family import chat_format_of
from chatglm_serve.model.lora import AdapterError
from chatglm_serve.model.ptuning import PrefixKV, read_ptuning
from chatglm_serve.model.summary import summarize

log = logging.getLogger(__name__)


def _default_detokenizer_factory(tokenizer: Any) -> Callable[[], Any]:
    from chatglm_serve.model.detokenizer import IncrementalDetokenizer

    return lambda: IncrementalDetokenizer(tokenizer)


class LLMEngine:
    def __init__(
        self,
        model: ChatGLMForCausalLM,
        tokenizer: Any,
        config: EngineConfig | None = None,
        detokenizer_factory: Callable[[], Any] | None = None,
        kernel_build: BackgroundKernelBuild | None = None,
    ) -> None:
        """kernel_build: the CPU kernels compiling in the background (engine/kernel_warmup.py);
        the model runs its PyTorch paths until the step after it ends."""
        config = config or EngineConfig()
        self.kernel_build = kernel_build
        config.validate()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        seq_length = model.config.seq_length
        if config.max_model_len is not None and config.max_model_len > seq_length:
            raise ValueError(
                f"engine config max_model_len: {config.max_model_len} exceeds the model's "
                f"seq_length {seq_length}"
            )
        self.model_summary = summarize(model)  # before the KV cache: the model's own bytes
        self.kv_plan = plan_kv_cache(model, config)
        wanted = config.max_model_len or seq_length
        self.max_model_len = min(wanted, self.kv_plan.num_tokens)
        if self.max_model_len < wanted:
            log.warning(
                "max_model_len %d clipped to the KV cache capacity of %d tokens",
                wanted,
                self.max_model_len,
            )
        self.block_manager = BlockManager(
            self.kv_plan.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.block_manager)
        # adapters are read (and refused, naming them) before the runner sizes its block tables
        self.adapters = AdapterRegistry(model, config.max_loras, config.max_lora_rank)
        read = [self.adapters.read(name, path) for name, path in config.adapters.items()]
        default = None
        if config.ptuning_checkpoint:
            default = read_ptuning("(base)", config.ptuning_checkpoint, model.config)
        prefix_lens = [x.pre_seq_len for x in [*read, default] if isinstance(x, PrefixKV)]
        bs = config.block_size
        self.runner = ModelRunner(
            model,
            config,
            self.kv_plan,
            self.max_model_len,
            prefix_blocks=max(((p + bs - 1) // bs for p in prefix_lens), default=0),
            optimize_cpu=kernel_build is None,
        )
        self.adapters.attach(self.runner.kv_caches, self.block_manager)
        for item in read:
            self.adapters.install(item)
        if default is not None:
            self.adapters.set_default_ptuning(default)
        self.runner.lora = self.adapters.lora
        # padded rows of the output layer past the tokenizer's vocabulary are never sampled
        tok_vocab = getattr(tokenizer, "vocab_size", None) or model.config.padded_vocab_size
        self.vocab_size = min(tok_vocab, model.config.padded_vocab_size)
        self.sampler = Sampler(self.vocab_size, seed=config.seed)
        self.logits_device = model.transformer.output_layer.weight.device
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id = model.config.eos_token_id if eos is None else eos
        # the chat format's reply ends: ChatGLM3 / GLM-4 also stop at <|user|> and <|observation|>
        self.chat_format = chat_format_of(tokenizer)
        self._more_stop_ids = tuple(
            i for i in getattr(self.chat_format, "stop_token_ids", ()) if i != self.eos_token_id
        )
        self._new_detokenizer = detokenizer_factory or _default_detokenizer_factory(tokenizer)
        # finished replies' ids by text, for encode_chat (pointless without the prefix cache)
        self.reply_tokens = ReplyTokenMap(
            config.reply_token_cache_size if config.enable_prefix_caching else 0,
            tokenizer.decode,
        )
        self._grammars: GrammarCompiler | None = None  # built at the first constraint
        self._grammar_lock = threading.Lock()
        self.requests: dict[str, Request] = {}
        self._pending: list[RequestOutput] = []
        self._next_seq_id = 0
        self._token_text: dict[int, str] = {}
        self._stats = EngineStats(
            kv_blocks_total=self.kv_plan.num_blocks, kv_capacity_tokens=self.kv_plan.num_tokens
        )
        # GPUs this process computes on, for the memory figure in the stats (/metrics)
        self._cuda_devices = sorted(
            {c.device for c in self.runner.kv_caches if c.device.type == "cuda"}, key=str
        )
        # Every step allocates short-lived containers, and each collection they trigger walked
        # the ~300k objects that loading left behind (modules, tokenizer tables): 1-7% of a CPU
        # int4 step on the medium model (three same-process pairs). What exists now lives as
        # long as the engine: freeze it.
        gc.freeze()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a reply: eos, and the chat format's turn openers (<|user|>, ...)."""
        return (self.eos_token_id, *self._more_stop_ids)

    # ---- capacity ----
    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_plan.num_tokens

    @property
    def max_concurrent_seqs(self) -> int:
        return self.config.max_num_seqs

    def capacity_line(self) -> str:
        full_ctx = self.kv_plan.num_tokens // self.max_model_len
        return (
            f"KV cache: {self.kv_plan.num_blocks} blocks x {self.kv_plan.block_size} tokens = "
            f"{self.kv_plan.num_tokens} tokens ({self.kv_plan.bytes_total / 2**20:.1f} MiB "
            f"{str(self.kv_plan.dtype).removeprefix('torch.')}, from {self.kv_plan.source}); "
            f"max_model_len {self.max_model_len}; up to {self.config.max_num_seqs} concurrent "
            f"sequences ({full_ctx} at full context); prefix caching "
            f"{'on' if self.config.enable_prefix_caching else 'off'}"
        )

    # ---- requests ----
    def encode_chat(
        self, query: str, history: collections.abc.Sequence[tuple[str, str]] | None = None
    ) -> list[int]:
        """A chat prompt's ids, with the history's replies this engine generated spliced in as
        their generated ids, so the turn reuses their K/V from the prefix cache (thread-safe)."""
        return self.chat_format.encode_chat(query, history, reply_ids=self.reply_tokens.lookup)

    def compile_grammar(self, spec: GuidedSpec) -> CompiledGrammar:
        """A structured-output constraint compiled for this engine's tokenizer, cached by spec
        (GrammarError if it cannot be). Slow for a new spec: call it off the step thread."""
        with self._grammar_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(
                    self.tokenizer, self.vocab_size, list(self.eos_token_ids)
                )
        return self._grammars.compile(spec)

    # ---- adapters ----
    def adapter_infos(self) -> list[AdapterInfo]:
        return self.adapters.infos()

    def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter at run time; EngineError (param "lora_path") when it is bad."""
        try:
            if adapter_kind(path) != "lora":
                raise AdapterError(f"{path}: only LoRA adapters can be loaded at run time")
            self.adapters.add(name, path)
        except AdapterError as e:
            raise EngineError(str(e), param="lora_path") from None
        self.runner.lora = self.adapters.lora

    def unload_adapter(self, name: str) -> None:
        """Unload a LoRA adapter no request is using; EngineError (param "lora_name") else."""
        if any(r.adapter is not None and r.adapter.name == name for r in self.requests.values()):
            raise EngineError(f"adapter {name!r} is in use by running requests", param="lora_name")
        try:
            self.adapters.remove(name)
        except AdapterError as e:
            raise EngineError(str(e), param="lora_name") from None

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Check a request without changing any state; returns normalised params."""
        if not isinstance(params, SamplingParams):
            raise EngineError("sampling params must be a SamplingParams", param="params")

        def bad(param: str, why: str) -> EngineError:
            return EngineError(f"{param}: {why}", param=param)

        if not prompt_ids:
            raise bad("prompt", "the prompt has no tokens")
        if any(not (0 <= t < self.vocab_size) for t in prompt_ids):
            raise bad("prompt", f"token ids must be in [0, {self.vocab_size})")
        p = params
        # a prompt must leave room for one reply token, unless none is asked (scoring only)
        if len(prompt_ids) >= self.max_model_len + (p.max_tokens == 0):
            raise PromptTooLongError(len(prompt_ids), self.max_model_len)
        temp_ok = isinstance(p.temperature, int | float) and math.isfinite(p.temperature)
        if not (temp_ok and p.temperature >= 0):
            raise bad("temperature", "must be a finite number >= 0")
        if not (0 < p.top_p <= 1):
            raise bad("top_p", "must be in (0, 1]")
        if p.top_k < -1:
            raise bad("top_k", "must be >= 0 (0 or -1 = off)")
        if not (p.repetition_penalty > 0 and math.isfinite(p.repetition_penalty)):
            raise bad("repetition_penalty", "must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(p, name)
            if not (-2.0 <= v <= 2.0):
                raise bad(name, "must be in [-2, 2]")
        if p.max_tokens is not None and p.max_tokens < 0:
            raise bad("max_tokens", "must be >= 0")
        if p.min_tokens < 0 or (p.max_tokens is not None and p.min_tokens > p.max_tokens):
            raise bad("min_tokens", "must be >= 0 and <= max_tokens")
        if not (1 <= p.n <= self.config.max_n):
            raise bad("n", f"must be in [1, {self.config.max_n}]")
        for token, bias in (p.logit_bias or {}).items():
            if not (isinstance(token, int) and 0 <= token < self.vocab_size):
                raise bad(
                    "logit_bias", f"token ids must be in [0, {self.vocab_size}), not {token!r}"
                )
            if not (isinstance(bias, int | float) and -100.0 <= bias <= 100.0):
                raise bad("logit_bias", f"biases must be in [-100, 100], not {bias!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(p, name)
            if k is not None and not (0 <= k <= self.config.max_logprobs):
                raise bad(name, f"must be in [0, {self.config.max_logprobs}]")
        if p.guided is not None and not isinstance(p.guided, CompiledGrammar):
            raise bad("guided", "must be a grammar compiled by this engine (compile_grammar)")
        # choice i seeds a torch.Generator with seed + i, which takes 64 bits (signed or not)
        if p.seed is not None and not (
            isinstance(p.seed, int) and -(2**63) <= p.seed <= 2**64 - p.n
        ):
            raise bad("seed", "must be a 64-bit integer")
        stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
        if any(not isinstance(s, str) for s in stop):
            raise bad("stop", "must be a string or a list of strings")
        stop = [s for s in stop if s]
        if any(not isinstance(t, int) for t in p.stop_token_ids):
            raise bad("stop_token_ids", "must be integers")
        return dataclasses.replace(
            p, stop=stop, stop_token_ids=list(p.stop_token_ids), top_k=max(p.top_k, 0)
        )

    def queue_limit(self, running: int) -> int:
        """Sequences that may wait: max_queue, plus one per free running slot. A burst that arrives
        between two steps waits for the next one even when it will run at once; without the free
        slots, it would be refused (429) by an idle engine."""
        return self.config.max_queue + max(0, self.config.max_num_seqs - running)

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
    ) -> None:
        """adapter: the name of a loaded LoRA / P-Tuning v2 adapter; None = the base model."""
        params = self.validate(prompt_ids, params)
        if adapter is not None and adapter not in self.adapters.entries:
            # e.g. unloaded between the server's look-up and this call
            raise EngineError(f"the adapter {adapter!r} is not loaded", param="model")
        if request_id in self.requests:
            raise EngineError(f"request id {request_id!r} is already in use", param="request_id")
        if len(self.scheduler.waiting) >= self.queue_limit(len(self.scheduler.running)):
            raise EngineOverloadedError()
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        req = Request(
            request_id, list(prompt_ids), params, max_tokens, adapter=self.adapters.resolve(adapter)
        )
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.logits_device).manual_seed(params.seed + i)
            seq = Sequence(self._next_seq_id, req, i, gen, self._new_detokenizer())
            self._next_seq_id += 1
            if i > 0 and self.config.enable_prefix_caching:
                seq.leader = req.seqs[0]
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; its final outputs come with the next step."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish(seq, FinishReason.ABORT)
                seq.pending_text = ""  # held-back text is dropped with the rest
                self._pending.append(self._output(seq))
        self._stats.requests_finished += 1
        return True

    def abort_all(self) -> None:
        for rid in list(self.requests):
            self.abort_request(rid)

    def has_unfinished(self) -> bool:
        return bool(self._pending) or self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    # ---- the step ----
    def poll_kernel_build(self) -> None:
        """Switch the model to the CPU kernels once their background build has ended. Called
        between steps (nothing is mid-forward), on the thread that steps."""
        if self.kernel_build is not None and self.kernel_build.ready():
            self.kernel_build.switch(self.model)

    def step(self) -> list[RequestOutput]:
        self.poll_kernel_build()
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        # prefill path first, then the batched single-token path
        batch = [s for s in sched.scheduled if s.num_new_tokens > 1]
        batch += [s for s in sched.scheduled if s.num_new_tokens == 1]
        for item in batch:
            seq = item.seq
            if not seq.admitted_once:
                seq.admitted_once = True
                seq.num_cached_tokens = seq.num_computed_tokens
                self._stats.prompt_tokens_total += seq.prompt_len
                self._stats.prompt_tokens_cached += seq.num_computed_tokens
        logits = self.runner.execute(batch)
        sampling = [item for item in batch if item.samples]
        self._collect_prompt_logprobs(batch, logits[len(sampling) :])
        result = self.sampler(
            logits[: len(sampling)], [self._sampling_row(item.seq) for item in sampling]
        )

        for item in batch:
            seq = item.seq
            start = seq.num_computed_tokens
            seq.num_computed_tokens += item.num_new_tokens
            self._stats.prompt_tokens_computed += max(
                0, min(seq.num_computed_tokens, seq.prompt_len) - start
            )
            self.block_manager.register_computed(seq)
        now = time.monotonic()
        for item, token, lp in zip(sampling, result.token_ids, result.logprobs, strict=True):
            seq = item.seq
            if seq.request.max_tokens == 0:  # the prompt scored, nothing to generate
                self._finish(seq, FinishReason.LENGTH)
            else:
                self._append_token(seq, token, lp, now)
            outputs.append(self._output(seq))
            if seq.is_finished and seq.request.finished:
                self.requests.pop(seq.request_id, None)
                self._stats.requests_finished += 1
        return outputs

    def _collect_prompt_logprobs(self, batch: list[ScheduledSeq], logits: torch.Tensor) -> None:
        """Score the prompt tokens this step's rows predict (rows as the runner returns them)."""
        at = 0
        for item in batch:
            first, count = item.prompt_logprob_rows
            if not count:
                continue
            seq = item.seq
            targets = seq.token_ids[first + 1 : first + 1 + count]
            assert seq.prompt_logprobs is not None and len(seq.prompt_logprobs) == first + 1
            seq.prompt_logprobs += score_rows(
                logits[at : at + count],
                targets,
                seq.params.prompt_logprobs or 0,
                self.vocab_size,
                self._text_of,
            )
            at += count

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        p = seq.params
        ban: list[int] = []
        if seq.num_output_tokens < p.min_tokens:
            ban = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
        return SamplingRow(p, seq.token_ids, seq.prompt_len, seq.generator, ban, seq.guided)

    def token_text(self, token_id: int) -> str:
        """A token's display text for logprobs (thread-safe)."""
        return self._text_of(token_id)

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = _piece_text(self.tokenizer, token_id)
            self._token_text[token_id] = text
        return text

    def _append_token(self, seq: Sequence, token: int, lp: Any, now: float) -> None:
        p = seq.params
        seq.token_ids.append(token)
        seq.pending_ids.append(token)
        self._stats.generation_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            self._stats.time_to_first_token_sum += now - seq.request.arrival_time
            self._stats.time_to_first_token_count += 1
        if lp is not None:
            chosen, top = lp
            seq.pending_logprobs.append(
                TokenLogprob(
                    token, self._text_of(token), chosen, [(t, self._text_of(t), v) for t, v in top]
                )
            )
        grammar_done = False
        if seq.guided is not None:
            if not seq.guided.accept(token):
                log.warning("%s: grammar refused token %d: %s", seq, token, seq.guided.error)
            grammar_done = seq.guided.done  # the constrained reply is complete: it ends here
        n_out = seq.num_output_tokens
        stops = p.stop if n_out > p.min_tokens else []
        is_stop_token = n_out > p.min_tokens and (
            token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos)
        )
        if is_stop_token:
            seq.ended_by_stop_token = True
            text = seq.held_text + seq.detokenizer.flush()
            emit, _, _ = split_stream(text, stops, final=True)
            seq.pending_text += emit
            seq.held_text = ""
            self._finish(seq, FinishReason.STOP)
            return
        length = n_out >= seq.request.max_tokens or seq.num_tokens >= self.max_model_len
        text = seq.held_text + seq.detokenizer.push(token)
        if length or grammar_done:
            text += seq.detokenizer.flush()
        emit, hold, stopped = split_stream(text, stops, final=length or grammar_done)
        seq.pending_text += emit
        seq.held_text = hold
        if stopped or grammar_done:
            self._finish(seq, FinishReason.STOP)
        elif length:
            self._finish(seq, FinishReason.LENGTH)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_time = time.monotonic()
        n = seq.num_output_tokens
        if seq.first_token_time is not None and n >= 2:
            self._stats.time_per_output_token_sum += (seq.finished_time - seq.first_token_time) / (
                n - 1
            )
            self._stats.time_per_output_token_count += 1

    def _output(self, seq: Sequence) -> RequestOutput:
        finished = seq.is_finished
        out = RequestOutput(
            request_id=seq.request_id,
            index=seq.index,
            text=seq.pending_text,
            token_ids=seq.pending_ids,
            finished=finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.num_output_tokens,
            logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None,
            prompt_logprobs=self._take_prompt_logprobs(seq),
            metrics=RequestMetrics(
                seq.request.arrival_time,
                seq.first_token_time,
                seq.finished_time,
                seq.num_cached_tokens,
            )
            if finished
            else None,
        )
        if seq.pending_text:
            seq.sent_text.append(seq.pending_text)
        seq.pending_text = ""
        seq.pending_ids = []
        seq.pending_logprobs = []
        if finished:
            self.reply_tokens.record("".join(seq.sent_text), seq.reply_ids)
        return out

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> list[TokenLogprob | None] | None:
        """The prompt's logprobs, once, on the first output after they are complete."""
        lps = seq.prompt_logprobs
        if lps is None or seq.prompt_logprobs_sent or len(lps) < seq.prompt_len:
            return None
        seq.prompt_logprobs_sent = True
        return lps

    # ---- introspection ----
    def get_stats(self) -> EngineStats:
        s = dataclasses.replace(self._stats)
        s.waiting = len(self.scheduler.waiting)
        s.running = len(self.scheduler.running)
        s.kv_blocks_used = self.block_manager.num_used_blocks
        s.num_preemptions = self.scheduler.num_preemptions
        if self._cuda_devices:
            s.gpu_memory_allocated_bytes = sum(
                torch.cuda.memory_allocated(d) for d in self._cuda_devices
            )
        return s


def _piece_text(tokenizer: Any, token_id: int) -> str:
    """Display text of one token for logprobs (SentencePiece's ▁ as a space, bytes as chars)."""
    try:
        piece = tokenizer.id_to_piece(token_id)
    except Exception:
        return tokenizer.decode([token_id])
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        b = int(piece[3:5], 16)
        return chr(b) if b < 0x80 else piece
    return piece.replace("\u2581", " ")
