"""The CPU decode weights gathered into one huge-page buffer (model/huge_pages.py)."""

from __future__ import annotations

import pytest
import torch

from chatglm_serve.kernels import cpu_decode
from chatglm_serve.kernels.build import KernelUnavailable
from chatglm_serve.model import huge_pages
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.cpu_linear import optimize_linears
from chatglm_serve.model.quantize import QuantSpec, quantize_model
from tests.conftest import tiny_config
from tests.paged import PagedRunner

# ~11 MB of fp32 linears: above the 2 MiB below which gathering is not worth a huge page
WIDE = dict(hidden_size=512, ffn_hidden_size=1408, kv_channels=64, num_attention_heads=8)


def _decode(model: ChatGLMForCausalLM) -> list[torch.Tensor]:
    runner = PagedRunner(model)
    runner.step([(0, list(range(3, 30)))])
    return [runner.step([(0, [t])]) for t in (5, 6, 7)]


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int4", "int8"])
def test_gathered_weights_give_the_same_logits(kind):
    try:
        cpu_decode.load_decode_kernels()
    except KernelUnavailable as e:
        pytest.skip(f"CPU kernels cannot be built here: {e}")
    if huge_pages.huge_page_buffer(huge_pages.HUGE_PAGE) is None:
        pytest.skip("no transparent huge pages on this machine (THP off or not Linux)")
    dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
    model = ChatGLMForCausalLM.random(tiny_config(**WIDE), dtype=dtype, seed=3, std=0.05)
    if kind.startswith("int"):
        quantize_model(model, QuantSpec(bits=int(kind[3:]), group_size=128))
    optimize_linears(model)  # packed as optimize_for_cpu does, not yet gathered
    slots = huge_pages._slots(model)
    assert len(slots) >= 9  # 4 linears x 2 layers (+ scales) and the output layer
    want = _decode(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    moved = huge_pages.gather_decode_weights(model)
    tensors = [getattr(m, a) for m, a in huge_pages._slots(model)]
    assert moved >= sum(t.numel() * t.element_size() for t in tensors)
    assert all(getattr(t, "_huge_pages", False) for t in tensors)
    # one buffer, in the order a step reads the weights
    base = tensors[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in tensors)
    ptrs = [t.data_ptr() for t in tensors]
    assert ptrs == sorted(ptrs) and len(set(ptrs)) == len(ptrs)
    assert huge_pages.gather_decode_weights(model) == 0  # already there: nothing moves

    got = _decode(model)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[k], v), k


def test_optimize_for_cpu_gathers(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "chatglm_serve.model.chatglm.gather_decode_weights", lambda m: calls.append(m) or 0
    )
    model = ChatGLMForCausalLM.random(tiny_config(), seed=3)
    model.optimize_for_cpu()
    assert calls == [model]
