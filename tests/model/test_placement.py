"""Layer-split placement: the pure planner (balanced, complete, contiguous) and real loads."""

from __future__ import annotations

import itertools
import json
import logging
import random

import pytest
import torch

from chatglm_serve.model.config import ChatGLMConfig
from chatglm_serve.model.loader import load_checkpoint
from chatglm_serve.model.placement import (
    EMBEDDING,
    FINAL_NORM,
    OUTPUT_LAYER,
    ModuleSizes,
    PlacementError,
    config_sizes,
    module_sizes,
    parse_device_map,
    parse_devices,
    plan_for_checkpoint,
    plan_placement,
    unit_of_key,
)
from tests.paged import PagedRunner

GiB = 1 << 30


def sizes_6b() -> ModuleSizes:
    return config_sizes(ChatGLMConfig(), "float16")


def planning_units(s: ModuleSizes) -> list[int]:
    # what the planner splits: embedding, each layer, then the final norm with the output layer
    return [s.embedding, *s.layers, s.final_norm + s.output_layer]


def best_max_by_cuts(weights: list[int], k: int) -> int:
    """Brute force over every way to cut the pipeline into k (possibly empty) runs."""
    m = len(weights)
    best = None
    for cuts in itertools.combinations_with_replacement(range(m + 1), k - 1):
        bounds = [0, *cuts, m]
        worst = max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds))
        best = worst if best is None else min(best, worst)
    return best


def best_max_by_greedy(weights: list[int], k: int) -> int:
    """The classic check (independent of the planner): smallest limit a greedy packing meets."""

    def fits(limit: int) -> bool:
        stages, run = 1, 0
        for w in weights:
            if w > limit:
                return False
            if run + w > limit:
                stages, run = stages + 1, 0
            run += w
        return stages <= k

    lo, hi = max(weights), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


def assert_complete_and_contiguous(plan, n_layers: int) -> None:
    units = [EMBEDDING, *(f"layers.{i}" for i in range(n_layers)), FINAL_NORM, OUTPUT_LAYER]
    stages = [plan.stage_of(u) for u in units]
    assert all(0 <= s < len(plan.devices) for s in stages)
    assert stages == sorted(stages), "the pipeline must visit devices in order"
    assert plan.final_norm == plan.output_layer
    assert sum(plan.bytes_per_stage()) == plan.sizes.total
    assert sum(plan.bytes_per_device().values()) == plan.sizes.total


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8])
def test_6b_plan_is_complete_and_as_balanced_as_possible(k):
    s = sizes_6b()
    plan = plan_placement(s, [f"cuda:{i}" for i in range(k)])
    assert_complete_and_contiguous(plan, 28)
    worst = max(plan.bytes_per_stage())
    assert worst == best_max_by_greedy(planning_units(s), k)
    assert worst <= s.total / k + max(planning_units(s))
    if k <= 8:  # every device has work: the model has 30 units
        assert all(b > 0 for b in plan.bytes_per_stage())


def test_6b_on_two_gpus_splits_at_the_middle_counting_embedding_and_head():
    plan = plan_placement(sizes_6b(), ["cuda:0", "cuda:1"])
    assert plan.to_device_map() == {
        "embedding": "cuda:0",
        "layers.0-13": "cuda:0",
        "layers.14-27": "cuda:1",
        "final_layernorm": "cuda:1",
        "output_layer": "cuda:1",
    }
    assert plan.num_boundaries() == 1
    a, b = plan.bytes_per_stage()
    assert abs(a - b) < sizes_6b().layers[0]


def test_embedding_and_head_are_counted():
    # With a huge embedding, the first device must take fewer layers than the second.
    s = ModuleSizes(embedding=600, layers=(100,) * 8, final_norm=1, output_layer=0)
    plan = plan_placement(s, ["cuda:0", "cuda:1"])
    assert plan.layers.count(0) < plan.layers.count(1)
    assert max(plan.bytes_per_stage()) == best_max_by_cuts(planning_units(s), 2)


