"""Structured output: a reply constrained to a grammar (a JSON schema, any JSON object, a regex,
one of fixed choices), with llguidance (bench/guided_libs.py and the README say why that library).

A request's constraint travels as a `GuidedSpec` (plain text, made by the server). It is compiled
once per distinct spec by `GrammarCompiler.compile` (an LRU cache; callers run it on a worker
thread, never on the engine's step thread) into a `CompiledGrammar`, which goes into
`SamplingParams.guided`. Each sequence then gets its own `GrammarState` (a copy of the compiled
matcher, cheap). Every step the sampler asks all constrained rows of the batch for their
allowed-token bitmask at once (`mask_logits`, filled in parallel by the library's executor) and
masks those rows' logits, so constrained and free requests share one step; the engine feeds
each chosen token back (`GrammarState.accept`) and ends the reply when the grammar is complete.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import llguidance as llg
import numpy as np
import torch
from torch import Tensor

from chatglm_serve.engine.types import GrammarError, GuidedSpec

log = logging.getLogger(__name__)

# JSON written on one line with the usual separators, no free whitespace: a model cannot wander
# off into endless blank space (a known failure of JSON modes), and `json.loads` reads it all.
# oneOf is enforced as anyOf (pydantic's unions are written as oneOf; exclusivity cannot be
# decided token by token). Keywords the library does not implement (if/then, ...) are refused
# with its reason rather than ignored, so a reply never silently breaks its schema.
_JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "coerce_one_of": True,
}


def vocab_bytes(tokenizer: Any, vocab_size: int) -> list[bytes | None]:
    """Each token's bytes; None for special tokens (no text: never allowed by a grammar).

    A tokenizer may say it itself (`token_bytes(id)`); else SentencePiece's rules: `▁` is a
    space and `<0xNN>` pieces are single bytes (byte fallback)."""
    own = getattr(tokenizer, "token_bytes", None)
    out: list[bytes | None] = []
    for i in range(vocab_size):
        if tokenizer.is_special(i):
            out.append(None)
        elif own is not None:
            out.append(own(i))
        else:
            piece = tokenizer.id_to_piece(i)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


class _LLTokenizerSource:
    """What llguidance's TokenizerWrapper reads: token bytes, eos, and a tokenize function."""

    def __init__(self, tokens: list[bytes | None], eos: int, encode: Callable[[str], list[int]]):
        # llguidance marks special tokens with a leading 0xFF byte
        self.tokens = [b"\xff<special_%d>" % i if t is None else t for i, t in enumerate(tokens)]
        self.special_token_ids = [i for i, t in enumerate(tokens) if t is None]
        self.eos_token_id = eos
        self.bos_token_id = None
        self._encode = encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


def _choice_regex(choices: list[str]) -> str:
    escaped = []
    for c in choices:
        out = []
        for ch in c:
            out.append("\\" + ch if ch in r"\.^$|?*+()[]{}/" else ch)
        escaped.append("".join(out))
    return "(" + "|".join(escaped) + ")"


class CompiledGrammar:
    """One compiled constraint; `new_state()` gives a sequence its own matcher."""

    def __init__(self, template: llg.LLMatcher, spec: GuidedSpec, owner: GrammarCompiler) -> None:
        self._template = template
        self.spec = spec
        self.owner = owner

    def new_state(self) -> GrammarState:
        return GrammarState(self._template.deep_copy(), self.owner)

    def __repr__(self) -> str:
        return f"CompiledGrammar({self.spec.kind}, {len(self.spec.source)} chars)"


class GrammarState:
    """A sequence's position in its grammar."""

    def __init__(self, matcher: llg.LLMatcher, owner: GrammarCompiler) -> None:
        self.matcher = matcher
        self.owner = owner  # whose executor fills its bitmask

    def accept(self, token: int) -> bool:
        """Feed the chosen token; False if the grammar refuses it (the state is then broken)."""
        return self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing may follow (or the matcher failed)."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    @property
    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""


