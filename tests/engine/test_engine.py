"""The synchronous engine core against the issue's proofs (tiny fp32 model, real tokenizer)."""

from __future__ import annotations

import random

import pytest

from chatglm_serve.engine.types import (
    EngineError,
    EngineOverloadedError,
    FinishReason,
    PromptTooLongError,
    SamplingParams,
)
from tests.engine.harness import assert_idle, make_engine, naive_greedy, run

GREEDY = dict(temperature=0.0, ignore_eos=True)


def prompts_of_lengths(tokenizer, corpus, lengths: list[int]) -> list[list[int]]:
    """Real encoded text, cut to the given lengths (each starts with [gMASK] sop)."""
    text = "\n".join(corpus)
    ids = tokenizer.encode(text)
    out = []
    for i, n in enumerate(lengths):
        start = 2 + (i * 37) % (len(ids) - n - 2)
        out.append(tokenizer.prefix_token_ids + ids[start : start + n - 2])
    return out


def test_engine_greedy_matches_full_recompute(model, tokenizer, corpus):
    prompts = prompts_of_lengths(tokenizer, corpus, [5, 40])
    eng = make_engine(model, tokenizer)
    res = run(
        eng, [(str(i), p, SamplingParams(max_tokens=12, **GREEDY)) for i, p in enumerate(prompts)]
    )
    for i, p in enumerate(prompts):
        assert res[(str(i), 0)].token_ids == naive_greedy(model, p, 12)


def test_sixteen_staggered_greedy_prompts_batched_equal_alone(model, tokenizer, corpus):
    lengths = [3, 7, 12, 16, 17, 25, 31, 33, 48, 50, 64, 65, 80, 97, 120, 150]
    prompts = prompts_of_lengths(tokenizer, corpus, lengths)
    reqs = [(f"r{i}", p, SamplingParams(max_tokens=24, **GREEDY)) for i, p in enumerate(prompts)]
    # a 64-token budget chunks the longer prompts while others decode
    cfg = dict(max_num_seqs=16, max_num_batched_tokens=64, num_blocks=256)
    alone = {}
    for req in reqs:
        eng = make_engine(model, tokenizer, **cfg)
        alone.update(run(eng, [req]))
    eng = make_engine(model, tokenizer, **cfg)
    batched = run(eng, reqs, stagger=1)
    # they really ran together: the last request started before the first finished
    assert batched[("r15", 0)].first_step < batched[("r0", 0)].finish_step
    for rid, _, _ in reqs:
        assert batched[(rid, 0)].token_ids == alone[(rid, 0)].token_ids, rid
        assert batched[(rid, 0)].text == alone[(rid, 0)].text
        assert len(batched[(rid, 0)].token_ids) == 24
    assert_idle(eng)


def test_seeded_request_is_the_same_alone_and_in_a_busy_batch(model, tokenizer, corpus):
    prompts = prompts_of_lengths(tokenizer, corpus, [20, 9, 33, 14, 60, 27, 5, 41])
    params = SamplingParams(
        temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=30, ignore_eos=True
    )
    target = ("target", prompts[0], params)
    alone = run(make_engine(model, tokenizer), [target])[("target", 0)]
    others = []
    for i, p in enumerate(prompts[1:]):
        kind = i % 3
        sp = (
            SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)  # unseeded
            if kind == 0
            else SamplingParams(temperature=0.7, seed=i, max_tokens=25, ignore_eos=True)
            if kind == 1
            else SamplingParams(max_tokens=25, **GREEDY)
        )
        others.append((f"o{i}", p, sp))
    busy = run(
        make_engine(model, tokenizer, max_num_batched_tokens=48),
        others[:3] + [target] + others[3:],
        stagger=2,
    )
    got = busy[("target", 0)]
    assert got.token_ids == alone.token_ids
    assert got.text == alone.text
    greedy = run(
        make_engine(model, tokenizer), [("g", prompts[0], SamplingParams(max_tokens=30, **GREEDY))]
    )
    assert alone.token_ids != greedy[("g", 0)].token_ids  # it really sampled


