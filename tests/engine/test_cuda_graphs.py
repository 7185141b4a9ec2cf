"""Decode steps padded to a bucket and run on static buffers (engine/cuda_graphs.py).

Without a GPU the padded static-buffer path runs through EagerStrategy, which calls the model on
the same buffers a CUDA graph would be captured from: same logits as the plain step, padding
rows writing only the scratch block, prefills and oversize steps left to the plain path. The
graph replay itself is checked only where a CUDA GPU is present.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.engine.cuda_graphs import (
    CUDAGraphStrategy,
    EagerStrategy,
    batch_buckets,
    decode_graph_device,
    width_buckets,
)
from chatglm_serve.engine.model_runner import ModelRunner, plan_kv_cache
from chatglm_serve.engine.scheduler import ScheduledSeq
from chatglm_serve.engine.sequence import Request, Sequence
from chatglm_serve.engine.types import SamplingParams
from chatglm_serve.kernels import cpu_decode
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.demo import demo_config
from tests.engine.harness import make_engine, run

MAX_LEN = 128  # 8 blocks of 16 per sequence
NUM_BLOCKS = 16 * 8 + 8


def new_seq(ids: list[int], table: list[int]) -> Sequence:
    seq = Sequence(0, Request("r", ids, SamplingParams(), 10), 0, None, None)
    seq.block_table = table
    return seq


def make_runners(model, *strategies, max_num_seqs=16, cuda_graphs=False):
    cfg = EngineConfig(
        num_blocks=NUM_BLOCKS,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=4096,
        cuda_graphs=cuda_graphs,
    )
    plan = plan_kv_cache(model, cfg)
    plain = ModelRunner(model, dataclasses.replace(cfg, cuda_graphs=False), plan, MAX_LEN)
    assert plain.graphs is None
    others = [ModelRunner(model, cfg, plan, MAX_LEN, decode_graphs=s) for s in strategies]
    return plain, others


def make_seqs(n: int, seed: int, lengths: list[int] | None = None) -> list[Sequence]:
    """n sequences of mixed prompt lengths, each with 8 blocks taken from a shuffled pool."""
    rng = random.Random(seed)
    blocks = list(range(NUM_BLOCKS))
    rng.shuffle(blocks)
    lengths = lengths or [rng.randint(2, MAX_LEN - 12) for _ in range(n)]
    return [
        new_seq([rng.randrange(5, 200) for _ in range(lengths[i])], blocks[8 * i : 8 * i + 8])
        for i in range(n)
    ]


def prefill_then_decode(runners, seqs, steps: int):
    """Prefill every sequence, then decode `steps` tokens; each step's logits from each runner."""
    out = []
    # prompt chunks before single tokens (a one-token prompt is decode-shaped)
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].num_tokens == 1)
    batch = [ScheduledSeq(seqs[i], seqs[i].num_tokens) for i in order]
    back = torch.tensor(order).argsort()
    logits = [r.execute(batch)[back.to(r.cache_device)] for r in runners]
    out.append(logits)
    for s in seqs:
        s.num_computed_tokens = s.num_tokens
    for _ in range(steps):
        for s, row in zip(seqs, logits[0], strict=True):
            s.token_ids.append(int(row.argmax()))
        batch = [ScheduledSeq(s, 1) for s in seqs]
        logits = [r.execute(batch) for r in runners]
        out.append(logits)
        for s in seqs:
            s.num_computed_tokens += 1
    return out


