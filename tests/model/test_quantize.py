"""Weight-only quantization: the seed's formats, the module swap, every compute path, loading."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from chatglm_serve.kernels.ops import activation_block, cpu_impls, quantize_activations_reference
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.checkpoint import save_checkpoint
from chatglm_serve.model.loader import load_checkpoint
from chatglm_serve.model.quantize import (
    OUTPUT_LAYER,
    QuantFormatError,
    QuantLinear,
    QuantSpec,
    dequantize,
    pack_int4,
    quantize_model,
    quantize_weight,
    quantized_modules,
    replace_linears,
    unpack_int4,
)
from tests.conftest import tiny_config
from tests.paged import PagedRunner


def _hand_pack_int4(rows: list[list[int]]) -> torch.Tensor:
    """The seed's byte layout written out by hand: even k -> high nibble, odd k -> low nibble."""
    out = []
    for row in rows:
        packed = []
        for even, odd in zip(row[0::2], row[1::2], strict=True):
            byte = ((even & 0xF) << 4) | (odd & 0xF)
            packed.append(byte - 256 if byte > 127 else byte)  # as a signed int8
        out.append(packed)
    return torch.tensor(out, dtype=torch.int8)


def _module(n: int, k: int, spec: QuantSpec, bias: bool = False) -> QuantLinear:
    return QuantLinear(k, n, bias, spec, from_checkpoint=True, name="test.lin")


# ---------------------------------------------------------------- the seed's format
def test_pack_int4_bytes_match_the_seed_layout():
    q = torch.tensor([[1, -2, 7, -8], [0, 5, -1, 3]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (2, 2)
    # 1,-2 -> 0x1E; 7,-8 -> 0x78; 0,5 -> 0x05; -1,3 -> 0xF3 (= -13 as int8)
    assert packed.tolist() == [[0x1E, 0x78], [0x05, 0xF3 - 256]]
    assert torch.equal(packed, _hand_pack_int4(q.tolist()))


def test_pack_unpack_round_trip_all_values():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (37, 130), generator=g, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    every = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(every, every).reshape(1, -1)  # all 256 byte values
    assert torch.equal(unpack_int4(pack_int4(pairs)), pairs)
    assert sorted(set(pack_int4(pairs).view(torch.uint8).flatten().tolist())) == list(range(256))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_weight_is_the_seeds_symmetric_scheme(bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 64, generator=g)
    q, scale = quantize_weight(w, bits)
    qmax = 7 if bits == 4 else 127
    assert scale.dtype == torch.float16 and scale.shape == (20, 1)
    torch.testing.assert_close(scale.float()[:, 0], (w.abs().amax(1) / qmax).half().float())
    assert q.abs().max().item() == qmax
    torch.testing.assert_close(q.float(), torch.round(w / scale.float()).clamp(-qmax, qmax))
    err = (dequantize(q, scale) - w).abs()
    assert (err <= scale.float() / 2 + 1e-6).all()  # rounding error at most half a step


def test_per_row_module_quantizes_exactly_as_the_seed():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(9))
    lin = QuantLinear(64, 48, False, QuantSpec(4), from_checkpoint=False, name="t")
    lin.load_weight("weight", w)
    seed_scale = (w.abs().amax(1) / 7).half()
    seed_q = torch.round(w / seed_scale.float()[:, None]).to(torch.int8)
    assert torch.equal(lin.weight, pack_int4(seed_q)) and torch.equal(
        lin.weight_scale[:, 0], seed_scale
    )


def test_int4_groups_use_all_sixteen_levels():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.25] * 8 + [-0.1, 0.3, 0.2, -0.4] * 8])
    q, s = quantize_weight(w, 4, 32)
    assert q[0, :32].min().item() == -8 and torch.equal(
        q[0, 1:32:4], torch.full((8,), -8, dtype=torch.int8)
    )
    assert s.float()[0, 0].item() == 0.25 and s.float()[0, 1].item() == pytest.approx(
        0.05, rel=1e-3
    )
    assert (
        (dequantize(q, s) - w).abs() <= s.float().abs().repeat_interleave(32, 1) / 2 + 1e-6
    ).all()


def test_group_scales_lose_less_than_per_row():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g) * torch.rand(1, 256, generator=g) * 3  # uneven columns
    errs = {}
    for group in (None, 128, 32):
        q, s = quantize_weight(w, 4, group)
        errs[group] = ((dequantize(q, s) - w).norm() / w.norm()).item()
    assert errs[32] < errs[128] < errs[None]