def test_abort_frees_capacity_and_a_waiting_request_is_admitted(model, tokenizer, corpus):
    # 9 blocks of 16: two 60-token prompts take 4 blocks each; the third cannot fit
    eng = make_engine(model, tokenizer, num_blocks=9, max_num_seqs=8, max_num_batched_tokens=128)
    a, b, c = prompts_of_lengths(tokenizer, corpus, [60, 60, 60])
    sp = SamplingParams(max_tokens=3, **GREEDY)
    eng.add_request("a", a, SamplingParams(max_tokens=50, **GREEDY))
    eng.add_request("b", b, SamplingParams(max_tokens=50, **GREEDY))
    eng.add_request("c", c, sp)
    eng.step()
    eng.step()
    s = eng.get_stats()
    assert (s.running, s.waiting) == (2, 1)
    used = s.kv_blocks_used
    assert eng.abort_request("a")
    assert eng.get_stats().kv_blocks_used == used - 4  # freed at once, not at the next step
    outs = eng.step()
    aborted = [o for o in outs if o.request_id == "a"]
    assert (
        len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason is FinishReason.ABORT
    )
    s = eng.get_stats()
    assert (s.running, s.waiting) == (2, 0)
    assert {seq.request_id for seq in eng.scheduler.running} == {"b", "c"}
    assert not eng.abort_request("a")  # already gone
    eng.abort_request("b")
    res = run(eng, [])
    assert res[("c", 0)].finish_reason is FinishReason.LENGTH
    assert_idle(eng)


def test_two_hundred_random_aborts_leak_nothing(model, tokenizer, corpus):
    rng = random.Random(0)
    eng = make_engine(model, tokenizer, num_blocks=20, max_num_seqs=6, max_num_batched_tokens=48)
    prompts = prompts_of_lengths(tokenizer, corpus, [rng.randrange(2, 70) for _ in range(40)])
    live: set[str] = set()
    finished: dict[tuple[str, int], int] = {}
    expected: dict[str, int] = {}
    aborts = 0
    i = 0
    while aborts < 200:
        if len(live) < 12:
            rid = f"q{i}"
            n = rng.choice([1, 1, 2])
            eng.add_request(
                rid,
                rng.choice(prompts),
                SamplingParams(
                    temperature=rng.choice([0.0, 1.0]),
                    n=n,
                    max_tokens=rng.randrange(1, 40),
                    ignore_eos=True,
                ),
            )
            expected[rid] = n
            live.add(rid)
            i += 1
        if live and rng.random() < 0.5:
            rid = rng.choice(sorted(live))
            assert eng.abort_request(rid)
            live.discard(rid)
            aborts += 1
        for out in eng.step():
            if out.finished:
                key = (out.request_id, out.index)
                finished[key] = finished.get(key, 0) + 1
        live = {rid for rid in live if rid in eng.requests}
        eng.block_manager.check_consistency()
    for key, r in run(eng, []).items():
        if r.finish_reason is not None:
            finished[key] = finished.get(key, 0) + 1
    assert_idle(eng)
    # every choice of every request ended exactly once
    assert finished == {(rid, k): 1 for rid, n in expected.items() for k in range(n)}
    assert eng.get_stats().num_preemptions > 0  # the small cache also exercised preemption


def test_stop_string_split_across_tokens_is_cut_cleanly(model, tokenizer, corpus):
    prompt = prompts_of_lengths(tokenizer, corpus, [30])[0]
    base = run(
        make_engine(model, tokenizer), [("x", prompt, SamplingParams(max_tokens=40, **GREEDY))]
    )[("x", 0)]
    full = base.text
    # token boundaries in the text, and a stop string straddling one of them
    bounds = [len(tokenizer.decode(base.token_ids[:k])) for k in range(1, len(base.token_ids))]
    stop = None
    for b in bounds[3:]:
        if 2 <= b <= len(full) - 2:
            cand = full[b - 2 : b + 2]
            if full.find(cand) == b - 2 and cand.strip():
                stop = cand
                break
    assert stop is not None, "no boundary-straddling stop string found"
    res = run(
        make_engine(model, tokenizer),
        [("s", prompt, SamplingParams(max_tokens=40, stop=["never-there", stop], **GREEDY))],
    )[("s", 0)]
    cut = full.find(stop)
    assert res.finish_reason is FinishReason.STOP
    assert res.text == full[:cut]
    assert all(stop not in c for c in res.chunks)
    assert res.token_ids == base.token_ids[: len(res.token_ids)]
    # the stop completed inside the last token: no token beyond it was generated
    assert (
        len(tokenizer.decode(res.token_ids[:-1]))
        < cut + len(stop)
        <= len(tokenizer.decode(res.token_ids))
    )


