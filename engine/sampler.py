"""Next-token choice for a whole batch at once, each row with its own sampling parameters.

Order of operations: NaN/inf guard, ChatGLM repetition penalty (prompt + output tokens, as the
seed's HF generate does), OpenAI presence/frequency penalties (output tokens only), OpenAI's
logit_bias, min_tokens ban of stop tokens, the grammar mask of constrained rows (structured output, engine/guided.py;
a grammar that can only end wins over the min_tokens ban), then greedy rows take the argmax and the others temperature, top-k, top-p and
an inverse-CDF draw with one uniform number per row. Rows of a seeded request take that number
from the request's own generator, so its tokens do not depend on the rest of the batch.
Logprobs are those of the model's distribution (after the guard, before penalties/temperature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from chatglm_serve.engine.guided import GrammarState, mask_logits
from chatglm_serve.engine.types import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    token_ids: list[int]  # prompt + output so far
    prompt_len: int
    generator: torch.Generator | None
    ban_ids: list[int]  # token ids that must not be chosen now (stop tokens before min_tokens)
    guided: GrammarState | None = None  # the grammar this row's token must keep to

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: None, or (chosen logprob, [(id, logprob)] top-k) when the row asked for logprobs
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def _penalized(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def _plain_greedy(r: SamplingRow) -> bool:
    """A row whose token is the argmax of the model's logits as they are."""
    p = r.params
    return (
        p.temperature <= 0
        and p.logprobs is None
        and not p.logit_bias
        and not r.ban_ids
        and r.guided is None
        and not _penalized(p)
    )


