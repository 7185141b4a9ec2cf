"""Train the embedded demo model's SentencePiece tokenizer from text shipped in the repo.

The trained model is built to have the same shape as ChatGLM2's `tokenizer.model`, so the
demo exercises every code path a real checkpoint does:
  - id 0 `<unk>` (also the pad id), 1 `<s>`, 2 `</s>`, then the 256 byte pieces `<0x00>`..`<0xFF>`
    (so `\n` is `<0x0A>` = id 13, as in the real file), then the learned pieces;
  - BPE with byte fallback (any text encodes, emoji included) and digits split one per piece;
  - identity normalization, dummy prefix on, whitespace kept as is (no NFKC, no collapsing),
    so decode(encode(text)) == text.
Training reads lines, never whole texts, so `\n` is never learned as a piece and always falls
back to its byte, like the real file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import sentencepiece as spm

CORPUS_PATH = Path(__file__).with_name("demo_corpus.txt")
DEFAULT_VOCAB_SIZE = 2048


def demo_corpus_lines(corpus: Path = CORPUS_PATH) -> list[str]:
    """The corpus' non-blank lines, in file order."""
    text = corpus.read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def train_demo_tokenizer_bytes(
    vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: Path = CORPUS_PATH
) -> bytes:
    """The serialized SentencePiece model; same bytes for the same corpus, size and library."""
    buf = io.BytesIO()
    # sentence_iterator + model_writer keep file paths out of the stored trainer spec, so the
    # bytes depend on the corpus content only. One thread and no shuffling/sampling make
    # training deterministic.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(demo_corpus_lines(corpus)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,  # ChatGLM2 pads with <unk> (id 0); no separate pad piece
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return buf.getvalue()


def train_demo_tokenizer(
    out_path: Path, vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: Path = CORPUS_PATH
) -> Path:
    """Train the demo tokenizer and write it to `out_path` (a file, e.g. dir/tokenizer.model).

    The write is atomic (temp file + rename), so a concurrent reader of a cache never sees a
    half-written model. Raises ValueError if the corpus cannot support `vocab_size` pieces.
    """
    out_path = Path(out_path)
    try:
        data = train_demo_tokenizer_bytes(vocab_size, corpus)
    except RuntimeError as e:
        raise ValueError(f"cannot train a {vocab_size}-piece tokenizer from {corpus}: {e}") from e
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out_path)
    return out_path
