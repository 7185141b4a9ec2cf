"""The seed's Python calls, on our engine, with no server.

    from chatglm_serve import ChatGLM, SamplingParams
    glm = ChatGLM.load("THUDM/chatglm2-6b dir")          # or ChatGLM.load() for the embedded demo
    response, history = glm.chat("你好", history=[])
    for response, history in glm.stream_chat("Tell me more", history): ...
    results = glm.generate(prompts, SamplingParams(temperature=0, max_tokens=64))

`chat` / `stream_chat` keep the seed's `model.chat(tokenizer, ...)` signature and defaults
(max_length 8192 counting prompt and reply, top_p 0.8, temperature 0.8, do_sample) minus the
tokenizer argument. `generate` is an offline batch call in the manner of vLLM's `LLM.generate`:
every prompt goes into the same continuous-batching LLMEngine at once and the engine's scheduler
batches them, so 64 prompts cost about as many forward passes as the longest one alone.

Everything runs in the caller's thread: a call steps the engine until its request is done.
Outputs of other requests that a step produces are parked for their own callers, so several
stream_chat generators can be interleaved (and are then decoded in one batch).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from chatglm_serve.engine.config import EngineArgs, EngineConfig
from chatglm_serve.engine.llm_engine import LLMEngine
from chatglm_serve.engine.load import build_engine
from chatglm_serve.engine.types import (
    EngineOverloadedError,
    FinishReason,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

History = list[tuple[str, str]]


@dataclass
class ChatPrompt:
    """One chat for `generate`: the query and the earlier (query, response) turns."""

    query: str
    history: Sequence[tuple[str, str]] = ()


Prompt = str | list[int] | ChatPrompt | tuple[str, Sequence[tuple[str, str]]]


@dataclass
class CompletionOutput:
    """One choice of one prompt (n > 1 gives several)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    """Everything `generate` produced for one prompt, in the prompt's position in the list."""

    prompt: Prompt
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The first choice's text (the common n == 1 case)."""
        return self.outputs[0].text


def process_response(response: str) -> str:
    """What the seed's `process_response` does to every reply (and every streamed prefix)."""
    return response.strip().replace("[[训练时间]]", "2023年")


