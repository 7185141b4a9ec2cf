"""Attention over a paged KV cache, for batches that mix prefill chunks and decodes.

The cache is paged (as in vLLM / nano-vllm) rather than one contiguous slot per sequence:
fixed-size blocks let the engine share a chat's common prefix between turns (prefix caching)
and grow a sequence without reserving its maximum length up front. Per layer the cache is one
tensor [2, num_blocks, block_size, num_kv_heads, head_dim]; with multi-query attention only the
2 KV groups are stored, never the 32 expanded query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def kv_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, ...]:
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


@dataclass
class AttentionMetadata:
    """Where this step's flat tokens come from and where their K/V go.

    Sequences are ordered prefills first (a chunk of one or more new tokens, possibly after a
    cached prefix), then decodes (exactly one new token each). Host-side lists drive the python
    loop over prefills; device tensors drive the batched decode path.
    """

    slot_mapping: Tensor  # [T] int64: flat cache slot (block * block_size + offset) per new token
    query_start_loc: list[int]  # [S + 1] offsets of each sequence's new tokens in the flat batch
    seq_lens: list[int]  # [S] context length of each sequence including this step's tokens
    block_tables: Tensor  # [S, max_blocks] int64 block ids, padded with 0
    num_prefills: int  # the first num_prefills sequences are prefills, the rest decodes
    block_size: int
    seq_lens_tensor: Tensor | None = None  # [S] int64 on the cache device (decode masking)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def to(self, device: torch.device) -> AttentionMetadata:
        """The same metadata with its tensors on another device (layer-split placement)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device),
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables.to(device),
            num_prefills=self.num_prefills,
            block_size=self.block_size,
            seq_lens_tensor=None
            if self.seq_lens_tensor is None
            else self.seq_lens_tensor.to(device),
        )


def write_kv(kv_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store this step's keys/values ([T, Hkv, D]) in their cache slots."""
    _, nb, bs, hkv, d = kv_cache.shape
    kv_cache[0].view(nb * bs, hkv, d).index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    kv_cache[1].view(nb * bs, hkv, d).index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def _gather(cache: Tensor, blocks: Tensor) -> Tensor:
    # cache [num_blocks, bs, Hkv, D], blocks [..., nb] -> [..., Hkv, nb * bs, D]
    g = cache[blocks]  # [..., nb, bs, Hkv, D]
    g = g.flatten(-4, -3)  # [..., nb*bs, Hkv, D]
    return g.transpose(-3, -2)


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, meta: AttentionMetadata, scale: float
) -> Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] (rotary applied) -> [T, Hq, D]."""
    write_kv(kv_cache, k, v, meta.slot_mapping)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    out = torch.empty_like(q)
    qsl, bs = meta.query_start_loc, meta.block_size

    for i in range(meta.num_prefills):
        s, e, L = qsl[i], qsl[i + 1], meta.seq_lens[i]
        n = e - s
        qi = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if n == L:  # nothing cached before this chunk: attend to the fresh K/V directly
            ki = k[s:e].transpose(0, 1).unsqueeze(0)
            vi = v[s:e].transpose(0, 1).unsqueeze(0)
            oi = F.scaled_dot_product_attention(
                qi, ki.to(q.dtype), vi.to(q.dtype), is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            blocks = meta.block_tables[i, : (L + bs - 1) // bs]
            ki = _gather(k_cache, blocks)[:, :L].unsqueeze(0).to(q.dtype)  # [1, Hkv, L, D]
            vi = _gather(v_cache, blocks)[:, :L].unsqueeze(0).to(q.dtype)
            # query j (absolute position L - n + j) sees keys 0..L - n + j
            qpos = torch.arange(L - n, L, device=q.device)
            mask = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]
            oi = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[s:e] = oi.squeeze(0).transpose(0, 1)

    nd = meta.num_seqs - meta.num_prefills
    if nd:
        d0 = qsl[meta.num_prefills]
        max_len = max(meta.seq_lens[meta.num_prefills :])
        nblocks = (max_len + bs - 1) // bs
        tables = meta.block_tables[meta.num_prefills :, :nblocks]
        kd = _gather(k_cache, tables).to(q.dtype)  # [B, Hkv, nblocks*bs, D]
        vd = _gather(v_cache, tables).to(q.dtype)
        if meta.seq_lens_tensor is not None:
            lens = meta.seq_lens_tensor[meta.num_prefills :]
        else:
            lens = torch.tensor(meta.seq_lens[meta.num_prefills :], device=q.device)
        mask = torch.arange(nblocks * bs, device=q.device)[None, :] < lens[:, None]  # [B, L]
        qd = q[d0 : d0 + nd].unsqueeze(2)  # [B, Hq, 1, D]
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
        )
        out[d0 : d0 + nd] = od.squeeze(2)
    return out
