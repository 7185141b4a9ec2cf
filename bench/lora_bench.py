"""Cost of serving LoRA adapters mixed into a batch: 16 decode streams of the base alone vs the
same 16 streams spread over 4 adapters (and 12 base + one stream per adapter); also the base
alone on the layer-by-layer path that steps with adapter rows take.

    PYTHONPATH=. python bench/lora_bench.py                       # medium shape, fp32, CPU
    PYTHONPATH=. python bench/lora_bench.py --rank 8 --dtype bfloat16

Random weights of the chosen shape, adapters in the PEFT format (rank --rank on all four target
linears) written to a temporary directory and loaded the way the server loads them. Every stream
decodes exactly --max-tokens tokens (ignore_eos), so each run does the same base work; the
figure is decode tokens/s over the steps where all 16 streams decode (prefill excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from make_checkpoint import MEDIUM  # bench/ is this script's sys.path[0]
from safetensors.torch import save_file

from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.engine.llm_engine import LLMEngine
from chatglm_serve.engine.types import SamplingParams
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.config import ChatGLMConfig
from chatglm_serve.model.demo_tokenizer import train_demo_tokenizer_bytes
from chatglm_serve.model.lora import LORA_TARGETS, target_shapes
from chatglm_serve.model.tokenizer import ChatGLMTokenizer


def write_lora(path: Path, cfg: ChatGLMConfig, rank: int, seed: int) -> str:
    path.mkdir(parents=True)
    conf = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(LORA_TARGETS),
    }
    (path / "adapter_config.json").write_text(json.dumps(conf))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(cfg.num_layers):
        for t, (fan_in, fan_out) in target_shapes(cfg).items():
            key = f"base_model.model.transformer.encoder.layers.{i}.{LORA_TARGETS[t]}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.01
            state[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
    save_file(state, str(path / "adapter_model.safetensors"))
    return str(path)


def decode_rate(
    engine: LLMEngine, prompt: list[int], names: list[str | None], tokens: int
) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for i, name in enumerate(names):
        engine.add_request(f"r{i}", prompt, params, adapter=name)
    while any(s.num_computed_tokens < s.prompt_len for s in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()  # prefills
    steps, t0 = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    dt = time.perf_counter() - t0
    return len(names) * steps / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = ChatGLMTokenizer.from_bytes(train_demo_tokenizer_bytes())
    cfg = ChatGLMConfig(
        **MEDIUM, padded_vocab_size=(tok.vocab_size + 63) // 64 * 64, torch_dtype=args.dtype
    )
    cfg = dataclasses.replace(cfg, seq_length=1024)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {f"a{k}": write_lora(Path(tmp) / f"a{k}", cfg, args.rank, k) for k in range(4)}
        model = ChatGLMForCausalLM.random(cfg, seed=0)
        engine = LLMEngine(
            model,
            tok,
            EngineConfig(
                max_num_seqs=16,
                num_blocks=16 * 8,
                max_lora_rank=args.rank,
                adapters=adapters,
                enable_prefix_caching=False,
            ),
        )
        prompt = tok.encode_chat("Tell me a long story about the sea and the ships.")
        runs = {
            "16 base streams": [None] * 16,
            "16 base, layer by layer": [None] * 16,
            "12 base + 4 adapters x 1": [None] * 12 + list(adapters),
            "4 adapters x 4 streams": [f"a{i % 4}" for i in range(16)],
        }
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for label, names in runs.items():
                # the path steps with adapter rows take (no one-call C++ decode step), for scale
                model.use_decode_stack = label != "16 base, layer by layer"
                rate = decode_rate(engine, prompt, names, args.max_tokens)
                best[label] = max(best.get(label, 0.0), rate)
    base = best["16 base streams"]
    print(f"medium shape, {args.dtype}, LoRA rank {args.rank} on all 4 targets, "
          f"{torch.get_num_threads()} threads; decode tokens/s (best of {args.repeats}):")  # fmt: skip
    for label, rate in best.items():
        print(f"  {label:28s} {rate:8.1f} tok/s  ({rate / base:.2f}x the base)")


if __name__ == "__main__":
    main()
