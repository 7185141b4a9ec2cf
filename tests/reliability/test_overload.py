"""Overload: twice the capacity at once. The excess gets 429 + Retry-After at once (never a hang,
never a 5xx), what was admitted runs to the end, and what the engine holds never exceeds its
capacity (running slots + queue), so memory stays bounded however many clients come.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass

import httpx

from tests.reliability.conftest import USER, assert_error, wait_idle

SEQS = 4  # max_num_seqs: sequences decoded together
QUEUE = 4  # max_queue: sequences waiting beyond the free running slots
CAPACITY = SEQS + QUEUE
TIMEOUT = 60.0  # no request may take longer than this, refused or served


@dataclass
class Outcome:
    status: int
    retry_after: str | None
    body: str


async def chat(
    client: httpx.AsyncClient, max_tokens: int, stream: bool, path: str = "/v1/chat/completions"
) -> Outcome:
    if path == "/":
        body = {"prompt": USER[0]["content"], "max_length": max_tokens}
    else:
        body = {"messages": USER, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    async with client.stream("POST", path, json=body) as r:
        text = (await r.aread()).decode()
    return Outcome(r.status_code, r.headers.get("retry-after"), text)


def assert_served(o: Outcome, max_tokens: int) -> None:
    """A complete answer of exactly max_tokens tokens (ignore_eos)."""
    assert o.status == 200, o.body[:300]
    if o.body.startswith("{"):
        body = json.loads(o.body)
        assert body["usage"]["completion_tokens"] == max_tokens
        assert body["choices"][0]["finish_reason"] == "length"
        return
    events = [line[5:].strip() for line in o.body.splitlines() if line.startswith("data:")]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def assert_refused(o: Outcome) -> None:
    assert_error(httpx.Response(o.status, content=o.body.encode()), 429, "overloaded")
    assert o.retry_after is not None and int(o.retry_after) >= 1


class PeakLoad:
    """Samples the engine's held sequences (running + waiting) while a test runs."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.engine.stats()
            self.peak = max(self.peak, s.running + s.waiting)
            time.sleep(0.001)

    def __enter__(self) -> PeakLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def overload_engine(engine_factory):
    return engine_factory(
        max_num_seqs=SEQS, max_queue=QUEUE, max_model_len=1024, kv_cache_tokens=CAPACITY * 1024
    )


async def test_a_burst_of_twice_the_capacity(daemon, engine_factory):
    engine = overload_engine(engine_factory)
    server = daemon(engine)
    max_tokens = 500  # long enough that none finishes while the burst is still arriving
    before = engine.stats().requests_finished
    with PeakLoad(engine) as load:
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as c:
            # streams and plain requests mixed, all at once: 2x (running slots + queue)
            jobs = [chat(c, max_tokens, stream=i % 4 != 3) for i in range(2 * CAPACITY)]
            outcomes = await asyncio.wait_for(asyncio.gather(*jobs), TIMEOUT)
    served = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status != 200]
    for o in refused:
        assert_refused(o)
    for o in served:
        assert_served(o, max_tokens)
    # never more held than the capacity: the queue is bounded, so is memory
    assert load.peak <= CAPACITY
    # nothing refused while there was room, nothing admitted beyond it
    assert len(served) == CAPACITY and len(refused) == CAPACITY
    wait_idle(engine, timeout=30)
    assert engine.stats().requests_finished - before == CAPACITY


async def test_a_full_engine_refuses_every_extra_request_and_finishes_its_own(
    daemon, engine_factory
):
    engine = overload_engine(engine_factory)
    server = daemon(engine)
    max_tokens = 800

    async def until(predicate) -> None:
        deadline = time.monotonic() + 20
        while not predicate(engine.stats()):
            assert time.monotonic() < deadline, engine.stats()
            await asyncio.sleep(0.005)

    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as c:
        running = [asyncio.create_task(chat(c, max_tokens, True)) for _ in range(SEQS)]
        await until(lambda s: s.running == SEQS)
        queued = [asyncio.create_task(chat(c, max_tokens, True)) for _ in range(QUEUE)]
        await until(lambda s: s.waiting == QUEUE)
        # the engine is full: twice its capacity more, streams, plain and legacy, all refused
        extra = [
            chat(c, 8, stream=i % 3 == 0, path="/" if i % 3 == 2 else "/v1/chat/completions")
            for i in range(2 * CAPACITY)
        ]
        for o in await asyncio.wait_for(asyncio.gather(*extra), TIMEOUT):
            assert_refused(o)
        assert engine.stats().running == SEQS  # ...and the admitted were not disturbed
        for o in await asyncio.wait_for(asyncio.gather(*running, *queued), TIMEOUT):
            assert_served(o, max_tokens)
        wait_idle(engine, timeout=30)
        # room again: the next request is served
        assert_served(await chat(c, 4, stream=False), 4)
