"""Load a Hugging Face `chatglm2-6b` (or `chatglm2-6b-int4`) directory into our model.

Shards are read one at a time (`.bin` memory-mapped with `weights_only=True`, safetensors lazily)
and each tensor goes straight to its device and dtype, so peak host memory stays near one shard
plus the model. Every tensor is accounted for: a missing, unexpected or wrongly shaped tensor, a
missing shard or a corrupt file is an error naming it, never a silently half-random model.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from chatglm_serve.kernels import cpu_decode
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.config import ChatGLMConfig, parse_dtype

log = logging.getLogger(__name__)

# Present in the seed's files but recomputed by us (fp32 is more exact than the stored copy).
_IGNORED_KEYS = {"transformer.rotary_pos_emb.inv_freq", "model.rotary_emb.inv_freq"}
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")

DeviceFor = Callable[[str], torch.device]


class CheckpointError(RuntimeError):
    """The checkpoint on disk does not match what the config promises."""


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in shard order; missing shards are an error."""
    for index_name in _INDEXES:
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid weight index ({e})") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise CheckpointError(f"missing shard file(s) listed in {index.name}: {missing}")
            return [path / f for f in files]
    for single in _SINGLES:
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(f"no weights in {path}: expected {' or '.join(_INDEXES + _SINGLES)}")


def _read_shard(file: Path) -> Iterator[tuple[str, Tensor]]:
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    yield key, f.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict):
                raise CheckpointError(f"{file.name}: expected a state dict, found {type(state)}")
            yield from state.items()
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or garbled shard: name the file
        raise CheckpointError(f"cannot read weight file {file.name}: {e}") from e


_HEAD_SCALE_KEY = "transformer.output_layer.weight_scale"


def _default_group(cfg: ChatGLMConfig, bits: int, group_size: int | None) -> int | None:
    """On-the-fly int4 uses groups of 128 input channels where the shapes allow.

    Measured on the medium shape: layer output error 10.3% vs 14.6% for the seed's one scale per
    row, at the same kernel speed. int8 keeps one scale per row (0.8% error already).
    """
    if group_size is not None or bits != 4:
        return group_size
    if cfg.hidden_size % 128 == 0 and cfg.ffn_hidden_size % 128 == 0:
        return 128
    return None


def _has_key(path: Path, files: list[Path], key: str) -> bool:
    """Whether the checkpoint holds `key`, read from its index (or the single file's header)."""
    for index_name in _INDEXES:
        if (path / index_name).is_file():
            return key in json.loads((path / index_name).read_text())["weight_map"]
    return any(k == key for k, _ in _read_shard(files[0]))


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, attr = key.rpartition(".")
    return model.get_submodule(prefix), attr


def _progress(files: list[Path]) -> Iterator[Path]:
    if len(files) > 1 and sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(files, desc="Loading checkpoint shards", unit="shard")
    else:
        yield from files


def _shards(files: list[Path], cfg: ChatGLMConfig) -> Iterator[tuple[Path, Iterator]]:
    """(file, its (our key, tensor) pairs) per shard; a `-hf` layout is renamed on the way
    (its q/k/v are fused once all three have been read, whichever shards hold them)."""
    if cfg.checkpoint_layout != "hf":
        for file in _progress(files):
            yield file, _read_shard(file)
        return
    from chatglm_serve.model.hf_layout import from_hf_keys, missing_parts

    pending: dict = {}
    for file in _progress(files):
        yield file, from_hf_keys(_read_shard(file), pending)
    if pending:
        raise CheckpointError(
            f"checkpoint is missing tensor(s): {', '.join(missing_parts(pending))}"
        )


