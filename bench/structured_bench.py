"""Structured output's cost: output tokens/s of 64 concurrent streams, all free vs half of them
under a JSON schema (grammar-constrained decoding, engine/guided.py), in the same engine steps.

    PYTHONPATH=. flock -x /tmp/cpu.lock python bench/structured_bench.py              # tiny, CPU
    PYTHONPATH=. python bench/structured_bench.py --shape medium --steps 60
    PYTHONPATH=. python bench/structured_bench.py --shape 6b --device cuda --dtype float16

Closed loop: 64 sequences are kept in flight; a finished one is replaced at once by a new
request of the same kind, so every step decodes 64 rows. Free requests decode --max-tokens
tokens (ignore_eos); constrained ones follow a schema whose replies are long (an array of up to
40 short objects) and end when the JSON does. Random weights of the chosen shape, the demo
tokenizer (2053 tokens; bench/guided_libs.py measures the mask on a 65k vocabulary too).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from engine_bench import shape_config  # bench/ is this script's sys.path[0]

from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.engine.llm_engine import LLMEngine
from chatglm_serve.engine.types import GuidedSpec, SamplingParams
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.demo_tokenizer import train_demo_tokenizer_bytes
from chatglm_serve.model.tokenizer import ChatGLMTokenizer

SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "name": {"type": "string", "maxLength": 8},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "name", "ok"],
        "additionalProperties": False,
    },
    "maxItems": 40,
}


def run(engine: LLMEngine, streams: int, guided_share: float, steps: int, max_tokens: int):
    grammar = engine.compile_grammar(GuidedSpec("json", json.dumps(SCHEMA)))
    n_guided = int(streams * guided_share)
    prompt = engine.tokenizer.encode("Write the records as JSON:")
    counter = 0

    def submit(guided: bool) -> None:
        nonlocal counter
        params = SamplingParams(
            temperature=1.0,
            seed=counter,
            max_tokens=max_tokens,
            ignore_eos=not guided,
            guided=grammar if guided else None,
        )
        engine.add_request(f"{'g' if guided else 'f'}{counter}", prompt, params)
        counter += 1

    for i in range(streams):
        submit(i < n_guided)
    for _ in range(5):  # warm-up: prefill and first decode steps
        engine.step()
    tokens = {"g": 0, "f": 0}
    start = time.perf_counter()
    for _ in range(steps):
        for out in engine.step():
            tokens[out.request_id[0]] += len(out.token_ids)
            if out.finished:
                submit(out.request_id[0] == "g")
    wall = time.perf_counter() - start
    engine.abort_all()
    engine.step()
    total = tokens["g"] + tokens["f"]
    return total / wall, tokens, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=["tiny", "small", "medium", "6b"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = ChatGLMTokenizer.from_bytes(train_demo_tokenizer_bytes())
    cfg = shape_config(args.shape, tok.vocab_size)
    model = ChatGLMForCausalLM.random(cfg, dtype=args.dtype, device=args.device, std=0.5)
    engine = LLMEngine(
        model,
        tok,
        EngineConfig(
            max_num_seqs=args.streams,
            kv_cache_tokens=args.streams * 512,
            max_model_len=512,
            enable_prefix_caching=True,
        ),
    )
    print(f"shape {args.shape}, {args.streams} streams, {args.steps} steps, vocab {tok.vocab_size}")
    for share in (0.0, 0.5, 0.0, 0.5):
        tok_s, tokens, wall = run(engine, args.streams, share, args.steps, args.max_tokens)
        print(
            f"  {int(share * 100):3d}% under the JSON schema: {tok_s:8.1f} tokens/s "
            f"({tokens['g']} constrained + {tokens['f']} free tokens in {wall:.2f} s)"
        )


if __name__ == "__main__":
    main()