def test_hand_built_int4_checkpoint_tensors_decode():
    rows = [[1, -2, 3, -4, 0, 7, -8, 2], [7, -8, 0, 5, -1, -1, 6, -3]]
    scale = torch.tensor([0.5, 0.25], dtype=torch.float16)
    lin = _module(2, 8, QuantSpec(bits=4), bias=True)
    lin.load_weight("weight", _hand_pack_int4(rows))
    lin.load_weight("weight_scale", scale)
    lin.load_weight("bias", torch.tensor([1.0, -1.0], dtype=torch.float16))
    lin.finalize()
    want = torch.tensor(rows, dtype=torch.float32) * scale.float()[:, None]
    torch.testing.assert_close(lin.dequantized_weight(), want, rtol=0, atol=0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(lin(x), x @ want.t() + torch.tensor([1.0, -1.0]))


def test_hand_built_int8_checkpoint_tensors_decode():
    q = torch.tensor([[127, -127, 0, 5], [-3, 2, 100, -100]], dtype=torch.int8)
    scale = torch.tensor([0.01, 0.5], dtype=torch.float16)
    lin = _module(2, 4, QuantSpec(bits=8))
    lin.load_weight("weight", q)
    lin.load_weight("weight_scale", scale)
    lin.finalize()
    want = q.float() * scale.float()[:, None]
    torch.testing.assert_close(lin.dequantized_weight(), want, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_hand_built_checkpoint_through_the_kernel_path(bits):
    """K = 64 takes the CPU kernel (when it builds): the decoded result must still be exact."""
    g = torch.Generator().manual_seed(3)
    lo, hi = (-8, 8) if bits == 4 else (-127, 128)
    q = torch.randint(lo, hi, (24, 64), generator=g, dtype=torch.int8)
    scale = (torch.rand(24, generator=g) * 0.1 + 0.01).half()
    lin = _module(24, 64, QuantSpec(bits=bits))
    lin.load_weight("weight", _hand_pack_int4(q.tolist()) if bits == 4 else q)
    lin.load_weight("weight_scale", scale)
    lin.finalize()
    want = q.float() * scale.float()[:, None]
    torch.testing.assert_close(lin.dequantized_weight(), want, rtol=0, atol=0)
    w, s = lin.seed_tensors()  # what state_dict() writes back
    assert torch.equal(w, _hand_pack_int4(q.tolist()) if bits == 4 else q)
    assert torch.equal(s, scale)


# ---------------------------------------------------------------- every path, every batch size
def _paths() -> list[str]:
    return ["torch"] + [f"cpu_kernel:{impl}" for impl in cpu_impls()]


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize(
    "bits,group", [(4, None), (4, 32), (4, 128), (8, None), (8, 64)], ids=lambda v: str(v)
)
def test_quantized_linear_matches_dequantized_reference(path, bits, group):
    n, k = 72, 256  # 72 rows: not a multiple of the kernel's 16-row tile
    g = torch.Generator().manual_seed(bits * 1000 + (group or 0))
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g)
    lin = QuantLinear(k, n, True, QuantSpec(bits, group), from_checkpoint=False, name="t")
    lin.load_weight("weight", w)
    lin.load_weight("bias", bias)
    lin.finalize()
    if path == "torch":
        lin.use_torch_fallback()
    else:
        assert lin.path == "cpu_kernel"
        lin.cpu_impl = path.split(":")[1]
    wd = lin.dequantized_weight().double()
    assert (wd - w.double()).norm() / w.double().norm() < (0.15 if bits == 4 else 0.01)
    x = torch.randn(64, k, generator=g)
    ref = x.double() @ wd.t() + bias.double()
    # The kernel quantizes activations to int8 per block of channels: exact up to fp32 rounding
    # against that, and within the int8 activation error of the weight-only reference.
    blk = activation_block(bits, lin.group_size)
    xq, xs = quantize_activations_reference(x, blk)
    xd = (xq.double().view(64, -1, blk) * xs.double()[..., None]).view(64, k)
    exact = xd @ wd.t() + bias.double()
    for batch in range(1, 65):
        y = lin(x[:batch])
        assert y.shape == (batch, n) and y.dtype == torch.float32
        if path == "torch":
            torch.testing.assert_close(y.double(), ref[:batch], rtol=1e-5, atol=1e-5)
            continue
        torch.testing.assert_close(y.double(), exact[:batch], rtol=1e-5, atol=1e-5)
        rel = (y.double() - ref[:batch]).norm() / (ref[:batch] - bias.double()).norm()
        assert rel.item() < 0.02, (batch, rel.item())


def test_quantized_linear_keeps_input_dtype_and_leading_dims():
    lin = QuantLinear(64, 48, False, QuantSpec(4, 32), from_checkpoint=False, name="t")
    lin.load_weight("weight", torch.randn(48, 64))
    lin.finalize()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 3, 64).to(dtype)
        y = lin(x)
        assert y.shape == (2, 3, 48) and y.dtype == dtype
        ref = F.linear(x.float(), lin.dequantized_weight())
        assert ((y.float() - ref).norm() / ref.norm()).item() < 0.03