class ChatGLM:
    """A loaded model and its engine; `chat`, `stream_chat` and `generate` share the engine.

    Use as a context manager (or call `close()`) to free the engine's KV cache and, under
    tensor parallel, stop its worker processes."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine: LLMEngine | None = engine
        self._ids = itertools.count()
        # one caller steps the engine at a time; outputs for others wait in their boxes
        self._lock = threading.RLock()
        self._boxes: dict[str, deque[RequestOutput]] = {}
        self._label = _describe(engine)

    @classmethod
    def load(
        cls,
        path: str | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: str = "auto",
        devices: Sequence[str] | None = None,
        device_map: dict[str, str] | None = None,
        tensor_parallel_size: int = 1,
        quantize: int | None = None,
        chat_template: str | None = None,
        config: EngineConfig | None = None,
    ) -> ChatGLM:
        """Load once: a Hugging Face checkpoint directory, or None for the embedded demo model.

        dtype None/"auto" = the checkpoint's; device "auto" = cuda when available, else cpu;
        devices = a layer split over several devices (device_map fixes it per layer);
        tensor_parallel_size N = every layer split over N processes; quantize 4/8 quantizes the
        linears while loading; chat_template ("chatglm2", "chatglm3", "glm4") overrides the
        chat format detected from the checkpoint. The same options as the daemon's flags
        (engine/load.py)."""
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        return cls.from_args(
            EngineArgs(
                model=None if path is None else str(path),
                dtype=dtype,
                device=device,
                devices=list(devices) if devices else None,
                device_map=device_map,
                tensor_parallel_size=tensor_parallel_size,
                quantize=quantize,
                chat_template=chat_template,
                engine=config or EngineConfig(),
            )
        )

    @classmethod
    def from_args(cls, args: EngineArgs) -> ChatGLM:
        return cls(build_engine(args))

    @property
    def model(self) -> Any:
        return self._engine().model

    @property
    def tokenizer(self) -> Any:
        return self._engine().tokenizer

    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("this ChatGLM is closed")
        return self.engine

    def close(self) -> None:
        """Abort what is running and free the engine (KV cache, model references, TP workers)."""
        with self._lock:
            engine, self.engine = self.engine, None
            if engine is None:
                return
            engine.abort_all()
            self._boxes.clear()
            close = getattr(engine.model, "close", None)
            if callable(close):  # a tensor-parallel model: stop its worker processes
                close()

    def __enter__(self) -> ChatGLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.engine is None else "ready"
        return f"ChatGLM({self._label}, {state})"

    @property
    def max_model_len(self) -> int:
        return self._engine().max_model_len

    def encode_chat(
        self, query: str, history: Sequence[tuple[str, str]] | None = None
    ) -> list[int]:
        """The prompt ids `chat` sends for (query, history): ChatGLM2's encoding, except that
        replies this engine generated are spliced in as their generated ids (so the turn
        reuses their K/V from the prefix cache; see engine/reply_tokens.py)."""
        return self._engine().encode_chat(query, history)

    # --- the seed's calls ------------------------------------------------------------------------

    def chat(
        self,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        max_length: int = 8192,
        top_p: float = 0.8,
        temperature: float = 0.8,
        do_sample: bool = True,
        adapter: str | None = None,
        **sampling: Any,
    ) -> tuple[str, History]:
        """-> (response, history + [(query, response)]), as the seed's `model.chat`.

        max_length counts prompt and reply, as in the seed. do_sample=False (or temperature 0)
        is greedy. adapter: a LoRA / P-Tuning v2 fine-tune loaded with the engine
        (EngineConfig.adapters). Other keywords (top_k, repetition_penalty, seed, stop, ...) go
        to SamplingParams."""
        raw = "".join(
            self._chat_deltas(
                query, history, max_length, top_p, temperature, do_sample, sampling, adapter
            )
        )
        response = process_response(raw)
        return response, self._with_turn(history, query, response)

    def stream_chat(
        self,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        max_length: int = 8192,
        top_p: float = 0.8,
        temperature: float = 0.8,
        do_sample: bool = True,
        adapter: str | None = None,
        **sampling: Any,
    ) -> Iterator[tuple[str, History]]:
        """Yields (response so far, history with this turn) as the reply grows, as the seed's
        `stream_chat`. Leaving the loop early aborts the request and frees its KV cache."""
        history = list(history or [])
        raw = ""
        for delta in self._chat_deltas(
            query, history, max_length, top_p, temperature, do_sample, sampling, adapter
        ):
            raw += delta
            response = process_response(raw)
            yield response, self._with_turn(history, query, response)

    def _with_turn(self, history: Sequence[Any] | None, query: str, response: str) -> list[Any]:
        """The history after this turn, in the seed's form for the model: ChatGLM2's (query,
        response) pairs; ChatGLM3's and GLM-4's {role, content} dicts (their `chat()` returns
        those; pairs given in are converted)."""
        if self._engine().chat_format.name == "chatglm2":
            return [*(history or []), (query, response)]
        turns: list[Any] = []
        for item in history or []:
            if isinstance(item, dict):
                turns.append(item)
            else:
                turns += [
                    {"role": "user", "content": item[0]},
                    {"role": "assistant", "metadata": "", "content": item[1]},
                ]
        return [
            *turns,
            {"role": "user", "content": query},
            {"role": "assistant", "metadata": "", "content": response},
        ]

    def _chat_deltas(
        self,
        query: str,
        history: Sequence[tuple[str, str]] | None,
        max_length: int,
        top_p: float,
        temperature: float,
        do_sample: bool,
        sampling: dict[str, Any],
        adapter: str | None = None,
    ) -> Iterator[str]:
        """The reply's text pieces (the last one may be empty: it marks the end)."""
        if sampling.get("n", 1) != 1:
            raise ValueError("chat answers with one reply: use generate() for n > 1")
        prompt_ids = self.encode_chat(query, history)
        room = max_length - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"max_length is {max_length} tokens but the prompt (query and history) "
                f"already has {len(prompt_ids)}"
            )
        params = SamplingParams(
            temperature=temperature if do_sample else 0.0,
            top_p=top_p,
            max_tokens=room,
            **sampling,
        )
        for out in self._stream(prompt_ids, params, adapter):
            if out.index == 0 and (out.text or out.finished):
                yield out.text

    # --- offline batch, in the manner of vLLM's LLM.generate ---------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        adapter: str | None = None,
    ) -> list[GenerationResult]:
        """Run many prompts through the continuous-batching engine together; results in order.

        A prompt is raw text (encoded with ChatGLM2's `[gMASK] sop` prefix, no chat template),
        token ids, or a chat: ChatPrompt(query, history) or a (query, history) tuple, built
        with the chat template as `chat` does. sampling_params: one for all or one per
        prompt; default SamplingParams() (temperature 1, up to the rest of the context).
        Requests beyond the engine's waiting-queue limit are fed in as others finish.
        adapter: a LoRA / P-Tuning v2 fine-tune loaded with the engine, for every prompt."""
        items = [prompts] if self._is_single(prompts) else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError(
                    f"{len(params_list)} sampling params for {len(items)} prompts: "
                    "give one, or one per prompt"
                )
        encoded = [self._encode(p) for p in items]
        for ids, params in zip(encoded, params_list, strict=True):
            self._engine().validate(ids, params)  # refuse a bad prompt before running any

        results = [GenerationResult(p, ids) for p, ids in zip(items, encoded, strict=True)]
        choices: dict[str, dict[int, CompletionOutput]] = {}
        index_of: dict[str, int] = {}
        open_choices: dict[str, int] = {}  # request id -> choices not finished yet
        todo = deque(range(len(items)))
        bar = _progress(len(items)) if use_tqdm else None
        with self._lock:
            try:
                while todo or open_choices:
                    while todo:  # admit as many as the engine's waiting queue takes
                        i = todo[0]
                        rid = f"generate-{next(self._ids)}"
                        try:
                            self._engine().add_request(
                                rid, encoded[i], params_list[i], adapter=adapter
                            )
                        except EngineOverloadedError:
                            break
                        todo.popleft()
                        index_of[rid] = i
                        choices[rid] = {}
                        open_choices[rid] = params_list[i].n
                    for out in self._step_once():
                        if out.request_id not in open_choices:
                            continue  # another caller's request, or an abort's leftovers
                        c = choices[out.request_id].setdefault(
                            out.index, CompletionOutput(out.index, "", [], None)
                        )
                        c.text += out.text
                        c.token_ids += out.token_ids
                        if out.logprobs is not None:
                            c.logprobs = (c.logprobs or []) + out.logprobs
                        if out.finished:
                            c.finish_reason = out.finish_reason
                            open_choices[out.request_id] -= 1
                            if not open_choices[out.request_id]:
                                del open_choices[out.request_id]
                                if bar is not None:
                                    bar.update(1)
            finally:
                for rid in open_choices:  # interrupted (e.g. KeyboardInterrupt): free the rest
                    self._engine().abort_request(rid)
                if bar is not None:
                    bar.close()
        for rid, i in index_of.items():
            results[i].outputs = [choices[rid][k] for k in sorted(choices[rid])]
        return results

    # --- plumbing --------------------------------------------------------------------------------

    @staticmethod
    def _is_single(prompts: Any) -> bool:
        if isinstance(prompts, str | ChatPrompt):
            return True
        if isinstance(prompts, tuple) and len(prompts) == 2 and isinstance(prompts[0], str):
            return not isinstance(prompts[1], str)  # (query, history), not two raw prompts
        return isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, ChatPrompt):
            return self.encode_chat(prompt.query, prompt.history)
        if isinstance(prompt, tuple):
            query, history = prompt
            return self.encode_chat(query, history)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise TypeError(
            f"a prompt must be text, token ids, ChatPrompt or (query, history); got {type(prompt)}"
        )

    def _step_once(self) -> list[RequestOutput]:
        outputs = self._engine().step()
        for out in outputs:
            box = self._boxes.get(out.request_id)
            if box is not None:
                box.append(out)
        return outputs

    def _stream(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> Iterator[RequestOutput]:
        """One request's outputs as the engine produces them; aborted if the caller stops early."""
        rid = f"chat-{next(self._ids)}"
        with self._lock:
            self._engine().add_request(rid, prompt_ids, params, adapter=adapter)
            box: deque[RequestOutput] = deque()
            self._boxes[rid] = box
        left = params.n
        try:
            while left:
                with self._lock:
                    while not box:
                        if not self._engine().has_unfinished():  # cannot happen; never spin
                            raise RuntimeError(f"engine lost request {rid}")
                        self._step_once()
                    out = box.popleft()
                if out.finished:
                    left -= 1
                yield out
        finally:
            with self._lock:
                self._boxes.pop(rid, None)
                if left:
                    self._engine().abort_request(rid)
                    # its final (abort) output comes with a later step, which drops it


def _describe(engine: LLMEngine) -> str:
    cfg = engine.model.config
    return (
        f"{getattr(cfg, 'num_layers', '?')} layers x {getattr(cfg, 'hidden_size', '?')}, "
        f"{engine.model_summary.line()}, max_model_len {engine.max_model_len}"
    )


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="Generating", unit="prompt")


__all__ = [
    "ChatGLM",
    "ChatPrompt",
    "CompletionOutput",
    "GenerationResult",
    "process_response",
]
