"""Prompt logprobs: each prompt token's log-probability under the model, from the forward pass
that prefills the prompt (lm-evaluation-harness scores a continuation this way: `echo` with
`logprobs` on /v1/completions).

Position p's logits predict token p + 1, so a prefill chunk over positions [start, end) yields
the logprobs of prompt tokens start + 1 .. end. They are computed only for a sequence that asked
(`SamplingParams.prompt_logprobs`, choice 0 of a request) and only until it has them all: the
runner then returns the logits of those rows too (`ScheduledSeq.prompt_logprob_rows`). Such a
sequence takes no prefix from the prefix cache (engine/block_manager.py): a cached block has
K/V but not the logits, so its tokens are recomputed; what it computes is cached for others.
After a preemption, positions already scored are not scored again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from chatglm_serve.engine.types import TokenLogprob

# rows turned into log-softmax at once: bounds the temporary [rows, vocab] fp32 copies
_ROWS_AT_ONCE = 256


@torch.inference_mode()
def score_rows(
    logits: Tensor,
    targets: list[int],
    k: int,
    vocab_size: int,
    text_of: Callable[[int], str],
) -> list[TokenLogprob]:
    """Logprob of targets[i] under logits[i] (fp32 [N, padded vocab]), with the top k of each."""
    out: list[TokenLogprob] = []
    for lo in range(0, len(targets), _ROWS_AT_ONCE):
        part = logits[lo : lo + _ROWS_AT_ONCE, :vocab_size].float()
        part = torch.nan_to_num(part, nan=float("-inf"), posinf=torch.finfo(part.dtype).max)
        lps = torch.log_softmax(part, dim=-1)
        ids = torch.tensor(targets[lo : lo + _ROWS_AT_ONCE], device=lps.device)
        chosen = lps.gather(1, ids[:, None]).squeeze(1).tolist()
        if k:
            top_lp, top_ids = lps.topk(k, dim=-1)
            top_l, top_i = top_lp.tolist(), top_ids.tolist()
        else:
            top_l, top_i = [[]] * len(chosen), [[]] * len(chosen)
        for t, c, tl, ti in zip(ids.tolist(), chosen, top_l, top_i, strict=True):
            top = [(i, text_of(i), v) for i, v in zip(ti, tl, strict=True)]
            out.append(TokenLogprob(t, text_of(t), c, top))
    return out
