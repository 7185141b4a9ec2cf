"""AsyncEngine: streaming from the step thread, errors to their caller, aborts, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from chatglm_serve.engine.async_engine import AsyncEngine
from chatglm_serve.engine.config import EngineArgs, EngineConfig
from chatglm_serve.engine.types import (
    EngineError,
    EngineOverloadedError,
    FinishReason,
    PromptTooLongError,
    SamplingParams,
)
from tests.engine.harness import fail_step, make_engine, run

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture
async def engine(model, tokenizer):
    eng = AsyncEngine(
        model, tokenizer, EngineConfig(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64)
    )
    eng.start()
    yield eng
    await eng.shutdown(timeout=5)


async def collect(agen) -> dict[int, list]:
    by_index: dict[int, list] = {}
    async for out in agen:
        by_index.setdefault(out.index, []).append(out)
    return by_index


async def wait_for(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


def slow_steps(eng: AsyncEngine, seconds: float) -> None:
    """Make every forward pass take at least `seconds` (a slow device), so that a long request
    is certainly still running when the test acts, however loaded the CPU is."""
    real = eng.engine.runner.execute

    def slow(batch):
        time.sleep(seconds)
        return real(batch)

    eng.engine.runner.execute = slow


def prompt(tokenizer, text: str = "你好，请介绍一下你自己。") -> list[int]:
    return tokenizer.encode_chat(text, [])


async def test_stream_matches_the_sync_engine(engine, model, tokenizer):
    p = prompt(tokenizer)
    sp = SamplingParams(max_tokens=20, **GREEDY)
    outs = (await collect(engine.generate(p, sp, "a")))[0]
    ref = run(make_engine(model, tokenizer), [("a", p, sp)])[("a", 0)]
    assert [t for o in outs for t in o.token_ids] == ref.token_ids
    assert "".join(o.text for o in outs) == ref.text
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
    assert all(not o.finished for o in outs[:-1])
    assert outs[-1].completion_tokens == 20 and outs[-1].prompt_tokens == len(p)
    assert outs[-1].metrics is not None and outs[-1].metrics.time_to_first_token > 0


async def test_concurrent_streams_and_n_choices(engine, tokenizer):
    sp = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=8, ignore_eos=True)
    tasks = [
        asyncio.create_task(collect(engine.generate(prompt(tokenizer, f"问题 {i}"), sp, f"c{i}")))
        for i in range(5)
    ]
    for result in await asyncio.gather(*tasks):
        assert sorted(result) == [0, 1, 2]
        for outs in result.values():
            assert outs[-1].finished and sum(len(o.token_ids) for o in outs) == 8
    await wait_for(lambda: engine.stats().running == 0)
    assert engine.stats().kv_blocks_used == 0


async def test_errors_reach_only_their_caller(engine, tokenizer):
    good = asyncio.create_task(
        collect(engine.generate(prompt(tokenizer), SamplingParams(max_tokens=10, **GREEDY), "good"))
    )
    with pytest.raises(PromptTooLongError):
        await collect(engine.generate([1] * engine.max_model_len, SamplingParams(), "long"))
    with pytest.raises(EngineError) as e:
        await collect(engine.generate(prompt(tokenizer), SamplingParams(top_p=2.0), "bad"))
    assert e.value.param == "top_p"
    outs = (await good)[0]
    assert outs[-1].finish_reason is FinishReason.LENGTH


async def test_abort_by_id_ends_the_stream_and_frees_blocks(engine, tokenizer):
    agen = engine.generate(prompt(tokenizer), SamplingParams(max_tokens=400, **GREEDY), "ab")
    first = await agen.__anext__()
    assert first.token_ids and not first.finished
    await engine.abort("ab")
    rest = [o async for o in agen]
    assert rest[-1].finished and rest[-1].finish_reason is FinishReason.ABORT
    assert sum(len(o.token_ids) for o in [first, *rest]) < 400
    await wait_for(lambda: engine.stats().running == 0)
    assert engine.stats().kv_blocks_used == 0


async def test_consumer_going_away_aborts_the_request(engine, tokenizer):
    agens = [
        engine.generate(
            prompt(tokenizer, f"q{i}"), SamplingParams(max_tokens=400, **GREEDY), f"gone{i}"
        )
        for i in range(10)
    ]
    for agen in agens:
        await agen.__anext__()
    for agen in agens[:5]:
        await agen.aclose()  # what an HTTP client disconnect does
    tasks = [asyncio.create_task(agen.__anext__()) for agen in agens[5:]]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for agen in agens[5:]:
        await agen.aclose()
    await wait_for(lambda: engine.stats().running == 0 and engine.stats().waiting == 0)
    assert engine.stats().kv_blocks_used == 0
    # the engine still serves
    outs = (
        await collect(
            engine.generate(prompt(tokenizer), SamplingParams(max_tokens=3, **GREEDY), "after")
        )
    )[0]
    assert outs[-1].finish_reason is FinishReason.LENGTH


async def test_full_queue_is_refused(model, tokenizer):
    eng = AsyncEngine(
        model,
        tokenizer,
        EngineConfig(num_blocks=64, max_num_seqs=1, max_num_batched_tokens=64, max_queue=1),
    )
    slow_steps(eng, 0.01)
    sp = SamplingParams(max_tokens=400, **GREEDY)
    first = eng.generate(prompt(tokenizer), sp, "first")
    await first.__anext__()
    second = asyncio.create_task(collect(eng.generate(prompt(tokenizer), sp, "second")))
    await wait_for(lambda: eng.stats().waiting == 1)
    with pytest.raises(EngineOverloadedError):
        await collect(eng.generate(prompt(tokenizer), sp, "third"))
    await first.aclose()
    await eng.abort("second")
    outs = (await second)[0]
    assert outs[-1].finish_reason is FinishReason.ABORT
    await eng.shutdown(timeout=5)


async def test_shutdown_lets_running_finish_then_refuses(model, tokenizer):
    eng = AsyncEngine(
        model, tokenizer, EngineConfig(num_blocks=64, max_num_seqs=4, max_num_batched_tokens=64)
    )
    slow_steps(eng, 0.02)  # the long request needs > 9 s, the short one ~0.1 s
    short = eng.generate(prompt(tokenizer), SamplingParams(max_tokens=5, **GREEDY), "s")
    long = eng.generate(prompt(tokenizer), SamplingParams(max_tokens=450, **GREEDY), "l")
    firsts = [await short.__anext__(), await long.__anext__()]
    assert not any(o.finished for o in firsts)
    short_rest = asyncio.create_task(collect(short))
    long_rest = asyncio.create_task(collect(long))
    await eng.shutdown(timeout=1.5)
    assert (await short_rest)[0][-1].finish_reason is FinishReason.LENGTH
    assert (await long_rest)[0][-1].finish_reason is FinishReason.ABORT
    assert not eng.is_running
    with pytest.raises(EngineError):
        await collect(eng.generate(prompt(tokenizer), SamplingParams(), "late"))


async def test_a_failing_step_fails_requests_not_the_engine(engine, tokenizer):
    fail_step(engine.engine.runner, at=3)
    with pytest.raises(EngineError) as e:
        await collect(
            engine.generate(prompt(tokenizer), SamplingParams(max_tokens=10, **GREEDY), "boom")
        )
    assert e.value.code == "internal_error"
    await wait_for(lambda: engine.stats().running == 0)
    assert engine.stats().kv_blocks_used == 0
    outs = (
        await collect(
            engine.generate(prompt(tokenizer), SamplingParams(max_tokens=4, **GREEDY), "ok")
        )
    )[0]
    assert outs[-1].finish_reason is FinishReason.LENGTH


async def test_from_pretrained_loads_a_checkpoint_dir(model, tokenizer, tmp_path):
    from chatglm_serve.model.checkpoint import save_checkpoint
    from chatglm_serve.model.demo_tokenizer import train_demo_tokenizer

    tok_file = train_demo_tokenizer(tmp_path / "tok" / "tokenizer.model")
    ckpt = save_checkpoint(
        model, model.config, tmp_path / "ckpt", fmt="safetensors", tokenizer_model=tok_file
    )
    eng = AsyncEngine.from_args(
        EngineArgs(
            str(ckpt),
            device="cpu",
            engine=EngineConfig(num_blocks=32, max_num_seqs=4, max_num_batched_tokens=32),
        )
    )
    assert eng.max_model_len == min(512, 32 * 16) and eng.kv_capacity_tokens == 512
    sp = SamplingParams(max_tokens=6, **GREEDY)
    outs = (await collect(eng.generate(prompt(tokenizer), sp, "fp")))[0]
    ref = run(make_engine(model, tokenizer), [("fp", prompt(tokenizer), sp)])[("fp", 0)]
    assert [t for o in outs for t in o.token_ids] == ref.token_ids
    await eng.shutdown()


async def test_launch_builds_and_steps_on_one_thread(model, tokenizer):
    """The model is loaded on the thread that steps it (one OpenMP pool; see launch)."""
    import threading

    from chatglm_serve.engine.llm_engine import LLMEngine

    threads = {}
    config = EngineConfig(num_blocks=32, max_num_seqs=4, max_num_batched_tokens=32)

    def build() -> LLMEngine:
        threads["build"] = threading.current_thread()
        return LLMEngine(model, tokenizer, config)

    eng = AsyncEngine.launch(build)
    assert eng.is_running and threads["build"] is not threading.current_thread()
    real_step = eng.engine.step

    def step():
        threads["step"] = threading.current_thread()
        return real_step()

    eng.engine.step = step
    eng.start()  # already running: no second thread
    sp = SamplingParams(max_tokens=3, **GREEDY)
    outs = (await collect(eng.generate(prompt(tokenizer), sp, "l")))[0]
    assert sum(len(o.token_ids) for o in outs) == 3
    assert threads["step"] is threads["build"]
    await eng.shutdown()


def test_launch_reraises_what_the_build_raised():
    def build():
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        AsyncEngine.launch(build)
