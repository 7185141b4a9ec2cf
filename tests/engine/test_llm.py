"""The Python API (engine/llm.py): the seed's chat/stream_chat, and the offline batch generate."""

from __future__ import annotations

import pytest

from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.engine.llm import ChatGLM, ChatPrompt, process_response
from chatglm_serve.engine.llm_engine import LLMEngine
from chatglm_serve.engine.types import FinishReason, SamplingParams

GREEDY = {"do_sample": False}


def make_glm(model, tokenizer, **kw) -> ChatGLM:
    kw.setdefault("num_blocks", 256)
    kw.setdefault("max_num_seqs", 32)
    kw.setdefault("max_num_batched_tokens", 512)
    return ChatGLM(LLMEngine(model, tokenizer, EngineConfig(**kw)))


@pytest.fixture(scope="module")
def glm(model, tokenizer) -> ChatGLM:
    return make_glm(model, tokenizer)


def assert_idle(glm: ChatGLM) -> None:
    glm.engine.step()  # collects any abort leftovers
    stats = glm.engine.get_stats()
    assert not glm.engine.has_unfinished()
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)


def max_length_for(glm: ChatGLM, query: str, history, reply_tokens: int) -> int:
    return len(glm.encode_chat(query, history)) + reply_tokens


def test_stream_chat_grows_and_ends_at_chat_answer(glm):
    max_length = max_length_for(glm, "你好", [], 24)
    response, history = glm.chat("你好", history=[], max_length=max_length, **GREEDY)
    assert response and history == [("你好", response)]

    seen = []
    for partial, hist in glm.stream_chat("你好", history=[], max_length=max_length, **GREEDY):
        assert hist == [("你好", partial)]
        if seen:
            assert partial.startswith(seen[-1]), "the streamed response only grows"
        seen.append(partial)
    assert len(set(seen)) > 3, "the reply arrives in pieces, not at the end"
    assert seen[-1] == response
    assert_idle(glm)


def test_history_grows_as_in_the_seed_and_feeds_the_prompt(glm):
    q1, q2 = "Hello there", "And the second question?"
    r1, h1 = glm.chat(q1, history=[], max_length=max_length_for(glm, q1, [], 12), **GREEDY)
    assert h1 == [(q1, r1)]
    ml2 = max_length_for(glm, q2, h1, 12)
    r2, h2 = glm.chat(q2, history=h1, max_length=ml2, **GREEDY)
    assert h2 == [(q1, r1), (q2, r2)]
    assert h1 == [(q1, r1)], "the caller's history is not modified"

    # the second turn was asked with the first as history: the same as encoding it by hand
    ids = glm.encode_chat(q2, h1)
    alone = glm.generate([ids], SamplingParams(temperature=0, max_tokens=12))[0]
    assert r2 == process_response(alone.text)
    # ... with the first reply (returned stripped) spliced in as the ids the model generated
    r1_ids = glm.engine.reply_tokens.lookup(r1)
    assert r1_ids is not None and glm.tokenizer.decode(r1_ids) == r1
    head = glm.tokenizer.encode_chat(q1, [])
    assert ids[: len(head) + len(r1_ids)] == head + r1_ids


def test_second_chat_turn_recomputes_only_the_new_text(glm):
    q1, q2 = "Tell me about the engine and its scheduler, please.", "Why?"
    r1, h1 = glm.chat(q1, history=[], max_length=max_length_for(glm, q1, [], 30), **GREEDY)
    before = glm.engine.get_stats()
    for _ in glm.stream_chat(q2, h1, max_length=max_length_for(glm, q2, h1, 4), **GREEDY):
        pass
    after = glm.engine.get_stats()
    computed = after.prompt_tokens_computed - before.prompt_tokens_computed
    new_text = glm.tokenizer.encode_continuation(f"\n\n[Round 2]\n\n问：{q2}\n\n答：")
    assert computed <= len(new_text) + 1, (computed, len(glm.encode_chat(q2, h1)))
    assert_idle(glm)


def test_max_length_counts_prompt_and_reply(glm):
    prompt_len = len(glm.tokenizer.encode_chat("hi", []))
    ids_alone = glm.generate(
        [glm.tokenizer.encode_chat("hi", [])], SamplingParams(temperature=0, max_tokens=5)
    )[0].outputs[0]
    response, _ = glm.chat("hi", max_length=prompt_len + 5, **GREEDY)
    assert response == process_response(ids_alone.text)
    assert ids_alone.finish_reason == FinishReason.LENGTH and len(ids_alone.token_ids) == 5
    with pytest.raises(ValueError, match="max_length"):
        glm.chat("hi", max_length=prompt_len)


