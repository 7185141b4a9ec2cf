"""The one load path: EngineArgs -> model (placed, quantized) + tokenizer -> a ready LLMEngine.

The daemon (server/app.py), the terminal chat, the Python API (`ChatGLM.load`) and the benchmarks
all come through here, so a setting such as a layer split or tensor parallel works the same in
each of them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from chatglm_serve.engine.config import EngineArgs
from chatglm_serve.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device) -> str | torch.device:
    """ "auto" = the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(args: EngineArgs) -> tuple[Any, Any]:
    """(model, tokenizer) as `args` places them: one device, a layer split over several, or
    tensor-parallel processes (the returned model then drives the workers)."""
    args.validate()
    dtype = None if args.dtype in (None, "auto") else args.dtype
    devices = list(args.devices or [])
    if args.tensor_parallel_size > 1:
        from chatglm_serve.engine.tp_worker import TPLoadSpec, start_tensor_parallel

        started = start_tensor_parallel(
            TPLoadSpec(args.model, dtype),
            args.tensor_parallel_size,
            devices or None,
        )
        if started is None:  # a torchrun worker rank: it served rank 0 and is done
            raise RuntimeError("load_model called in a tensor-parallel worker rank")
        return started
    if len(devices) > 1 or args.device_map:
        from chatglm_serve.model.placement import load_placed

        model, tokenizer, _plan = load_placed(
            args.model, devices, dtype=dtype, quantize=args.quantize, device_map=args.device_map
        )
        return model, tokenizer
    from chatglm_serve.model.loader import load_model_and_tokenizer

    device = devices[0] if devices else resolve_device(args.device)
    # "auto": the checkpoint's dtype, or bf16 for an fp16 one on a CPU (loader.serving_dtype)
    return load_model_and_tokenizer(
        args.model, dtype=dtype or "auto", device=device, quantize=args.quantize
    )


def build_engine(args: EngineArgs) -> LLMEngine:
    """A ready engine for `args` (blocking: minutes for a real checkpoint)."""
    kernel_build = None
    if args.kernel_build == "background":
        from chatglm_serve.engine.kernel_warmup import start_if_needed

        on_cpu = (
            args.tensor_parallel_size == 1
            and not args.device_map
            and all(str(resolve_device(d)) == "cpu" for d in (args.devices or [args.device]))
        )
        kernel_build = start_if_needed(on_cpu)
    model, tokenizer = load_model(args)
    if args.chat_template:
        from chatglm_serve.model.chat_format import make_chat_format

        tokenizer.chat_format = make_chat_format(args.chat_template, tokenizer)
        log.info("chat template: %s (set by --chat-template)", args.chat_template)
    return LLMEngine(model, tokenizer, args.engine, kernel_build=kernel_build)