# ---------------------------------------------------------------- module swap and the model
def _model(seed: int = 0, **overrides) -> ChatGLMForCausalLM:
    return ChatGLMForCausalLM.random(tiny_config(**overrides), seed=seed, std=0.05)


def test_replace_linears_allocates_nothing_full_precision():
    cfg = tiny_config()
    with torch.device("meta"):
        model = ChatGLMForCausalLM(cfg)
    names = replace_linears(model, QuantSpec(4), from_checkpoint=True)
    assert len(names) == 4 * cfg.num_layers
    mods = quantized_modules(model)
    assert len(mods) == len(names) and all(m.weight.is_meta for m in mods)
    qkv = model.transformer.encoder.layers[0].self_attention.query_key_value
    keys = {k: (v.dtype, tuple(v.shape)) for k, v in qkv.state_dict(keep_vars=True).items()}
    assert keys == {
        "weight": (torch.int8, (cfg.qkv_out_features, cfg.hidden_size // 2)),
        "weight_scale": (torch.float16, (cfg.qkv_out_features,)),
        "bias": (torch.float32, (cfg.qkv_out_features,)),
    }
    assert isinstance(model.transformer.output_layer, torch.nn.Linear)  # not asked for
    # on-the-fly: the loader hands the full-precision weight, so only weight (+ bias) is expected
    with torch.device("meta"):
        model = ChatGLMForCausalLM(cfg)
    replace_linears(model, QuantSpec(8, quantize_output_layer=True), from_checkpoint=False)
    dense = model.transformer.encoder.layers[1].self_attention.dense
    assert set(dense.state_dict(keep_vars=True)) == {"weight"}
    assert isinstance(model.transformer.output_layer, QuantLinear)


def test_quantized_module_memory_is_the_packed_size():
    model = quantize_model(_model(), QuantSpec(4))
    for m in quantized_modules(model):
        assert m.weight.numel() * m.weight.element_size() == m.out_features * m.in_features // 2
        assert not any(
            t.dtype.is_floating_point and t.numel() >= m.weight.numel() for t in m.buffers()
        )


@pytest.mark.parametrize(
    "spec,min_cos", [(QuantSpec(8), 0.999), (QuantSpec(4, 32), 0.95), (QuantSpec(4), 0.95)]
)
def test_quantized_model_logits_close_to_fp32(spec, min_cos):
    ids = list(range(3, 40))
    ref = PagedRunner(_model()).step([(0, ids)])
    qmodel = quantize_model(_model(), spec)
    assert all(m.path != "unfinalized" for m in quantized_modules(qmodel))
    got = PagedRunner(qmodel).step([(0, ids)])
    cos = F.cosine_similarity(got.double(), ref.double(), dim=-1)
    assert cos.min().item() > min_cos, cos.min().item()


def test_state_dict_is_the_seed_format_and_reloads():
    spec = QuantSpec(4)
    qmodel = quantize_model(_model(), spec)
    state = qmodel.state_dict()
    key = "transformer.encoder.layers.1.mlp.dense_h_to_4h"
    assert state[key + ".weight"].dtype == torch.int8
    assert state[key + ".weight"].shape == (2 * 96, 32)
    assert state[key + ".weight_scale"].dtype == torch.float16
    with torch.device("meta"):
        fresh = ChatGLMForCausalLM(qmodel.config)
    fresh = fresh.to_empty(device="cpu")
    replace_linears(fresh, spec, from_checkpoint=True)
    fresh.load_state_dict(state)
    ids = list(range(3, 30))
    torch.testing.assert_close(
        PagedRunner(fresh).step([(0, ids)]), PagedRunner(qmodel).step([(0, ids)])
    )


# ---------------------------------------------------------------- checkpoints through the loader
@pytest.mark.parametrize("bits,fmt", [(4, "bin"), (8, "safetensors")])
def test_loads_test_written_quantized_checkpoint(tmp_path, bits, fmt):
    """A chatglm2-6b-int4/int8 style directory (quantization_bit in config.json) loads as is."""
    qmodel = quantize_model(_model(seed=5), QuantSpec(bits))
    with torch.no_grad():  # what the fp16 file will hold, so the loaded model must match exactly
        for p in qmodel.parameters():
            p.copy_(p.half().float())
        for m in quantized_modules(qmodel):
            if m.bias is not None:
                m.bias = m.bias.half().float()
    cfg = dataclasses.replace(qmodel.config, quantization_bit=bits, torch_dtype="float16")
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in qmodel.state_dict().items()}
    save_checkpoint(state, cfg, tmp_path / "ckpt", fmt=fmt, shards=2)
    loaded = load_checkpoint(tmp_path / "ckpt", dtype="float32")
    mods = quantized_modules(loaded)
    assert len(mods) == 4 * cfg.num_layers and all(m.path != "unfinalized" for m in mods)
    for name, m in loaded.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.seed_tensors()[0], state[name + ".weight"])
    ids = list(range(3, 30))
    want = PagedRunner(qmodel).step([(0, ids)])
    torch.testing.assert_close(PagedRunner(loaded).step([(0, ids)]), want, rtol=1e-5, atol=1e-5)


