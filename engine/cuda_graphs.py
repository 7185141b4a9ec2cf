"""Decode steps replayed from CUDA graphs, one graph per (batch bucket, block-table width bucket).

On a GPU a small-batch decode step of the 6B model is launch-bound: a few hundred small kernels
per step, each costing more to launch from Python than to run. A CUDA graph records the step's
kernels once and replays them with one launch. A graph replays fixed shapes at fixed addresses,
so a decode-only step (every sequence one new token) of B sequences whose block tables are W
blocks wide runs as the captured step of the next batch bucket >= B and width bucket >= W:

- inputs are copied into static buffers owned by that bucket (one packed int64 tensor, so one
  host-to-device copy a step): token ids, positions, KV slots, context lengths, block tables;
- the rows past B are padding: token 0 at position 0, context length 1, writing its K/V into
  slot 0 of a scratch block the block manager never hands out (the KV cache is allocated one
  block larger than the plan; the extra block is `scratch_block`), its block table all scratch;
- attention gets a precomputed decode plan of static shape: every row gathers W blocks
  (W * block_size keys) and a boolean mask built on the device from the context lengths hides
  what is past each row's own length, so nothing depends on host values of this step (the
  attention metadata's own plan sizes the gather by the longest context, a host value).
  A paged decode kernel that reads `meta.block_tables` and `meta.decode_lens()` sees the same
  static tensors;
- the graph outputs the final hidden states [bucket, hidden]; the caller selects the rows it
  samples and computes their logits outside the graph (padding rows cost no output-layer work).

Width is bucketed (powers of two blocks, at least `min_width`) rather than fixed at the longest
context: the fallback attention gathers every key of the width, so a fixed 32k-token width would
make short chats read their whole context window every step.

The seam: how a static step is turned into something replayable is a strategy. On CUDA,
CUDAGraphStrategy warms the step up on a side stream and captures it into a graph (every graph
in one shared memory pool); EagerStrategy runs the same static-buffer step by calling the model
each time, which is how the CPU tests check the padding, the buffers and the static attention
plan without a GPU.

Graphs are captured lazily, at the first step that needs each (batch, width) bucket, not at
start-up: with about a dozen batch buckets times up to a dozen widths most pairs are never used
by a given workload, and capturing them all would cost start-up time and graph memory. A
capture costs one stall of a few hundred milliseconds the first time a bucket is used. Because
of that, the largest bucket is not necessarily captured first: the shared pool then grows as
bigger buckets come, instead of being sized by the first capture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from chatglm_serve.model.attention import AttentionMetadata, _DecodePlan
from chatglm_serve.model.chatglm import ChatGLMForCausalLM

log = logging.getLogger(__name__)

StepFn = Callable[[], Tensor]


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then multiples of 8, up to and including max_num_seqs (as vLLM pads)."""
    out = [b for b in (1, 2, 4) if b < max_num_seqs]
    out += range(8, max_num_seqs, 8)
    out.append(max_num_seqs)
    return out


def width_buckets(max_blocks: int, min_width: int = 16) -> list[int]:
    """Block-table widths: powers of two from min_width, and max_blocks itself."""
    out = []
    w = max(1, min_width)
    while w < max_blocks:
        out.append(w)
        w *= 2
    out.append(max_blocks)
    return out


def _bucket(buckets: list[int], n: int) -> int | None:
    for b in buckets:
        if b >= n:
            return b
    return None


def _module_device(module: torch.nn.Module) -> torch.device | None:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def decode_graph_device(model: object, cuda_graphs: bool) -> torch.device | None:
    """The CUDA device decode graphs would run on, or None where they are not used.

    Only for a plain ChatGLMForCausalLM (tensor parallel's leader wraps it in a model that
    talks to its workers from the host) whose embedding, every layer and the output layer sit on
    one CUDA device (a layer split moves activations and metadata between devices mid-step).
    """
    if not cuda_graphs or not isinstance(model, ChatGLMForCausalLM):
        return None
    t = model.transformer
    devices = set(model.layer_devices())
    devices.add(_module_device(t.embedding))
    devices.add(_module_device(t.output_layer))
    if len(devices) != 1:
        return None
    (device,) = devices
    if device is None or device.type != "cuda":
        return None
    return device


class CaptureStrategy(Protocol):
    """Turns a static step (a function that runs the model on fixed buffers and returns its
    output tensor) into a replay function returning the output of a fresh run."""

    name: str

    def build(self, step: StepFn) -> StepFn: ...


class EagerStrategy:
    """Calls the model on the static buffers every step: the CPU-testable twin of graphs."""

    name = "eager"

    def build(self, step: StepFn) -> StepFn:
        return step


class CUDAGraphStrategy:
    """Warm-up on a side stream, then capture into a torch.cuda.CUDAGraph; one memory pool is
    shared by every graph (their steps never run concurrently: one stream, one step at a time).
    """

    name = "cuda graphs"

    def __init__(self, device: torch.device, warmup_steps: int = 2) -> None:
        self.device = device
        self.warmup_steps = warmup_steps
        self._pool = None  # created at the first capture (touches CUDA)

    def build(self, step: StepFn) -> StepFn:
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                # lazy initialisation (cuBLAS handles and workspaces, kernel builds, the rotary
                # table) happens here, outside the capture
                for _ in range(self.warmup_steps):
                    step()
            current.wait_stream(side)
            torch.cuda.synchronize()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (HTTP, tokenizer) may keep using CUDA meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = step()

        def replay() -> Tensor:
            graph.replay()
            return out

        return replay


