"""Batched sampler: each row's own parameters, seeded rows independent of the batch, guards."""

from __future__ import annotations

import math

import pytest
import torch

from chatglm_serve.engine.sampler import Sampler, SamplingRow
from chatglm_serve.engine.types import SamplingParams

V = 50


def row(prompt=(1, 2), out=(), gen=None, ban=(), **kw) -> SamplingRow:
    ids = list(prompt) + list(out)
    return SamplingRow(SamplingParams(**kw), ids, len(prompt), gen, list(ban))


def logits_batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax():
    lg = logits_batch(4)
    res = Sampler(V)(lg, [row(temperature=0) for _ in range(4)])
    assert res.token_ids == lg.argmax(-1).tolist()
    assert res.logprobs == [None] * 4


def test_top_k_1_and_tiny_top_p_are_greedy():
    lg = logits_batch(6, seed=1)
    rows = [row(temperature=1.0, top_k=1) for _ in range(3)]
    rows += [row(temperature=1.0, top_p=1e-6) for _ in range(3)]
    assert Sampler(V)(lg, rows).token_ids == lg.argmax(-1).tolist()


def test_top_k_restricts_to_the_k_best():
    lg = logits_batch(1, seed=2).repeat(300, 1)
    g = torch.Generator().manual_seed(3)
    picked = Sampler(V)(lg, [row(temperature=5.0, top_k=3, gen=g) for _ in range(300)]).token_ids
    assert set(picked) <= set(lg[0].topk(3).indices.tolist())
    assert len(set(picked)) == 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)]))
    rows = [
        row(temperature=1.0, top_p=0.7, gen=torch.Generator().manual_seed(i)) for i in range(200)
    ]
    picked = Sampler(V)(lg.repeat(200, 1), rows).token_ids
    assert set(picked) == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1] + [0.0] * (V - 3))
    lg = torch.log(probs).unsqueeze(0).repeat(4000, 1)
    s = Sampler(V, seed=123)
    picked = torch.tensor(s(lg, [row(temperature=1.0) for _ in range(4000)]).token_ids)
    freq = torch.bincount(picked, minlength=V).float() / 4000
    # deterministic (fixed seed); 4000 draws put each frequency well within 0.03 of p
    assert torch.allclose(freq[:3], probs[:3], atol=0.03)
    assert freq[3:].sum() == 0


def test_seeded_row_ignores_the_rest_of_the_batch():
    lg = logits_batch(1, seed=4)[0]

    def draw(batch_size: int, position: int) -> list[int]:
        g = torch.Generator().manual_seed(99)
        out = []
        for step in range(20):
            batch = logits_batch(batch_size, seed=1000 + step)
            batch[position] = lg
            rows = [row(temperature=0.8) for _ in range(batch_size)]
            rows[position] = row(temperature=0.8, gen=g)
            out.append(Sampler(V, seed=step)(batch, rows).token_ids[position])
        return out

    alone = draw(1, 0)
    assert draw(7, 3) == alone
    assert draw(16, 15) == alone
    assert len(set(alone)) > 1  # really sampled, not greedy


def test_repetition_penalty_is_chatglms():
    lg = torch.zeros(1, V)
    lg[0, 5], lg[0, 6], lg[0, 7] = 2.0, -2.0, 1.0
    s = Sampler(V)
    r = row(prompt=(5,), out=(6,), repetition_penalty=2.0, temperature=0)
    pen = lg.clone()
    s._apply_penalties(pen, [r])
    assert pen[0, 5] == 1.0  # positive seen logit divided (prompt tokens count too)
    assert pen[0, 6] == -4.0  # negative seen logit multiplied
    assert pen[0, 7] == 1.0  # unseen untouched


def test_presence_and_frequency_penalties_use_output_tokens_only():
    lg = torch.zeros(2, V)
    s = Sampler(V)
    rows = [
        row(prompt=(9,), out=(3, 3, 4), presence_penalty=0.5, frequency_penalty=0.25),
        row(prompt=(9,), out=(3,)),  # no penalties: untouched
    ]
    s._apply_penalties(lg, rows)
    assert lg[0, 3] == pytest.approx(-(0.5 + 2 * 0.25))
    assert lg[0, 4] == pytest.approx(-(0.5 + 0.25))
    assert lg[0, 9] == 0.0  # prompt token
    assert torch.count_nonzero(lg[1]) == 0


def test_banned_ids_are_never_chosen():
    lg = torch.zeros(2, V)
    lg[:, 2] = 100.0  # eos by far the best
    res = Sampler(V)(lg, [row(temperature=0, ban=[2]), row(temperature=1.0, ban=[2])])
    assert 2 not in res.token_ids


def test_nan_and_inf_logits_are_guarded():
    lg = torch.randn(4, V)
    lg[0, :10] = float("nan")
    lg[1] = float("nan")  # nothing usable at all
    lg[2, 7] = float("inf")
    lg[3] = float("-inf")
    rows = [row(temperature=t) for t in (0.0, 1.0, 0.0, 1.0)]
    ids = Sampler(V)(lg, rows).token_ids
    assert all(0 <= t < V for t in ids)
    assert ids[0] >= 10 and ids[2] == 7


