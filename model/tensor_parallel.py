"""Tensor parallelism for ChatGLM2 (Megatron-style, applied gpt-fast `tp.py` style by module swap).

Each rank holds a slice of every transformer linear and does 1/world of the matmul work:

- query_key_value (column parallel): rank r keeps query heads [r*Hq/w, (r+1)*Hq/w) and the KV
  group(s) those heads read. ChatGLM2-6B has Hq=32 query heads in Hkv=2 groups (heads 0-15 read
  group 0, 16-31 group 1). At w <= Hkv each rank owns Hkv/w whole groups (TP=2: one group
  each, nothing duplicated). At w > Hkv there are fewer groups than ranks, so a group is
  replicated: rank r keeps group r // (w/Hkv), the one its query heads use (TP=4: ranks 0-1 hold
  group 0, ranks 2-3 group 1). Replication costs w/Hkv copies of the small K/V projection and
  of the KV cache, but keeps attention free of communication; splitting a group's head_dim
  instead would need an all-reduce inside every attention score.
- dense (attention out) and dense_4h_to_h (row parallel): the input dimension is split the
  same way as the heads / MLP columns, each rank computes a partial sum, one all_reduce each.
- dense_h_to_4h (column parallel): its rows are [gate (F); up (F)]; rank r keeps gate[r] and
  up[r] as [gate_r; up_r], so the unchanged `chunk(2)` in MLP.forward pairs them correctly.
- word_embeddings (vocab parallel): rank r looks up only its vocab slice, zeros elsewhere, and
  an all_reduce completes the rows. output_layer (vocab parallel): each rank computes its slice
  of the logits and an all_gather assembles them. The head is 0.5 GB of the 6B model in fp16
  and at decode its matmul reads all of it every step; replicating it would make every rank read
  the whole head (TP=2: ~9% more weight traffic per step, TP=4: ~25%) to save one gather of
  [batch, vocab] logits, which is small next to that.

The KV cache of each rank therefore holds only its own KV heads (`model.kv_cache_shape` reads
them from the attention module). Norms and the residual stream are replicated: after each
all_reduce every rank holds the same activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from chatglm_serve.model.config import ChatGLMConfig, ConfigError


@dataclass
class TPGroup:
    """This process's place in the tensor-parallel group (passed explicitly, never global)."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None  # collectives on the model's tensors (NCCL / gloo)

    def all_reduce(self, x: Tensor) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: Tensor) -> Tensor:
        """Concatenate every rank's `x` along the last dimension, in rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def check_tensor_parallel(cfg: ChatGLMConfig, world_size: int) -> None:
    """Refuse, naming the field, a TP degree this model cannot be split by."""
    if world_size < 1:
        raise ConfigError(f"tensor_parallel_size must be >= 1, not {world_size}")
    hq, hkv = cfg.num_attention_heads, cfg.num_kv_heads
    problems = []
    if hq % world_size:
        problems.append(f"num_attention_heads {hq}")
    if hkv % world_size and world_size % hkv:
        problems.append(f"KV groups {hkv} (nor is it a multiple of them)")
    if cfg.ffn_hidden_size % world_size:
        problems.append(f"ffn_hidden_size {cfg.ffn_hidden_size}")
    if cfg.padded_vocab_size % world_size:
        problems.append(f"padded_vocab_size {cfg.padded_vocab_size}")
    if problems:
        raise ConfigError(
            f"tensor_parallel_size {world_size} does not divide " + ", ".join(problems)
        )


@dataclass(frozen=True)
class ShardLayout:
    """Which slice of each full tensor one rank keeps (pure arithmetic on the config)."""

    cfg: ChatGLMConfig
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        check_tensor_parallel(self.cfg, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside tensor-parallel world {self.world_size}")

    @property
    def num_heads(self) -> int:
        return self.cfg.num_attention_heads // self.world_size

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.cfg.num_kv_heads // self.world_size)

    @property
    def first_head(self) -> int:
        return self.rank * self.num_heads

    @property
    def first_kv_head(self) -> int:
        """The first KV group this rank keeps: the group of its first query head."""
        heads_per_group = self.cfg.num_attention_heads // self.cfg.num_kv_heads
        return self.first_head // heads_per_group

    @property
    def ffn(self) -> int:
        return self.cfg.ffn_hidden_size // self.world_size

    @property
    def vocab(self) -> int:
        return self.cfg.padded_vocab_size // self.world_size

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab

    def full_shape(self, key: str) -> tuple[int, ...] | None:
        """The unsharded shape of a tensor this layout slices (None: kept whole)."""
        c = self.cfg
        kind = _kind(key)
        if kind == "qkv.weight":
            return (c.qkv_out_features, c.hidden_size)
        if kind == "qkv.bias":
            return (c.qkv_out_features,)
        if kind == "dense":
            return (c.hidden_size, c.num_attention_heads * c.head_dim)
        if kind == "h_to_4h":
            return (2 * c.ffn_hidden_size, c.hidden_size)
        if kind == "4h_to_h":
            return (c.hidden_size, c.ffn_hidden_size)
        if kind in ("embedding", "output"):
            return (c.padded_vocab_size, c.hidden_size)
        return None

    def shard(self, key: str, t: Tensor) -> Tensor:
        """This rank's part of the full tensor `key` (contiguous, so the full one can be freed)."""
        want = self.full_shape(key)
        if want is None:
            return t
        if tuple(t.shape) != want:
            raise ValueError(
                f"tensor {key!r} has shape {tuple(t.shape)}, expected {want} before "
                "tensor-parallel sharding"
            )
        c, d = self.cfg, self.cfg.head_dim
        kind = _kind(key)
        if kind in ("qkv.weight", "qkv.bias"):
            q_rows = c.num_attention_heads * d
            kv_rows = c.num_kv_heads * d
            q0 = self.first_head * d
            k0 = q_rows + self.first_kv_head * d
            v0 = q_rows + kv_rows + self.first_kv_head * d
            nq, nkv = self.num_heads * d, self.num_kv_heads * d
            part = torch.cat([t[q0 : q0 + nq], t[k0 : k0 + nkv], t[v0 : v0 + nkv]])
        elif kind == "dense":
            part = t[:, self.first_head * d : (self.first_head + self.num_heads) * d]
        elif kind == "h_to_4h":
            f, lo = c.ffn_hidden_size, self.rank * self.ffn
            part = torch.cat([t[lo : lo + self.ffn], t[f + lo : f + lo + self.ffn]])
        elif kind == "4h_to_h":
            part = t[:, self.rank * self.ffn : (self.rank + 1) * self.ffn]
        else:  # embedding / output layer rows
            part = t[self.vocab_start : self.vocab_start + self.vocab]
        return part.contiguous()


