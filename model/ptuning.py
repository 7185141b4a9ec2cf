"""P-Tuning v2 checkpoints (the ChatGLM2-6B `ptuning/` format) as per-layer prefix keys/values.

Such a checkpoint directory holds the model's `config.json` with `pre_seq_len` (P) and
`prefix_projection`, and weights with only `transformer.prefix_encoder.*`: an embedding
[P, L * 2 * Hkv * D] and, with prefix_projection, a two-layer MLP (`trans.0`: kv -> hidden,
tanh, `trans.2`: hidden -> kv) applied to it. The seed's modeling code views the encoder's
output as [P, 2L, Hkv, D] and gives layer i the keys at 2i and the values at 2i + 1 as its past
key/values: P virtual tokens that every real token attends to (its mask is all ones over them),
taken as they are (no rotary), while the real tokens keep positions 0, 1, ... (not shifted by P).

The encoder's output does not depend on the input, so it is computed once, here; the engine
stores it in pinned KV blocks that every request of the adapter starts its block table with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from chatglm_serve.model.config import ChatGLMConfig
from chatglm_serve.model.loader import CheckpointError, _read_shard, weight_files
from chatglm_serve.model.lora import AdapterError

PREFIX = "transformer.prefix_encoder."


@dataclass
class PrefixKV:
    """A P-Tuning v2 adapter: keys/values [num_layers, 2, pre_seq_len, Hkv, D] (fp32, CPU)."""

    name: str
    path: Path
    pre_seq_len: int
    kv: Tensor = field(repr=False)


def is_ptuning_dir(path: Path) -> bool:
    try:
        return "pre_seq_len" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def prefix_encoder_output(state: dict[str, Tensor], projection: bool) -> Tensor:
    """The prefix encoder of the seed ([P, L * 2 * Hkv * D]) on its P prefix tokens."""
    emb = state["embedding.weight"].float()
    if not projection:
        return emb
    h = torch.tanh(emb @ state["trans.0.weight"].float().T + state["trans.0.bias"].float())
    return h @ state["trans.2.weight"].float().T + state["trans.2.bias"].float()


def read_ptuning(name: str, path: str | Path, cfg: ChatGLMConfig) -> PrefixKV:
    """Read a P-Tuning v2 checkpoint and compute its prefix keys/values for a base of `cfg`;
    AdapterError naming `name` when it cannot serve this base."""
    path = Path(path)

    def bad(why: str) -> AdapterError:
        return AdapterError(f"P-Tuning v2 checkpoint {name!r} ({path}): {why}")

    try:
        conf = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise bad("missing config.json") from None
    except (OSError, json.JSONDecodeError) as e:
        raise bad(f"unreadable config.json ({e})") from None
    try:
        p = int(conf["pre_seq_len"])
    except (KeyError, TypeError, ValueError):
        raise bad("config.json has no integer pre_seq_len") from None
    if p < 1:
        raise bad(f"pre_seq_len {p} must be >= 1")
    projection = bool(conf.get("prefix_projection", False))
    state: dict[str, Tensor] = {}
    try:
        for file in weight_files(path):
            for key, tensor in _read_shard(file):
                if key.startswith(PREFIX):
                    state[key[len(PREFIX) :]] = tensor
    except CheckpointError as e:
        raise bad(str(e)) from None
    L, hkv, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    kv_size = L * 2 * hkv * d
    want = {"embedding.weight": (p, kv_size)}
    if projection:
        hidden = state.get("trans.0.weight", torch.empty(0, 0)).shape[0]
        want |= {
            "trans.0.weight": (hidden, kv_size),
            "trans.0.bias": (hidden,),
            "trans.2.weight": (kv_size, hidden),
            "trans.2.bias": (kv_size,),
        }
    missing = sorted(set(want) - set(state))
    if missing:
        raise bad(f"missing {[PREFIX + k for k in missing]}")
    extra = sorted(set(state) - set(want))
    if extra:
        raise bad(f"unexpected {[PREFIX + k for k in extra]} (prefix_projection mismatch?)")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise bad(
                f"{PREFIX + k}: shape {tuple(state[k].shape)}, this base needs {shape} "
                f"({L} layers x 2 x {hkv} KV heads x {d}): a checkpoint of another base?"
            )
    with torch.no_grad():
        out = prefix_encoder_output(state, projection)  # [P, 2L * Hkv * D]
        kv = out.view(p, L, 2, hkv, d).permute(1, 2, 0, 3, 4).contiguous()
    return PrefixKV(name, path, p, kv)
