"""A minimal driver of the model's paged-cache forward, for tests that run without the engine."""

from __future__ import annotations

import torch
from torch import Tensor

from chatglm_serve.model.attention import AttentionMetadata
from chatglm_serve.model.chatglm import ChatGLMForCausalLM


class PagedRunner:
    """Each sequence gets its own contiguous run of blocks; enough to exercise the paged layout."""

    def __init__(
        self, model: ChatGLMForCausalLM, max_seqs: int = 8, max_len: int = 256, block_size: int = 16
    ):
        self.model = model
        self.bs = block_size
        self.blocks_per_seq = (max_len + block_size - 1) // block_size
        nb = max_seqs * self.blocks_per_seq
        dtype = next(model.parameters()).dtype
        self.caches = [
            torch.zeros(model.kv_cache_shape(nb, block_size), dtype=dtype, device=d)
            for d in model.layer_devices()
        ]
        self.lens = [0] * max_seqs

    def table(self, seq: int) -> list[int]:
        # interleave sequences' blocks in reverse so block ids are not trivially contiguous
        return [
            (self.blocks_per_seq - 1 - j) * len(self.lens) + seq for j in range(self.blocks_per_seq)
        ]

    @torch.inference_mode()
    def step(self, chunks: list[tuple[int, list[int]]]) -> Tensor:
        """chunks: (seq index, new token ids); prefills (len > 1) must come before decodes.

        Returns logits [num new tokens, vocab].
        """
        ids, pos, slots, qsl, lens = [], [], [], [0], []
        num_prefills = 0
        for seq, new in chunks:
            start = self.lens[seq]
            table = self.table(seq)
            for j, t in enumerate(new):
                p = start + j
                ids.append(t)
                pos.append(p)
                slots.append(table[p // self.bs] * self.bs + p % self.bs)
            self.lens[seq] = start + len(new)
            qsl.append(qsl[-1] + len(new))
            lens.append(self.lens[seq])
            if len(new) > 1:
                assert num_prefills == len(lens) - 1, "prefill chunks must come before decodes"
                num_prefills = len(lens)
        tables = torch.tensor([self.table(s) for s, _ in chunks])
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            query_start_loc=qsl,
            seq_lens=lens,
            block_tables=tables,
            num_prefills=num_prefills,
            block_size=self.bs,
        )
        hidden = self.model(torch.tensor(ids), torch.tensor(pos), self.caches, meta)
        return self.model.compute_logits(hidden)

    def greedy(self, seq: int, prompt: list[int], steps: int) -> list[int]:
        logits = self.step([(seq, prompt)])
        out = [int(logits[-1].argmax())]
        for _ in range(steps - 1):
            logits = self.step([(seq, [out[-1]])])
            out.append(int(logits[-1].argmax()))
        return out
