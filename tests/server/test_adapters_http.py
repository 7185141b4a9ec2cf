"""Fine-tunes over HTTP: selected by `model`, listed with their base, loaded/unloaded at run time."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from chatglm_serve.engine.async_engine import AsyncEngine
from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.model.loader import load_model_and_tokenizer
from chatglm_serve.server.app import create_app
from tests.adapters_util import write_peft_lora, write_ptuning
from tests.server.conftest import settings

GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
USER = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    model, _ = load_model_and_tokenizer(None, dtype="float32", device="cpu")
    root = tmp_path_factory.mktemp("ft")
    return {
        "tuned": write_peft_lora(root / "lora", model.config, r=4, seed=1, std=0.5),
        "other": write_peft_lora(root / "lora2", model.config, r=8, seed=2, std=0.5),
        "prefixed": write_ptuning(root / "pt", model.config, pre_seq_len=16, projection=True),
    }


@pytest.fixture(scope="module")
def engine(dirs):
    # its own copy of the demo model: adapters hook the model's linears
    model, tokenizer = load_model_and_tokenizer(None, dtype="float32", device="cpu")
    config = EngineConfig(
        max_num_seqs=8,
        kv_cache_tokens=8 * 256,
        max_model_len=256,
        adapters={"tuned": str(dirs["tuned"]), "prefixed": str(dirs["prefixed"])},
        max_loras=2,
    )
    engine = AsyncEngine(model, tokenizer, config)
    engine.start()
    yield engine
    asyncio.run(engine.shutdown(timeout=2))


@pytest.fixture
async def client(engine, dirs):
    app = create_app(
        settings(lora=[f"tuned={dirs['tuned']}", f"prefixed={dirs['prefixed']}"], api_keys=["k"]),
        engine=engine,
    )
    transport = httpx.ASGITransport(app)
    headers = {"Authorization": "Bearer k"}
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as c:
        yield c


async def _reply(client, model: str | None) -> dict:
    body = {"messages": USER, **GREEDY} | ({"model": model} if model else {})
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_models_lists_fine_tunes_with_their_base(client):
    cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
    assert cards["tuned"]["parent"] == "chatglm2-6b"
    assert cards["prefixed"]["parent"] == "chatglm2-6b"
    assert cards["chatglm2-6b"]["parent"] is None
    assert (await client.get("/v1/models/tuned")).json()["parent"] == "chatglm2-6b"


async def test_model_field_selects_the_adapter(client):
    base, tuned, prefixed, again = await asyncio.gather(
        _reply(client, None), _reply(client, "tuned"), _reply(client, "prefixed"),
        _reply(client, "tuned"),
    )  # fmt: skip
    text = {k: r["choices"][0]["message"]["content"] for k, r in
            [("base", base), ("tuned", tuned), ("prefixed", prefixed), ("again", again)]}  # fmt: skip
    assert tuned["model"] == "tuned" and prefixed["model"] == "prefixed"
    assert base["model"] == "chatglm2-6b"
    assert text["tuned"] == text["again"]
    assert len({text["base"], text["tuned"], text["prefixed"]}) == 3


async def test_completions_model_field_selects_the_adapter(client):
    async def text(model: str | None) -> str:
        body = {"prompt": "Once upon a time", **GREEDY} | ({"model": model} if model else {})
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == (model or "chatglm2-6b")
        return r.json()["choices"][0]["text"]

    base, tuned, prefixed, again = await asyncio.gather(
        text(None), text("tuned"), text("prefixed"), text("tuned")
    )
    assert tuned == again and tuned != base and prefixed != base


async def test_runtime_load_and_unload(client, dirs, tmp_path):
    r = await client.post(
        "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path)}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    r = await client.post(
        "/v1/load_lora_adapter", json={"lora_name": "tuned", "lora_path": str(dirs["other"])}
    )
    assert r.status_code == 400  # the name is taken
    r = await client.post(
        "/v1/load_lora_adapter", json={"lora_name": "other", "lora_path": str(dirs["other"])}
    )
    assert r.status_code == 200, r.text
    ids = [c["id"] for c in (await client.get("/v1/models")).json()["data"]]
    assert "other" in ids
    assert (await _reply(client, "other"))["model"] == "other"
    r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "other"})
    assert r.status_code == 200
    r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "other"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    # an unloaded name is the base again
    assert (await _reply(client, "other"))["model"] == "chatglm2-6b"


async def test_load_endpoint_needs_the_api_key(engine, dirs):
    app = create_app(settings(api_keys=["k"]), engine=engine)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        body = {"lora_name": "x", "lora_path": str(dirs["other"])}
        assert (await c.post("/v1/load_lora_adapter", json=body)).status_code == 401


def test_lora_flags_env_and_yaml_reach_the_engine_config(tmp_path):
    from chatglm_serve.server.cli import parse
    from chatglm_serve.server.settings import SettingsError, engine_config, load_settings

    _, _, s = parse(["--lora", "a=/x/a", "--lora", "b=/x/b", "--max-loras", "3"])
    cfg = engine_config(s)
    assert cfg.adapters == {"a": "/x/a", "b": "/x/b"} and cfg.max_loras == 3
    s = load_settings({}, environ={"CHATGLM_LORA": "a=/x/a,c=/x/c"})
    assert engine_config(s).adapters == {"a": "/x/a", "c": "/x/c"}
    yml = tmp_path / "c.yaml"
    yml.write_text("lora: ['a=/x/a']\nptuning_checkpoint: /x/pt\nblock_size: 8\n")
    _, _, s = parse(["--config", str(yml)])
    cfg = engine_config(s)
    assert cfg.adapters == {"a": "/x/a"} and cfg.ptuning_checkpoint == "/x/pt"
    assert cfg.block_size == 8
    cfg = engine_config(settings(ptuning_checkpoint="pt=/x/pt"))  # a named prefix
    assert cfg.adapters == {"pt": "/x/pt"} and cfg.ptuning_checkpoint is None
    with pytest.raises(SettingsError, match="NAME=DIR"):
        engine_config(settings(lora=["/x/no-name"]))
    with pytest.raises(SettingsError, match="used twice"):
        engine_config(settings(lora=["chatglm2-6b=/x/a"]))
