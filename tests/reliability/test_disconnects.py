"""A disconnect storm: 200 requests, each cut by its client at a random point (half-sent request,
queued, mid-stream, just before the end; closed politely or reset), 50 at a time, against the
real daemon on 127.0.0.1. Afterwards nothing runs or waits, the KV cache is empty, nothing was
logged as an error, and the next request is answered normally.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import struct
from collections import Counter

import httpx

from tests.reliability.conftest import USER, wait_idle

STORM = 200
AT_ONCE = 50
KEY = "sk-storm"


def request_bytes(body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def cut_one(port: int, rng: random.Random) -> tuple[str, int]:
    """One client that hangs up somewhere: (where, or 'completed' if the answer won; the tokens
    it asked for)."""
    stream = rng.random() < 0.85
    max_tokens = rng.randint(16, 160)
    body = {"messages": USER, "stream": stream, "max_tokens": max_tokens, "ignore_eos": True}
    if rng.random() < 0.3:
        body["n"] = 2
    data = request_bytes(body)
    where = rng.choices(
        ["mid-request", "before-answer", "mid-stream"], weights=[1, 2, 7] if stream else [1, 9, 0]
    )[0]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if where == "mid-request":
            writer.write(data[: rng.randrange(1, len(data))])
            await writer.drain()
            await asyncio.sleep(rng.random() * 0.05)
        else:
            writer.write(data)
            await writer.drain()
            if where == "before-answer":
                await asyncio.sleep(rng.random() * 0.2)
            else:
                # an SSE token event is ~250 bytes: stop anywhere from the headers to the end
                budget = rng.randrange(100, max_tokens * body.get("n", 1) * 250)
                seen = b""
                while len(seen) < budget:
                    chunk = await reader.read(4096)
                    if not chunk:
                        break
                    seen += chunk
                if b"data: [DONE]" in seen:
                    where = "completed"
                else:
                    assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
    finally:
        if rng.random() < 0.5:  # a reset (RST), as a crashed client or a proxy timeout sends
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
    return where, max_tokens * body.get("n", 1)


async def storm(port: int, seed: int) -> tuple[Counter, int]:
    """(how many hung up where, tokens asked for in all)"""
    rng = random.Random(seed)
    rngs = [random.Random(rng.random()) for _ in range(STORM)]
    gate = asyncio.Semaphore(AT_ONCE)

    async def gated(r: random.Random) -> tuple[str, int]:
        async with gate:
            return await cut_one(port, r)

    results = await asyncio.wait_for(asyncio.gather(*map(gated, rngs)), 120)
    return Counter(where for where, _ in results), sum(asked for _, asked in results)


async def test_disconnect_storm_leaves_nothing_behind(daemon, engine_factory, caplog):
    engine = engine_factory(max_num_seqs=32, max_model_len=512, kv_cache_tokens=64 * 512)
    server = daemon(engine, api_keys=[KEY])
    before = engine.stats()
    with caplog.at_level(logging.WARNING):
        outcomes, asked = await storm(server.port, seed=9)
        await asyncio.to_thread(wait_idle, engine, 30)
    print(f"disconnect storm: {dict(outcomes)}")
    assert sum(outcomes.values()) == STORM
    cut = STORM - outcomes["completed"]
    assert cut >= STORM * 3 // 4  # most were really cut, not served to the end
    assert outcomes["mid-stream"] >= STORM // 3
    # nothing running or waiting, every KV block back
    s = engine.stats()
    assert (s.running, s.waiting, s.kv_blocks_used) == (0, 0, 0)
    # the cut requests were aborted, not generated to the end for nobody
    generated = s.generation_tokens_total - before.generation_tokens_total
    print(f"tokens asked for {asked}, generated {generated}")
    assert generated < asked * 3 // 4
    # no error, no traceback: a client hanging up is normal life for a daemon
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors[:5]]
    # and the next request is answered normally, streamed and not
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ) as c:
        r = await c.post(
            "/v1/chat/completions", json={"messages": USER, "max_tokens": 8, "ignore_eos": True}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        r = await c.post("/v1/chat/completions", json={"messages": USER, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    await asyncio.to_thread(wait_idle, engine, 30)