@dataclass
class _Static:
    """One bucket's buffers (views into one packed int64 tensor) and its replay function."""

    batch: int
    width: int
    packed: Tensor  # on the device: [batch * (4 + width)] int64
    host: Tensor  # what is filled on the host each step (pinned), or `packed` itself on CPU
    input_ids: Tensor
    positions: Tensor
    slots: Tensor
    seq_lens: Tensor
    tables: Tensor  # [batch, width]
    copied: torch.cuda.Event | None = None  # the last host-to-device copy of `host`
    replay: StepFn | None = None


class DecodeGraphRunner:
    """Runs decode-only steps padded to a bucket, through a capture strategy."""

    def __init__(
        self,
        model: ChatGLMForCausalLM,
        kv_caches: list[Tensor],
        strategy: CaptureStrategy,
        *,
        device: torch.device,
        block_size: int,
        scratch_block: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        min_width: int = 16,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.strategy = strategy
        self.device = device
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        assert all(c.shape[1] > scratch_block for c in kv_caches), "no room for the scratch block"
        self.batch_buckets = batch_buckets(max_num_seqs)
        self.width_buckets = width_buckets(max_blocks_per_seq, min_width)
        self._static: dict[tuple[int, int], _Static] = {}
        self._key_pos: dict[int, Tensor] = {}
        self.enabled = True
        self.replays = 0  # steps run through this runner (tests and stats)

    def bucket(self, num_seqs: int, width: int) -> tuple[int, int] | None:
        """The (batch, width) bucket of a decode-only step, or None when it does not fit one."""
        if not self.enabled:
            return None
        b = _bucket(self.batch_buckets, num_seqs)
        w = _bucket(self.width_buckets, width)
        return None if b is None or w is None else (b, w)

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._static)

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        tables: np.ndarray,
        width: int,
    ) -> Tensor | None:
        """Final hidden states [bucket rows, hidden] of a decode-only step (the first
        len(seq_lens) rows are the step's), or None when this step must run eagerly.

        tables: [len(seq_lens), >= width] int64 block tables; columns past `width` are ignored.
        """
        n = len(seq_lens)
        key = self.bucket(n, width)
        if key is None:
            return None
        st = self._static.get(key)
        if st is None:
            st = self._capture(*key)
            if st is None:
                return None
        B, W = key
        if st.copied is not None:
            st.copied.synchronize()  # the previous step's copy has read the host buffer
        h = st.host.numpy()
        h[:B] = 0
        h[:n] = input_ids
        h[B : 2 * B] = 0
        h[B : B + n] = positions
        h[2 * B : 3 * B] = self.scratch_slot
        h[2 * B : 2 * B + n] = slots
        h[3 * B : 4 * B] = 1
        h[3 * B : 3 * B + n] = seq_lens
        tab = h[4 * B :].reshape(B, W)
        tab[:] = self.scratch_block
        tab[:n, :width] = tables[:n, :width]
        if st.host is not st.packed:
            st.packed.copy_(st.host, non_blocking=True)  # on the device's current stream
            st.copied = torch.cuda.Event()
            st.copied.record(torch.cuda.current_stream(self.device))
        assert st.replay is not None
        self.replays += 1
        return st.replay()

    def _buffers(self, B: int, W: int) -> _Static:
        size = B * (4 + W)
        packed = torch.empty(size, dtype=torch.int64, device=self.device)
        if self.device.type == "cpu":
            host = packed
        else:
            host = torch.empty(size, dtype=torch.int64, pin_memory=True)
        ids, pos, slots, lens, tables = packed.split([B, B, B, B, B * W])
        st = _Static(B, W, packed, host, ids, pos, slots, lens, tables.view(B, W))
        # every row padding: what the warm-up and capture runs write goes to the scratch block
        h = host.numpy()
        h[: 2 * B] = 0
        h[2 * B : 3 * B] = self.scratch_slot
        h[3 * B : 4 * B] = 1
        h[4 * B :] = self.scratch_block
        if host is not packed:
            packed.copy_(host)
        return st

    def _step_fn(self, st: _Static) -> StepFn:
        B, W, bs = st.batch, st.width, self.block_size
        keys = W * bs
        key_pos = self._key_pos.get(keys)
        if key_pos is None:
            key_pos = self._key_pos[keys] = torch.arange(keys, device=self.device)
        qsl = list(range(B + 1))
        model, caches = self.model, self.kv_caches

        def step() -> Tensor:
            lens = st.seq_lens
            # a fixed-width gather of W blocks per row; keys past each row's length are masked
            mask = (key_pos[None, :] < lens[:, None]).view(B, 1, 1, keys)
            plan = _DecodePlan(block_ids=st.tables.view(-1), nblocks=W, keys=keys, mask=mask)
            meta = AttentionMetadata(
                slot_mapping=st.slots,
                query_start_loc=qsl,
                seq_lens=[keys] * B,  # host-side upper bound: the static key width
                block_tables=st.tables,
                num_prefills=0,
                block_size=bs,
                seq_lens_tensor=lens,
                _decode=plan,
                _decode_lens=lens,
            )
            return model(st.input_ids, st.positions, caches, meta)

        return step

    def _capture(self, B: int, W: int) -> _Static | None:
        t0 = time.perf_counter()
        try:
            st = self._buffers(B, W)
            st.replay = self.strategy.build(self._step_fn(st))
        except Exception:
            # e.g. a kernel that syncs with the host: run every decode step eagerly from now on
            log.warning(
                "decode step capture (%s) failed for batch %d, width %d blocks; decode steps "
                "run without it from now on",
                self.strategy.name,
                B,
                W,
                exc_info=True,
            )
            self.enabled = False
            return None
        self._static[(B, W)] = st
        log.debug(
            "decode step captured (%s): batch %d, width %d blocks, %.0f ms",
            self.strategy.name,
            B,
            W,
            (time.perf_counter() - t0) * 1e3,
        )
        return st
