"""Turns a scheduled step into one forward pass: flat inputs, attention metadata, logits.

The runner owns the KV cache: one tensor per layer on that layer's device, allocated once from
the budget in EngineConfig. Inputs for the whole step are built as host lists and moved to the
device in one copy each; logits are computed only for the rows that will be sampled.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.engine.cuda_graphs import (
    CaptureStrategy,
    CUDAGraphStrategy,
    DecodeGraphRunner,
    decode_graph_device,
)
from chatglm_serve.engine.scheduler import ScheduledSeq
from chatglm_serve.engine.step_inputs import StepInputs
from chatglm_serve.model import huge_pages
from chatglm_serve.model.attention import AttentionMetadata
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.config import parse_dtype
from chatglm_serve.model.lora import LoRASlots

log = logging.getLogger(__name__)


@dataclass
class KVCachePlan:
    num_blocks: int
    block_size: int
    dtype: torch.dtype
    bytes_total: int
    source: str  # which budget decided the size, for the start-up log line

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def _model_dtype(model: ChatGLMForCausalLM) -> torch.dtype:
    w = model.transformer.embedding.word_embeddings.weight
    return w.dtype if w.is_floating_point() else torch.float16


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _activation_reserve(model: ChatGLMForCausalLM, config: EngineConfig, max_len: int) -> int:
    """A generous guess at the peak bytes one step needs outside the cache and the weights."""
    c = model.config
    elem = torch.empty((), dtype=_model_dtype(model)).element_size()
    t = config.max_num_batched_tokens
    hidden = t * (6 * c.hidden_size + 3 * c.ffn_hidden_size + c.qkv_out_features) * elem
    logits = config.max_num_seqs * c.padded_vocab_size * 4 * 4  # logits + sampler copies, fp32
    # a prefill chunk's rows when its prompt logprobs are asked (engine/prompt_logprobs.py)
    logits += config.max_num_batched_tokens * c.padded_vocab_size * 4
    # decode attention gathers each sequence's whole context (K and V) per layer
    gather = config.max_num_seqs * max_len * 2 * c.num_kv_heads * c.head_dim * elem * 2
    return hidden + logits + gather + (256 << 20)


def plan_kv_cache(model: ChatGLMForCausalLM, config: EngineConfig) -> KVCachePlan:
    """How many KV blocks fit the configured budget (same count on every layer's device)."""
    bs = config.block_size
    dtype = parse_dtype(config.kv_cache_dtype) if config.kv_cache_dtype else _model_dtype(model)
    per_block = model.kv_bytes_per_token(dtype) * bs  # all layers
    per_block_layer = per_block // model.config.num_layers
    devices = model.layer_devices()
    seq_len = min(model.config.seq_length, config.max_model_len or model.config.seq_length)
    # enough for every sequence slot at full context: more would never be used
    useful = config.max_num_seqs * ((seq_len + bs - 1) // bs)

    if config.num_blocks is not None:
        n, source = config.num_blocks, "num_blocks"
    elif config.kv_cache_tokens is not None:
        n, source = (config.kv_cache_tokens + bs - 1) // bs, "kv_cache_tokens"
    elif config.kv_cache_bytes is not None:
        n, source = config.kv_cache_bytes // per_block, "kv_cache_bytes"
    elif any(d.type == "cuda" for d in devices):
        reserve = _activation_reserve(model, config, seq_len)
        counts: dict[torch.device, int] = {}
        for d in devices:
            counts[d] = counts.get(d, 0) + 1
        n = useful
        for d, layers in counts.items():
            if d.type != "cuda":
                continue
            free, _ = torch.cuda.mem_get_info(d)
            budget = int(free * config.gpu_memory_utilization) - reserve
            n = min(n, max(0, budget) // (per_block_layer * layers))
        source = f"{config.gpu_memory_utilization:.0%} of free GPU memory"
    else:
        budget = min(config.cpu_kv_cache_max_bytes, _available_host_memory() // 4)
        n, source = min(useful, budget // per_block), "host memory budget"
    if n < 1:
        raise RuntimeError(
            f"KV cache budget ({source}) leaves no room for a single block of {bs} tokens "
            f"({per_block} bytes); lower max_num_seqs/max_num_batched_tokens or free memory"
        )
    return KVCachePlan(n, bs, dtype, n * per_block, source)


class ModelRunner:
    def __init__(
        self,
        model: ChatGLMForCausalLM,
        config: EngineConfig,
        plan: KVCachePlan,
        max_model_len: int,
        decode_graphs: CaptureStrategy | None = None,
        optimize_cpu: bool = True,
        lora: LoRASlots | None = None,
        prefix_blocks: int = 0,
    ) -> None:
        """decode_graphs: how decode-only steps are captured (engine/cuda_graphs.py); None = CUDA
        graphs where config.cuda_graphs and the model sits on one CUDA device, else none. Tests
        pass EagerStrategy() to run the padded static-buffer path on CPU.
        lora: the model's LoRA slots, when adapters may be served (engine/adapters.py);
        prefix_blocks: the most pinned P-Tuning prefix blocks a block table may start with."""
        self.model = model
        self.lora = lora
        self.config = config
        if config.num_threads:
            # process-wide; threads started later (the async engine's step thread) inherit it
            torch.set_num_threads(config.num_threads)
        # optimize_cpu False: the CPU kernels are still being built (engine/kernel_warmup.py),
        # the engine gives the linears their kernels once they are
        if optimize_cpu and all(d.type == "cpu" for d in model.layer_devices()):
            # decode matmuls: oneDNN-packed half precision, our small-batch kernel for fp32
            fast = model.optimize_for_cpu()
            if fast:
                log.info("%d linears set up for CPU decode", len(fast))
        self.block_size = plan.block_size
        self.num_blocks = plan.num_blocks
        self.input_device = model.transformer.embedding.word_embeddings.weight.device
        self.cache_device = model.layer_devices()[0]
        if decode_graphs is None:
            graph_device = decode_graph_device(model, config.cuda_graphs)
            if graph_device is not None:
                decode_graphs = CUDAGraphStrategy(graph_device)
        # with decode graphs the cache has one more block than the block manager hands out: the
        # scratch block that padding rows write their K/V to
        cache_blocks = plan.num_blocks + (decode_graphs is not None)
        shape = model.kv_cache_shape(cache_blocks, plan.block_size)
        self.kv_caches: list[Tensor] = [
            huge_pages.zeros(shape, plan.dtype)
            if d.type == "cpu"
            else torch.zeros(shape, dtype=plan.dtype, device=d)
            for d in model.layer_devices()
        ]
        self.max_blocks_per_seq = (max_model_len + self.block_size - 1) // self.block_size
        self.max_blocks_per_seq += prefix_blocks
        self.graphs: DecodeGraphRunner | None = None
        if decode_graphs is not None:
            self.graphs = DecodeGraphRunner(
                model,
                self.kv_caches,
                decode_graphs,
                device=self.cache_device,
                block_size=self.block_size,
                scratch_block=plan.num_blocks,
                max_num_seqs=config.max_num_seqs,
                max_blocks_per_seq=self.max_blocks_per_seq,
            )
            log.info(
                "decode steps: %s per batch bucket %s, captured at first use",
                decode_graphs.name,
                self.graphs.batch_buckets,
            )
        # host staging for block tables, reused every step
        self._tables = np.zeros((config.max_num_seqs, self.max_blocks_per_seq), dtype=np.int64)
        self._pin = self.cache_device.type == "cuda"
        # eager steps on one GPU: all inputs in one pinned buffer, one copy (engine/step_inputs.py)
        self.staging: StepInputs | None = None
        if self._pin and self.input_device == self.cache_device:
            self.staging = StepInputs(pin=True)

    def _to(self, data: list[int] | np.ndarray, device: torch.device) -> Tensor:
        t = torch.as_tensor(data, dtype=torch.int64)
        if device.type == "cpu":
            return t
        if self._pin:
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> Tensor:
        """Run one step; returns fp32 logits [number of sampling rows, vocab] in batch order,
        followed by the rows of each item's `prompt_logprob_rows` (batch order; none unless a
        sequence asked for prompt logprobs).

        Sequences with more than one new token go through the prefill path and single tokens
        through the batched decode path; the caller passes them in that order.
        """
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[int] = []
        num_prefills = 0
        width = 1
        row_slots: list[int] = []  # each row's LoRA slot (-1 = none)
        for i, item in enumerate(batch):
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            adapter = seq.request.adapter
            off = 0  # P-Tuning v2: K/V slots after the pinned prefix, positions unshifted
            if adapter is not None:
                row_slots.extend([adapter.lora_slot] * n)
                if adapter.prefix_len:
                    off = adapter.prefix_len
                    table = list(adapter.prefix_blocks) + table
            else:
                row_slots.extend([-1] * n)
            slots.extend(table[p // bs] * bs + p % bs for p in range(start + off, end + off))
            end += off
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            if n > 1:
                assert num_prefills == i, "multi-token chunks must precede single tokens"
                num_prefills = i + 1
            if end - off == seq.num_tokens:
                sample_rows.append(qsl[-1] - 1)
            first, count = item.prompt_logprob_rows
            if count:
                row0 = qsl[-2] + first - start
                prompt_rows.extend(range(row0, row0 + count))
            nb = (end + bs - 1) // bs
            width = max(width, nb)
            self._tables[i, :nb] = table[:nb]
        hidden = None
        with_lora = any(s >= 0 for s in row_slots)
        if num_prefills == 0 and batch and self.graphs is not None and not with_lora:
            # None when the step fits no bucket (or capture failed): the eager path below
            hidden = self.graphs.run(ids, positions, slots, seq_lens, self._tables, width)
        if hidden is None:
            if with_lora:
                assert self.lora is not None, "a LoRA row without LoRA slots"
                with self.lora.step(row_slots):
                    hidden = self._forward(
                        ids, positions, slots, qsl, seq_lens, num_prefills, width
                    )
            else:
                hidden = self._forward(ids, positions, slots, qsl, seq_lens, num_prefills, width)
        sample_rows += prompt_rows
        if not sample_rows:
            return hidden.new_empty((0, self.model.config.padded_vocab_size), dtype=torch.float32)
        rows = self._to(sample_rows, hidden.device)
        return self.model.compute_logits(hidden.index_select(0, rows))

    def _forward(
        self,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        qsl: list[int],
        seq_lens: list[int],
        num_prefills: int,
        width: int,
    ) -> Tensor:
        bs = self.block_size
        tables = self._tables[: len(seq_lens), :width]
        if self.staging is not None:
            slot_t, table_t, lens_t, input_ids, pos = self.staging.upload(
                [slots, tables, seq_lens, ids, positions], self.cache_device
            )
        else:
            slot_t = self._to(slots, self.cache_device)
            table_t = self._to(tables.copy(), self.cache_device)
            lens_t = self._to(seq_lens, self.cache_device)
            input_ids = self._to(ids, self.input_device)
            pos = self._to(positions, self.input_device)
        meta = AttentionMetadata(
            slot_mapping=slot_t,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=table_t,
            num_prefills=num_prefills,
            block_size=bs,
            seq_lens_tensor=lens_t,
        )
        return self.model(input_ids, pos, self.kv_caches, meta)