def serving_dtype(config_dtype: torch.dtype, device: torch.device | None) -> torch.dtype:
    """The dtype `--dtype auto` serves a checkpoint in: the config's, except fp16 on a CPU.

    Real ChatGLM checkpoints are fp16. A CPU without AVX-512 FP16 has no fast fp16 matmul: our
    CPU kernels, the one-call decode step and paged attention take fp32 and bf16 only, and fp16
    went to oneDNN layer by layer. bf16 keeps fp16's memory and streams at the read bandwidth
    (kernels/csrc/cpu/half_linear.cpp), at 8 mantissa bits instead of 11; `--dtype float16`
    keeps fp16 and `--dtype float32` the exact weights. device None: a layer split (as is).
    Decided by the CPU's features, not by whether the kernels are built: on a first start they
    build in the background, and the dtype must not depend on the kernel cache.
    """
    if (
        config_dtype == torch.float16
        and device is not None
        and device.type == "cpu"
        and cpu_decode.cpu_has_avx2()
    ):
        log.info(
            "fp16 checkpoint on a CPU: serving it in bfloat16, which our CPU kernels run "
            "(--dtype float16 keeps fp16 on the slower oneDNN path, --dtype float32 is exact)"
        )
        return torch.bfloat16
    return config_dtype


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    quantize: int | None = None,
    group_size: int | None = None,
    device_for: DeviceFor | None = None,
    tensor_parallel=None,
) -> ChatGLMForCausalLM:
    """Build the model from a checkpoint directory.

    dtype: None = the config's torch_dtype; "auto" = the dtype it is served in on `device`
    (`serving_dtype`: the config's, but fp16 runs as bf16 on a CPU). quantize: 4 or 8 quantizes the transformer
    linears on the fly as they stream in (a `quantization_bit` checkpoint loads as is).
    device_for(key) -> device places each tensor for a layer-split model; default: `device`.
    tensor_parallel: a `model.tensor_parallel.TensorParallel`; this process keeps its shard only.
    """
    path = Path(path)
    cfg = ChatGLMConfig.from_json(path)
    default_device = torch.device(device)
    whole_on = None if device_for else default_device  # the one device, unless a layer split
    if dtype == "auto":
        dtype = serving_dtype(parse_dtype(cfg.torch_dtype), whole_on)
    elif dtype is None:
        dtype = cfg.torch_dtype
    dtype = parse_dtype(dtype)
    place: DeviceFor = device_for or (lambda key: default_device)
    files = weight_files(path)

    with torch.device("meta"):
        model = ChatGLMForCausalLM(cfg)
    if cfg.quantization_bit or quantize:
        from chatglm_serve.model.quantize import QuantSpec, replace_linears

        bits = cfg.quantization_bit or quantize
        if cfg.quantization_bit and quantize and quantize != cfg.quantization_bit:
            raise CheckpointError(
                f"checkpoint is already int{cfg.quantization_bit}; cannot serve it as int{quantize}"
            )
        if cfg.quantization_bit:  # the file decides: group size is read from weight_scale
            spec = QuantSpec(
                bits=bits, quantize_output_layer=_has_key(path, files, _HEAD_SCALE_KEY)
            )
        else:
            # on a CPU the head is quantized too, to int8: in bf16 / fp32 it was 16% / 27% of an
            # int4 6B decode step's bytes (65024 x 4096); int8 rows keep the logits close
            on_cpu = whole_on is not None and whole_on.type == "cpu"
            spec = QuantSpec(
                bits=bits,
                group_size=_default_group(cfg, bits, group_size),
                quantize_output_layer=on_cpu,
                head_bits=8 if on_cpu else None,
            )
        replace_linears(model, spec, from_checkpoint=bool(cfg.quantization_bit))
    if tensor_parallel is not None:
        tensor_parallel.prepare(model)

    expected = dict(model.state_dict(keep_vars=True))
    loaded: set[str] = set()
    for file, items in _shards(files, cfg):
        for key, tensor in items:
            if key in _IGNORED_KEYS:
                continue
            if key not in expected:
                raise CheckpointError(f"unexpected tensor {key!r} in {file.name}")
            if key in loaded:
                raise CheckpointError(f"tensor {key!r} appears twice (again in {file.name})")
            if tensor_parallel is not None:
                tensor = tensor_parallel.shard(key, tensor)
            module, attr = _owner(model, key)
            target = place(key)
            if hasattr(module, "load_weight"):  # quantized modules take (and check) their own
                module.load_weight(attr, tensor.to(target))
            else:
                want = expected[key]
                if tuple(tensor.shape) != tuple(want.shape):
                    raise CheckpointError(
                        f"tensor {key!r} in {file.name} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(want.shape)}"
                    )
                value = tensor.to(
                    device=target, dtype=dtype if tensor.is_floating_point() else None
                )
                if isinstance(want, nn.Parameter):
                    module._parameters[attr] = nn.Parameter(value, requires_grad=False)
                else:
                    module._buffers[attr] = value
            loaded.add(key)
        # one shard's mapping is dropped here before the next is opened
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise CheckpointError(f"checkpoint {path} is missing tensor(s): {shown}")

    for module in model.modules():
        if hasattr(module, "finalize"):
            module.finalize()
    rot = model.transformer.rotary_pos_emb
    rot_device = place("transformer.encoder.layers.0.input_layernorm.weight")
    rot._buffers["inv_freq"] = rot._inv_freq(rot_device)
    log.info(
        "loaded %s: %d layers, vocab %d, context %d, rope_ratio %g (%s keys)",
        path.name,
        cfg.num_layers,
        cfg.padded_vocab_size,
        cfg.seq_length,
        cfg.rope_ratio,
        cfg.checkpoint_layout,
    )
    return model.eval()


def load_model_and_tokenizer(
    path: str | Path | None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    quantize: int | None = None,
    group_size: int | None = None,
    device_for: DeviceFor | None = None,
    tensor_parallel=None,
    chat_template: str | None = None,
):
    """(model, tokenizer) from a checkpoint dir; path None = the embedded demo model.

    The family member (ChatGLM2 / ChatGLM3 / GLM-4) is detected from the files (model/family.py)
    and logged; the tokenizer carries its chat format, `chat_template` overriding it."""
    from chatglm_serve.model.family import detect_family, load_tokenizer

    if path is None:
        from chatglm_serve.model.demo import demo_checkpoint_dir

        path = demo_checkpoint_dir()
        log.warning(
            "No model given: serving the embedded DEMO model (tiny ChatGLM2, random weights, "
            "fixed seed) from %s. Its replies are gibberish; pass --model DIR for a real one.",
            path,
        )
    path = Path(path)
    try:
        family = detect_family(path)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    log.info("model family: %s", family.describe())
    tokenizer = load_tokenizer(family, chat_template)
    if chat_template and chat_template != family.family:
        log.warning("chat template %r overrides the detected %r", chat_template, family.family)
    model = load_checkpoint(
        path,
        dtype=dtype,
        device=device,
        quantize=quantize,
        group_size=group_size,
        device_for=device_for,
        tensor_parallel=tensor_parallel,
    )
    return model, tokenizer