def test_stop_token_ids_min_tokens_and_eos(model, tokenizer, corpus):
    prompt = prompts_of_lengths(tokenizer, corpus, [25])[0]
    base = run(
        make_engine(model, tokenizer), [("x", prompt, SamplingParams(max_tokens=30, **GREEDY))]
    )[("x", 0)]
    stop_tok = base.token_ids[4]
    first = base.token_ids.index(stop_tok)
    res = run(
        make_engine(model, tokenizer),
        [("s", prompt, SamplingParams(max_tokens=30, stop_token_ids=[stop_tok], temperature=0))],
    )[("s", 0)]
    assert res.finish_reason is FinishReason.STOP
    assert res.token_ids == base.token_ids[: first + 1]  # the stop token is counted, not shown
    assert res.text == tokenizer.decode(base.token_ids[:first])

    # the same id as eos: stops by default, not with ignore_eos, never before min_tokens
    eng = make_engine(model, tokenizer)
    eng.eos_token_id = stop_tok
    res = run(eng, [("e", prompt, SamplingParams(max_tokens=30, temperature=0))])[("e", 0)]
    assert res.finish_reason is FinishReason.STOP and res.token_ids == base.token_ids[: first + 1]
    res = run(eng, [("i", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))])[
        ("i", 0)
    ]
    assert res.finish_reason is FinishReason.LENGTH and res.token_ids == base.token_ids
    min_tokens = first + 3
    res = run(
        eng, [("m", prompt, SamplingParams(max_tokens=30, temperature=0, min_tokens=min_tokens))]
    )[("m", 0)]
    assert stop_tok not in res.token_ids[:min_tokens]
    assert res.finish_reason is FinishReason.LENGTH or res.token_ids[-1] == stop_tok


def test_max_tokens_and_context_limit_end_with_length(model, tokenizer, corpus):
    eng = make_engine(model, tokenizer, max_model_len=64)
    assert eng.max_model_len == 64
    p50, p63, p64 = prompts_of_lengths(tokenizer, corpus, [50, 63, 64])
    res = run(
        eng,
        [
            ("max", p50, SamplingParams(max_tokens=5, **GREEDY)),
            ("none", p50, SamplingParams(max_tokens=None, **GREEDY)),
            ("clipped", p50, SamplingParams(max_tokens=1000, **GREEDY)),
            ("one", p63, SamplingParams(**GREEDY)),
        ],
    )
    assert [len(res[(k, 0)].token_ids) for k in ("max", "none", "clipped", "one")] == [5, 14, 14, 1]
    assert all(r.finish_reason is FinishReason.LENGTH for r in res.values())
    assert res[("none", 0)].outputs[-1].completion_tokens == 14
    assert res[("none", 0)].outputs[-1].prompt_tokens == 50
    with pytest.raises(PromptTooLongError) as e:
        eng.add_request("long", p64, SamplingParams())
    assert e.value.prompt_tokens == 64 and e.value.max_model_len == 64
    assert_idle(eng)


@pytest.mark.parametrize("limit", ["seqs", "blocks"])
def test_more_requests_than_capacity_all_finish_in_admission_order(model, tokenizer, corpus, limit):
    cfg = (
        dict(max_num_seqs=3, num_blocks=64)
        if limit == "seqs"
        else dict(max_num_seqs=16, num_blocks=9)
    )
    eng = make_engine(model, tokenizer, **cfg)
    prompts = prompts_of_lengths(
        tokenizer, corpus, [40, 22, 35, 10, 45, 30, 18, 41, 25, 33, 12, 38]
    )
    reqs = [
        (f"r{i:02d}", p, SamplingParams(max_tokens=10, **GREEDY)) for i, p in enumerate(prompts)
    ]
    res = run(eng, reqs)
    order = [rid for rid, _, _ in reqs]
    assert all(res[(rid, 0)].finish_reason is FinishReason.LENGTH for rid in order)
    assert all(len(res[(rid, 0)].token_ids) == 10 for rid in order)
    firsts = [res[(rid, 0)].first_step for rid in order]
    ends = [res[(rid, 0)].finish_step for rid in order]
    assert firsts == sorted(firsts) and ends == sorted(ends)
    assert firsts[-1] > ends[0]  # they really queued
    assert_idle(eng)


