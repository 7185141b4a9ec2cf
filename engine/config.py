"""How the engine is sized: batch limits, KV cache budget, context length, queue limit."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # sequences decoded together in one step
    # Per-step token budget: every running sequence's decode token plus prefill chunks. A long
    # prompt is prefilled in chunks of what is left, so it never stalls decodes for long.
    max_num_batched_tokens: int = 1024
    block_size: int = 16  # tokens per KV cache block (the unit of sharing and allocation)

    # KV cache budget, first one set wins: an exact block count, a token count, bytes, or (CUDA)
    # a fraction of the GPU memory free after the model is loaded. With none set on CPU the
    # budget is min(cpu_kv_cache_max_bytes, a quarter of the memory available at start).
    num_blocks: int | None = None
    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_max_bytes: int = 4 << 30
    kv_cache_dtype: str | None = None  # None = the model's dtype

    max_model_len: int | None = None  # None = model seq_length, clipped to the KV capacity
    # waiting sequences beyond this (and the free running slots) are refused (EngineOverloadedError)
    max_queue: int = 1024
    enable_prefix_caching: bool = True
    # finished replies whose generated token ids are remembered by text, so a chat's next turn
    # is encoded with them spliced in and hits the prefix cache (engine/reply_tokens.py);
    # 0 = off. Unused without prefix caching.
    reply_token_cache_size: int = 1024
    max_n: int = 16  # largest accepted SamplingParams.n
    max_logprobs: int = 20  # largest accepted SamplingParams.logprobs
    seed: int = 0  # seeds the generator that unseeded requests draw from
    # torch intra-op (OpenMP) threads for the forward pass; None = torch's default (all cores)
    num_threads: int | None = None
    # decode-only steps replayed from CUDA graphs per batch bucket (engine/cuda_graphs.py); used
    # only when the whole model sits on one CUDA device without tensor parallel
    cuda_graphs: bool = True
    # fine-tunes served beside the base (engine/adapters.py): name -> directory of a PEFT LoRA
    # adapter or a P-Tuning v2 checkpoint (told apart by their files); a request selects one by
    # its model name. LoRA memory is preallocated for max_loras adapters of rank <= max_lora_rank.
    adapters: dict[str, str] = field(default_factory=dict)
    max_loras: int = 4
    max_lora_rank: int = 16
    # a P-Tuning v2 checkpoint every request that names no adapter is served with
    ptuning_checkpoint: str | None = None

    def validate(self) -> None:
        def refuse(name: str, why: str) -> None:
            raise ValueError(f"engine config {name}: {why}")

        if self.max_num_seqs < 1:
            refuse("max_num_seqs", "must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # every running sequence must be able to decode in the same step
            refuse("max_num_batched_tokens", f"must be >= max_num_seqs ({self.max_num_seqs})")
        if self.block_size < 1:
            refuse("block_size", "must be >= 1")
        for name in ("num_blocks", "kv_cache_tokens", "kv_cache_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                refuse(name, "must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            refuse("gpu_memory_utilization", "must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 2:
            refuse("max_model_len", "must be >= 2")
        if self.max_queue < 1:
            refuse("max_queue", "must be >= 1")
        if self.reply_token_cache_size < 0:
            refuse("reply_token_cache_size", "must be >= 0")
        if self.num_threads is not None and self.num_threads < 1:
            refuse("num_threads", "must be >= 1")
        if self.max_loras < 1:
            refuse("max_loras", "must be >= 1")
        if self.max_lora_rank < 1:
            refuse("max_lora_rank", "must be >= 1")


@dataclass
class EngineArgs:
    """Everything that builds a ready engine: which model, how it is placed and quantized, and
    how the engine is sized. The daemon, the terminal chat, the Python API and the benchmarks all
    hand one of these to `engine.load.build_engine`, so a model is loaded one way everywhere.
    (vLLM's EngineArgs plays the same part.) Torch-free, so the server can fill it in."""

    model: str | None = None  # a checkpoint directory; None = the embedded demo model
    dtype: str | None = None  # "float16", "bfloat16", "float32"; None / "auto" = the checkpoint's
    # one device ("cpu", "cuda", "cuda:1"; "auto" = cuda when available) ...
    device: str = "auto"
    # ... or a layer split over several (["cuda:0", "cuda:1"], ["cuda:0", "cpu"]), planned by
    # weight bytes, or fixed per unit by device_map ({"transformer.encoder.layers.0-13": "cuda:0"})
    devices: list[str] | None = None
    device_map: dict[str, str] | None = None
    tensor_parallel_size: int = 1  # every layer split over N processes (devices: one per rank)
    quantize: int | None = None  # 4 or 8: weight-only quantization while loading
    # the chat format ("chatglm2", "chatglm3", "glm4"); None = detected from the checkpoint
    chat_template: str | None = None
    # CPU kernels not in the cache yet: "now" compiles them while loading (a minute on 2 cores);
    # "background" serves on PyTorch at once and switches when a background build ends
    kernel_build: str = "now"
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> None:
        if self.quantize not in (None, 4, 8):
            raise ValueError(f"quantize must be 4, 8 or None, not {self.quantize!r}")
        if self.kernel_build not in ("now", "background"):
            raise ValueError(
                f"kernel_build must be 'now' or 'background', not {self.kernel_build!r}"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.tensor_parallel_size > 1 and (
            self.engine.adapters or self.engine.ptuning_checkpoint
        ):
            raise ValueError("LoRA / P-Tuning v2 adapters are not served under tensor parallel")
        self.engine.validate()