def test_on_the_fly_quantization_while_loading(tmp_path):
    src = _model(seed=6)
    save_checkpoint(src, src.config, tmp_path / "fp", shards=3)
    loaded = load_checkpoint(tmp_path / "fp", quantize=4)
    # on a CPU the head comes out int8 (one scale per row) under an int4 body
    in_memory = quantize_model(
        _model(seed=6), QuantSpec(4, quantize_output_layer=True, head_bits=8)
    )
    head = loaded.get_submodule(OUTPUT_LAYER)
    assert (head.bits, head.group_size) == (8, head.in_features)
    for (name, a), b in zip(
        [(n, m) for n, m in loaded.named_modules() if isinstance(m, QuantLinear)],
        quantized_modules(in_memory),
        strict=True,
    ):
        assert torch.equal(a.seed_tensors()[0], b.seed_tensors()[0]), name
        assert torch.equal(a.seed_tensors()[1], b.seed_tensors()[1]), name


def test_int8_head_keeps_the_logits_close(tmp_path):
    src = _model(seed=8)
    save_checkpoint(src, src.config, tmp_path / "fp")
    ids = list(range(3, 30))
    want = PagedRunner(_model(seed=8)).step([(0, ids)])
    loaded = load_checkpoint(tmp_path / "fp", quantize=8)
    assert isinstance(loaded.get_submodule(OUTPUT_LAYER), QuantLinear)
    body_only = quantize_model(_model(seed=8), QuantSpec(8))  # the same body, full head
    got, ref = PagedRunner(loaded).step([(0, ids)]), PagedRunner(body_only).step([(0, ids)])
    # the head's own error, over what the body's quantization already moved
    head_err = (got - ref).norm() / ref.norm()
    assert 0 < head_err < 0.01, head_err
    assert (got - want).norm() / want.norm() < 0.02
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # elsewhere than a CPU the head stays as it was: asked for by the layer-split placement
    split = load_checkpoint(tmp_path / "fp", quantize=8, device_for=lambda key: "cpu")
    assert not isinstance(split.get_submodule(OUTPUT_LAYER), QuantLinear)


def test_checkpoint_mismatch_names_the_tensor():
    lin = QuantLinear(64, 32, False, QuantSpec(4), from_checkpoint=True, name="layers.0.mlp.x")
    with pytest.raises(QuantFormatError, match=r"layers\.0\.mlp\.x.*int8 \[32, 32\]"):
        lin.load_weight("weight", torch.zeros(32, 64, dtype=torch.int8))  # an int8 layout
    with pytest.raises(QuantFormatError, match="quantization_bit"):
        lin.load_weight("weight", torch.zeros(32, 64))
    lin.load_weight("weight", torch.zeros(32, 32, dtype=torch.int8))
    with pytest.raises(QuantFormatError, match="weight_scale was never loaded"):
        lin.finalize()
    with pytest.raises(QuantFormatError, match="unexpected tensor 'bias'|has no bias"):
        lin.load_weight("bias", torch.zeros(32))
    fp = QuantLinear(64, 32, False, QuantSpec(8), from_checkpoint=False, name="n")
    with pytest.raises(QuantFormatError, match="unexpected weight_scale"):
        fp.load_weight("weight_scale", torch.ones(32))
    with pytest.raises(QuantFormatError, match="does not divide"):
        QuantLinear(96, 32, False, QuantSpec(4, 64), from_checkpoint=False, name="g")


def test_spec_validation():
    with pytest.raises(ValueError):
        QuantSpec(bits=3)
    with pytest.raises(ValueError):
        QuantSpec(bits=4, group_size=0)
    assert QuantSpec(4, 32).name == "int4-g32" and QuantSpec(8).name == "int8-row"


def test_without_the_cpu_extension_falls_back_to_torch(monkeypatch):
    import chatglm_serve.model.quantize as quantize

    monkeypatch.setattr(quantize, "cpu_kernels_or_none", lambda: None)
    lin = QuantLinear(64, 32, False, QuantSpec(4), from_checkpoint=False, name="nokernel")
    w = torch.randn(32, 64)
    lin.load_weight("weight", w)
    lin.finalize()
    assert lin.path == "torch" and lin.layout == "seed"
    x = torch.randn(5, 64)
    torch.testing.assert_close(lin(x), x @ lin.dequantized_weight().t())