def test_an_all_greedy_batch_is_guarded_too():
    # every row greedy and plain: the one-max shortcut, which must fall back when a row's
    # maximum is not finite; and ties go to the first index, in bf16 as in fp32
    lg = torch.randn(5, V + 14)  # a padded vocabulary: the tail must never win
    lg[:, V:] = 100.0
    lg[0, :10] = float("nan")
    lg[1] = float("nan")
    lg[2, 7] = float("inf")
    lg[3] = float("-inf")
    lg[4, [3, 9]] = 50.0
    ids = Sampler(V)(lg, [row(temperature=0) for _ in range(5)]).token_ids
    assert all(0 <= t < V for t in ids)
    assert ids[0] >= 10 and ids[2] == 7 and ids[4] == 3
    clean = logits_batch(3, seed=5).bfloat16()
    clean[1, [4, 20]] = 40.0
    ids = Sampler(V)(clean, [row(temperature=0) for _ in range(3)]).token_ids
    assert ids == clean.float().argmax(-1).tolist() and ids[1] == 4


def test_logprobs_are_the_models_distribution():
    lg = logits_batch(3, seed=5)
    rows = [row(temperature=0, logprobs=2), row(temperature=0), row(temperature=0.7, logprobs=0)]
    res = Sampler(V)(lg, rows)
    ref = torch.log_softmax(lg, -1)
    chosen, top = res.logprobs[0]
    assert chosen == pytest.approx(ref[0, res.token_ids[0]].item(), abs=1e-5)
    assert [t for t, _ in top] == ref[0].topk(2).indices.tolist()
    assert all(math.isclose(v, ref[0, t].item(), abs_tol=1e-5) for t, v in top)
    assert res.logprobs[1] is None
    chosen2, top2 = res.logprobs[2]
    assert top2 == [] and chosen2 == pytest.approx(ref[2, res.token_ids[2]].item(), abs=1e-5)


def test_padded_vocab_rows_are_never_sampled():
    lg = torch.zeros(1, V + 14)
    lg[0, V + 3] = 50.0  # a padded row of the output layer
    assert Sampler(V)(lg, [row(temperature=0)]).token_ids[0] < V


def test_penalties_and_bans_change_the_choice_but_not_the_logprobs():
    lg = torch.zeros(3, V)
    lg[:, 4], lg[:, 8] = 3.0, 2.0  # 4 is best, 8 second
    rows = [
        row(prompt=(4,), temperature=0, repetition_penalty=2.0, logprobs=1),  # 3/2 < 2
        row(prompt=(1,), out=(4, 4), temperature=0, frequency_penalty=0.6),  # 3 - 1.2 < 2
        row(temperature=0),  # untouched neighbour in the same batch
    ]
    res = Sampler(V)(lg, rows)
    assert res.token_ids == [8, 8, 4]
    chosen, top = res.logprobs[0]
    ref = torch.log_softmax(lg[0], -1)
    assert chosen == pytest.approx(ref[8].item(), abs=1e-6) and top[0][0] == 4


def test_draw_never_picks_a_zero_probability_entry():
    from chatglm_serve.engine.sampler import _draw

    cdf = torch.tensor([[0.0, 0.0, 0.5, 0.5, 1.0, 1.0]]).repeat(4, 1)
    u = torch.tensor([0.0, 0.25, 0.5, 0.9999999999])
    assert _draw(cdf, u).tolist() == [2, 2, 4, 4]
    assert _draw(cdf[:1], torch.tensor([1.0])).tolist() == [4]  # u * total == total


def test_flat_top_p_looks_past_the_first_candidates():
    big = 2000
    lg = torch.zeros(1000, big)  # flat: top_p 0.9 keeps 1800 tokens, more than _CANDIDATES
    rows = [row(temperature=1.0, top_p=0.9) for _ in range(1000)]
    assert len(set(Sampler(big, seed=1)(lg, rows).token_ids)) > 600  # > 512 candidates
    rows = [row(temperature=1.0, top_k=1500) for _ in range(1000)]
    assert len(set(Sampler(big, seed=2)(lg, rows).token_ids)) > 600


def test_logit_bias_steers_greedy_rows_and_leaves_logprobs_and_other_rows_alone():
    lg = logits_batch(3, seed=11)
    worst = lg[0].argmin().item()
    best = lg[1].argmax().item()
    rows = [
        row(temperature=0, logit_bias={worst: 100.0}, logprobs=0),  # pushed to the top
        row(temperature=0, logit_bias={best: -100.0}),  # banned in effect
        row(temperature=0),
    ]
    res = Sampler(V)(lg, rows)
    assert res.token_ids[0] == worst
    assert res.token_ids[1] == lg[1].clone().index_fill_(0, torch.tensor([best]), -1e9).argmax()
    assert res.token_ids[2] == lg[2].argmax()
    # logprobs stay the model's distribution (the bias only changes the choice)
    assert res.logprobs[0][0] == pytest.approx(torch.log_softmax(lg[0], -1)[worst].item(), abs=1e-5)


def test_logit_bias_applies_to_sampled_rows():
    lg = logits_batch(1, seed=12).repeat(200, 1)
    target = lg[0].argmin().item()
    rows = [row(temperature=1.0, logit_bias={target: 100.0}) for _ in range(200)]
    assert set(Sampler(V)(lg, rows).token_ids) == {target}