class GrammarCompiler:
    """Compiles specs for one tokenizer; thread-safe; the `cache_size` latest specs are kept."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_ids: list[int],
        cache_size: int = 256,
        num_threads: int | None = None,
    ) -> None:
        encode = getattr(tokenizer, "encode_continuation", None)

        def tokenize(text: str) -> list[int]:
            ids = encode(text) if encode is not None else None
            return ids if ids is not None else tokenizer.encode(text, add_special_tokens=False)

        source = _LLTokenizerSource(vocab_bytes(tokenizer, vocab_size), stop_ids[0], tokenize)
        # the model's stop tokens (eos; ChatGLM3's <|user|> ...) end a complete reply
        self.tokenizer = llg.LLTokenizer(
            llg.TokenizerWrapper(source), n_vocab=vocab_size, eos_token=list(stop_ids)
        )
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.executor = llg.LLExecutor(num_threads=num_threads)
        self.compiled = 0  # cache misses, for tests and stats

    def grammar_text(self, spec: GuidedSpec) -> str:
        """The library's grammar for a spec (GrammarError when the spec itself is malformed)."""
        if spec.kind == "json":
            try:
                return llg.LLMatcher.grammar_from_json_schema(spec.source, overrides=_JSON_OPTIONS)
            except ValueError as e:
                raise GrammarError(f"invalid JSON schema: {e}", spec.param) from None
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.source)
        if spec.kind == "choice":
            choices = json.loads(spec.source)
            return llg.LLMatcher.grammar_from_regex(_choice_regex(choices))
        raise GrammarError(f"unknown constraint kind {spec.kind!r}", spec.param)

    def compile(self, spec: GuidedSpec) -> CompiledGrammar:
        key = spec.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            grammar = self.grammar_text(spec)
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(
                grammar, self.tokenizer
            )
            reason = messages[0] if is_error else ""
            template = None if is_error else llg.LLMatcher(self.tokenizer, grammar, log_level=0)
            if template is not None and template.is_error():
                reason = template.get_error()
        except GrammarError:
            raise
        except Exception as e:  # whatever a client's schema makes the library raise: its error
            reason = f"{type(e).__name__}: {e}"
        if reason:
            raise GrammarError(f"cannot compile the {spec.kind} constraint: {reason}", spec.param)
        assert template is not None
        compiled = CompiledGrammar(template, spec, self)
        with self._lock:
            self.compiled += 1
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled


def mask_logits(logits: Tensor, rows: list[int], states: list[GrammarState]) -> None:
    """Set every token the grammar refuses to -inf, in place: logits[rows[i]] by states[i].

    The bitmasks of all rows are filled in one call, in parallel by the library's executor;
    the masking is one batched tensor operation on the logits' device."""
    owner = states[0].owner
    words = (owner.vocab_size + 31) // 32
    bitmask = torch.empty((len(rows), words), dtype=torch.int32)
    owner.executor.unsafe_compute_mask_ptr(
        [(s.matcher, j) for j, s in enumerate(states)], bitmask.data_ptr(), words * 4, len(rows)
    )
    allowed = _unpack(bitmask, logits.shape[1], logits.device)
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        idx = torch.tensor(rows, device=logits.device)
        logits[idx] = logits[idx].masked_fill_(~allowed, float("-inf"))


def _unpack(bitmask: Tensor, width: int, device: torch.device) -> Tensor:
    """int32 bitmask [R, W] (bit j of word w allows token 32w + j) -> bool [R, width] on device;
    tokens past the bitmask's words are refused."""
    rows, words = bitmask.shape
    if device.type == "cpu":  # numpy's unpackbits: one C loop, little-endian words
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        allowed = torch.from_numpy(bits).bool()
    else:
        gpu = bitmask.to(device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        allowed = ((gpu.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1).bool()
    if allowed.shape[1] < width:
        pad = allowed.new_zeros((rows, width - allowed.shape[1]))
        allowed = torch.cat([allowed, pad], dim=1)
    return allowed[:, :width]
