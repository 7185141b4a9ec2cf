"""The embedded default: a tiny ChatGLM2 with random weights, so a fresh machine serves at once.

It goes through the same path as a real checkpoint: it is written once as a Hugging Face format
directory (config.json, sharded weights, a SentencePiece tokenizer.model trained from text that
ships in this package) under the user's cache directory, then loaded like any other model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.checkpoint import save_checkpoint
from chatglm_serve.model.config import ChatGLMConfig

DEMO_SEED = 1234
_FORMAT_VERSION = "1"  # bump when the demo's recipe changes so stale caches are rebuilt


def demo_config(vocab_size: int) -> ChatGLMConfig:
    padded = (vocab_size + 63) // 64 * 64
    return ChatGLMConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=160,
        kv_channels=16,
        num_attention_heads=4,
        multi_query_attention=True,
        multi_query_group_num=2,
        padded_vocab_size=padded,
        seq_length=2048,
        torch_dtype="float32",
    )


def cache_root() -> Path:
    base = os.environ.get("CHATGLM_SERVE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "chatglm-serve" if base else Path.home() / ".cache" / "chatglm-serve"


def _recipe_hash() -> str:
    from chatglm_serve.model.demo_tokenizer import train_demo_tokenizer_bytes

    # the trained tokenizer itself (about 10 ms to make) covers corpus, trainer settings and version
    h = hashlib.sha256(train_demo_tokenizer_bytes())
    h.update(f"{_FORMAT_VERSION}:{DEMO_SEED}".encode())
    return h.hexdigest()[:12]


def build_demo_checkpoint(out_dir: Path) -> Path:
    from chatglm_serve.model.demo_tokenizer import train_demo_tokenizer
    from chatglm_serve.model.tokenizer import ChatGLMTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = train_demo_tokenizer(out_dir / "tokenizer.model")
    vocab = ChatGLMTokenizer(str(tok_path)).vocab_size
    cfg = demo_config(vocab)
    model = ChatGLMForCausalLM.random(cfg, seed=DEMO_SEED, std=0.5)
    save_checkpoint(model, cfg, out_dir, fmt="safetensors", shards=2)
    return out_dir


def demo_checkpoint_dir(root: Path | None = None) -> Path:
    """Path of the demo checkpoint, building it once (atomically) if the cache lacks it."""
    root = root or cache_root()
    final = root / f"demo-{_recipe_hash()}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    try:
        build_demo_checkpoint(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process won the race; use its copy
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