def test_prefix_cache_second_chat_turn(model, tokenizer, corpus):
    q1 = " ".join(corpus[:6])
    sp = SamplingParams(max_tokens=20, **GREEDY)
    p1 = tokenizer.encode_chat(q1, [])
    eng = make_engine(model, tokenizer)
    t1 = run(eng, [("turn1", p1, sp)])[("turn1", 0)]
    p2 = tokenizer.encode_chat("and then?", [(q1, t1.text)])
    before = eng.get_stats()
    t2 = run(eng, [("turn2", p2, sp)])[("turn2", 0)]
    after = eng.get_stats()
    computed = after.prompt_tokens_computed - before.prompt_tokens_computed
    cached = after.prompt_tokens_cached - before.prompt_tokens_cached
    # cached: the full blocks of the longest common prefix with turn 1's computed tokens
    seen = p1 + t1.token_ids[:-1]  # the last sampled token was never computed
    lcp = next(
        (i for i, (x, y) in enumerate(zip(seen, p2, strict=False)) if x != y),
        min(len(seen), len(p2)),
    )
    assert cached == min(lcp, len(p2) - 1) // 16 * 16
    assert computed == len(p2) - cached
    assert computed < len(p2) / 2, (computed, len(p2))
    assert t2.outputs[-1].metrics.num_cached_tokens == cached
    # and the cache changes nothing in the output
    off = make_engine(model, tokenizer, enable_prefix_caching=False)
    t2_off = run(off, [("turn2", p2, sp)])[("turn2", 0)]
    assert t2_off.token_ids == t2.token_ids
    assert off.get_stats().prompt_tokens_computed == len(p2)


@pytest.mark.parametrize("finish", ["stop token", "length"])
def test_second_chat_turn_is_encoded_with_the_reply_ids_and_hits_the_cache(
    model, tokenizer, corpus, finish
):
    q1, q2 = " ".join(corpus[:6]), "Why is that?"
    p1 = tokenizer.encode_chat(q1, [])
    sp = SamplingParams(max_tokens=40, temperature=0.0)
    if finish == "stop token":  # end turn 1 on a token it generates (the model never says eos)
        probe = run(make_engine(model, tokenizer), [("probe", p1, sp)])[("probe", 0)]
        sp = SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[probe.token_ids[25]])
    eng = make_engine(model, tokenizer)
    t1 = run(eng, [("turn1", p1, sp)])[("turn1", 0)]
    assert t1.finish_reason is (
        FinishReason.STOP if finish == "stop token" else FinishReason.LENGTH
    )
    reply_ids = t1.token_ids[:-1] if finish == "stop token" else t1.token_ids
    assert eng.reply_tokens.lookup(t1.text) == reply_ids  # the stop token is no reply id

    history = [(q1, t1.text)]
    p2 = eng.encode_chat(q2, history)
    new_text = tokenizer.encode_continuation(f"\n\n[Round 2]\n\n问：{q2}\n\n答：")
    assert p2 == p1 + reply_ids + new_text
    assert tokenizer.decode(p2) == tokenizer.build_chat_prompt(q2, history)
    # re-tokenized, the random model's reply has other ids: what this is for
    assert tokenizer.encode_chat(q2, history) != p2

    before = eng.get_stats()
    t2 = run(eng, [("turn2", p2, sp)])[("turn2", 0)]
    after = eng.get_stats()
    computed = after.prompt_tokens_computed - before.prompt_tokens_computed
    cached = after.prompt_tokens_cached - before.prompt_tokens_cached
    assert computed + cached == len(p2)
    # only the new text is computed (and the reply's last token, when turn 1 ended on length:
    # sampled, never computed); the reply's last, partly filled block is taken over
    assert computed <= len(new_text) + 16  # full blocks alone
    assert computed == len(new_text) + (finish == "length"), (computed, len(new_text), len(p2))
    # the same output as the spliced prompt computed from scratch
    eng.block_manager.reset_prefix_cache()
    before = eng.get_stats()
    again = run(eng, [("again", p2, sp)])[("again", 0)]
    assert eng.get_stats().prompt_tokens_computed - before.prompt_tokens_computed == len(p2)
    assert again.token_ids == t2.token_ids and again.text == t2.text
    assert_idle(eng)


