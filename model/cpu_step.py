"""A CPU decode step through every layer in one call, where the model's linears allow it.

On a CPU the layer-by-layer forward of model/chatglm.py costs ~30 small ops and module calls
per layer (norms, rotary, cache writes, SwiGLU, residuals): about a fifth of a batch-1 step of
the medium model, and about half of an int4 one. For decode-only steps whose linears are our
CPU decode ones (fp32 `PanelLinear`, or on AVX-512 `SmallBatchLinear` up to 16 rows; bf16
`Bf16Linear`; `QuantLinear` on the CPU kernel under fp32 or bf16 activations), decode_stack.cpp
runs the same arithmetic in one C++ call, on AVX-512, AVX2 or baseline code as the CPU allows;
anything else returns None and the caller runs the layers itself.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from chatglm_serve.kernels import cpu_decode
from chatglm_serve.model.attention import AttentionMetadata
from chatglm_serve.model.changes import change_count
from chatglm_serve.model.cpu_linear import Bf16Linear, PackedLinear, PanelLinear, SmallBatchLinear
from chatglm_serve.model.quantize import QuantLinear

if TYPE_CHECKING:
    from chatglm_serve.model.chatglm import ChatGLMForCausalLM


@dataclass
class _StepPlan:
    """What the C++ step needs of the model's weights, gathered once: walking 16 layers' modules
    from Python every step cost ~0.6 ms, about a sixth of an int4 batch-1 step."""

    key: list  # the objects the plan was made from (see _state_key), compared by identity
    caches: list[weakref.ref]  # the KV caches it was checked against (weak: a closed engine's
    # caches are freed with it, not kept alive by the model)
    weights: list[Tensor] | None  # None: the step does not apply to these modules
    max_rows: int  # plain fp32 linears (SmallBatchLinear) take at most 16 rows
    checked_at: int = -1  # model/changes.py's count when the key was last found the same


def cpu_decode_step(
    model: ChatGLMForCausalLM,
    input_ids: Tensor,
    positions: Tensor,
    kv_caches: list[Tensor],
    meta: AttentionMetadata,
) -> Tensor | None:
    """Final hidden states [T, hidden] of a decode-only step (T sequences, one token each), or
    None where this path does not apply."""
    t = model.transformer
    plan = _plan(model, kv_caches)
    if plan.weights is None or input_ids.shape[0] > plan.max_rows:
        return None
    attn = t.encoder.layers[0].self_attention
    # [T, rot/2, 2] (cos, sin) fp32
    rotation = torch.view_as_real(t.rotary_pos_emb.rotation(positions).squeeze(1))
    with torch.no_grad():
        return cpu_decode.decode_stack(
            t.embedding(input_ids),
            plan.weights,
            kv_caches,
            t.encoder.final_layernorm.weight,
            rotation.contiguous(),
            meta.slot_mapping,
            meta.block_tables,
            meta.decode_lens(),
            (attn.num_heads, attn.num_kv_heads, attn.head_dim),
            t.encoder.final_layernorm.eps,
            attn.scale,
        )


def _plan(model: ChatGLMForCausalLM, kv_caches: list[Tensor]) -> _StepPlan:
    """The model's step plan, made again whenever a module, parameter, packed weight, kernel
    path or cache it depends on is no longer the same object (kernel warm-up, a test pinning an
    ISA, a state-dict load into packed linears). The modules are compared only when
    model/changes.py's count moved since the last comparison: walking them every step cost
    ~0.18 ms of an int4 batch-1 step on cold caches."""
    plan = model.__dict__.get("_cpu_step_plan")
    count = change_count()
    same_caches = (
        plan is not None
        and len(plan.caches) == len(kv_caches)
        and all(r() is c for r, c in zip(plan.caches, kv_caches, strict=True))
    )
    if same_caches and plan.checked_at == count:  # nothing was assigned anywhere since
        return plan
    key = _state_key(model)
    if (
        not same_caches
        or len(plan.key) != len(key)
        or any(a is not b for a, b in zip(plan.key, key, strict=True))
    ):
        plan = _make_plan(model, kv_caches, key)
        model.__dict__["_cpu_step_plan"] = plan
    plan.checked_at = count
    return plan


def _layer_modules(layer: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """(input norm, qkv, dense, post-attention norm, h_to_4h, 4h_to_h), read from the module
    dicts directly: nn.Module.__getattr__ is the slow part of walking a model per step."""
    m = layer._modules
    attn, mlp = m["self_attention"]._modules, m["mlp"]._modules
    return (
        m["input_layernorm"],
        attn["query_key_value"],
        attn["dense"],
        m["post_attention_layernorm"],
        mlp["dense_h_to_4h"],
        mlp["dense_4h_to_h"],
    )


def _state_key(model: ChatGLMForCausalLM) -> list:
    t = model.transformer._modules
    key: list = [t["embedding"]._modules["word_embeddings"]._parameters["weight"]]
    for layer in t["encoder"]._modules["layers"]:
        for mod in _layer_modules(layer):
            d = mod.__dict__
            key += [mod, *d["_parameters"].values(), *d["_buffers"].values()]
            key += [d.get("packed"), d.get("path"), d.get("cpu_impl")]
    return key


def _make_plan(model: ChatGLMForCausalLM, kv_caches: list[Tensor], key: list) -> _StepPlan:
    t = model.transformer
    caches = [weakref.ref(c) for c in kv_caches]
    emb = t.embedding.word_embeddings.weight
    if emb.device.type != "cpu" or emb.dtype not in (torch.float32, torch.bfloat16):
        return _StepPlan(key, caches, None, 0)
    # the linears the C++ step can call: packed ones (any rows), plain fp32 ones (up to 16 rows),
    # int4/int8 ones on the CPU kernel with its automatic ISA choice (fp32 or bf16 activations)
    packed_cls = PanelLinear if emb.dtype == torch.float32 else Bf16Linear
    plain_ok = emb.dtype == torch.float32 and cpu_decode.has_avx512()  # small_gemm.cpp's ISA
    quant = isinstance(t.encoder.layers[0].self_attention.query_key_value, QuantLinear)
    max_rows = sys.maxsize
    weights: list[Tensor] = []
    for layer, cache in zip(t.encoder.layers, kv_caches, strict=True):
        norm1, *linears = _layer_modules(layer)
        norm2 = linears.pop(2)
        if (
            any(
                not _quant_ok(lin)
                if quant
                else type(lin) is not packed_cls
                and not (plain_ok and type(lin) is SmallBatchLinear)
                for lin in linears
            )
            or any(lin.bias is not None for lin in linears[1:])
            or norm1.weight.dtype != emb.dtype
            or norm2.weight.dtype != emb.dtype
            or cache.dtype != emb.dtype
            or cache.device.type != "cpu"
            or not cache.is_contiguous()
        ):
            return _StepPlan(key, caches, None, 0)
        if any(type(lin) is SmallBatchLinear for lin in linears):
            max_rows = cpu_decode.SMALL_LINEAR_MAX_ROWS
        qkv_w, dense_w, up_w, down_w = (
            lin.packed if isinstance(lin, PackedLinear) else lin.weight for lin in linears
        )
        qkv_b = linears[0].bias
        weights += [
            norm1.weight,
            qkv_w,
            qkv_b if qkv_b is not None else emb.new_empty(0),
            dense_w,
            norm2.weight,
            up_w,
            down_w,
        ]
        if quant:
            weights += [lin.weight_scale for lin in linears]
            weights.append(_quant_formats(linears))
    return _StepPlan(key, caches, weights, max_rows)


def _quant_ok(lin: object) -> bool:
    """A QuantLinear the C++ step can call: on the CPU kernel, its ISA left to the kernel."""
    return type(lin) is QuantLinear and lin.path == "cpu_kernel" and lin.cpu_impl == "auto"


def _quant_formats(linears: list[QuantLinear]) -> Tensor:
    """int64 [4, 4]: (bits, group, activation block, out_features) of a layer's four linears."""
    return torch.tensor(
        [[lin.bits, lin.group_size, lin._act_block, lin.out_features] for lin in linears],
        dtype=torch.int64,
    )
