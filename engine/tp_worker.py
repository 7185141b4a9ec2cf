"""Tensor-parallel serving: rank 0 runs the scheduler and the HTTP server, the other ranks mirror
its forward passes on their shards.

Rank 0's model is wrapped in `TPLeaderModel`, which the engine uses like the plain model: each
forward and each logits call is first announced to the workers (one small int64 broadcast of the
step's inputs and attention metadata over a gloo group, then the same collectives as rank 0 in
the model itself, over NCCL on GPUs or gloo on CPU). Workers own their own KV cache, holding only
their KV heads, sized like rank 0's (the block ids in the metadata index into it).

Launch: `start_tensor_parallel` spawns one process per extra rank (torch.multiprocessing,
`spawn`) with the daemon as rank 0, or, when the daemon runs under `torchrun`, joins the group
torchrun set up: rank 0 returns the model, other ranks serve until rank 0 stops them.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from chatglm_serve.model.attention import AttentionMetadata
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.config import ChatGLMConfig
from chatglm_serve.model.placement import check_devices_exist, normalize_device
from chatglm_serve.model.tensor_parallel import TensorParallel, TPGroup, check_tensor_parallel

log = logging.getLogger(__name__)

_FORWARD, _LOGITS, _STOP = 1, 2, 3
_HEADER = 10  # int64 slots of every control message
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Workers block on the control group between requests, which can be idle for days.
_IDLE_TIMEOUT = datetime.timedelta(days=3650)


@dataclass
class TPLoadSpec:
    """What every rank loads (picklable: it is sent to the spawned workers)."""

    path: str | None  # checkpoint directory; None = the embedded demo model
    dtype: str | None = None
    num_threads: int | None = None  # torch CPU threads per rank (CPU tensor parallel)
    tokenizer: bool = True  # rank 0 also loads tokenizer.model (False: weights only, e.g. tests)


@dataclass
class _Dist:
    tp: TPGroup
    control: dist.ProcessGroup  # gloo: step inputs, always on the host
    device: torch.device


def default_tp_devices(world_size: int) -> list[str]:
    """cuda:0..N-1 when there are enough GPUs, else N CPU ranks (gloo, for tests and trials)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return [f"cuda:{i}" for i in range(world_size)]
    return ["cpu"] * world_size


def _init(rank: int, world_size: int, device: str, init_method: str, timeout_s: float) -> _Dist:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    return _Dist(TPGroup(rank, world_size, dist.group.WORLD), control, dev)


def _tensor_parallel(path: str, d: _Dist) -> TensorParallel:
    cfg = ChatGLMConfig.from_json(Path(path))
    return TensorParallel(cfg, d.tp)


def _resolve_path(path: str | None) -> str:
    if path is None:
        from chatglm_serve.model.demo import demo_checkpoint_dir

        return str(demo_checkpoint_dir())
    return str(path)


class TPLeaderModel:
    """Rank 0's model: the same interface as ChatGLMForCausalLM, each call mirrored on workers."""

    def __init__(
        self,
        model: ChatGLMForCausalLM,
        d: _Dist,
        processes: list[Any] | None = None,
    ) -> None:
        self.model = model
        self._dist = d
        self._processes = processes or []
        self._lock = threading.Lock()  # one message sequence at a time, whichever thread calls
        self._closed = False

    def __getattr__(self, name: str) -> Any:  # config, layer_devices, kv_cache_shape, ...
        if name == "model":  # not yet set (during unpickling / before __init__)
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def world_size(self) -> int:
        return self._dist.tp.world_size

    def _send(self, header: list[int], payload: Tensor | None = None) -> None:
        if self._closed:
            raise RuntimeError("tensor-parallel group is closed")
        h = torch.zeros(_HEADER, dtype=torch.int64)
        h[: len(header)] = torch.tensor(header, dtype=torch.int64)
        dist.broadcast(h, src=0, group=self._dist.control)
        if payload is not None:
            dist.broadcast(payload, src=0, group=self._dist.control)

    def __call__(
        self, input_ids: Tensor, positions: Tensor, kv_caches: list[Tensor], meta: AttentionMetadata
    ) -> Tensor:
        cache = kv_caches[0]
        T, S = input_ids.shape[0], meta.num_seqs
        tables = meta.block_tables
        width = tables.shape[1] if tables.dim() == 2 else 0
        payload = torch.cat(
            [
                input_ids.reshape(-1).to("cpu", torch.int64),
                positions.reshape(-1).to("cpu", torch.int64),
                meta.slot_mapping.reshape(-1).to("cpu", torch.int64),
                torch.tensor(meta.query_start_loc, dtype=torch.int64),
                torch.tensor(meta.seq_lens, dtype=torch.int64),
                tables.reshape(-1).to("cpu", torch.int64),
            ]
        )
        header = [
            _FORWARD,
            T,
            S,
            meta.num_prefills,
            meta.block_size,
            cache.shape[1],  # num_blocks
            width,
            _DTYPES.index(cache.dtype),
            int(meta.seq_lens_tensor is not None),
        ]
        with self._lock:
            self._send(header, payload)
            return self.model(input_ids, positions, kv_caches, meta)

    forward = __call__

    def compute_logits(self, hidden: Tensor) -> Tensor:
        hidden = hidden.contiguous()
        with self._lock:
            self._send([_LOGITS, hidden.shape[0], _DTYPES.index(hidden.dtype)])
            # the workers need the same rows; they travel on the device group (NCCL on GPU)
            dist.broadcast(hidden, src=0, group=self._dist.tp.group)
            return self.model.compute_logits(hidden)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        if self._closed:
            return
        try:
            with self._lock:
                self._send([_STOP])
        except Exception as e:  # a worker already gone: still tear down what is left
            log.warning("tensor parallel: could not signal workers to stop: %s", e)
        self._closed = True
        deadline = time.monotonic() + timeout_s
        for p in self._processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("tensor parallel: worker pid %s did not stop; terminating", p.pid)
                p.terminate()
                p.join(5)
        if dist.is_initialized():
            dist.destroy_process_group()


