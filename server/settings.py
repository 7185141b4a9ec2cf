"""Every knob of the daemon, documented in one place.

Precedence, highest first: command-line flags, `CHATGLM_<FIELD>` environment variables, the YAML
file given by `--config` (or `CHATGLM_CONFIG`), then the defaults below. List fields read from the
environment take either a JSON list or comma-separated values (`CHATGLM_API_KEYS=k1,k2`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    SettingsConfigDict,
)

from chatglm_serve.engine.config import EngineArgs, EngineConfig

ENV_PREFIX = "CHATGLM_"
CONFIG_ENV = "CHATGLM_CONFIG"


def _split_list(v: Any) -> Any:
    """Environment lists: JSON (`["a","b"]`) or comma-separated (`a,b`)."""
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            return json.loads(s)
        return [p.strip() for p in s.split(",") if p.strip()]
    return v


class SettingsError(ValueError):
    """A settings file or value that cannot be used; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", protected_namespaces=(), validate_default=True
    )

    # --- the model
    model: str | None = Field(
        None,
        description="Checkpoint directory (Hugging Face chatglm2-6b layout). Unset = the "
        "embedded tiny demo model (random weights, for trying the daemon out).",
    )
    served_model_name: str = Field(
        "chatglm2-6b",
        description="Model name answered in responses and listed by /v1/models; unset = the "
        "checkpoint's detected family member (chatglm2-6b, chatglm3-6b, glm-4-9b-chat, ...).",
    )
    model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="More names listed by /v1/models (and accepted when strict).",
    )
    strict_model_name: bool = Field(
        False,
        description="Refuse (404 model_not_found) a request whose model is neither the served "
        "name nor an alias. Off: any name is accepted (ChatGPT-Next-Web sends OpenAI names).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description=(
            "Weight dtype; auto = the checkpoint's torch_dtype (an fp16 one runs as bf16 on a CPU)."
        ),
    )
    device: str = Field(
        "auto", description="cpu, cuda, cuda:N or mps; auto = cuda when available, else cpu."
    )
    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Several devices (e.g. cuda:0,cuda:1) to split the layers over; overrides device.",
    )
    num_gpus: int | None = Field(
        None,
        ge=1,
        description="Use cuda:0..N-1 (shorthand for devices): the layer split, or the "
        "tensor-parallel ranks' GPUs.",
    )
    device_map: Annotated[dict[str, str] | None, NoDecode] = Field(
        None,
        description="Explicit layer split: {embedding, layers.N or layers.A-B, final_layernorm, "
        "output_layer: device} (YAML mapping, JSON, or k=v,k=v); overrides devices' balancing.",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="Split every layer over N processes, one per device (NCCL on GPUs, gloo on "
        "CPU); the daemon spawns them and serves HTTP from rank 0. Under torchrun: its "
        "process count.",
    )
    quantize: Literal[4, 8] | None = Field(
        None, description="Quantize the linears to int4/int8 while loading (unset = none)."
    )
    chat_template: Literal["chatglm2", "chatglm3", "glm4"] | None = Field(
        None,
        description="Chat format; unset = detected from the checkpoint (config, tokenizer "
        "file, special tokens).",
    )
    lora: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="A fine-tune served beside the base as NAME=DIR: a PEFT LoRA adapter "
        "(adapter_config.json) or a P-Tuning v2 checkpoint (config.json with pre_seq_len). "
        "A request selects it by `model`: NAME.",
    )
    ptuning_checkpoint: str | None = Field(
        None,
        description="A P-Tuning v2 checkpoint directory (ChatGLM2-6B ptuning/ output) that "
        "every request naming no adapter is served with; NAME=DIR serves it as adapter NAME.",
    )
    max_loras: int = Field(4, ge=1, description="LoRA adapters resident at once (memory bound).")
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank accepted (memory bound).")

    # --- the HTTP side
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in a container).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (Authorization: Bearer KEY). Empty = no authentication.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='Origins allowed to call from a browser (["*"] = any). Empty = no CORS.',
    )
    web_ui: bool = Field(True, description="Serve the web chat page at GET / (when installed).")
    metrics_public: bool = Field(
        True, description="/metrics without an API key; off = it needs one like /v1."
    )
    max_body_bytes: int = Field(
        8 << 20, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="On SIGTERM: seconds running streams may take to finish."
    )
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="Reply length limit for requests that set none (no max_tokens / "
        "max_completion_tokens / max_length; ChatGPT-Next-Web sends none for most model "
        "names). Unset = up to the end of the context.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the daemon and uvicorn."
    )

    # --- the engine
    max_num_seqs: int | None = Field(
        None, ge=1, description="Sequences decoded together (unset = engine default, 64)."
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Tokens per engine step, i.e. the prefill chunk (unset = 1024)."
    )
    max_model_len: int | None = Field(
        None,
        ge=2,
        description="Context length (prompt + reply). Unset = the model's, clipped to the KV capacity.",
    )
    max_queue: int = Field(
        256, ge=1, description="Requests waiting beyond this are refused with 429 + Retry-After."
    )
    kv_cache_tokens: int | None = Field(
        None, ge=1, description="KV cache budget in tokens (unset: a share of free memory)."
    )
    block_size: int = Field(
        16,
        ge=1,
        le=256,
        description="Tokens per KV cache block (a P-Tuning v2 pre_seq_len must be a multiple).",
    )
    gpu_memory_utilization: float = Field(
        0.90,
        gt=0.0,
        le=1.0,
        description="CUDA: fraction of GPU memory the weights and KV cache may fill.",
    )
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="KV cache dtype; auto = the model's dtype."
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV of a shared prompt prefix (a chat's earlier turns)."
    )
    reply_token_cache_size: int = Field(
        1024,
        ge=0,
        description="Recent replies whose generated token ids are kept by text: a chat's next "
        "turn sends them back as history and is encoded with those ids, so it hits the prefix "
        "cache instead of recomputing re-tokenized replies. 0 = off.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for the forward pass (torch intra-op); unset = torch's default "
        "(one per core).",
    )
    cuda_graphs: bool = Field(
        True,
        description="CUDA: replay decode steps from CUDA graphs captured per batch size bucket "
        "(fewer kernel launches); used when the model sits on one GPU without tensor parallel.",
    )

    @field_validator("model_aliases", "devices", "cors_origins", "api_keys", "lora", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("device_map", mode="before")
    @classmethod
    def _device_map(cls, v: Any) -> Any:
        """JSON (`{"embedding": "cuda:0", ...}`) or `embedding=cuda:0,layers.0-13=cuda:0,...`."""
        if isinstance(v, str):
            s = v.strip()
            if not s or s.lower() in ("none", "null"):
                return None
            if s.startswith("{"):
                return json.loads(s)
            pairs = [p.split("=", 1) for p in s.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(
                    "device_map: expected JSON or key=device pairs separated by commas"
                )
            return {k.strip(): d.strip() for k, d in pairs}
        return v

    @field_validator("quantize", mode="before")
    @classmethod
    def _quantize(cls, v: Any) -> Any:
        if isinstance(v, str):
            s = v.strip().lower()
            if s in ("", "none", "null", "0", "off", "false"):
                return None
            return int(s)
        return v or None

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in ("", "none", "null", "demo"):
            return None
        return v

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # No .env file or secrets dir: three documented layers only (the YAML one is added by
        # load_settings below).
        return (init_settings, env_settings)

    def model_names(self) -> list[str]:
        names = [self.served_model_name]
        names += [a for a in self.model_aliases if a not in names]
        return names

    def reply_limit(self, asked: int | None) -> int | None:
        """The reply token limit of a request that asked for `asked` (None = it set none): the
        one place default_max_tokens applies, for every route and the terminal chat."""
        return self.default_max_tokens if asked is None else asked

    def stream_grace(self) -> float:
        """How long an SSE stream may run on after SIGTERM before it is cut. The engine's drain
        ends every stream at shutdown_timeout (finish_reason "abort", then [DONE]); the margin
        lets that ending reach the client first (the drain waits up to 2 s for its aborts)."""
        return self.shutdown_timeout + 3.0

    def adapter_dirs(self) -> dict[str, str]:
        """NAME -> DIR of the adapters loaded at start (--lora, a named --ptuning-checkpoint)."""
        out: dict[str, str] = {}
        specs = list(self.lora)
        if self.ptuning_checkpoint and "=" in self.ptuning_checkpoint:
            specs.append(self.ptuning_checkpoint)
        for spec in specs:
            name, sep, path = spec.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise SettingsError(f"lora: expected NAME=DIR, got {spec!r}")
            if name.strip() in out or name.strip() in self.model_names():
                raise SettingsError(f"lora: the name {name.strip()!r} is used twice")
            out[name.strip()] = path.strip()
        return out

    def api_key_values(self) -> list[str]:
        return [k.get_secret_value() for k in self.api_keys]


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of setting: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {unknown}")
    return data


class _EnvFrom(EnvSettingsSource):
    """CHATGLM_* variables from a given mapping (os.environ in the daemon, a dict in tests)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Flags (`overrides`: only the flags given) > CHATGLM_* env > YAML file > defaults."""
    env = os.environ if environ is None else environ
    config_file = config_file or env.get(CONFIG_ENV) or None
    yaml_data = read_yaml(config_file) if config_file else {}

    class _Layered(Settings):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        ):
            return (
                init_settings,
                _EnvFrom(settings_cls, env),
                InitSettingsSource(settings_cls, yaml_data),
            )

    layered = _Layered(**dict(overrides or {}))
    # A plain Settings (no layered subclass in reprs) holding the validated values; which were
    # given (flag, env, YAML) stays known (an unset served_model_name follows the checkpoint).
    return Settings.model_construct(
        _fields_set=set(layered.model_fields_set),
        **{name: getattr(layered, name) for name in Settings.model_fields},
    )


def engine_config(settings: Settings) -> EngineConfig:
    """The one place settings become the engine's sizing."""
    return EngineConfig(
        max_num_seqs=settings.max_num_seqs or EngineConfig.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens
        or max(EngineConfig.max_num_batched_tokens, settings.max_num_seqs or 0),
        kv_cache_tokens=settings.kv_cache_tokens,
        block_size=settings.block_size,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_cache_dtype=None if settings.kv_cache_dtype == "auto" else settings.kv_cache_dtype,
        max_model_len=settings.max_model_len,
        max_queue=settings.max_queue,
        enable_prefix_caching=settings.enable_prefix_caching,
        reply_token_cache_size=settings.reply_token_cache_size,
        num_threads=settings.threads,
        cuda_graphs=settings.cuda_graphs,
        adapters=settings.adapter_dirs(),
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,
        ptuning_checkpoint=settings.ptuning_checkpoint
        if settings.ptuning_checkpoint and "=" not in settings.ptuning_checkpoint
        else None,
    )


def engine_args(settings: Settings) -> EngineArgs:
    """The one place settings become what the engine is built from (engine/load.py)."""
    devices = settings.devices or [f"cuda:{i}" for i in range(settings.num_gpus or 0)]
    return EngineArgs(
        model=settings.model,
        dtype=None if settings.dtype == "auto" else settings.dtype,
        device=settings.device,
        devices=devices or None,
        device_map=settings.device_map,
        tensor_parallel_size=settings.tensor_parallel_size,
        quantize=settings.quantize,
        chat_template=settings.chat_template,
        engine=engine_config(settings),
        kernel_build="background",  # a first start serves at once (engine/kernel_warmup.py)
    )


# Flags whose name is not simply the field's (repeatable singular forms).
_FLAGS = {
    "api_keys": "--api-key",
    "cors_origins": "--cors-origin",
    "model_aliases": "--model-alias",
    "lora": "--lora",
}
REPEATABLE = frozenset(_FLAGS)


def flag_for(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def settings_table() -> str:
    """The settings as a Markdown table (for the README), straight from the field docs."""
    rows = ["| setting | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for name, f in Settings.model_fields.items():
        default = f.get_default(call_default_factory=True)
        flag = f"`{flag_for(name)}`"
        if f.annotation is bool:
            flag += f" / `--no-{flag_for(name)[2:]}`"
        elif name in REPEATABLE:
            flag += " (repeatable)"
        env = f"`{ENV_PREFIX}{name.upper()}`"
        rows.append(f"| `{name}` | {flag} | {env} | `{default!r}` | {f.description} |")
    return "\n".join(rows)