@pytest.mark.parametrize("off", [{"reply_token_cache_size": 0}, {"enable_prefix_caching": False}])
def test_without_the_reply_map_chat_prompts_are_plain(model, tokenizer, corpus, off):
    eng = make_engine(model, tokenizer, **off)
    q1 = " ".join(corpus[:3])
    p1 = tokenizer.encode_chat(q1, [])
    t1 = run(eng, [("t", p1, SamplingParams(max_tokens=12, temperature=0.0))])[("t", 0)]
    assert eng.reply_tokens.lookup(t1.text) is None and len(eng.reply_tokens) == 0
    assert eng.encode_chat("next", [(q1, t1.text)]) == tokenizer.encode_chat(
        "next", [(q1, t1.text)]
    )


def test_chunked_prefill_gives_the_unchunked_output(model, tokenizer, corpus):
    prompts = prompts_of_lengths(tokenizer, corpus, [300, 170, 9])
    reqs = [(f"c{i}", p, SamplingParams(max_tokens=16, **GREEDY)) for i, p in enumerate(prompts)]
    whole = run(make_engine(model, tokenizer, max_num_batched_tokens=512), reqs)
    eng = make_engine(model, tokenizer, max_num_batched_tokens=16)
    chunked = run(eng, reqs)
    for rid, _, _ in reqs:
        assert chunked[(rid, 0)].token_ids == whole[(rid, 0)].token_ids
    # 300 tokens in chunks of at most 16: the long prompt's first token came many steps later
    assert chunked[("c0", 0)].first_step >= 300 // 16


def test_preemption_gives_the_same_greedy_output(model, tokenizer, corpus):
    prompts = prompts_of_lengths(tokenizer, corpus, [40, 35, 50, 30])
    reqs = [(f"p{i}", p, SamplingParams(max_tokens=60, **GREEDY)) for i, p in enumerate(prompts)]
    roomy = run(make_engine(model, tokenizer, num_blocks=128), reqs)
    eng = make_engine(model, tokenizer, num_blocks=12, max_num_batched_tokens=64)
    tight = run(eng, reqs)
    assert eng.get_stats().num_preemptions > 0
    for rid, _, _ in reqs:
        assert tight[(rid, 0)].token_ids == roomy[(rid, 0)].token_ids, rid
        assert tight[(rid, 0)].text == roomy[(rid, 0)].text
    assert_idle(eng)


def test_n_choices_share_the_prompt_and_match_single_seeded_requests(model, tokenizer, corpus):
    prompt = prompts_of_lengths(tokenizer, corpus, [70])[0]
    sp = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=12, ignore_eos=True)
    eng = make_engine(model, tokenizer)
    res = run(eng, [("n", prompt, sp)])
    assert sorted(res) == [("n", 0), ("n", 1), ("n", 2)]
    # siblings reuse the first choice's full prompt blocks: only their partial tails are computed
    assert eng.get_stats().prompt_tokens_computed == len(prompt) + 2 * (len(prompt) % 16)
    for i in range(3):
        single = SamplingParams(temperature=1.0, seed=5 + i, max_tokens=12, ignore_eos=True)
        alone = run(make_engine(model, tokenizer), [("s", prompt, single)])[("s", 0)]
        assert res[("n", i)].token_ids == alone.token_ids
    assert len({tuple(r.token_ids) for r in res.values()}) > 1
    assert_idle(eng)


