"""ChatGLM2 in plain PyTorch, built for serving.

Module and parameter names follow the Hugging Face `chatglm2-6b` checkpoint exactly, so a state
dict key such as `transformer.encoder.layers.3.self_attention.query_key_value.weight` names the
parameter that holds it. The forward pass takes a flat batch of tokens from many sequences (prefill
chunks and single decode tokens together), their positions, and the engine-owned paged KV cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatglm_serve.model.attention import AttentionMetadata, kv_cache_shape, paged_attention
from chatglm_serve.model.config import ChatGLMConfig, parse_dtype
from chatglm_serve.model.cpu_linear import PackedLinear, optimize_linears
from chatglm_serve.model.cpu_step import cpu_decode_step
from chatglm_serve.model.huge_pages import gather_decode_weights


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        # half precision: normalise in fp32, round, then scale (as the seed and HF do)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the first `dim` channels of a head, as interleaved pairs."""

    def __init__(self, dim: int, max_positions: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_positions = max_positions
        self.base = base
        # Present in the seed's checkpoints; we recompute it in fp32 rather than trust an fp16 copy.
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self._cache: Tensor | None = None

    def _inv_freq(self, device: torch.device | None = None) -> Tensor:
        exps = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        return 1.0 / (self.base**exps)

    def rotation(self, positions: Tensor) -> Tensor:
        """positions [T] -> [T, 1, dim/2] complex64 e^(i pos freq), one row per token."""
        if self._cache is None or self._cache.device != positions.device:
            t = torch.arange(self.max_positions, dtype=torch.float32, device=positions.device)
            freqs = torch.outer(t, self._inv_freq(positions.device))  # [P, dim/2]
            # cos + i sin, computed once for every position (not per step or per layer)
            self._cache = torch.polar(torch.ones_like(freqs), freqs)
        return self._cache.index_select(0, positions).unsqueeze(1)


def apply_rotary_(x: Tensor, rotation: Tensor) -> None:
    """Rotate x [T, H, D] in place on channels [0, rot) taken as pairs (2i, 2i+1).

    A pair (x0, x1) is the complex number x0 + i x1, so the rotation (x0 cos - x1 sin,
    x1 cos + x0 sin) is one complex multiply by cos + i sin: one op instead of a dozen.
    rotation: [T, 1, rot/2] complex64 (RotaryEmbedding.rotation); fp32 arithmetic throughout.
    """
    rot = rotation.shape[-1] * 2
    part = x[..., :rot]
    if part.dtype == torch.float32:
        torch.view_as_complex(part.unflatten(-1, (-1, 2))).mul_(rotation)
    else:
        z = torch.view_as_complex(part.float().unflatten(-1, (-1, 2))) * rotation
        part.copy_(torch.view_as_real(z).flatten(-2))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.query_key_value = nn.Linear(
            cfg.hidden_size, cfg.qkv_out_features, bias=cfg.add_qkv_bias
        )
        self.dense = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self, x: Tensor, rotation: Tensor, kv_cache: Tensor, meta: AttentionMetadata
    ) -> Tensor:
        T = x.shape[0]
        qkv = self.query_key_value(x)  # [T, (Hq + 2 Hkv) D], a fresh tensor we may rotate in place
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        # q and k are adjacent in qkv: rotate both heads' sets with one call
        apply_rotary_(qkv[:, : (hq + hkv) * d].view(T, hq + hkv, d), rotation)
        q = qkv[:, : hq * d].view(T, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(T, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(T, hkv, d)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale)  # [T, Hq, D]
        return self.dense(o.reshape(T, hq * d))


class MLP(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # SwiGLU: silu(first half) * second
        return self.dense_4h_to_h(F.silu(gate).mul_(up))


class GLMBlock(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, rotation: Tensor, kv_cache: Tensor, meta: AttentionMetadata
    ) -> Tensor:
        # residual adds in place on the sublayers' fresh outputs (x itself is never written)
        x = self.self_attention(self.input_layernorm(x), rotation, kv_cache, meta).add_(x)
        return self.mlp(self.post_attention_layernorm(x)).add_(x)


class Embedding(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.word_embeddings(input_ids)


class Encoder(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)


class ChatGLMModel(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.embedding = Embedding(cfg)
        self.rotary_pos_emb = RotaryEmbedding(cfg.rotary_dim, cfg.seq_length, base=cfg.rope_base)
        self.encoder = Encoder(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)


class ChatGLMForCausalLM(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = ChatGLMModel(cfg)
        # decode-only CPU steps in one C++ call where the linears allow it (model/cpu_step.py)
        self.use_decode_stack = True

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.encoder.layers

    def forward(
        self,
        input_ids: Tensor,  # [T]
        positions: Tensor,  # [T]
        kv_caches: list[Tensor],  # one per layer, see kv_cache_shape
        meta: AttentionMetadata,
    ) -> Tensor:
        """-> final hidden states [T, hidden] (normed); logits via compute_logits."""
        if meta.num_prefills == 0 and self.use_decode_stack:
            hidden = cpu_decode_step(self, input_ids, positions, kv_caches, meta)
            if hidden is not None:
                return hidden
        t = self.transformer
        x = t.embedding(input_ids.to(t.embedding.word_embeddings.weight.device))
        rotation = t.rotary_pos_emb.rotation(positions)
        for layer, cache in zip(t.encoder.layers, kv_caches, strict=True):
            if x.device != cache.device:  # a layer-split boundary: move activations once
                x = x.to(cache.device)
            if rotation.device != cache.device:  # (inputs may come on another device)
                rotation = rotation.to(cache.device)
            if meta.slot_mapping.device != cache.device:
                meta = meta.to(cache.device)
            x = layer(x, rotation, cache, meta)
        norm = t.encoder.final_layernorm
        return norm(x.to(norm.weight.device))

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, hidden] -> fp32 logits [N, vocab]."""
        head = self.transformer.output_layer
        device = head.device if isinstance(head, PackedLinear) else head.weight.device
        return head(hidden.to(device)).float()

    def optimize_for_cpu(self) -> list[str]:
        """Give the CPU linears their decode matmuls (model/cpu_linear.py); their names.

        Inference only, and in place (half-precision weights are repacked): call once the
        weights are final.
        """
        names = optimize_linears(self)
        gather_decode_weights(self)
        return names

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        # the KV heads this process holds (fewer than the config's under tensor parallel)
        attn = self.layers[0].self_attention
        return kv_cache_shape(num_blocks, block_size, attn.num_kv_heads, attn.head_dim)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        attn = self.layers[0].self_attention
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.config.num_layers * attn.num_kv_heads * attn.head_dim * elem

    def layer_devices(self) -> list[torch.device]:
        """The device of each transformer layer (where its KV cache must live)."""
        return [layer.input_layernorm.weight.device for layer in self.layers]

    @classmethod
    def random(
        cls,
        cfg: ChatGLMConfig,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        std: float = 0.02,
    ) -> ChatGLMForCausalLM:
        """Random weights of any config, created directly on `device` (no file, no CPU copy)."""
        dtype = parse_dtype(dtype or cfg.torch_dtype)
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=device)
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=gen)
            rot = model.transformer.rotary_pos_emb
            rot.inv_freq.copy_(rot._inv_freq(rot.inv_freq.device))
        return model.to(dtype).eval()
