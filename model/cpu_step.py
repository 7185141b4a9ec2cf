"""A CPU decode step through every layer in one call, where the model's linears allow it.

On a CPU the layer-by-layer forward of model/chatglm.py costs ~30 small ops and module calls
per layer (norms, rotary, cache writes, SwiGLU, residuals): about a fifth of a batch-1 step of
the medium model, and about half of an int4 one. For decode-only steps whose linears are our
CPU decode ones (fp32 `PanelLinear`, or `SmallBatchLinear` up to 16 rows; bf16 `Bf16Linear`;
`QuantLinear` on the CPU kernel in an fp32 model), decode_stack.cpp runs the same arithmetic in
one C++ call; anything else returns None and the caller runs the layers itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from chatglm_serve.kernels import cpu_decode
from chatglm_serve.model.attention import AttentionMetadata
from chatglm_serve.model.cpu_linear import Bf16Linear, PackedLinear, PanelLinear, SmallBatchLinear
from chatglm_serve.model.quantize import QuantLinear

if TYPE_CHECKING:
    from chatglm_serve.model.chatglm import ChatGLMForCausalLM


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
    emb = t.embedding.word_embeddings.weight
    if (
        emb.device.type != "cpu"
        or emb.dtype not in (torch.float32, torch.bfloat16)
        or not cpu_decode.has_avx512()  # the step's own loops are AVX-512
    ):
        return None
    # the linears the C++ step can call: packed ones (any rows), plain fp32 ones (up to 16 rows),
    # int4/int8 ones on the CPU kernel with its automatic ISA choice (fp32 models)
    packed_cls = PanelLinear if emb.dtype == torch.float32 else Bf16Linear
    plain_ok = emb.dtype == torch.float32 and input_ids.shape[0] <= cpu_decode.SMALL_LINEAR_MAX_ROWS
    quant = emb.dtype == torch.float32 and isinstance(
        t.encoder.layers[0].self_attention.query_key_value, QuantLinear
    )
    weights: list[Tensor] = []
    for layer, cache in zip(t.encoder.layers, kv_caches, strict=True):
        attn, mlp = layer.self_attention, layer.mlp
        linears = (attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
        if (
            any(
                not _quant_ok(lin)
                if quant
                else type(lin) is not packed_cls
                and not (plain_ok and type(lin) is SmallBatchLinear)
                for lin in linears
            )
            or any(lin.bias is not None for lin in linears[1:])
            or layer.input_layernorm.weight.dtype != emb.dtype
            or layer.post_attention_layernorm.weight.dtype != emb.dtype
            or cache.dtype != emb.dtype
            or cache.device.type != "cpu"
            or not cache.is_contiguous()
        ):
            return None
        qkv_w, dense_w, up_w, down_w = (
            lin.packed if isinstance(lin, PackedLinear) else lin.weight for lin in linears
        )
        qkv_b = attn.query_key_value.bias
        weights += [
            layer.input_layernorm.weight,
            qkv_w,
            qkv_b if qkv_b is not None else emb.new_empty(0),
            dense_w,
            layer.post_attention_layernorm.weight,
            up_w,
            down_w,
        ]
        if quant:
            weights += [lin.weight_scale for lin in linears]
            weights.append(_quant_formats(layer, linears))
    attn = t.encoder.layers[0].self_attention
    # [T, rot/2, 2] (cos, sin) fp32
    rotation = torch.view_as_real(t.rotary_pos_emb.rotation(positions).squeeze(1))
    with torch.no_grad():
        return cpu_decode.decode_stack(
            t.embedding(input_ids),
            weights,
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


def _quant_ok(lin: object) -> bool:
    """A QuantLinear the C++ step can call: on the CPU kernel, its ISA left to the kernel."""
    return type(lin) is QuantLinear and lin.path == "cpu_kernel" and lin.cpu_impl == "auto"


def _quant_formats(layer: torch.nn.Module, linears: tuple[QuantLinear, ...]) -> Tensor:
    """int64 [4, 4]: (bits, group, activation block, out_features) of the layer's four linears,
    made once per layer (the format does not change after loading)."""
    formats = getattr(layer, "_cpu_step_formats", None)
    if formats is None:
        formats = torch.tensor(
            [[lin.bits, lin.group_size, lin._act_block, lin.out_features] for lin in linears],
            dtype=torch.int64,
        )
        layer._cpu_step_formats = formats
    return formats