@pytest.mark.parametrize("seed", range(12))
def test_random_sizes_match_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    s = ModuleSizes(
        embedding=rng.randint(1, 500),
        layers=tuple(rng.randint(1, 300) for _ in range(n)),
        final_norm=rng.randint(0, 5),
        output_layer=rng.randint(1, 500),
    )
    k = rng.randint(1, 4)
    plan = plan_placement(s, [f"cuda:{i}" for i in range(k)])
    assert_complete_and_contiguous(plan, n)
    assert max(plan.bytes_per_stage()) == best_max_by_cuts(planning_units(s), k)


def test_repeated_device_is_two_pipeline_stages():
    plan = plan_placement(sizes_6b(), ["cpu", "cpu"])
    assert plan.devices == ("cpu", "cpu")
    assert set(plan.layers) == {0, 1}
    assert plan.bytes_per_device() == {"cpu": sizes_6b().total}


def test_mixed_gpu_cpu_fills_the_gpu_budget_first():
    s = sizes_6b()
    plan = plan_placement(s, ["cuda:0", "cpu"], budgets={"cuda:0": 8 * GiB})
    assert_complete_and_contiguous(plan, 28)
    gpu, cpu = plan.bytes_per_stage()
    assert gpu <= 8 * GiB
    # the next unit would not have fit: nothing that could be on the GPU was left on the CPU
    first_cpu_layer = plan.layers.index(1)
    assert gpu + s.layers[first_cpu_layer] > 8 * GiB
    assert cpu == s.total - gpu
    # a GPU with room for everything leaves the CPU empty
    roomy = plan_placement(s, ["cuda:0", "cpu"], budgets={"cuda:0": 20 * GiB})
    assert roomy.bytes_per_stage() == [s.total, 0]


def test_mixed_with_two_gpus_balances_the_gpus_and_spills_the_rest():
    s = sizes_6b()
    plan = plan_placement(
        s, ["cuda:0", "cuda:1", "cpu"], budgets={"cuda:0": 4 * GiB, "cuda:1": 4 * GiB}
    )
    assert_complete_and_contiguous(plan, 28)
    g0, g1, cpu = plan.bytes_per_stage()
    assert g0 <= 4 * GiB and g1 <= 4 * GiB and cpu > 0
    assert cpu < s.total - 7 * GiB  # the GPUs are nearly full, the CPU holds the remainder


def test_budgets_that_cannot_hold_the_model_are_refused():
    with pytest.raises(PlacementError, match="do not fit"):
        plan_placement(
            sizes_6b(), ["cuda:0", "cuda:1"], budgets={"cuda:0": 4 * GiB, "cuda:1": 4 * GiB}
        )


def test_budget_of_a_repeated_device_is_shared():
    s = ModuleSizes(embedding=10, layers=(10,) * 4, final_norm=0, output_layer=10)
    with pytest.raises(PlacementError):
        plan_placement(s, ["cuda:0", "cuda:0"], budgets={"cuda:0": 50})
    plan = plan_placement(s, ["cuda:0", "cuda:0"], budgets={"cuda:0": 60})
    assert plan.bytes_per_stage() == [30, 30]


def test_explicit_device_map_round_trips_and_accepts_the_seeds_names():
    s = sizes_6b()
    short = {
        "embedding": "cuda:0",
        "layers.0-9": "cuda:0",
        "layers.10-27": "cuda:1",
        "final_layernorm": "cuda:0",
        "output_layer": "cuda:0",
    }
    plan = plan_placement(s, ["cuda:0", "cuda:1"], device_map=short)
    assert plan.device_of("layers.9") == "cuda:0" and plan.device_of("layers.10") == "cuda:1"
    assert plan.device_of(OUTPUT_LAYER) == "cuda:0"
    assert plan.num_boundaries() == 2  # there and back
    assert plan_placement(s, [], device_map=plan.to_device_map()) == plan

    # the form the seed's load_model_on_gpus builds
    seed = {
        "transformer.embedding.word_embeddings": 0,
        "transformer.encoder.final_layernorm": 0,
        "transformer.output_layer": 0,
        "transformer.rotary_pos_emb": 0,
        **{f"transformer.encoder.layers.{i}": "cuda:0" if i < 10 else "cuda:1" for i in range(28)},
    }
    seed = {k: f"cuda:{v}" if isinstance(v, int) else v for k, v in seed.items()}
    assert plan_placement(s, [], device_map=seed) == plan


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        (
            {
                "embedding": "cpu",
                "layers.0-26": "cpu",
                "final_layernorm": "cpu",
                "output_layer": "cpu",
            },
            "layer 27",
        ),
        ({"embedding": "cpu", "layers.0-27": "cpu", "final_layernorm": "cpu"}, "output layer"),
        ({"embedding": "cpu", "layers.0-28": "cpu"}, "outside layers 0-27"),
        ({"embedings": "cpu"}, "unknown key"),
        ({"embedding": "cpu", "transformer.embedding": "cuda:0"}, "assigned twice"),
        ({"embedding": "gpu7"}, "not a device"),
    ],
)
def test_bad_device_maps_are_refused_by_name(mapping, message):
    with pytest.raises(PlacementError, match=message):
        parse_device_map(mapping, 28)