def _kind(key: str) -> str | None:
    if key.endswith("self_attention.query_key_value.weight"):
        return "qkv.weight"
    if key.endswith("self_attention.query_key_value.bias"):
        return "qkv.bias"
    if key.endswith("self_attention.dense.weight"):
        return "dense"
    if key.endswith("mlp.dense_h_to_4h.weight"):
        return "h_to_4h"
    if key.endswith("mlp.dense_4h_to_h.weight"):
        return "4h_to_h"
    if key == "transformer.embedding.word_embeddings.weight":
        return "embedding"
    if key == "transformer.output_layer.weight":
        return "output"
    return None


class RowParallelLinear(nn.Linear):
    """A linear whose input features are split across ranks: partial product, then all_reduce."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.tp = tp

    def forward(self, x: Tensor) -> Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + n) of the embedding; other ids contribute zeros."""

    def __init__(self, num_local: int, dim: int, vocab_start: int, tp: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_local, dim))
        self.vocab_start = vocab_start
        self.tp = tp

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(x)


class VocabParallelHead(nn.Linear):
    """The output layer's vocab slice; the full logits are gathered from every rank."""

    def __init__(self, in_features: int, num_local: int, tp: TPGroup) -> None:
        super().__init__(in_features, num_local, bias=False)
        self.tp = tp

    def forward(self, x: Tensor) -> Tensor:
        return self.tp.all_gather_last(F.linear(x, self.weight))


class TensorParallel:
    """Shards a ChatGLM2 for one rank: `prepare` swaps modules (before loading, on meta),
    `shard` slices each checkpoint tensor as it streams in; `apply` does both to a loaded model."""

    def __init__(self, cfg: ChatGLMConfig, tp: TPGroup) -> None:
        self.tp = tp
        self.layout = ShardLayout(cfg, tp.rank, tp.world_size)

    @property
    def rank(self) -> int:
        return self.tp.rank

    @property
    def world_size(self) -> int:
        return self.tp.world_size

    def shard(self, key: str, tensor: Tensor) -> Tensor:
        return self.layout.shard(key, tensor)

    def prepare(self, model: nn.Module) -> None:
        """Swap every split module for its per-rank form; new weights are on the meta device."""
        if any(hasattr(m, "load_weight") for m in model.modules()):
            raise ConfigError(
                "tensor parallel is not supported together with int4/int8 quantization"
            )
        lay, c, tp = self.layout, self.layout.cfg, self.tp
        with torch.device("meta"):
            for layer in model.transformer.encoder.layers:
                attn = layer.self_attention
                qkv_out = (lay.num_heads + 2 * lay.num_kv_heads) * c.head_dim
                attn.query_key_value = nn.Linear(c.hidden_size, qkv_out, bias=c.add_qkv_bias)
                attn.dense = RowParallelLinear(lay.num_heads * c.head_dim, c.hidden_size, tp)
                attn.num_heads = lay.num_heads
                attn.num_kv_heads = lay.num_kv_heads
                mlp = layer.mlp
                mlp.dense_h_to_4h = nn.Linear(c.hidden_size, 2 * lay.ffn, bias=False)
                mlp.dense_4h_to_h = RowParallelLinear(lay.ffn, c.hidden_size, tp)
            t = model.transformer
            t.embedding.word_embeddings = VocabParallelEmbedding(
                lay.vocab, c.hidden_size, lay.vocab_start, tp
            )
            t.output_layer = VocabParallelHead(c.hidden_size, lay.vocab, tp)
        for m in model.modules():  # meta placeholders are filled by the loader, never trained
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        model.tensor_parallel = self

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Shard an already loaded full model in place (each tensor sliced on its own device)."""
        full = dict(model.state_dict())
        self.prepare(model)
        for key, want in model.state_dict(keep_vars=True).items():
            if not want.is_meta:
                continue
            prefix, _, attr = key.rpartition(".")
            module = model.get_submodule(prefix)
            module._parameters[attr] = nn.Parameter(self.shard(key, full[key]), requires_grad=False)
        return model