def test_logprobs(model, tokenizer, corpus):
    prompt = prompts_of_lengths(tokenizer, corpus, [20])[0]
    res = run(
        make_engine(model, tokenizer),
        [("l", prompt, SamplingParams(max_tokens=6, logprobs=3, **GREEDY))],
    )[("l", 0)]
    lps = [lp for o in res.outputs for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == res.token_ids
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token
        assert lp.top[0][2] == pytest.approx(lp.logprob)
        assert isinstance(lp.token, str)


def test_requests_are_validated(model, tokenizer, corpus):
    eng = make_engine(model, tokenizer, max_queue=2, max_num_seqs=1)
    p = prompts_of_lengths(tokenizer, corpus, [10])[0]
    bad = [
        dict(temperature=-1),
        dict(top_p=0),
        dict(n=0),
        dict(max_tokens=-1),  # 0 is valid: score the prompt only
        dict(logprobs=99),
        dict(repetition_penalty=0),
        dict(presence_penalty=3),
        dict(min_tokens=5, max_tokens=2),
    ]
    for kw in bad:
        with pytest.raises(EngineError) as e:
            eng.add_request("x", p, SamplingParams(**kw))
        assert e.value.param == next(iter(kw)) or "min_tokens" in kw
    with pytest.raises(EngineError):
        eng.add_request("x", [], SamplingParams())
    with pytest.raises(EngineError):
        eng.add_request("x", [tokenizer.vocab_size], SamplingParams())
    eng.add_request("a", p, SamplingParams())
    with pytest.raises(EngineError):
        eng.add_request("a", p, SamplingParams())  # duplicate id
    eng.add_request("b", p, SamplingParams())
    eng.add_request("c", p, SamplingParams())  # waits for the free running slot, not in the queue
    with pytest.raises(EngineOverloadedError):
        eng.add_request("d", p, SamplingParams())
    eng.abort_all()
    eng.step()
    assert_idle(eng)


def test_stats_count_tokens_and_timings(model, tokenizer, corpus):
    eng = make_engine(model, tokenizer)
    prompts = prompts_of_lengths(tokenizer, corpus, [10, 20])
    run(eng, [(str(i), p, SamplingParams(max_tokens=5, **GREEDY)) for i, p in enumerate(prompts)])
    s = eng.get_stats()
    assert s.prompt_tokens_total == 30 and s.generation_tokens_total == 10
    assert s.requests_finished == 2 and s.kv_blocks_total == 128
    assert s.time_to_first_token_count == 2 and s.time_to_first_token_sum > 0
    assert s.time_per_output_token_count == 2
    assert s.kv_capacity_tokens == 128 * 16


@pytest.mark.parametrize("seed", [0, 1])
def test_random_workload_with_every_parameter(model, tokenizer, seed):
    """Mixed sampling parameters, n, stops, aborts, tiny caches: nothing fails or leaks."""
    rng = random.Random(seed)
    eng = make_engine(
        model,
        tokenizer,
        num_blocks=rng.choice([8, 12]),
        block_size=rng.choice([4, 16]),
        max_num_seqs=rng.choice([2, 5]),
        max_num_batched_tokens=rng.choice([8, 32]),
    )
    shared = [rng.randrange(3, tokenizer.sp_vocab_size) for _ in range(40)]
    expect: dict[str, int] = {}
    done: dict[tuple[str, int], FinishReason] = {}

    def collect(outs):
        for o in outs:
            if o.finished:
                assert (o.request_id, o.index) not in done
                done[(o.request_id, o.index)] = o.finish_reason

    for step in range(300):
        if rng.random() < 0.3 and len(eng.requests) < 8:
            plen = rng.randrange(1, eng.max_model_len - 1)
            prompt = (
                shared[: rng.randrange(0, 40)] + [rng.randrange(3, 2000) for _ in range(plen)]
            )[: eng.max_model_len - 1]
            sp = SamplingParams(
                temperature=rng.choice([0, 0.7, 1.3]),
                top_p=rng.choice([1.0, 0.9]),
                top_k=rng.choice([0, 5]),
                repetition_penalty=rng.choice([1.0, 1.2]),
                presence_penalty=rng.choice([0, 0.5]),
                frequency_penalty=rng.choice([0, 0.3]),
                seed=rng.choice([None, 5]),
                max_tokens=rng.choice([None, 1, 5, 30]),
                min_tokens=rng.choice([0, 1]),
                stop=rng.choice([[], ["a"], ["the ", "，"]]),
                stop_token_ids=rng.choice([[], [5, 6]]),
                ignore_eos=rng.random() < 0.5,
                n=rng.choice([1, 1, 2, 3]),
                logprobs=rng.choice([None, 0, 2]),
            )
            eng.add_request(f"t{step}", prompt, sp)
            expect[f"t{step}"] = sp.n
        if eng.requests and rng.random() < 0.05:
            eng.abort_request(rng.choice(list(eng.requests)))
        collect(eng.step())
        eng.block_manager.check_consistency()
    while eng.has_unfinished():
        collect(eng.step())
    assert set(done) == {(r, i) for r, n in expect.items() for i in range(n)}
    assert_idle(eng)
