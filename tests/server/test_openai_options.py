"""OpenAI request options beyond the basics: logit_bias is applied, bad values are 400s."""

from __future__ import annotations

import pytest

from tests.server.conftest import wait_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

USER = [{"role": "user", "content": "你好"}]


async def test_logit_bias_forces_a_token(client, engine):
    token = engine.tokenizer.encode("猫", add_special_tokens=False)[-1]
    body = {"messages": USER, "temperature": 0, "max_tokens": 3}
    plain = (await client.post("/v1/chat/completions", json=body)).json()
    forced = engine.tokenizer.decode([token] * 3)
    assert plain["choices"][0]["message"]["content"] != forced
    r = await client.post("/v1/chat/completions", json={**body, "logit_bias": {str(token): 100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == forced
    wait_idle(engine)


@pytest.mark.parametrize(
    "bias",
    [{"abc": 1}, {"5": 101}, {"5": "much"}, {"999999999": 1}],
)
async def test_bad_logit_bias_is_400_naming_it(client, bias):
    r = await client.post(
        "/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "logit_bias": bias}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("logit_bias")


async def test_logit_bias_on_completions(client, engine):
    token = engine.tokenizer.encode("猫", add_special_tokens=False)[-1]
    body = {"prompt": "Once upon a time", "temperature": 0, "max_tokens": 3}
    forced = engine.tokenizer.decode([token] * 3)
    plain = (await client.post("/v1/completions", json=body)).json()
    assert plain["choices"][0]["text"] != forced
    r = await client.post("/v1/completions", json={**body, "logit_bias": {str(token): 100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == forced
    bad = await client.post("/v1/completions", json={**body, "logit_bias": {"5": 101}})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("logit_bias")
    wait_idle(engine)