@torch.inference_mode()
def serve_worker(model: ChatGLMForCausalLM, d: _Dist) -> None:
    """A worker rank's loop: replay every forward / logits call of rank 0 until told to stop."""
    caches: list[Tensor] = []
    cache_spec: tuple[int, int, torch.dtype] | None = None
    input_device = model.transformer.embedding.word_embeddings.weight.device
    cache_device = model.layer_devices()[0]
    hidden_size = model.config.hidden_size
    header = torch.zeros(_HEADER, dtype=torch.int64)
    while True:
        dist.broadcast(header, src=0, group=d.control)
        cmd = int(header[0])
        if cmd == _STOP:
            return
        if cmd == _LOGITS:
            n, dtype = int(header[1]), _DTYPES[int(header[2])]
            hidden = torch.empty((n, hidden_size), dtype=dtype, device=d.device)
            dist.broadcast(hidden, src=0, group=d.tp.group)
            model.compute_logits(hidden)
            continue
        if cmd != _FORWARD:
            raise RuntimeError(f"tensor parallel worker: unknown command {cmd}")
        T, S, num_prefills, block_size, num_blocks, width, dtype_i, has_lens = (
            int(v) for v in header[1:9]
        )
        sizes = [T, T, T, S + 1, S, S * width]
        payload = torch.empty(sum(sizes), dtype=torch.int64)
        dist.broadcast(payload, src=0, group=d.control)
        ids, pos, slots, qsl, lens, tables = payload.split(sizes)
        spec = (num_blocks, block_size, _DTYPES[dtype_i])
        if spec != cache_spec:
            caches = []  # free the old cache before allocating the new one
            caches = [
                torch.zeros(model.kv_cache_shape(num_blocks, block_size), dtype=spec[2], device=dev)
                for dev in model.layer_devices()
            ]
            cache_spec = spec
        seq_lens = lens.tolist()
        meta = AttentionMetadata(
            slot_mapping=slots.to(cache_device),
            query_start_loc=qsl.tolist(),
            seq_lens=seq_lens,
            block_tables=tables.view(S, width).to(cache_device),
            num_prefills=num_prefills,
            block_size=block_size,
            seq_lens_tensor=lens.to(cache_device) if has_lens else None,
        )
        model(ids.to(input_device), pos.to(input_device), caches, meta)


def _load_shard(spec: TPLoadSpec, path: str, d: _Dist) -> ChatGLMForCausalLM:
    from chatglm_serve.model.loader import load_checkpoint

    return load_checkpoint(
        path, dtype=spec.dtype, device=d.device, tensor_parallel=_tensor_parallel(path, d)
    )


