"""Which grammar library for structured output: llguidance vs xgrammar, measured the way the
engine uses one (engine/guided.py): 64 concurrent constrained rows, one bitmask per row per step,
the mask applied to the batch's logits, the sampled token fed back.

    PYTHONPATH=. flock -x /tmp/cpu.lock python bench/guided_libs.py

Per library and vocabulary (the demo tokenizer's 2053 tokens, and a synthetic 65024-token
SentencePiece-style vocabulary, ChatGLM2-6B's size): how many of a set of JSON schemas compile
(and how long that takes), and the mean time per step for 64 rows (mask + apply + accept).
xgrammar is optional here (`pip install xgrammar`); it is not a dependency of the daemon.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path

import torch

from chatglm_serve.engine.guided import GrammarCompiler, mask_logits, vocab_bytes
from chatglm_serve.engine.types import GrammarError, GuidedSpec
from chatglm_serve.model.demo_tokenizer import train_demo_tokenizer_bytes
from chatglm_serve.model.tokenizer import ChatGLMTokenizer

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 4},
            "score": {"type": "number"},
        },
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {"kind": {"enum": ["x", "y"]}, "child": {"$ref": "#/$defs/n"}},
        "$defs": {
            "n": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "next": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]},
                },
                "required": ["v"],
            }
        },
        "required": ["kind"],
    },
    {
        "type": "object",
        "properties": {
            "email": {"type": "string", "format": "email"},
            "id": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
        },
        "required": ["email", "id"],
    },
    {
        "oneOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]},
        ]
    },
    {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}, "minProperties": 1},
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "multipleOf": 5}},
        "required": ["n"],
    },
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
    {
        "type": "object",
        "properties": {"when": {"type": "string", "format": "date-time"}},
        "required": ["when"],
    },
    {"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
]


class SyntheticVocab:
    """A 65024-token vocabulary: 3 specials, 256 byte pieces, frequent words of Python's own
    sources with and without a leading space (as SentencePiece's ▁)."""

    def __init__(self, size: int = 65024) -> None:
        counts: dict[str, int] = {}
        for f in sorted(Path(sys.prefix, "lib").glob("python3*/*.py"))[:600]:
            for w in re.findall(r"[A-Za-z_]+|[^\sA-Za-z_0-9]{1,3}|\d{1,3}", f.read_text("latin-1")):
                counts[w] = counts.get(w, 0) + 1
        toks: list[bytes | None] = [None, None, None] + [bytes([b]) for b in range(256)]
        seen = set(toks[3:])
        for w, _ in sorted(counts.items(), key=lambda kv: -kv[1]):
            for cand in (w.encode(), b" " + w.encode()):
                if cand not in seen and len(toks) < size:
                    toks.append(cand)
                    seen.add(cand)
        while len(toks) < size:  # not enough words: filler pieces
            toks.append(b"~%d" % len(toks))
        self.toks = toks
        self.vocab_size = size
        self.eos_token_id = 2

    def is_special(self, i: int) -> bool:
        return self.toks[i] is None

    def token_bytes(self, i: int) -> bytes:
        return self.toks[i]  # type: ignore[return-value]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + b for b in text.encode()]


def bench_llguidance(tok, vocab: int, steps: int, rows: int) -> tuple[int, float, float]:
    t = time.perf_counter()
    gc = GrammarCompiler(tok, vocab, [2])
    grammars = []
    for s in SCHEMAS:
        try:
            grammars.append(gc.compile(GuidedSpec("json", json.dumps(s))))
        except GrammarError as e:
            print(f"    llguidance refuses: {e.message[:90]}")
    compile_s = time.perf_counter() - t
    states = [grammars[i % len(grammars)].new_state() for i in range(rows)]
    spent = 0.0
    for _ in range(steps):
        logits = torch.randn(rows, vocab)
        t = time.perf_counter()
        mask_logits(logits, list(range(rows)), states)
        chosen = logits.argmax(-1).tolist()
        for i, s in enumerate(states):
            if s.done or chosen[i] == 2:
                states[i] = grammars[i % len(grammars)].new_state()
            else:
                assert s.accept(chosen[i]), s.error
        spent += time.perf_counter() - t
    return len(grammars), compile_s, spent / steps


def bench_xgrammar(tok, vocab: int, steps: int, rows: int) -> tuple[int, float, float]:
    import xgrammar as xgr

    t = time.perf_counter()
    enc = [b"" if b is None else b for b in vocab_bytes(tok, vocab)]
    info = xgr.TokenizerInfo(enc, xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=[2])
    comp = xgr.GrammarCompiler(info, max_threads=2)
    grammars = []
    for s in SCHEMAS:
        try:
            grammars.append(
                comp.compile_json_schema(
                    json.dumps(s), any_whitespace=False, separators=(", ", ": ")
                )
            )
        except Exception as e:  # noqa: BLE001 - reported
            print(f"    xgrammar refuses: {str(e)[:90]}")
    compile_s = time.perf_counter() - t
    matchers = [xgr.GrammarMatcher(grammars[i % len(grammars)]) for i in range(rows)]
    bitmask = xgr.allocate_token_bitmask(rows, vocab)
    spent = 0.0
    for _ in range(steps):
        logits = torch.randn(rows, vocab)
        t = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        chosen = logits.argmax(-1).tolist()
        for i, m in enumerate(matchers):
            if m.is_terminated() or chosen[i] == 2:
                matchers[i] = xgr.GrammarMatcher(grammars[i % len(grammars)])
            else:
                assert m.accept_token(chosen[i])
        spent += time.perf_counter() - t
    return len(grammars), compile_s, spent / steps


def main() -> None:
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    demo = ChatGLMTokenizer.from_bytes(train_demo_tokenizer_bytes())
    for name, tok in (("demo", demo), ("synthetic", SyntheticVocab())):
        for lib, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
            try:
                ok, compile_s, per_step = fn(tok, tok.vocab_size, 50, 64)
            except ImportError:
                print(f"{lib}: not installed")
                continue
            print(
                f"{name} vocab {tok.vocab_size}, {lib}: {ok}/{len(SCHEMAS)} schemas compile "
                f"({compile_s * 1000:.0f} ms with the tokenizer set-up); "
                f"{per_step * 1000:.2f} ms per step of 64 rows"
            )


if __name__ == "__main__":
    main()
