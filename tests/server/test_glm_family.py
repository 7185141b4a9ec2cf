"""ChatGLM3 and GLM-4 behind the OpenAI API: chat formats, tool calls, /v1/models, legacy POST /.

The tiny checkpoints have random weights, so they never write a tool call by themselves. The
tool-call tests therefore script the reply: a test-only sampler (`ScriptedSampler`) masks every
logit but the next token of a given token sequence, so the engine generates, detokenizes, stops
and streams exactly that reply through the real server and parser. They prove what the server
does with a reply of that shape, not that a model writes one. Greedy parity runs unscripted.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from chatglm_serve.engine.async_engine import AsyncEngine
from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.model.chat_format import Turn
from chatglm_serve.model.loader import load_model_and_tokenizer
from tests.glm_family import ScriptedSampler, write_member

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
USER = [{"role": "user", "content": "What is the weather in Beijing?"}]


def _engine(path) -> AsyncEngine:
    model, tok = load_model_and_tokenizer(path, dtype="float32")
    engine = AsyncEngine(model, tok, EngineConfig(max_num_seqs=8, kv_cache_tokens=8192))
    engine.engine.sampler = ScriptedSampler(engine.engine.vocab_size)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-server")
    return {
        "glm4": write_member(root / "glm4", "glm4", seed=11, seq_length=2048)[0],
        "glm4-hf": write_member(root / "glm4-hf", "glm4", hf=True, seed=11, seq_length=2048)[0],
        "chatglm3": write_member(root / "chatglm3", "chatglm3", seed=12, seq_length=2048)[0],
    }


@pytest.fixture(scope="module")
def engines(family_dirs):
    made = {name: _engine(family_dirs[name]) for name in ("glm4", "chatglm3")}
    yield made
    for e in made.values():
        asyncio.run(e.shutdown(timeout=2))


def script(engine: AsyncEngine, text: str, end: str = "<|user|>") -> ScriptedSampler:
    tok = engine.tokenizer
    sampler = engine.engine.sampler
    sampler.script = tok.encode_text(text)
    sampler.end = tok.special_tokens[end]
    sampler.prompts.clear()
    return sampler


@pytest.fixture
def oai(live, engines):
    def client(name: str) -> openai.OpenAI:
        server = live(engines[name])
        return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)

    return client


# --- GLM-4 ---------------------------------------------------------------------------------------


def test_glm4_scripted_tool_call_round_trip_with_openai_python(oai, engines):
    engine, client = engines["glm4"], oai("glm4")
    tok, fmt = engine.tokenizer, engine.chat_format
    sampler = script(engine, 'get_weather\n{"city": "Beijing"}', end="<|observation|>")
    r = client.chat.completions.create(model="glm-4", messages=USER, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Beijing"}
    tools_turn = fmt.tools_turn([TOOLS[0]["function"]])
    assert sampler.prompts == [fmt.encode_turns([tools_turn, Turn("user", USER[0]["content"])])]

    # the tool's result goes back as the observation turn; the model answers from it
    sampler = script(engine, "\nIt is 22 degrees in Beijing.")
    messages = [
        *USER,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 22}'},
    ]
    r2 = client.chat.completions.create(model="glm-4", messages=messages, tools=TOOLS)
    assert r2.choices[0].message.content == "It is 22 degrees in Beijing."
    assert r2.choices[0].finish_reason == "stop" and not r2.choices[0].message.tool_calls
    observation = tok.special_tokens["<|observation|>"]
    want = fmt.encode_turns(
        [
            tools_turn,
            Turn("user", USER[0]["content"]),
            Turn("assistant", '{"city": "Beijing"}', "get_weather"),
            Turn("observation", '{"temperature": 22}'),
        ]
    )
    assert sampler.prompts == [want]
    i = want.index(observation)
    assert want[i + 1 :] == [
        *tok.encode_text("\n"),
        *tok.encode_text('{"temperature": 22}'),
        tok.special_tokens["<|assistant|>"],
    ]


def test_glm4_scripted_tool_call_streams_name_then_argument_pieces(oai, engines):
    engine, client = engines["glm4"], oai("glm4")
    script(engine, 'get_weather\n{"city": "Beijing"}', end="<|observation|>")
    chunks = list(
        client.chat.completions.create(
            model="glm-4", messages=USER, tools=TOOLS, tool_choice="auto", stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert not any(d.content for d in deltas)
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == ""
    pieces = [c.function.arguments for c in calls[1:]]
    assert len(pieces) > 1 and all(c.index == 0 for c in calls)
    assert json.loads("".join(pieces)) == {"city": "Beijing"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "reply",
    ['get_weather\n{"city": Beij', 'get_weather\n{"town": "Beijing"}', 'get_weather\n["Beijing"]'],
    ids=["not-json", "missing-required", "not-an-object"],
)
@pytest.mark.parametrize("stream", [False, True])
def test_glm4_invalid_tool_arguments_come_back_as_text(oai, engines, reply, stream):
    engine, client = engines["glm4"], oai("glm4")
    script(engine, reply, end="<|observation|>")
    kwargs = dict(model="glm-4", messages=USER, tools=TOOLS)
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert not any(d.tool_calls for d in deltas)
        text = "".join(d.content or "" for d in deltas)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.chat.completions.create(**kwargs)
        assert not r.choices[0].message.tool_calls
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text == reply and finish == "stop"


def test_glm4_named_tool_choice_opens_the_call_in_the_prompt(oai, engines):
    engine, client = engines["glm4"], oai("glm4")
    sampler = script(engine, '{"city": "Paris"}', end="<|observation|>")
    r = client.chat.completions.create(
        model="glm-4",
        messages=USER,
        tools=[*TOOLS, {"type": "function", "function": {"name": "other"}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )
    tok = engine.tokenizer
    (prompt,) = sampler.prompts
    tail = [tok.special_tokens["<|assistant|>"], *tok.encode_text("get_weather\n")]
    assert prompt[-len(tail) :] == tail
    assert "## other" not in tok.decode(prompt)  # only the named function is offered


def test_glm4_tool_choice_none_offers_no_tools_and_parses_nothing(oai, engines):
    engine, client = engines["glm4"], oai("glm4")
    sampler = script(engine, 'get_weather\n{"city": "Paris"}')
    r = client.chat.completions.create(
        model="glm-4", messages=USER, tools=TOOLS, tool_choice="none"
    )
    assert r.choices[0].message.content == 'get_weather\n{"city": "Paris"}'
    assert not r.choices[0].message.tool_calls
    tok = engine.tokenizer
    assert sampler.prompts[0][:3] == [*tok.prefix_token_ids, tok.special_tokens["<|user|>"]]


def test_glm4_plain_answer_with_tools_offered_streams_as_content(oai, engines):
    engine, client = engines["glm4"], oai("glm4")
    script(engine, "\nHello there, how can I help?")
    chunks = list(
        client.chat.completions.create(model="glm-4", messages=USER, tools=TOOLS, stream=True)
    )
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == "Hello there, how can I help?" and len(texts) > 1
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_glm4_stops_at_user_and_observation_tokens(oai, engines):
    engine, client = engines["glm4"], oai("glm4")
    for end in ("<|user|>", "<|observation|>", "<|endoftext|>"):
        script(engine, "\nDone.", end=end)
        r = client.chat.completions.create(model="glm-4", messages=USER, max_tokens=50)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Done.", "stop")
        assert r.usage.completion_tokens == len(engine.tokenizer.encode_text("\nDone.")) + 1


async def test_models_report_the_family_member(make_app, engines):
    app = make_app(engines["glm4"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        data = (await c.get("/v1/models")).json()["data"]
        assert [(m["id"], m["root"], m["chat_template"]) for m in data] == [
            ("glm-4-9b-chat", "glm-4-9b-chat", "glm4")
        ]
        named = make_app(engines["glm4"], served_model_name="mine")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(named), base_url="http://t") as c:
        (card,) = (await c.get("/v1/models")).json()["data"]
        assert (card["id"], card["root"]) == ("mine", "glm-4-9b-chat")


async def test_glm4_legacy_post_keeps_the_seed_shape(make_app, engines):
    engine = engines["glm4"]
    sampler = script(engine, "\n  Fine, thanks.  ")
    app = make_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.post("/", json={"prompt": "How are you?", "history": [["Hi", "Hello"]]})
    body = r.json()
    assert body["response"] == "Fine, thanks." and body["status"] == 200
    assert body["history"] == [["Hi", "Hello"], ["How are you?", "Fine, thanks."]]
    want = engine.chat_format.encode_turns(
        [Turn("user", "Hi"), Turn("assistant", "Hello"), Turn("user", "How are you?")]
    )
    assert sampler.prompts == [want]


def test_glm4_greedy_over_http_matches_transformers(live, engines, family_dirs):
    """Unscripted: our server's greedy reply equals transformers' GlmForCausalLM (-hf files)."""
    from transformers import GlmForCausalLM

    engine = engines["glm4"]
    engine.engine.sampler.script = None
    server = live(engine)
    text = "Tell me about the weather."
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": 16,
            "ignore_eos": True,
        },
        timeout=60,
    )
    got = r.json()["choices"][0]["message"]["content"]
    prompt = engine.chat_format.encode_turns([Turn("user", text)])
    ref = GlmForCausalLM.from_pretrained(family_dirs["glm4-hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    want = engine.tokenizer.decode(out[0, len(prompt) :].tolist())
    assert r.json()["usage"]["completion_tokens"] == 16
    assert got == want.lstrip() and got


# --- ChatGLM3 ------------------------------------------------------------------------------------


def test_chatglm3_scripted_tool_call_round_trip(oai, engines):
    engine, client = engines["chatglm3"], oai("chatglm3")
    fmt = engine.chat_format
    sampler = script(
        engine, 'get_weather\n```python\ntool_call(city="Beijing")\n```', end="<|observation|>"
    )
    r = client.chat.completions.create(model="chatglm3-6b", messages=USER, tools=TOOLS)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Beijing"},
    )
    tools_turn = fmt.tools_turn([TOOLS[0]["function"]])
    assert tools_turn.content.startswith("Answer the following questions as best as you can.")
    assert sampler.prompts == [fmt.encode_turns([tools_turn, Turn("user", USER[0]["content"])])]

    sampler = script(engine, "\nIt is sunny.")
    messages = [
        *USER,
        r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    chunks = list(
        client.chat.completions.create(
            model="chatglm3-6b", messages=messages, tools=TOOLS, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "It is sunny."
    assert sampler.prompts == [
        fmt.encode_turns(
            [
                tools_turn,
                Turn("user", USER[0]["content"]),
                Turn("assistant", "```python\ntool_call(city='Beijing')\n```", "get_weather"),
                Turn("observation", "sunny"),
            ]
        )
    ]


def test_chatglm3_scripted_tool_call_streamed(oai, engines):
    engine, client = engines["chatglm3"], oai("chatglm3")
    script(engine, "get_weather\n```python\ntool_call(city='Rome')\n```", end="<|observation|>")
    chunks = list(
        client.chat.completions.create(model="chatglm3-6b", messages=USER, tools=TOOLS, stream=True)
    )
    calls = [
        c.choices[0].delta.tool_calls[0]
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
    ]
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Rome"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# --- refusals ------------------------------------------------------------------------------------


async def test_chatglm2_answers_tools_with_a_400_naming_it(client):
    r = await client.post("/v1/chat/completions", json={"messages": USER, "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    tool_turn = [*USER, {"role": "tool", "tool_call_id": "x", "content": "1"}]
    r = await client.post("/v1/chat/completions", json={"messages": tool_turn})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "auto"}, "tool_choice"),  # no tools
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS * 2}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ],
)
async def test_glm4_bad_tool_requests_are_400s(make_app, engines, extra, param):
    app = make_app(engines["glm4"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json={"messages": USER, **extra})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param)


def test_chatglm3_scripted_text_then_tool_call_in_one_reply(oai, engines):
    """PROMPT.md's "Okay, let's look it up.<|assistant|>get_weather\\n```python...```"."""
    engine, client = engines["chatglm3"], oai("chatglm3")
    tok = engine.tokenizer
    sampler = script(engine, "", end="<|observation|>")
    sampler.script = [
        *tok.encode_text("\nLet me look that up."),
        tok.special_tokens["<|assistant|>"],
        *tok.encode_text("get_weather\n```python\ntool_call(city='Oslo')\n```"),
    ]
    r = client.chat.completions.create(model="chatglm3-6b", messages=USER, tools=TOOLS)
    message = r.choices[0].message
    assert message.content == "Let me look that up." and r.choices[0].finish_reason == "tool_calls"
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    chunks = list(
        client.chat.completions.create(model="chatglm3-6b", messages=USER, tools=TOOLS, stream=True)
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me look that up."
    assert [d.tool_calls[0].function.name for d in deltas if d.tool_calls][0] == "get_weather"


async def test_terminal_chat_hides_the_metadata_line(engines):
    from chatglm_serve.server.terminal_chat import engine_reply

    engine = engines["glm4"]
    script(engine, "\nHi there!")
    reply = engine_reply(engine, temperature=0, top_p=None, max_tokens=20)
    assert "".join([part async for part in reply("Hello", [])]) == "Hi there!"