def test_describe_names_every_device_what_it_holds_and_bytes():
    text = plan_placement(sizes_6b(), ["cuda:0", "cuda:1"]).describe()
    assert "28 layers over 2 device(s)" in text
    line0, line1 = text.splitlines()[1:]
    assert "cuda:0" in line0 and "embedding, layers 0-13" in line0 and "GiB" in line0
    assert "cuda:1" in line1 and "layers 14-27, final norm, output layer" in line1


def test_parse_devices():
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices(["cuda", "cpu"]) == ["cuda:0", "cpu"]
    assert parse_devices(num_gpus=3) == ["cuda:0", "cuda:1", "cuda:2"]
    with pytest.raises(PlacementError, match="not both"):
        parse_devices("cuda:0", num_gpus=2)
    with pytest.raises(PlacementError, match="not a device"):
        parse_devices("gpu0")
    with pytest.raises(PlacementError, match="no devices"):
        parse_devices("")


def test_unit_of_key():
    assert unit_of_key("transformer.embedding.word_embeddings.weight") == EMBEDDING
    assert (
        unit_of_key("transformer.encoder.layers.12.mlp.dense_h_to_4h.weight_scale") == "layers.12"
    )
    assert unit_of_key("transformer.encoder.final_layernorm.weight") == FINAL_NORM
    assert unit_of_key("transformer.output_layer.weight") == OUTPUT_LAYER
    assert unit_of_key("transformer.rotary_pos_emb.inv_freq") == "layers.0"
    with pytest.raises(PlacementError):
        unit_of_key("lm_head.weight")


def test_sizes_count_every_byte(tiny_model, tiny_cfg):
    s = module_sizes(tiny_model)
    assert s.total == sum(t.numel() * t.element_size() for t in tiny_model.state_dict().values())
    assert config_sizes(tiny_cfg, "float16").total * 2 == s.total  # the model is fp32
    assert s.embedding == s.output_layer == tiny_cfg.padded_vocab_size * tiny_cfg.hidden_size * 4


# ------------------------------------------------------------------------------ real loads


def _steps(model) -> torch.Tensor:
    r = PagedRunner(model)
    outs = [r.step([(0, list(range(5, 40))), (1, list(range(50, 57)))])]
    for i in range(4):
        outs.append(r.step([(0, [60 + i]), (1, [70 + i])]))
    return torch.cat(outs)


def test_layer_split_cpu_cpu_streams_each_tensor_to_its_stage(tiny_checkpoints):
    path = tiny_checkpoints["safetensors-sharded"]
    plan = plan_for_checkpoint(path, ["cpu", "cpu"], dtype="float32")
    assert plan.layers == (0, 1), plan.describe()  # the tiny model splits between its 2 layers
    asked: dict[str, int] = {}

    def device_for(key):
        asked[key] = plan.stage_of(unit_of_key(key))
        return plan.device_for(key)

    split = load_checkpoint(path, dtype="float32", device_for=device_for)
    whole = load_checkpoint(path, dtype="float32")
    assert set(asked) == set(whole.state_dict())  # every tensor was placed through the plan
    assert asked["transformer.encoder.layers.0.self_attention.dense.weight"] == 0
    assert asked["transformer.encoder.layers.1.self_attention.dense.weight"] == 1
    assert asked["transformer.output_layer.weight"] == 1
    torch.testing.assert_close(_steps(split), _steps(whole), rtol=0, atol=0)


