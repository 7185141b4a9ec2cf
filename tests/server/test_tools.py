"""The reply parser on its own: engine output text pieces in, content / tool call out.

These feed hand-written text (the pieces an engine would emit), so they prove the parsing and
holding rules; the HTTP round trips are in test_glm_family.py."""

from __future__ import annotations

import json

import pytest

from chatglm_serve.server.tools import ReplyParser

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = {"get_weather": SCHEMA, "get_time": None}


def run(parser: ReplyParser, pieces: list[str]) -> tuple[list[str], str, object]:
    sent = [parser.feed(p) for p in pieces]
    tail, call = parser.finish()
    return sent, tail, call


def test_plain_reply_streams_after_the_empty_metadata_line():
    sent, tail, call = run(ReplyParser("glm4", TOOLS), ["\n", "Hel", "lo", " world"])
    assert sent == ["", "Hel", "lo", " world"] and tail == "" and call is None


def test_without_tools_only_leading_whitespace_is_dropped():
    sent, tail, call = run(ReplyParser("glm4", None), [" \n", "\n  Hi", " there"])
    assert "".join(sent) + tail == "Hi there" and call is None


def test_first_line_is_held_only_while_it_can_name_a_tool():
    p = ReplyParser("glm4", TOOLS)
    assert p.feed("get") == "" and p.feed("_") == ""  # "get_" could be either tool
    assert p.feed("wx") == "get_wx"  # no tool starts so: released as text at once
    assert p.feed("!") == "!"


def test_glm4_call_keeps_the_generated_pieces_of_its_arguments():
    pieces = ["get_", "weather\n", ' {"ci', 'ty": "Be', 'ijing"}', "\n"]
    sent, tail, call = run(ReplyParser("glm4", TOOLS), pieces)
    assert sent == [""] * len(pieces) and tail == ""
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Beijing"}
    assert "".join(call.pieces) == call.arguments == '{"city": "Beijing"}'
    assert len(call.pieces) == 3


@pytest.mark.parametrize(
    "args", ['{"city": "Be', '{"town": "x"}', "[1]", "", '{"city": "x"} trailing']
)
def test_glm4_invalid_arguments_come_back_as_the_text_written(args):
    sent, tail, call = run(ReplyParser("glm4", TOOLS), ["get_weather\n", args])
    assert call is None and "".join(sent) + tail == "get_weather\n" + args


def test_schema_without_required_keys_accepts_any_object():
    _, _, call = run(ReplyParser("glm4", TOOLS), ["get_time\n", "{}"])
    assert call.name == "get_time" and call.arguments == "{}"


@pytest.mark.parametrize(
    ("code", "args"),
    [
        ("```python\ntool_call(city='Rome')\n```", {"city": "Rome"}),
        (
            'tool_call(city="Rome", days=3, hourly=True)',
            {"city": "Rome", "days": 3, "hourly": True},
        ),
    ],
)
def test_chatglm3_tool_call_code_is_read_without_running_it(code, args):
    _, tail, call = run(ReplyParser("chatglm3", TOOLS), ["get_weather\n", code])
    assert tail == "" and json.loads(call.arguments) == args


@pytest.mark.parametrize(
    "code",
    [
        "```python\n__import__('os').system('true')\n```",
        "```python\ntool_call(city=open('x').read())\n```",
        "```python\ntool_call('Rome')\n```",
        "```python\ntool_call(**{'city': 'Rome'})\n```",
        "```python\ntool_call(city='Rome'\n```",
    ],
)
def test_chatglm3_anything_but_literal_keywords_is_text(code):
    _, tail, call = run(ReplyParser("chatglm3", TOOLS), ["get_weather\n", code])
    assert call is None and tail == "get_weather\n" + code


def test_forced_call_parses_from_the_first_token():
    _, tail, call = run(ReplyParser("glm4", TOOLS, forced="get_weather"), ['{"city": "Oslo"}'])
    assert call.name == "get_weather" and tail == ""
    _, tail, call = run(ReplyParser("glm4", TOOLS, forced="get_weather"), ["oops"])
    assert call is None and tail == "oops"


def test_text_then_assistant_token_then_a_tool_call():
    """ChatGLM3's "I will look it up.<|assistant|>get_weather\\n```...```" (PROMPT.md)."""
    p = ReplyParser("chatglm3", TOOLS, segment_id=99)
    sent = [p.feed("\nLet me check.", [5, 6]), p.feed("", [99])]
    sent += [p.feed("get_weather\n", [7]), p.feed("```python\ntool_call(city='Oslo')\n```", [8])]
    tail, call = p.finish()
    assert "".join(sent) + tail == "Let me check."
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