def test_leaving_stream_chat_early_aborts_the_request(glm):
    stream = glm.stream_chat("stop me", max_length=300, **GREEDY)
    for _ in range(3):
        next(stream)
    assert glm.engine.get_stats().running == 1
    stream.close()
    assert_idle(glm)


def test_interleaved_streams_are_batched_and_each_as_alone(glm):
    queries = ["first one", "a second, longer question", "三"]
    lengths = [max_length_for(glm, q, [], 10) for q in queries]
    alone = [glm.chat(q, max_length=m, **GREEDY)[0] for q, m in zip(queries, lengths, strict=True)]
    streams = [
        glm.stream_chat(q, max_length=m, **GREEDY) for q, m in zip(queries, lengths, strict=True)
    ]
    last = ["", "", ""]
    running_peak = 0
    live = set(range(3))
    while live:
        for i in sorted(live):
            try:
                last[i] = next(streams[i])[0]
            except StopIteration:
                live.discard(i)
        running_peak = max(running_peak, glm.engine.get_stats().running)
    assert last == alone
    assert running_peak == 3
    assert_idle(glm)


def test_generate_32_prompts_batched_equals_each_alone(model, tokenizer):
    glm = make_glm(model, tokenizer)
    words = ["alpha", "beta", "gamma", "delta", "你好", "世界", "ChatGLM", "serve"]
    prompts = [" ".join(words[: 1 + i % len(words)]) + f" #{i}" for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=10)

    steps = 0
    running_peak = 0
    real_step = glm.engine.step

    def counting_step():
        nonlocal steps, running_peak
        steps += 1
        out = real_step()
        running_peak = max(running_peak, glm.engine.get_stats().running)
        return out

    glm.engine.step = counting_step
    batched = glm.generate(prompts, params)
    batched_steps = steps

    steps = 0
    alone = [glm.generate(p, params)[0] for p in prompts]
    alone_steps = steps

    assert [r.prompt for r in batched] == prompts
    for b, a in zip(batched, alone, strict=True):
        assert b.prompt_token_ids == a.prompt_token_ids == tokenizer.encode(b.prompt)
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.text == a.text == tokenizer.decode(a.outputs[0].token_ids)
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason
    # batched, not looped: all 32 ran together, in a fraction of the one-by-one steps
    assert running_peak == 32
    assert batched_steps * 8 < alone_steps
    assert_idle(glm)


def test_generate_takes_chats_token_ids_and_per_prompt_params(glm, tokenizer):
    history = [("你好", "你好！")]
    params = SamplingParams(temperature=0, max_tokens=6)
    by_tuple, by_chat, by_ids = glm.generate(
        [("再见", history), ChatPrompt("再见", history), tokenizer.encode_chat("再见", history)],
        params,
    )
    assert by_tuple.prompt_token_ids == by_chat.prompt_token_ids == by_ids.prompt_token_ids
    assert by_tuple.text == by_chat.text == by_ids.text

    short, long = glm.generate(
        ["one", "two"], [SamplingParams(temperature=0, max_tokens=2), params]
    )
    assert len(short.outputs[0].token_ids) == 2 and len(long.outputs[0].token_ids) == 6
    with pytest.raises(ValueError, match="sampling params"):
        glm.generate(["a", "b"], [params])

    (multi,) = glm.generate("n choices", SamplingParams(temperature=1.0, max_tokens=4, n=3, seed=5))
    assert [c.index for c in multi.outputs] == [0, 1, 2]
    assert_idle(glm)


def test_generate_refuses_a_prompt_too_long_before_running_any(glm):
    from chatglm_serve.engine.types import PromptTooLongError

    too_long = list(glm.tokenizer.encode("x")) * glm.max_model_len
    with pytest.raises(PromptTooLongError):
        glm.generate(["fine", too_long], SamplingParams(temperature=0, max_tokens=2))
    assert_idle(glm)


def test_generate_feeds_more_prompts_than_the_queue_holds(model, tokenizer):
    glm = make_glm(model, tokenizer, max_queue=3, max_num_seqs=4)
    prompts = [f"queued prompt {i}" for i in range(10)]
    params = SamplingParams(temperature=0, max_tokens=4)
    results = glm.generate(prompts, params)
    reference = make_glm(model, tokenizer).generate(prompts, params)
    assert [r.text for r in results] == [r.text for r in reference]
    assert all(r.outputs[0].finish_reason == FinishReason.LENGTH for r in results)
    assert_idle(glm)


def test_load_without_a_path_serves_the_embedded_demo():
    glm = ChatGLM.load(config=EngineConfig(num_blocks=64))
    response, history = glm.chat("你好", history=[], max_length=40, **GREEDY)
    assert isinstance(response, str) and history == [("你好", response)]
    assert glm.tokenizer.vocab_size <= glm.model.config.padded_vocab_size
