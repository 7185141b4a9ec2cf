"""Tiny checkpoints of each ChatGLM family member, in the published file formats.

- ChatGLM3-6B (-32k): ChatGLM2's weight layout and SentencePiece `tokenizer.model` (our demo
  vocabulary here), `tokenizer_config.json` declaring the role tokens, `_name_or_path`, and for
  -32k `rope_ratio: 50` with `seq_length 32768`'s role played by a small context.
- GLM-4-9B-chat (-1m): THUDM keys, `eos_token_id` as a list, `rope_ratio` 500 (1m: 10000), and a
  tiktoken `base64 rank` `tokenizer.model` made here: byte-level BPE ranks trained on the demo
  corpus with tiktoken's own trainer, then the 14 GLM-4 special tokens after them.
- GLM-4-9B-chat-hf: the same weights under transformers' GlmForCausalLM names, `model_type:
  glm` config and a byte-level `tokenizer.json` (no tokenizer.model).
Scaled-down shapes, random weights.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from pathlib import Path

import torch

from chatglm_serve.engine.sampler import Sampler
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.checkpoint import save_checkpoint
from chatglm_serve.model.config import ChatGLMConfig
from chatglm_serve.model.demo_tokenizer import demo_corpus_lines, train_demo_tokenizer
from chatglm_serve.model.tokenizer_chatglm3 import ROLE_TOKENS
from chatglm_serve.model.tokenizer_glm4 import (
    PATTERN,
    SPECIAL_TOKENS,
    gpt2_byte_chars,
    write_rank_file,
)
from tests.conftest import tiny_config

GLM4_BPE_SIZE = 420  # 256 bytes + learned merges (glm-4-9b-chat: 151,329)


@cache
def glm4_ranks() -> dict[bytes, int]:
    """Byte-level BPE ranks in GLM-4's format, learned from the demo corpus by tiktoken."""
    from tiktoken._educational import bpe_train

    text = "\n".join(demo_corpus_lines())[:1500]
    return bpe_train(text, GLM4_BPE_SIZE, PATTERN, visualise=None)


def glm4_specials() -> dict[str, int]:
    n = len(glm4_ranks())
    return {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list a rank table implies: each multi-byte token is the BPE of its own bytes
    under the lower ranks, which leaves exactly two parts."""
    from tiktoken._educational import bpe_encode

    out = []
    for token, rank in sorted(ranks.items(), key=lambda x: x[1]):
        if len(token) < 2:
            continue
        lower = {t: r for t, r in ranks.items() if r < rank}
        parts = bpe_encode(lower, token, visualise=None)
        assert len(parts) == 2, (token, parts)
        inv = {r: t for t, r in lower.items()}
        out.append((inv[parts[0]], inv[parts[1]]))
    return out


def tokenizer_json(ranks: dict[bytes, int], specials: dict[str, int]) -> dict:
    """The `-hf` tokenizer.json of a rank table: byte-level BPE (vocab + merges), the GLM-4
    split pattern, specials as added tokens: what transformers' fast tokenizer reads."""
    chars = gpt2_byte_chars()

    def s(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": name,
                "special": True,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
            }
            for name, i in specials.items()
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": False,
                    "use_regex": False,
                },
            ],
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {s(t): r for t, r in ranks.items()},
            "merges": [[s(a), s(b)] for a, b in _merges(ranks)],
        },
    }


def family_config(family: str, vocab: int, **overrides) -> ChatGLMConfig:
    """tests/conftest.py's tiny shape with the member's own config fields."""
    base: dict = dict(padded_vocab_size=(vocab + 63) // 64 * 64)
    if family == "glm4":
        specials = glm4_specials()
        eos = [specials["<|endoftext|>"], specials["<|user|>"], specials["<|observation|>"]]
        base.update(
            layernorm_epsilon=1.5625e-07,
            rope_ratio=500.0,
            eos_token_id=eos[0],
            pad_token_id=eos[0],
            extra={"eos_token_id": eos, "_name_or_path": "THUDM/glm-4-9b-chat"},
        )
    else:
        base["extra"] = {"_name_or_path": f"THUDM/{family}-6b"}
    base.update(overrides)
    return tiny_config(**base)


def write_member(
    out: Path, family: str, *, hf: bool = False, seed: int = 3, **overrides
) -> tuple[Path, ChatGLMForCausalLM]:
    """Write one member's checkpoint directory; returns (dir, the model it holds)."""
    out.mkdir(parents=True, exist_ok=True)
    if family == "glm4":
        vocab = len(glm4_ranks()) + len(SPECIAL_TOKENS)
    else:
        tok = train_demo_tokenizer(out / "tokenizer.model")
        from chatglm_serve.model.tokenizer import ChatGLMTokenizer

        vocab = ChatGLMTokenizer(str(tok)).vocab_size + (
            len(ROLE_TOKENS) if family == "chatglm3" else 0
        )
    cfg = family_config(family, vocab, **overrides)
    model = ChatGLMForCausalLM.random(cfg, seed=seed, std=0.3)
    with torch.no_grad():  # stored as bf16 (as published): the model holds what the file holds
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    if hf:
        extra = {**cfg.extra, "_name_or_path": "THUDM/glm-4-9b-chat-hf"}
        cfg = dataclasses.replace(cfg, checkpoint_layout="hf", extra=extra)
    save_checkpoint(state, cfg, out, fmt="safetensors", shards=2, dtype=torch.bfloat16)
    if family == "chatglm3":
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "ChatGLMTokenizer",
                    "padding_side": "left",
                    "added_tokens_decoder": {},
                    "additional_special_tokens": list(ROLE_TOKENS),
                },
                indent=2,
            )
        )
    elif family == "glm4":
        if hf:
            (out / "tokenizer.json").write_text(
                json.dumps(tokenizer_json(glm4_ranks(), glm4_specials()), ensure_ascii=False)
            )
        else:
            write_rank_file(glm4_ranks(), out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "ChatGLM4Tokenizer" if not hf else "PreTrainedTokenizerFast",
                    "eos_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>",
                    "padding_side": "left",
                },
                indent=2,
            )
        )
    return out, model


class ScriptedSampler(Sampler):
    """Test-only: forces the next token of `script` (then an end token); records prompts."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__(vocab_size)
        self.script: list[int] | None = None
        self.end: int = 0
        self.prompts: list[list[int]] = []

    def __call__(self, logits, rows):
        if self.script is not None:
            logits = logits.clone()
            for i, row in enumerate(rows):
                k = len(row.output_ids)
                if k == 0:
                    self.prompts.append(list(row.token_ids[: row.prompt_len]))
                tok = self.script[k] if k < len(self.script) else self.end
                logits[i] = -1e9
                logits[i, tok] = 0.0
        return super().__call__(logits, rows)
