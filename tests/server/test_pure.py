"""Pure parts of the daemon: message -> prompt mapping, request models, settings layering, auth."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.server.auth import ApiKeyAuth
from chatglm_serve.server.errors import APIError
from chatglm_serve.server.prompt import messages_to_chat
from chatglm_serve.server.protocol import ChatCompletionRequest, ChatMessage, LegacyRequest
from chatglm_serve.server.routes_openai import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, sampling_params
from chatglm_serve.server.settings import (
    Settings,
    SettingsError,
    engine_config,
    load_settings,
    settings_table,
)


def msgs(*pairs: tuple[str, object]) -> list[ChatMessage]:
    return [ChatMessage(role=r, content=c) for r, c in pairs]


# --- messages -> (query, history) ---------------------------------------------------------------


def test_single_user_message():
    assert messages_to_chat(msgs(("user", "你好"))) == ("你好", [])


def test_leading_system_is_prepended_to_the_final_query_as_the_seed_does():
    query, history = messages_to_chat(
        msgs(("system", "Be brief. "), ("user", "q1"), ("assistant", "a1"), ("user", "q2"))
    )
    assert query == "Be brief. q2"
    assert history == [("q1", "a1")]


def test_history_pairs_in_order():
    m = msgs(
        ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"), ("user", "q3")
    )
    assert messages_to_chat(m) == ("q3", [("q1", "a1"), ("q2", "a2")])


def test_irregular_turns_are_folded_not_dropped():
    m = msgs(
        ("assistant", "greeting"),  # no user before it
        ("user", "a"),
        ("user", "b"),  # two user turns in a row
        ("assistant", "x"),
        ("system", "mid"),  # a system message after the start counts as user text
        ("user", "q"),
    )
    assert messages_to_chat(m) == ("mid\nq", [("", "greeting"), ("a\nb", "x")])


def test_content_as_text_parts():
    m = [
        ChatMessage.model_validate(
            {
                "role": "user",
                "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}],
            }
        )
    ]
    assert messages_to_chat(m) == ("hello", [])


def test_image_part_is_refused():
    with pytest.raises(ValidationError, match="only 'text' parts"):
        ChatMessage.model_validate(
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        )


def test_last_message_must_not_be_assistant():
    with pytest.raises(APIError) as e:
        messages_to_chat(msgs(("user", "q"), ("assistant", "x")))
    assert e.value.status == 400 and e.value.param == "messages"


@pytest.mark.parametrize("role", ["system", "developer"])
def test_only_instructions_and_no_user_message_is_refused(role):
    with pytest.raises(APIError) as e:
        messages_to_chat(msgs((role, "x"), (role, "y")))
    assert e.value.status == 400 and e.value.param == "messages"


@pytest.mark.parametrize("role", ["system", "developer"])
def test_trailing_instruction_after_a_reply_becomes_the_query(role):
    # ChatGPT-Next-Web's memory request: the conversation, then a system instruction
    summarize = "Summarize the discussion briefly in 200 words or less to use as a prompt."
    m = msgs(
        ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"), (role, summarize)
    )
    assert messages_to_chat(m) == (summarize, [("q1", "a1"), ("q2", "a2")])


def test_trailing_instruction_joins_the_last_user_turn_and_keeps_the_leading_system():
    m = msgs(
        ("system", "S. "),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("system", "Be brief."),
    )
    assert messages_to_chat(m) == ("S. q2\nBe brief.", [("q1", "a1")])


# --- request models ------------------------------------------------------------------------------


def test_unknown_fields_are_ignored_and_extensions_read():
    r = ChatCompletionRequest.model_validate(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "some_future_field": {"x": 1},
            "top_k": 5,
            "ignore_eos": True,
            "min_tokens": 3,
            "repetition_penalty": 1.1,
        }
    )
    p = sampling_params(r, prompt_tokens=10)
    assert (p.top_k, p.ignore_eos, p.min_tokens, p.repetition_penalty) == (5, True, 3, 1.1)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", "hot"),
        ("temperature", 3.0),
        ("top_p", 1.5),
        ("max_tokens", 0),
        ("n", 0),
        ("stream", "yes please"),
        ("messages", []),
        ("messages", "hello"),
        ("stop", 5),
    ],
)
def test_wrong_types_and_ranges_are_refused(field, value):
    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_sampling_defaults_and_mapping():
    r = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    p = sampling_params(r, prompt_tokens=10)
    assert (p.temperature, p.top_p, p.max_tokens, p.n, p.logprobs) == (
        DEFAULT_TEMPERATURE,
        DEFAULT_TOP_P,
        None,  # no max_tokens = up to the rest of the context
        1,
        None,
    )
    r = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4000,
            "max_completion_tokens": 7,
            "stop": "\n\n",
            "logprobs": True,
            "top_logprobs": 3,
            "top_p": 0,
            "seed": 42,
        }
    )
    p = sampling_params(r, prompt_tokens=10)
    # max_completion_tokens wins; top_p 0 means only the top token: greedy
    assert (p.max_tokens, p.stop, p.logprobs, p.temperature, p.top_p, p.seed) == (
        7,
        ["\n\n"],
        3,
        0.0,
        1.0,
        42,
    )


def test_seed_max_length_counts_the_prompt():
    r = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "max_length": 100}
    )
    assert sampling_params(r, prompt_tokens=30).max_tokens == 70
    assert sampling_params(r, prompt_tokens=300).max_tokens == 1


def test_legacy_request_shape():
    r = LegacyRequest.model_validate({"prompt": "你好", "history": [["a", "b"]], "extra": 1})
    assert r.history == [["a", "b"]] and r.max_length is None
    with pytest.raises(ValidationError):
        LegacyRequest.model_validate({"prompt": "x", "history": [["only one"]]})
    with pytest.raises(ValidationError):
        LegacyRequest.model_validate({"history": []})


# --- settings ------------------------------------------------------------------------------------


def test_precedence_flags_over_env_over_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 7000\nhost: 0.0.0.0\nmax_num_seqs: 3\nserved-model-name: from-yaml\n")
    env = {"CHATGLM_PORT": "7100", "CHATGLM_MAX_NUM_SEQS": "5"}
    s = load_settings({"port": 7200}, config_file=cfg, environ=env)
    assert (s.port, s.max_num_seqs, s.host, s.served_model_name) == (
        7200,
        5,
        "0.0.0.0",
        "from-yaml",
    )
    s = load_settings({}, config_file=cfg, environ=env)
    assert s.port == 7100
    s = load_settings({}, environ={"CHATGLM_CONFIG": str(cfg)})
    assert s.port == 7000
    assert type(s) is Settings


def test_env_lists_comma_or_json_and_keys_hidden():
    s = load_settings(
        environ={
            "CHATGLM_API_KEYS": "sk-one, sk-two",
            "CHATGLM_CORS_ORIGINS": '["http://a", "http://b"]',
            "CHATGLM_QUANTIZE": "4",
            "CHATGLM_DEVICES": "cuda:0,cuda:1",
        }
    )
    assert s.api_key_values() == ["sk-one", "sk-two"]
    assert s.cors_origins == ["http://a", "http://b"]
    assert s.quantize == 4 and s.devices == ["cuda:0", "cuda:1"]
    assert "sk-one" not in repr(s) and "sk-one" not in str(s.model_dump())


def test_bad_settings_are_refused_by_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prot: 1\n")
    with pytest.raises(SettingsError, match="prot"):
        load_settings(config_file=bad, environ={})
    with pytest.raises(ValidationError, match="quantize"):
        load_settings({"quantize": 3}, environ={})
    with pytest.raises(ValidationError, match="port"):
        load_settings(environ={"CHATGLM_PORT": "eighty"})


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    names = {p.name for p in root.glob("*.yaml")}
    assert {
        "tiny.yaml",
        "chatglm2-6b.yaml",
        "chatglm2-6b-int4.yaml",
        "chatglm2-6b-2gpu.yaml",
    } <= names
    for name in names:
        load_settings(config_file=root / name, environ={})
    assert load_settings(config_file=root / "chatglm2-6b-2gpu.yaml", environ={}).devices == [
        "cuda:0",
        "cuda:1",
    ]
    assert load_settings(config_file=root / "tiny.yaml", environ={}).model is None


def test_engine_config_mapping():
    s = load_settings(
        {"max_num_seqs": 8, "max_model_len": 512, "max_queue": 3, "kv_cache_tokens": 4096},
        environ={},
    )
    c = engine_config(s)
    assert isinstance(c, EngineConfig)
    assert (c.max_num_seqs, c.max_model_len, c.max_queue, c.kv_cache_tokens) == (8, 512, 3, 4096)
    c.validate()
    c = engine_config(load_settings({"max_num_seqs": 2000}, environ={}))
    c.validate()  # the step budget grows with max_num_seqs


def test_cuda_graphs_setting():
    from chatglm_serve.server.cli import parse

    assert engine_config(load_settings({}, environ={})).cuda_graphs
    assert not engine_config(
        load_settings({}, environ={"CHATGLM_CUDA_GRAPHS": "false"})
    ).cuda_graphs
    _, _, s = parse(["--no-cuda-graphs"])
    assert not engine_config(s).cuda_graphs


def test_every_setting_is_documented_and_has_a_flag():
    from chatglm_serve.server.cli import build_parser

    table = settings_table()
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert f"`{name}`" in table
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    dests = {a.dest for a in serve._actions}
    assert set(Settings.model_fields) <= dests


def test_cli_flags_parse():
    from chatglm_serve.server.cli import parse

    command, _, s = parse(
        ["--port", "9001", "--api-key", "k1", "--api-key", "k2", "--quantize", "8", "--no-web-ui"]
    )
    assert command == "serve"
    assert (s.port, s.api_key_values(), s.quantize, s.web_ui) == (9001, ["k1", "k2"], 8, False)
    command, ns, s = parse(["chat", "--dtype", "float32", "--max-tokens", "5"])
    assert (command, ns.url, s.dtype, ns.max_tokens) == ("chat", None, "float32", 5)
    command, ns, s = parse(["chat", "--url", "http://x:1", "--api-key", "sk-1"])
    assert (command, ns.url, ns.chat_api_key, s.api_key_values()) == (
        "chat",
        "http://x:1",
        "sk-1",
        [],
    )


# --- auth ----------------------------------------------------------------------------------------


def test_api_keys():
    auth = ApiKeyAuth(["sk-a", "sk-b"])
    assert auth.accepts("Bearer sk-b") and auth.accepts("bearer sk-a")
    assert not auth.accepts("Bearer sk-c")
    assert not auth.accepts("sk-a")
    assert not auth.accepts(None)
    assert ApiKeyAuth([]).accepts(None)
