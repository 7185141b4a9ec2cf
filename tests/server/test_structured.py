"""Structured output: response_format / guided_* replies of the (random) demo model keep to their
grammar, constrained and free requests sharing the engine's steps."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from tests.server.conftest import wait_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

# bounded schemas: a random model's reply must end (strings and arrays have a maximum length)
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "member": {"type": "boolean"},
        },
        "required": ["name", "age", "member"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 5},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["colour", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "label": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]},
        },
        "required": ["point", "label"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
]


def _body(kind: str, i: int) -> tuple[str, dict, dict | None]:
    """(path, body, schema to validate or None for free text) of request i."""
    schema = SCHEMAS[i % len(SCHEMAS)]
    common = {"max_tokens": 120, "temperature": 1.0, "seed": i}
    fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
    if kind == "chat":
        return (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": f"request {i}"}],
                "response_format": fmt,
                **common,
            },
            schema,
        )
    if kind == "completion":
        return (
            "/v1/completions",
            {"prompt": f"JSON {i}:", "response_format": fmt, **common},
            schema,
        )
    if kind == "guided_json":
        return (
            "/v1/completions",
            {"prompt": f"JSON {i}:", "guided_json": schema, **common},
            schema,
        )
    if kind == "json_object":
        return (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": f"any {i}"}],
                "response_format": {"type": "json_object"},
                **common,
                "max_tokens": 200,
            },
            {"type": "object"},
        )
    return ("/v1/completions", {"prompt": f"free {i}", **common, "max_tokens": 20}, None)


def _text(reply: dict) -> str:
    choice = reply["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


async def test_every_json_reply_validates_against_its_schema(client, engine):
    kinds = ["chat", "completion", "guided_json", "chat", "free"]
    requests = [_body(kinds[i % len(kinds)], i) for i in range(100)]
    sem = asyncio.Semaphore(32)

    async def send(path: str, body: dict):
        async with sem:
            return await client.post(path, json=body)

    replies = await asyncio.gather(*(send(p, b) for p, b, _ in requests))
    constrained = 0
    for (_path, body, schema), r in zip(requests, replies, strict=True):
        assert r.status_code == 200, r.text
        reply = r.json()
        if schema is None:
            continue
        constrained += 1
        assert reply["choices"][0]["finish_reason"] == "stop", (body, _text(reply))
        value = json.loads(_text(reply))
        jsonschema.validate(value, schema)
    assert constrained == 80
    wait_idle(engine)


async def test_json_object_replies_are_json_objects(client):
    """Any JSON object: unbounded, so a random model's reply may run into max_tokens inside a
    string (finish "length", as OpenAI's); every reply that ends is a JSON object."""
    finished = 0
    for i in range(12):
        r = await client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": f"any {i}"}],
                "seed": i,
                "response_format": {"type": "json_object"},
                "max_tokens": 60,
            },
        )
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            finished += 1
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:
            assert choice["finish_reason"] == "length"
            assert choice["message"]["content"].startswith("{")
    assert finished >= 3


async def test_streamed_json_reply_validates(client):
    schema = SCHEMAS[0]
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
            "stream": True,
            "n": 2,
            "max_tokens": 120,
        },
    )
    texts = ["", ""]
    for line in r.text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            for c in json.loads(line[5:])["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
    for text in texts:
        jsonschema.validate(json.loads(text), schema)


async def test_choice_and_regex(client):
    r = await client.post(
        "/v1/completions",
        json={
            "prompt": "pick",
            "guided_choice": ["yes", "no", "maybe so"],
            "n": 4,
            "temperature": 1.0,
            "max_tokens": 10,
        },
    )
    assert r.status_code == 200, r.text
    assert all(c["text"] in ("yes", "no", "maybe so") for c in r.json()["choices"])
    r = await client.post(
        "/v1/completions",
        json={"prompt": "code", "guided_regex": "[0-9]{3}-[a-z]{2}", "max_tokens": 20},
    )
    text = r.json()["choices"][0]["text"]
    assert len(text) == 6 and text[:3].isdigit() and text[3] == "-" and text[4:].isalpha()


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
        {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}},
        {"type": "strange"},
    ],
)
async def test_a_schema_that_cannot_be_compiled_is_400_with_the_reason(client, engine, schema):
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
        },
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and err["code"] == "invalid_grammar"
    assert len(err["message"]) > len("cannot compile the json constraint: ")
    wait_idle(engine)


async def test_grammars_are_compiled_once_per_schema(client, engine):
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}
    fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
    body = {"prompt": "x", "response_format": fmt, "max_tokens": 30}
    assert (await client.post("/v1/completions", json=body)).status_code == 200
    compiled = engine.engine._grammars.compiled
    # the same schema again, keys in another order: a cache hit
    reordered = {"required": ["k"], "properties": {"k": {"type": "boolean"}}, "type": "object"}
    body["response_format"]["json_schema"]["schema"] = reordered
    for _ in range(3):
        assert (await client.post("/v1/completions", json=body)).status_code == 200
    assert engine.engine._grammars.compiled == compiled
