"""Write random-weight checkpoints of the shapes we benchmark, in the HF `chatglm2-6b` format.

Every engine (ours, transformers' GlmForCausalLM, llama.cpp, chatglm.cpp) loads the same files.

    python bench/make_checkpoint.py --shape medium --out /tmp/ckpt-medium
    python bench/make_checkpoint.py --shape medium-realvocab --out /tmp/ckpt-medium-rv
    python bench/make_checkpoint.py --shape 6b --out /tmp/ckpt-6b --dtype float16
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.checkpoint import save_checkpoint
from chatglm_serve.model.config import ChatGLMConfig
from chatglm_serve.model.demo_tokenizer import train_demo_tokenizer
from chatglm_serve.model.tokenizer import ChatGLMTokenizer

MEDIUM = dict(
    num_layers=16,
    hidden_size=1024,
    ffn_hidden_size=2816,
    kv_channels=128,
    num_attention_heads=8,
    multi_query_group_num=2,
    seq_length=4096,
)
SIX_B = dict(
    num_layers=28,
    hidden_size=4096,
    ffn_hidden_size=13696,
    kv_channels=128,
    num_attention_heads=32,
    multi_query_group_num=2,
    padded_vocab_size=65024,
    seq_length=32768,
)


def shape_config(shape: str, tokenizer_vocab: int, dtype: str) -> ChatGLMConfig:
    padded = (tokenizer_vocab + 63) // 64 * 64
    if shape == "medium":
        return ChatGLMConfig(**MEDIUM, padded_vocab_size=padded, torch_dtype=dtype)
    if shape == "medium-realvocab":
        return ChatGLMConfig(**MEDIUM, padded_vocab_size=65024, torch_dtype=dtype)
    if shape == "6b":
        return ChatGLMConfig(**SIX_B, torch_dtype=dtype)
    raise SystemExit(f"unknown shape {shape!r}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="medium", choices=["medium", "medium-realvocab", "6b"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", help="dtype stored in the files")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--fmt", default="safetensors", choices=["bin", "safetensors"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp())
    tok = train_demo_tokenizer(tmp / "tokenizer.model")
    cfg = shape_config(args.shape, ChatGLMTokenizer(str(tok)).vocab_size, args.dtype)
    # std 0.02 as in real inits; narrow shapes would need more for token-exact comparisons
    model = ChatGLMForCausalLM.random(cfg, dtype=args.dtype, seed=args.seed, std=0.02)
    n_params = sum(p.numel() for p in model.parameters())
    out = save_checkpoint(
        model, cfg, args.out, fmt=args.fmt, shards=args.shards, tokenizer_model=tok
    )
    print(f"{args.shape}: {n_params / 1e6:.1f}M params, {args.dtype}, written to {out}")
    print(dataclasses.asdict(cfg) | {"extra": None})


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
