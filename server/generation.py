"""One engine request as the HTTP side sees it: opened, iterated, and always cleaned up.

`open(wait)` lets the engine's first answer arrive for up to `wait` seconds: a refusal (prompt too
long, queue full, bad parameters) then still becomes a proper 4xx status instead of an error
inside a 200 stream, while a request that has to queue gets its stream headers after `wait` at
most, long before any client gives up on them (ChatGPT-Next-Web: 60 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, TypeVar

import anyio
from starlette.requests import Request

from chatglm_serve.engine.types import RequestOutput, SamplingParams

if TYPE_CHECKING:
    from chatglm_serve.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineStream:
    def __init__(
        self,
        engine: AsyncEngine,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        adapter: str | None = None,
    ) -> None:
        self.engine = engine
        self.request_id = request_id
        self._n = params.n
        self._gen = engine.generate(prompt_ids, params, request_id, adapter=adapter)
        self._first: asyncio.Future[RequestOutput] | None = None
        self._done_indexes: set[int] = set()
        self._closed = False

    @property
    def finished(self) -> bool:
        return len(self._done_indexes) >= self._n

    async def open(self, wait: float) -> None:
        """Start the request; raises the engine's refusal (EngineError) if it comes within `wait`."""
        self._first = asyncio.ensure_future(self._gen.__anext__())
        await asyncio.wait({self._first}, timeout=wait)
        if self._first.done() and not self._first.cancelled():
            exc = self._first.exception()
            if exc is not None and not isinstance(exc, StopAsyncIteration):
                self._first = None
                raise exc

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        if self._first is not None:
            try:
                out = await self._first  # if cancelled here, close() still finds and reaps it
            except StopAsyncIteration:
                return
            self._first = None
            self._note(out)
            yield out
        async for out in self._gen:
            self._note(out)
            yield out

    def _note(self, out: RequestOutput) -> None:
        if out.finished:
            self._done_indexes.add(out.index)

    async def close(self) -> None:
        """Idempotent; aborts the engine request unless it finished. Runs shielded from cancel."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._first is not None and not self._first.done():
                self._first.cancel()
            if self._first is not None:
                with contextlib.suppress(BaseException):
                    await self._first
            with contextlib.suppress(Exception):
                await self._gen.aclose()
            if not self.finished:
                try:
                    await self.engine.abort(self.request_id)
                except Exception:  # already gone: nothing to free
                    log.debug("abort of %s failed", self.request_id, exc_info=True)


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client goes away first, cancel it and raise ClientDisconnected.

    Starlette keeps running a non-streaming handler after its client left; without this the
    engine would go on generating a reply nobody reads.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected
