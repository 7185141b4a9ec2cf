"""Engine benchmark: N requests served concurrently (continuous batching) vs one at a time.

    PYTHONPATH=. python bench/engine_bench.py                       # tiny demo shape, CPU
    PYTHONPATH=. python bench/engine_bench.py --shape medium -n 16
    PYTHONPATH=. python bench/engine_bench.py --shape 6b --device cuda --dtype float16

Random weights of the chosen shape (the 6B shape is ChatGLM2-6B's: 28 layers, hidden 4096,
vocab 65024), the demo tokenizer for text. Every request decodes exactly --max-tokens tokens
(ignore_eos), so both runs do the same work. Prints output tokens/s both ways and their ratio,
time to first token and inter-token latency (p50/p99), and the prefix cache's saving on the
second turn of a chat (prompt tokens computed vs total).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

import torch
from make_checkpoint import MEDIUM  # bench/ is this script's sys.path[0]

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.types import SamplingParams
from model.chatglm import ChatGLMForCausalLM
from model.config import ChatGLMConfig
from model.demo import demo_config
from model.demo_tokenizer import demo_corpus_lines, train_demo_tokenizer_bytes
from model.tokenizer import ChatGLMTokenizer


def shape_config(shape: str, vocab: int) -> ChatGLMConfig:
    if shape == "tiny":
        return dataclasses.replace(demo_config(vocab), seq_length=2048)
    if shape == "medium":  # the shape every CPU figure in bench/README.md uses
        return ChatGLMConfig(
            **MEDIUM, padded_vocab_size=(vocab + 63) // 64 * 64, torch_dtype="float32"
        )
    if shape == "small":
        return ChatGLMConfig(
            num_layers=6,
            hidden_size=512,
            ffn_hidden_size=1408,
            kv_channels=64,
            num_attention_heads=8,
            multi_query_group_num=2,
            padded_vocab_size=(vocab + 63) // 64 * 64,
            seq_length=2048,
            torch_dtype="float32",
        )
    if shape == "6b":
        return ChatGLMConfig()  # chatglm2-6b's config.json values
    raise SystemExit(f"unknown shape {shape!r}")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


@dataclasses.dataclass
class Timings:
    wall: float
    tokens: int
    ttft: list[float]
    itl: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall


def serve(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> Timings:
    """Submit all prompts now and step until done; per-token host timestamps."""
    start = time.perf_counter()
    arrival = {}
    last: dict[str, float] = {}
    ttft, itl = [], []
    tokens = 0
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        engine.add_request(rid, p, params)
        arrival[rid] = time.perf_counter()
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if not o.token_ids:
                continue
            tokens += len(o.token_ids)
            if o.request_id not in last:
                ttft.append(now - arrival[o.request_id])
            else:
                itl.append(now - last[o.request_id])
            last[o.request_id] = now
    return Timings(time.perf_counter() - start, tokens, ttft, itl)


def one_at_a_time(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> Timings:
    parts = [serve(engine, [p], params) for p in prompts]
    return Timings(
        sum(t.wall for t in parts),
        sum(t.tokens for t in parts),
        [x for t in parts for x in t.ttft],
        [x for t in parts for x in t.itl],
    )


def prefix_cache_saving(engine: LLMEngine, tokenizer: ChatGLMTokenizer) -> tuple[int, int, int]:
    """(turn-2 prompt tokens, computed, cached) for a two-turn chat."""
    lines = demo_corpus_lines()
    q1 = " ".join(lines[10:20])
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    p1 = tokenizer.encode_chat(q1, [])
    t1 = serve_text(engine, p1, sp)
    p2 = tokenizer.encode_chat(lines[21], [(q1, t1)])
    before = engine.get_stats()
    serve(engine, [p2], sp)
    after = engine.get_stats()
    return (
        len(p2),
        after.prompt_tokens_computed - before.prompt_tokens_computed,
        after.prompt_tokens_cached - before.prompt_tokens_cached,
    )


def serve_text(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> str:
    engine.add_request("text", prompt, params)
    text = ""
    while engine.has_unfinished():
        text += "".join(o.text for o in engine.step())
    return text


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=["tiny", "small", "medium", "6b"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, float16 on CUDA")
    ap.add_argument("-n", "--num-requests", type=int, default=16)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    tokenizer = ChatGLMTokenizer.from_bytes(train_demo_tokenizer_bytes())
    cfg = shape_config(args.shape, tokenizer.vocab_size)
    t0 = time.perf_counter()
    model = ChatGLMForCausalLM.random(
        cfg, dtype=dtype, device=args.device, seed=args.seed, std=0.02
    )
    load_s = time.perf_counter() - t0

    rng = random.Random(args.seed)
    prompts = [
        tokenizer.prefix_token_ids
        + [
            rng.randrange(3, tokenizer.sp_vocab_size)
            for _ in range(rng.randint(args.min_prompt, args.max_prompt))
        ]
        for _ in range(args.num_requests)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    config = EngineConfig(
        max_num_seqs=max(args.num_requests, 1),
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.num_requests),
        kv_cache_tokens=args.kv_cache_tokens,
        # room for the prompts and for the chat used to show the prefix cache
        max_model_len=min(cfg.seq_length, max(args.max_prompt, 384) + args.max_tokens + 64),
    )
    engine = LLMEngine(model, tokenizer, config)
    print(
        f"shape {args.shape} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab "
        f"{cfg.padded_vocab_size}), {dtype} on {args.device}, torch threads "
        f"{torch.get_num_threads()}, random weights built in {load_s:.1f}s"
    )
    print(engine.capacity_line())
    print(
        f"{args.num_requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens "
        f"(total {sum(map(len, prompts))}), {args.max_tokens} output tokens each, greedy"
    )
    serve(engine, prompts[:2], dataclasses.replace(params, max_tokens=4))  # warm-up

    # each run starts with an empty prefix cache, so neither reuses the other's prompts
    engine.block_manager.reset_prefix_cache()
    seq = one_at_a_time(engine, prompts, params)
    engine.block_manager.reset_prefix_cache()
    con = serve(engine, prompts, params)
    ms = 1000.0
    rows = [("one at a time", seq), ("concurrent", con)]
    print(
        f"{'':15} {'tok/s':>9} {'wall s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  (ms)"
    )
    for name, t in rows:
        print(
            f"{name:15} {t.tok_s:9.1f} {t.wall:8.2f} {pct(t.ttft, 50) * ms:9.1f} "
            f"{pct(t.ttft, 99) * ms:9.1f} {pct(t.itl, 50) * ms:8.1f} {pct(t.itl, 99) * ms:8.1f}"
        )
    print(f"concurrent / one-at-a-time output tok/s: {con.tok_s / seq.tok_s:.2f}x")

    total, computed, cached = prefix_cache_saving(engine, tokenizer)
    print(
        f"prefix cache, chat turn 2: prompt {total} tokens, computed {computed}, "
        f"served from cache {cached} ({cached / total:.0%} saved)"
    )
    s = engine.get_stats()
    print(f"preemptions {s.num_preemptions}, KV blocks used at end {s.kv_blocks_used}")


if __name__ == "__main__":
    main()
