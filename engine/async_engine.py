"""The asyncio face of the engine: the step loop runs in its own thread.

HTTP handlers never wait on a forward pass: `generate()` validates the request on the caller's
event loop, hands it to the step thread through an inbox, and awaits outputs that the step thread
posts back with `loop.call_soon_threadsafe` (one callback per event loop per step). All engine
state is touched by the step thread only; the event loop reads a stats snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from chatglm_serve.engine.config import EngineArgs, EngineConfig
from chatglm_serve.engine.guided import CompiledGrammar
from chatglm_serve.engine.llm_engine import LLMEngine
from chatglm_serve.engine.types import (
    EngineError,
    EngineOverloadedError,
    EngineStats,
    GuidedSpec,
    RequestOutput,
    SamplingParams,
)
from chatglm_serve.model.chatglm import ChatGLMForCausalLM

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput | BaseException


class AsyncEngine:
    def __init__(
        self,
        model: ChatGLMForCausalLM,
        tokenizer: Any,
        config: EngineConfig | None = None,
        detokenizer_factory: Any = None,
    ) -> None:
        self._thread: threading.Thread | None = None
        self._setup(LLMEngine(model, tokenizer, config, detokenizer_factory=detokenizer_factory))

    def _setup(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.chat_format = engine.chat_format  # model/chat_format.py: prompt ids, stop ids
        # the family member detected at load (model/family.py), for /v1/models
        self.model_member: str | None = getattr(engine.tokenizer, "member", None)
        self.max_model_len = engine.max_model_len
        self.kv_capacity_tokens = engine.kv_capacity_tokens
        self.num_kv_blocks = engine.kv_plan.num_blocks
        self.max_concurrent_seqs = engine.max_concurrent_seqs
        self.model_summary = engine.model_summary
        self._inbox: deque[tuple] = deque()  # ("add", id, ids, params) | ("abort", id) | ...
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._stop = False
        self._accepting = True
        self._stats = engine.get_stats()
        self._errors = 0
        log.info("%s", engine.capacity_line())

    @classmethod
    def launch(cls, build: Callable[[], LLMEngine]) -> AsyncEngine:
        """An engine built by `build` (model loading included) on its own step thread, started.

        Blocks until it is built; re-raises what `build` raised. Why on that thread: OpenMP
        (libgomp) keeps a pool of worker threads for each thread that has run a parallel
        region, and once the process holds more of them than CPUs its workers stop spinning
        between regions, so every matmul waits for sleeping workers (measured: a 16-stream
        decode step 50 instead of 45 ms with the model loaded on another thread). Loading and
        stepping on one thread keeps a single pool.
        """
        self = cls.__new__(cls)
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                self._setup(build())
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                failure.append(e)
                return
            finally:
                ready.set()
            self._run()

        self._thread = threading.Thread(target=main, name="engine-step", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    @classmethod
    def from_args(cls, args: EngineArgs) -> AsyncEngine:
        """The engine `args` describe (engine/load.py), loaded on its own step thread, started."""
        from chatglm_serve.engine.load import build_engine

        return cls.launch(lambda: build_engine(args))

    # ---- lifecycle ----
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def drain(self, timeout: float = 30.0) -> None:
        """Stop admitting; let running requests finish for up to timeout; abort the rest, so
        their streams end (finish_reason "abort") instead of being cut. Safe to call twice."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.is_running and self._busy() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.is_running and self._busy():
            self._post(("abort_all",))
            grace = loop.time() + 2.0
            while self._busy() and loop.time() < grace:
                await asyncio.sleep(0.01)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Drain (see `drain`), then stop the step thread and release the model."""
        await self.drain(timeout)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
        self._fail_all(EngineError("the engine has shut down", code="unavailable"))
        close = getattr(self.engine.model, "close", None)
        if callable(close):  # a tensor-parallel model: stop its worker processes
            await asyncio.to_thread(close)

    def _busy(self) -> bool:
        s = self._stats
        return bool(self._inbox or self._streams or s.running or s.waiting)

    # ---- requests ----
    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        adapter: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; errors reach this caller before any output. adapter: a
        loaded LoRA / P-Tuning v2 adapter's name (engine/adapters.py), None = the base."""
        if not self._accepting:
            raise EngineError("the engine is shutting down", code="unavailable")
        params = self.engine.validate(prompt_ids, params)
        queued = self._stats.waiting + sum(1 for c in self._inbox if c[0] == "add")
        if queued >= self.engine.queue_limit(self._stats.running):
            raise EngineOverloadedError()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if request_id in self._streams:
                raise EngineError(
                    f"request id {request_id!r} is already in use", param="request_id"
                )
            self._streams[request_id] = stream
        self.start()
        self._post(("add", request_id, list(prompt_ids), params, adapter))
        remaining = params.n
        try:
            while remaining:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    remaining = 0
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if remaining:  # the consumer went away (client disconnected, cancelled)
                self._post(("abort", request_id))

    def encode_chat(self, query: str, history: list[tuple[str, str]] | None = None) -> list[int]:
        """A chat prompt's ids, the history's replies generated here spliced in as their ids
        (LLMEngine.encode_chat; safe to call from any thread)."""
        return self.engine.encode_chat(query, history)

    def token_text(self, token_id: int) -> str:
        """A token's display text, as logprobs show it (safe from any thread)."""
        return self.engine.token_text(token_id)

    async def compile_grammar(self, spec: GuidedSpec) -> CompiledGrammar:
        """A structured-output constraint for SamplingParams.guided, compiled once per spec on a
        worker thread (never the step thread); GrammarError (an EngineError) if it cannot be."""
        return await asyncio.to_thread(self.engine.compile_grammar, spec)

    def adapter_names(self) -> list[str]:
        return [a.name for a in self.engine.adapter_infos()]

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter between steps; EngineError when it is bad."""
        await self._call(self.engine.load_adapter, name, path)

    async def unload_adapter(self, name: str) -> None:
        await self._call(self.engine.unload_adapter, name)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.start()
        self._post(("call", fn, args, loop, future))
        return await future

    async def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def stats(self) -> EngineStats:
        return dataclasses.replace(self._stats)

    # ---- the step thread ----
    def _post(self, command: tuple) -> None:
        self._inbox.append(command)
        self._wake.set()

    def _drain_inbox(self) -> None:
        while self._inbox:
            cmd = self._inbox.popleft()
            kind = cmd[0]
            if kind == "add":
                _, rid, ids, params, adapter = cmd
                try:
                    self.engine.add_request(rid, ids, params, adapter=adapter)
                except EngineError as e:
                    self._deliver_error(rid, e)
                except Exception as e:  # a bug must fail this request, not the step thread
                    log.exception("adding request %s failed", rid)
                    self._deliver_error(rid, _internal(e))
            elif kind == "abort":
                self.engine.abort_request(cmd[1])
            elif kind == "abort_all":
                self.engine.abort_all()
            elif kind == "call":  # run on the step thread, between steps (adapter load/unload)
                _, fn, args, loop, future = cmd
                try:
                    result = fn(*args)
                except BaseException as e:
                    loop.call_soon_threadsafe(_settle, future, None, e)
                else:
                    loop.call_soon_threadsafe(_settle, future, result, None)

    def _run(self) -> None:
        while not self._stop:
            try:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self.engine.poll_kernel_build()  # idle: switch now, not on a request
                    self._stats = self.engine.get_stats()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
            except Exception as e:  # a failed step must not kill the server
                log.exception("engine step failed; failing the requests in flight")
                self._errors += 1
                self._recover(e)
                continue
            self._stats = self.engine.get_stats()
            if outputs:
                self._deliver(outputs)
        self._stats = self.engine.get_stats()

    def _recover(self, error: Exception) -> None:
        err = _internal(error)
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
            self._deliver_error(rid, err)
        try:
            self.engine.step()  # drop the abort outputs; every block goes back
        except Exception:
            log.exception("engine cleanup step failed")
        # a failed step may have left K/V half written; never serve it from the prefix cache
        self.engine.block_manager.reset_prefix_cache()
        self._stats = self.engine.get_stats()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._streams_lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens
                loop.call_soon_threadsafe(_put_all, items)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        with self._streams_lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            with contextlib.suppress(RuntimeError):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)

    def _fail_all(self, error: BaseException) -> None:
        with self._streams_lock:
            rids = list(self._streams)
        for rid in rids:
            self._deliver_error(rid, error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _internal(error: BaseException) -> EngineError:
    return EngineError(f"internal engine error: {error}", code="internal_error")