def _worker_main(
    rank: int,
    world_size: int,
    device: str,
    init_method: str,
    spec: TPLoadSpec,
    path: str,
    conn: Any,
    timeout_s: float,
) -> None:
    """Entry point of a spawned worker process."""
    try:
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        conn.send(("alive", rank))
        d = _init(rank, world_size, device, init_method, timeout_s)
        model = _load_shard(spec, path, d)
        conn.send(("ready", rank))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    try:
        serve_worker(model, d)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _process_context() -> Any:
    """forkserver where there is one: torch is imported once, in the fork server, and each
    worker forks from it (CUDA is never initialised there, so forking is safe); else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["chatglm_serve.engine.tp_worker"])
        return ctx
    return mp.get_context("spawn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _await(conns: list[Any], procs: list[Any], want: str, timeout_s: float) -> None:
    """Wait for every worker to report `want`; a worker error or death is raised here."""
    deadline = time.monotonic() + timeout_s
    pending = dict(enumerate(conns))
    while pending:
        for i, conn in list(pending.items()):
            if conn.poll(0.05):
                msg = conn.recv()
                if msg[0] == "error":
                    raise RuntimeError(f"tensor-parallel worker rank {i + 1} failed:\n{msg[1]}")
                if msg[0] == want:
                    del pending[i]
            elif not procs[i].is_alive():
                raise RuntimeError(
                    f"tensor-parallel worker rank {i + 1} exited (code {procs[i].exitcode}) "
                    f"before it was {want}"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel workers not {want} after {timeout_s:.0f} s")


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun with more than one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        rank = int(os.environ["RANK"])
        return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))
    return None


def start_tensor_parallel(
    spec: TPLoadSpec,
    world_size: int,
    devices: list[str] | None = None,
    timeout_s: float = 1800.0,
) -> tuple[TPLeaderModel, Any] | None:
    """Bring up the tensor-parallel group and load this process's shard.

    Returns (model, tokenizer) in rank 0: the model is a TPLeaderModel, to be handed to the
    engine and `close()`d at shutdown. Under torchrun, a rank other than 0 serves rank 0's
    steps and returns None once rank 0 closes the group (the caller then exits).
    """
    path = _resolve_path(spec.path)
    check_tensor_parallel(ChatGLMConfig.from_json(Path(path)), world_size)
    run = torchrun_rank()
    if run is not None:
        rank, world, local_rank = run
        if world != world_size:
            raise ValueError(
                f"tensor_parallel_size {world_size} but torchrun started {world} processes"
            )
        device = (devices or default_tp_devices(world))[local_rank]
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        d = _init(rank, world, device, "env://", timeout_s)
        model = _load_shard(spec, path, d)
        if rank != 0:
            try:
                serve_worker(model, d)
            finally:
                dist.destroy_process_group()
            return None
        procs: list[Any] = []
    else:
        devices = [normalize_device(d) for d in devices or default_tp_devices(world_size)]
        if len(devices) != world_size:
            raise ValueError(
                f"tensor_parallel_size {world_size} needs {world_size} devices, got {devices}"
            )
        # refused here, before any process starts: a worker that fails before the rendezvous
        # would leave rank 0 waiting for it until the timeout
        check_devices_exist(devices)
        if len({torch.device(d).type for d in devices}) > 1:
            raise ValueError(f"tensor-parallel ranks must all be GPUs or all CPUs, not {devices}")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = _process_context()
        procs, conns = [], []
        for rank in range(1, world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_worker_main,
                args=(rank, world_size, devices[rank], init_method, spec, path, child, timeout_s),
                daemon=True,
                name=f"chatglm-tp-rank{rank}",
            )
            p.start()
            procs.append(p)
            conns.append(parent)
        try:
            _await(conns, procs, "alive", timeout_s)
            if spec.num_threads:
                torch.set_num_threads(spec.num_threads)
            d = _init(0, world_size, devices[0], init_method, timeout_s)
            model = _load_shard(spec, path, d)
            _await(conns, procs, "ready", timeout_s)
        except BaseException:
            for p in procs:
                p.terminate()
                p.join(5)
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
    log.info(
        "tensor parallel: %d ranks on %s; this rank holds %d of %d query heads, %d of %d KV "
        "groups, %.1f MiB of weights",
        world_size,
        ",".join(devices) if devices else "torchrun devices",
        model.layers[0].self_attention.num_heads,
        model.config.num_attention_heads,
        model.layers[0].self_attention.num_kv_heads,
        model.config.num_kv_heads,
        sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    )
    tokenizer = None
    if spec.tokenizer:
        from chatglm_serve.model.family import detect_family, load_tokenizer

        tokenizer = load_tokenizer(detect_family(path))
    return TPLeaderModel(model, d, procs), tokenizer