def _padded(seqs: list[list[int]], pad: int, device: torch.device) -> Tensor:
    width = max(1, max(len(s) for s in seqs))
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[device] = g
        return g

    @staticmethod
    def guard(logits: Tensor) -> Tensor:
        """NaN -> -inf, +inf -> float max; a row left with nothing finite becomes uniform."""
        if logits.device.type == "cpu" and bool(torch.isfinite(logits.amax(dim=-1)).all()):
            # amax propagates NaN, so finite row maxima mean nothing to fix: one cheap pass
            # instead of four (on a GPU the check would cost a sync; the fix-up is cheap there)
            return logits
        logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
        dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
        return logits.masked_fill(dead, 0.0)

    @torch.inference_mode()
    def __call__(self, logits: Tensor, rows: list[SamplingRow]) -> SampleResult:
        logits = logits[:, : self.vocab_size]
        if all(_plain_greedy(r) for r in rows):
            # One max per row: a NaN or +inf anywhere in a row is its max, and a row of -inf
            # has a max of -inf, so finite maxima mean guard() has nothing to fix and the
            # argmax is the answer. A batch-1 CPU step saved ~0.1 ms of ~3 (int4) this way.
            best, chosen = logits.max(dim=-1)
            if all(math.isfinite(v) for v in best.tolist()):
                return SampleResult(chosen.tolist(), [None] * len(rows))
        n, vocab = logits.shape
        device = logits.device
        logits = self.guard(logits.float())
        raw = logits
        banned = [(i, t) for i, r in enumerate(rows) for t in r.ban_ids if 0 <= t < vocab]
        biased = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias.items()]
        guided = [i for i, r in enumerate(rows) if r.guided is not None]
        if banned or biased or guided or any(_penalized(r.params) for r in rows):
            logits = logits.clone()  # raw stays the model's distribution, for logprobs
            self._apply_penalties(logits, rows)
            if biased:
                ri, ti, bi = zip(*biased, strict=True)
                logits.index_put_(
                    (torch.tensor(ri, device=device), torch.tensor(ti, device=device)),
                    torch.tensor(bi, dtype=logits.dtype, device=device),
                    accumulate=True,
                )
            if guided:  # after the bias: a bias never re-opens a token the grammar forbids
                mask_logits(logits, guided, [rows[i].guided for i in guided])  # type: ignore[misc]
            if banned:
                ri, ti = zip(*banned, strict=True)
                before = logits[guided].clone() if guided else None
                logits[list(ri), list(ti)] = float("-inf")
                if before is not None:
                    # a constrained row whose grammar allows only banned (stop) tokens ends
                    dead = torch.isneginf(logits[guided]).all(dim=-1)
                    if bool(dead.any()):
                        g = torch.tensor(guided, device=device)[dead]
                        logits[g] = before[dead]
                logits = self.guard(logits)

        sampled_rows = [i for i, r in enumerate(rows) if r.params.temperature > 0]
        if not sampled_rows:
            chosen = logits.argmax(dim=-1)
        elif len(sampled_rows) == n:
            chosen = self._sample(logits, rows)
        else:
            idx = torch.tensor(sampled_rows, device=device)
            picked = self._sample(logits[idx], [rows[i] for i in sampled_rows])
            chosen = logits.argmax(dim=-1).index_copy(0, idx, picked)

        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not lp_rows:
            return SampleResult(chosen.tolist(), [None] * n)
        # one transfer for ids and logprobs together
        idx = torch.tensor(lp_rows, device=device)
        lps = torch.log_softmax(raw[idx], dim=-1)
        chosen_lp = lps.gather(1, chosen[idx, None]).squeeze(1)
        k = max(rows[i].params.logprobs or 0 for i in lp_rows)
        top_lp, top_ids = lps.topk(k, dim=-1) if k else (lps[:, :0], chosen[idx, None][:, :0])
        ids, chosen_l, top_l, top_i = (
            chosen.tolist(),
            chosen_lp.tolist(),
            top_lp.tolist(),
            top_ids.tolist(),
        )
        out: list[tuple[float, list[tuple[int, float]]] | None] = [None] * n
        for j, i in enumerate(lp_rows):
            kk = rows[i].params.logprobs or 0
            out[i] = (chosen_l[j], list(zip(top_i[j][:kk], top_l[j][:kk], strict=True)))
        return SampleResult(ids, out)

    def _apply_penalties(self, logits: Tensor, rows: list[SamplingRow]) -> None:
        device = logits.device
        vocab = logits.shape[1]
        rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        if rep:
            # seen-token mask via scatter into one spare column that absorbs the padding
            ids = _padded([rows[i].token_ids for i in rep], vocab, device)
            seen = torch.zeros(len(rep), vocab + 1, dtype=torch.bool, device=device)
            seen.scatter_(1, ids, True)
            seen = seen[:, :vocab]
            pen = torch.tensor(
                [rows[i].params.repetition_penalty for i in rep], device=device
            ).unsqueeze(1)
            idx = torch.tensor(rep, device=device)
            sub = logits[idx]
            penalized = torch.where(sub < 0, sub * pen, sub / pen)
            logits[idx] = torch.where(seen, penalized, sub)
        pf = [
            i
            for i, r in enumerate(rows)
            if (r.params.presence_penalty or r.params.frequency_penalty) and r.output_ids
        ]
        if pf:
            ids = _padded([rows[i].output_ids for i in pf], vocab, device)
            counts = torch.zeros(len(pf), vocab + 1, device=device)
            counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
            counts = counts[:, :vocab]
            freq = torch.tensor([rows[i].params.frequency_penalty for i in pf], device=device)
            pres = torch.tensor([rows[i].params.presence_penalty for i in pf], device=device)
            idx = torch.tensor(pf, device=device)
            logits[idx] -= freq[:, None] * counts + pres[:, None] * (counts > 0).float()

    def _uniforms(self, rows: list[SamplingRow], device: torch.device) -> Tensor:
        """One U(0,1) per row: seeded rows from their own generator, the rest from ours."""
        u = torch.empty(len(rows), device=device)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if shared:
            draw = torch.rand(len(shared), device=device, generator=self._shared_generator(device))
            u[torch.tensor(shared, device=device)] = draw
        for i, r in enumerate(rows):
            if r.generator is not None:
                u[i] = torch.rand((), device=device, generator=r.generator)
        return u

    def _sample(self, logits: Tensor, rows: list[SamplingRow]) -> Tensor:
        """Inverse-CDF draws: token = first index where the cumulative kept mass >= u * total.

        One uniform per row, so a seeded row's draw never depends on its neighbours. Rows with
        top-k/top-p only look at their best candidates (topk is far cheaper than a full sort on
        CPU); top-p rows fall back to the whole vocabulary when the candidates hold too little
        mass to decide.
        """
        device = logits.device
        n, vocab = logits.shape
        temp = torch.tensor([r.params.temperature for r in rows], device=device)
        logits = logits / temp[:, None]
        u = self._uniforms(rows, device)

        top_k = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in rows]
        top_p = [r.params.top_p for r in rows]
        restricted = [i for i in range(n) if top_k[i] or top_p[i] < 1.0]
        free = [i for i in range(n) if not (top_k[i] or top_p[i] < 1.0)]
        out = torch.empty(n, dtype=torch.long, device=device)
        if free:
            idx = torch.tensor(free, device=device)
            probs = logits[idx].softmax(dim=-1)
            out[idx] = _draw(probs.cumsum(dim=-1), u[idx])
        if restricted:
            idx = torch.tensor(restricted, device=device)
            ks = [top_k[i] for i in restricted]
            ps = [top_p[i] for i in restricted]
            sub = logits[idx]
            width = _CANDIDATES if device.type == "cpu" else vocab
            k = min(vocab, max(max(ks), width if 0 in ks else 0))
            picked = self._sample_top(sub, ks, ps, u[idx], k, check=k < vocab)
            if picked is None:  # some top-p row needs more than k candidates
                picked = self._sample_top(sub, ks, ps, u[idx], vocab, check=False)
            out[idx] = picked
        return out

    @staticmethod
    def _sample_top(
        logits: Tensor, ks: list[int], ps: list[float], u: Tensor, k: int, check: bool
    ) -> Tensor | None:
        device = logits.device
        vals, ids = logits.topk(k, dim=-1)  # sorted, best first
        rank = torch.arange(k, device=device)[None, :]
        kk = torch.tensor([kr or k for kr in ks], device=device)[:, None]
        vals = vals.masked_fill(rank >= kk, float("-inf"))
        # top-p mass is relative to what top-k kept (HF order), or to the whole vocabulary
        has_k = torch.tensor([kr > 0 for kr in ks], device=device)
        lse = torch.where(has_k, vals.logsumexp(dim=-1), logits.logsumexp(dim=-1))
        probs = (vals - lse[:, None]).exp()
        cum = probs.cumsum(dim=-1)
        p = torch.tensor(ps, device=device)
        if check and bool(((cum[:, -1] < p) & ~has_k).any()):
            return None
        probs = probs.masked_fill((cum - probs) > p[:, None], 0.0)  # the best always stays
        pos = _draw(probs.cumsum(dim=-1), u)
        return ids.gather(1, pos[:, None]).squeeze(1)


# candidates examined for top-p on CPU before falling back to a full sort
_CANDIDATES = 512


def _draw(cdf: Tensor, u: Tensor) -> Tensor:
    """Index of the first cdf entry > u * total, per row (cdf [N, K] non-decreasing).

    Strictly greater, so a zero-probability entry (a flat step) is never picked; the cap at the
    entry where the total is reached covers u * total rounding up to the total itself.
    """
    total = cdf[:, -1:]
    pos = torch.searchsorted(cdf, u.unsqueeze(1) * total, right=True)
    last = (cdf < total).sum(dim=1, keepdim=True)
    return torch.minimum(pos, last).squeeze(1)