@pytest.fixture(params=["cpu kernels", "gather + sdpa"])
def attention_path(request, model, monkeypatch):
    """The CPU decode kernels (when they build), or the gather + SDPA path CUDA would take."""
    if request.param == "gather + sdpa":
        monkeypatch.setattr(model, "use_decode_stack", False)
        monkeypatch.setattr(cpu_decode, "attention_supports", lambda q, kv_cache: False)
    return request.param


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(1) == [1]
    assert width_buckets(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert width_buckets(100) == [16, 32, 64, 100]
    assert width_buckets(8) == [8]
    assert width_buckets(8, min_width=1) == [1, 2, 4, 8]


@pytest.mark.parametrize("n", [1, 3, 5, 13, 16])
@pytest.mark.parametrize("min_width", [1, 16])
def test_padded_decode_matches_the_plain_step(model, attention_path, n, min_width):
    plain, (padded,) = make_runners(model, EagerStrategy())
    g = padded.graphs
    assert g is not None and g.scratch_block == NUM_BLOCKS
    assert padded.kv_caches[0].shape[1] == NUM_BLOCKS + 1  # the scratch block, past the plan's
    assert plain.kv_caches[0].shape[1] == NUM_BLOCKS
    g.width_buckets = width_buckets(padded.max_blocks_per_seq, min_width)
    steps = prefill_then_decode([plain, padded], make_seqs(n, seed=n), steps=4)
    for want, got in steps:
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert g.replays == 4  # every decode step went through the static buffers, no prefill did
    bucket = min(b for b in g.batch_buckets if b >= n)
    assert {b for b, _ in g.captured} == {bucket}
    assert {w for _, w in g.captured} <= set(g.width_buckets)
    # the real sequences' blocks hold the same K/V either way
    for a, b in zip(plain.kv_caches, padded.kv_caches, strict=True):
        torch.testing.assert_close(b[:, :NUM_BLOCKS], a, rtol=1e-4, atol=1e-4)


def test_block_tables_of_different_widths_share_a_bucket(model, attention_path):
    """Lengths 1..100: tables 1 to 7 blocks wide, padded to the width buckets."""
    plain, (padded,) = make_runners(model, EagerStrategy())
    padded.graphs.width_buckets = [2, 4, 8]
    seqs = make_seqs(5, seed=7, lengths=[1, 17, 30, 64, 100])
    steps = prefill_then_decode([plain, padded], seqs, steps=3)
    for want, got in steps:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert padded.graphs.captured == [(8, 8)]  # the longest has 7 blocks
    seqs = make_seqs(3, seed=8, lengths=[1, 2, 20])  # new sequences, fresh blocks
    plain, (padded,) = make_runners(model, EagerStrategy())
    padded.graphs.width_buckets = [2, 4, 8]
    for want, got in prefill_then_decode([plain, padded], seqs, steps=2):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert padded.graphs.captured == [(4, 2)]


@pytest.mark.parametrize("n", [3, 5])
def test_padding_rows_write_only_the_scratch_block(model, attention_path, n):
    _, (padded,) = make_runners(model, EagerStrategy())
    seqs = make_seqs(n, seed=100 + n)
    prefill_then_decode([padded], seqs, steps=1)
    for c in padded.kv_caches:  # the last step's padding rows wrote the same K/V there
        c[:, NUM_BLOCKS].zero_()
    before = [c.clone() for c in padded.kv_caches]
    for s in seqs:
        s.token_ids.append(7)
    batch = [ScheduledSeq(s, 1) for s in seqs]
    bs = padded.block_size
    real = {s.block_table[(s.num_tokens - 1) // bs] * bs + (s.num_tokens - 1) % bs for s in seqs}
    padded.execute(batch)
    assert padded.graphs.replays == 2
    for old, new in zip(before, padded.kv_caches, strict=True):
        changed = (old != new).flatten(3).any(-1).any(0).flatten()  # per slot
        slots = set(changed.nonzero().flatten().tolist())
        # the real tokens' slots, and slot 0 of the scratch block for the padding rows
        assert slots == real | {NUM_BLOCKS * bs}


def test_prefills_and_oversize_steps_bypass_the_runner(model, attention_path):
    plain, (padded,) = make_runners(model, EagerStrategy())
    g = padded.graphs
    seqs = make_seqs(3, seed=3, lengths=[20, 9, 33])
    prefill_then_decode([plain, padded], seqs[:2], steps=0)
    assert g.replays == 0 and g.captured == []
    # a step mixing a prefill with decodes runs the plain path too
    for s in seqs[:2]:
        s.token_ids.append(11)
    mixed = [ScheduledSeq(seqs[2], 33)] + [ScheduledSeq(s, 1) for s in seqs[:2]]
    torch.testing.assert_close(padded.execute(mixed), plain.execute(mixed), rtol=1e-4, atol=1e-4)
    assert g.replays == 0
    for s in seqs:
        s.num_computed_tokens = s.num_tokens
        s.token_ids.append(12)
    # more sequences than the largest bucket: plain path
    g.batch_buckets = [1, 2]
    batch = [ScheduledSeq(s, 1) for s in seqs]
    torch.testing.assert_close(padded.execute(batch), plain.execute(batch), rtol=1e-4, atol=1e-4)
    assert g.replays == 0
    # wider block tables than the widest bucket: plain path
    g.batch_buckets, g.width_buckets = [4], [1]
    torch.testing.assert_close(padded.execute(batch), plain.execute(batch), rtol=1e-4, atol=1e-4)
    assert g.replays == 0
    g.width_buckets = [4]
    torch.testing.assert_close(padded.execute(batch), plain.execute(batch), rtol=1e-4, atol=1e-4)
    assert g.replays == 1


def test_decode_rows_that_do_not_sample(model, attention_path):
    """A one-token chunk inside a prompt is a decode-shaped row whose logits are not wanted."""
    plain, (padded,) = make_runners(model, EagerStrategy())
    a, b = make_seqs(2, seed=5, lengths=[20, 12])
    prefill_then_decode([plain, padded], [b], steps=0)
    a_batch = [ScheduledSeq(a, 18)]
    plain.execute(a_batch)
    padded.execute(a_batch)
    a.num_computed_tokens = 18
    b.num_computed_tokens = 12
    b.token_ids.append(40)
    batch = [ScheduledSeq(a, 1), ScheduledSeq(b, 1)]  # a's 19th of 20 prompt tokens
    want, got = plain.execute(batch), padded.execute(batch)
    assert got.shape == want.shape == (1, model.config.padded_vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert padded.graphs.replays == 1


def test_failed_capture_falls_back_to_the_plain_path(model):
    class Broken:
        name = "broken"

        def build(self, step):
            raise RuntimeError("operation not permitted when stream is capturing")

    plain, (padded,) = make_runners(model, Broken())
    seqs = make_seqs(2, seed=9)
    for want, got in prefill_then_decode([plain, padded], seqs, steps=2):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not padded.graphs.enabled and padded.graphs.replays == 0


def requests_and_plain_run(model, tokenizer, seed: int, n: int, max_tokens: int):
    """n greedy requests of 3-60 prompt tokens, and what the plain engine makes of them."""
    rng = random.Random(seed)
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [
        (f"r{i}", [rng.randrange(5, 200) for _ in range(rng.randint(3, 60))], greedy)
        for i in range(n)
    ]
    return reqs, run(make_engine(model, tokenizer, max_num_batched_tokens=48), reqs, stagger=2)


def test_engine_generates_the_same_with_padded_decode_steps(model, tokenizer, attention_path):
    reqs, want = requests_and_plain_run(model, tokenizer, seed=0, n=7, max_tokens=12)
    eng = make_engine(model, tokenizer, max_num_batched_tokens=48)
    eng.runner = ModelRunner(
        model, eng.config, eng.kv_plan, eng.max_model_len, decode_graphs=EagerStrategy()
    )
    eng.runner.graphs.width_buckets = width_buckets(eng.runner.max_blocks_per_seq, 2)
    got = run(eng, reqs, stagger=2)
    assert {k: r.token_ids for k, r in got.items()} == {k: r.token_ids for k, r in want.items()}
    assert eng.runner.graphs.replays > 0
    assert len(eng.runner.graphs.captured) > 1


def test_graphs_only_for_a_whole_model_on_one_cuda_device(model, monkeypatch):
    import chatglm_serve.engine.cuda_graphs as cg

    assert decode_graph_device(model, True) is None  # on the CPU
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    layers = model.config.num_layers
    monkeypatch.setattr(cg, "_module_device", lambda m: cuda0)
    monkeypatch.setattr(model, "layer_devices", lambda: [cuda0] * layers)
    assert decode_graph_device(model, True) == cuda0
    assert decode_graph_device(model, False) is None  # --no-cuda-graphs
    monkeypatch.setattr(model, "layer_devices", lambda: [cuda0] * (layers - 1) + [cuda1])
    assert decode_graph_device(model, True) is None  # a layer split

    class Leader:  # tensor parallel's rank-0 model wraps the module
        def __getattr__(self, name):
            return getattr(model, name)

    assert decode_graph_device(Leader(), True) is None


def test_runner_without_graphs_on_cpu(model):
    cfg = EngineConfig(num_blocks=8, max_num_seqs=4, max_num_batched_tokens=64)
    assert cfg.cuda_graphs
    runner = ModelRunner(model, cfg, plan_kv_cache(model, cfg), max_model_len=128)
    assert runner.graphs is None and runner.kv_caches[0].shape[1] == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_matches_eager(tokenizer, dtype):
    cfg = dataclasses.replace(demo_config(tokenizer.vocab_size), seq_length=512)
    model = ChatGLMForCausalLM.random(cfg, dtype=dtype, device="cuda", seed=1234, std=0.5)
    # decode_graphs=None: the runner picks CUDA graphs itself (cuda_graphs=True, one CUDA device)
    plain, (eager, graphed) = make_runners(model, EagerStrategy(), None, cuda_graphs=True)
    assert isinstance(graphed.graphs.strategy, CUDAGraphStrategy)
    assert isinstance(eager.graphs.strategy, EagerStrategy)
    fp32 = dtype == torch.float32
    tol = {"rtol": 1e-4, "atol": 1e-4} if fp32 else {"rtol": 2e-2, "atol": 5e-2}
    same = {"rtol": 1e-5, "atol": 1e-5} if fp32 else {"rtol": 1e-2, "atol": 1e-2}
    for n in (1, 3, 5, 16):
        seqs = make_seqs(n, seed=n)
        before = graphed.graphs.replays
        for want, e, got in prefill_then_decode([plain, eager, graphed], seqs, steps=5):
            # graph replay runs exactly the eager static step's kernels
            torch.testing.assert_close(got, e, **same)
            torch.testing.assert_close(got, want, **tol)
        assert graphed.graphs.replays == before + 5
        for r in (plain, eager, graphed):  # fresh caches for the next batch size
            for c in r.kv_caches:
                c.zero_()
    torch.cuda.synchronize()


# ---------------------------------------------------------------- one copy per eager step
def test_step_inputs_are_views_of_one_upload():
    from chatglm_serve.engine.step_inputs import StepInputs

    staging = StepInputs(pin=False)
    tables = np_tables()
    parts = [[5, 6, 7], tables[:2, :3], [9], list(range(2000))]
    got = staging.upload(parts, torch.device("cpu"))
    assert staging.copies == 1
    assert [t.shape for t in got] == [(3,), (2, 3), (1,), (2000,)]  # the buffer grew past 1024
    assert got[0].tolist() == [5, 6, 7] and got[2].tolist() == [9]
    assert torch.equal(got[1], torch.from_numpy(tables[:2, :3]))
    assert got[3].tolist() == list(range(2000))
    assert all(t.dtype == torch.int64 for t in got)
    assert got[0].untyped_storage().data_ptr() == got[3].untyped_storage().data_ptr()
    again = staging.upload([[1, 2]], torch.device("cpu"))  # the buffer is reused...
    assert again[0].tolist() == [1, 2] and got[0].tolist() == [5, 6, 7]  # ...the last step kept


def np_tables():
    import numpy as np

    return np.arange(24, dtype=np.int64).reshape(4, 6)


def test_engine_with_one_upload_per_eager_step_generates_the_same(model, tokenizer):
    """The single-copy staging GPU runners use for eager steps (prefills, mixed batches),
    forced on the CPU: the same greedy tokens, one upload per eager step."""
    from chatglm_serve.engine.step_inputs import StepInputs

    reqs, want = requests_and_plain_run(model, tokenizer, seed=1, n=5, max_tokens=8)
    eng = make_engine(model, tokenizer, max_num_batched_tokens=48)
    assert eng.runner.staging is None  # on the CPU the tensors are made one by one
    eng.runner.staging = StepInputs(pin=False)
    got = run(eng, reqs, stagger=2)
    assert {k: r.token_ids for k, r in got.items()} == {k: r.token_ids for k, r in want.items()}
    assert eng.runner.staging.copies >= len(reqs)  # at least each prefill went through it
