"""Attention over a paged KV cache, for batches that mix prefill chunks and decodes.

The cache is paged (as in vLLM / nano-vllm) rather than one contiguous slot per sequence:
fixed-size blocks let the engine share a chat's common prefix between turns (prefix caching)
and grow a sequence without reserving its maximum length up front. Per layer the cache is one
tensor [2, num_blocks, block_size, num_kv_heads, head_dim]; with multi-query attention only the
2 KV groups are stored, never the 32 expanded query heads.

Everything a step's attention needs besides the cache itself (block ids to gather, masks) is the
same in every layer, so it is built once per step by the first layer and kept on the metadata:
on a CPU a 16-layer decode step is a few milliseconds, and small per-layer tensor creation shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from chatglm_serve.kernels import cpu_decode, cuda_decode


def kv_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, ...]:
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


@dataclass
class _DecodePlan:
    """The batched decode path's per-step tensors, shared by every layer."""

    block_ids: Tensor  # [B * nblocks] int64: each sequence's blocks up to the longest context
    nblocks: int
    keys: int  # key positions attended to per sequence (the longest context)
    mask: Tensor | None  # [B, 1, 1, keys] additive (0 / -inf); None when every length is `keys`


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
    # built on first use (by the first layer) and reused by the others; not part of equality
    _decode: _DecodePlan | None = field(default=None, repr=False, compare=False)
    _decode_lens: Tensor | None = field(default=None, repr=False, compare=False)
    _prefill: dict = field(default_factory=dict, repr=False, compare=False)

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

    def decode_lens(self) -> Tensor:
        """[decodes] int64 context lengths of the decoding sequences, on the tables' device."""
        if self._decode_lens is None:
            p = self.num_prefills
            if self.seq_lens_tensor is not None:
                self._decode_lens = self.seq_lens_tensor[p:]
            else:
                self._decode_lens = torch.tensor(
                    self.seq_lens[p:], dtype=torch.int64, device=self.block_tables.device
                )
        return self._decode_lens

    def decode_plan(self, dtype: torch.dtype) -> _DecodePlan:
        """The gather-and-SDPA decode path's block ids and mask."""
        if self._decode is None:
            p, bs = self.num_prefills, self.block_size
            lens = self.seq_lens[p:]
            keys = max(lens)
            nblocks = (keys + bs - 1) // bs
            block_ids = self.block_tables[p:, :nblocks].reshape(-1)
            mask = None
            if min(lens) != keys:  # only ragged batches need masking
                lens_t = self.decode_lens()
                pos = torch.arange(keys, device=block_ids.device)
                mask = torch.zeros(len(lens), 1, 1, keys, dtype=dtype, device=block_ids.device)
                mask.masked_fill_((pos[None, :] >= lens_t[:, None])[:, None, None, :], -torch.inf)
            self._decode = _DecodePlan(block_ids, nblocks, keys, mask)
        return self._decode

    def prefill_mask(self, i: int) -> Tensor:
        """Prefill i after a cached prefix: query j (position L - n + j) sees keys 0..L - n + j."""
        mask = self._prefill.get(i)
        if mask is None:
            n = self.query_start_loc[i + 1] - self.query_start_loc[i]
            L = self.seq_lens[i]
            device = self.block_tables.device
            qpos = torch.arange(L - n, L, device=device)
            mask = torch.arange(L, device=device)[None, :] <= qpos[:, None]
            self._prefill[i] = mask
        return mask


def write_kv(kv_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store this step's keys/values ([T, Hkv, D]) in their cache slots."""
    _, nb, bs, hkv, d = kv_cache.shape
    kv_cache[0].view(nb * bs, hkv, d).index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    kv_cache[1].view(nb * bs, hkv, d).index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def _gather(cache: Tensor, block_ids: Tensor, seqs: int, keys: int) -> Tensor:
    """cache [num_blocks, bs, Hkv, D], block_ids [seqs * nb] -> [seqs, Hkv, keys, D].

    index_select copies only the listed blocks (one pass, faster than advanced indexing); the
    result is a strided view whose per-head rows SDPA reads directly.
    """
    _, bs, hkv, d = cache.shape
    g = cache.index_select(0, block_ids).view(seqs, -1, hkv, d)  # [seqs, nb * bs, Hkv, D]
    return g[:, :keys].transpose(1, 2)


def _decode_attention(q: Tensor, kv_cache: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    """q [B, Hq, D] of the decoding sequences (one token each) -> [B, Hq, D]."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    # our kernels read each sequence's blocks in place, up to its own length (no gathered copy)
    if cpu_decode.attention_supports(q, kv_cache):
        out = cpu_decode.decode_attention(
            q, k_cache, v_cache, meta.block_tables[meta.num_prefills :], meta.decode_lens(), scale
        )
        if out is not None:
            return out
    elif cuda_decode.attention_supports(q, kv_cache):
        out = cuda_decode.decode_attention(
            q, k_cache, v_cache, meta.block_tables[meta.num_prefills :], meta.decode_lens(), scale
        )
        if out is not None:
            return out
    plan = meta.decode_plan(q.dtype)
    nd = q.shape[0]
    kd = _gather(k_cache, plan.block_ids, nd, plan.keys).to(q.dtype)  # [B, Hkv, keys, D]
    vd = _gather(v_cache, plan.block_ids, nd, plan.keys).to(q.dtype)
    od = F.scaled_dot_product_attention(
        q.unsqueeze(2), kd, vd, attn_mask=plan.mask, scale=scale, enable_gqa=True
    )
    return od.squeeze(2)


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, meta: AttentionMetadata, scale: float
) -> Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] (rotary applied) -> [T, Hq, D]."""
    write_kv(kv_cache, k, v, meta.slot_mapping)
    qsl, bs = meta.query_start_loc, meta.block_size
    nd = meta.num_seqs - meta.num_prefills
    if meta.num_prefills == 0:  # decodes only (the steady state): no copy-out
        return _decode_attention(q, kv_cache, meta, scale).reshape(q.shape)

    k_cache, v_cache = kv_cache[0], kv_cache[1]
    out = torch.empty_like(q)
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
            ki = _gather(k_cache, blocks, 1, L).to(q.dtype)  # [1, Hkv, L, D]
            vi = _gather(v_cache, blocks, 1, L).to(q.dtype)
            oi = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=meta.prefill_mask(i), scale=scale, enable_gqa=True
            )
        out[s:e] = oi.squeeze(0).transpose(0, 1)

    if nd:
        d0 = qsl[meta.num_prefills]
        out[d0 : d0 + nd] = _decode_attention(q[d0 : d0 + nd], kv_cache, meta, scale)
    return out