def test_load_placed_logs_the_plan(caplog):
    from chatglm_serve.model.placement import load_placed

    with caplog.at_level(logging.INFO, logger="chatglm_serve.model.placement"):
        model, tokenizer, plan = load_placed(None, "cpu,cpu", dtype="float32")
    assert "placement plan" in caplog.text and "[1] cpu" in caplog.text
    assert [str(d) for d in model.layer_devices()] == ["cpu", "cpu"]
    assert tokenizer.vocab_size > 0


def test_layer_split_through_the_engine_gives_the_same_greedy_tokens():
    import asyncio

    from chatglm_serve.engine.types import SamplingParams
    from chatglm_serve.server.app import load_engine
    from chatglm_serve.server.settings import load_settings

    def greedy(**values):
        settings = load_settings(
            {"dtype": "float32", "kv_cache_tokens": 2048, "max_model_len": 256, **values},
            environ={},
        )
        engine = load_engine(settings)

        async def go():
            engine.start()
            ids = engine.tokenizer.encode_chat("你好，介绍一下你自己", [])
            params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
            tokens = []
            async for out in engine.generate(ids, params, "r"):
                tokens += out.token_ids
            await engine.shutdown(timeout=2)
            return tokens, engine

        return asyncio.run(go())

    split, engine = greedy(devices=["cpu", "cpu"])
    assert len(engine.engine.model.layer_devices()) == 2
    single, _ = greedy(device="cpu")
    assert len(split) == 12 and split == single


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cpu_split_matches_single_device(tmp_path):
    """A scaled model split cuda:0,cpu (activations cross once each way) matches one device."""
    from chatglm_serve.model.chatglm import ChatGLMForCausalLM
    from chatglm_serve.model.checkpoint import save_checkpoint
    from tests.conftest import tiny_config

    cfg = tiny_config(
        num_layers=6,
        hidden_size=256,
        ffn_hidden_size=512,
        num_attention_heads=8,
        kv_channels=32,
        padded_vocab_size=1024,
    )
    path = save_checkpoint(ChatGLMForCausalLM.random(cfg, seed=3, std=0.05), cfg, tmp_path / "m")
    sizes = config_sizes(cfg, "float32")
    budget = sizes.embedding + sum(sizes.layers[:3])
    plan = plan_for_checkpoint(path, ["cuda:0", "cpu"], dtype="float32", budgets={"cuda:0": budget})
    assert plan.layers == (0, 0, 0, 1, 1, 1), plan.describe()
    split = load_checkpoint(path, dtype="float32", device_for=plan.device_for)
    assert {str(d) for d in split.layer_devices()} == {"cuda:0", "cpu"}
    whole = load_checkpoint(path, dtype="float32", device="cpu")
    torch.testing.assert_close(_steps(split).cpu(), _steps(whole), rtol=1e-4, atol=1e-4)


def test_settings_and_flags_for_placement(tmp_path):
    from chatglm_serve.server.cli import parse
    from chatglm_serve.server.settings import load_settings

    want = {"embedding": "cuda:0", "layers.0-13": "cuda:0", "layers.14-27": "cuda:1"}
    s = load_settings(
        {"device_map": "embedding=cuda:0, layers.0-13=cuda:0,layers.14-27=cuda:1"}, environ={}
    )
    assert s.device_map == want
    s = load_settings(environ={"CHATGLM_DEVICE_MAP": json.dumps(want), "CHATGLM_NUM_GPUS": "2"})
    assert s.device_map == want and s.num_gpus == 2
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "device_map:\n  embedding: cuda:0\n  layers.0-13: cuda:0\n  layers.14-27: cuda:1\n"
    )
    assert load_settings(config_file=yaml_file, environ={}).device_map == want
    _, _, s = parse(
        ["--tensor-parallel-size", "2", "--num-gpus", "2", "--device-map", "embedding=cpu"]
    )
    assert (s.tensor_parallel_size, s.num_gpus, s.device_map) == (2, 2, {"embedding": "cpu"})
    assert load_settings(environ={}).tensor_parallel_size == 1
