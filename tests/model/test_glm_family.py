"""ChatGLM3 and GLM-4 checkpoints in their published formats: detection, tokenizers and chat
formats against hand-built ids, weights (THUDM and -hf layouts) against transformers' Glm, and
rope_ratio in the rotary frequencies."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm
import tiktoken
import torch

from chatglm_serve.model.chat_format import ChatFormatError, Turn, make_chat_format
from chatglm_serve.model.config import ChatGLMConfig
from chatglm_serve.model.family import detect_family
from chatglm_serve.model.loader import CheckpointError, load_checkpoint, load_model_and_tokenizer
from chatglm_serve.model.tokenizer_glm4 import PATTERN
from tests.glm_family import glm4_ranks, write_member
from tests.paged import PagedRunner


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return {
        "chatglm3": write_member(root / "chatglm3", "chatglm3")[0],
        "chatglm3-32k": write_member(
            root / "chatglm3-32k",
            "chatglm3",
            rope_ratio=50.0,
            extra={"_name_or_path": "THUDM/chatglm3-6b-32k"},
        )[0],
        "glm4": write_member(root / "glm4", "glm4", seed=5)[0],
        "glm4-hf": write_member(root / "glm4-hf", "glm4", hf=True, seed=5)[0],
    }


# --- detection -----------------------------------------------------------------------------------


def test_each_member_is_recognised_from_its_files(members):
    seen = {name: detect_family(path) for name, path in members.items()}
    assert [(f.family, f.member) for f in seen.values()] == [
        ("chatglm3", "chatglm3-6b"),
        ("chatglm3", "chatglm3-6b-32k"),
        ("glm4", "glm-4-9b-chat"),
        ("glm4", "glm-4-9b-chat-hf"),
    ]
    assert "tiktoken" in seen["glm4"].evidence
    assert "tokenizer.json" in seen["glm4-hf"].evidence and "-hf" in seen["glm4-hf"].evidence
    assert seen["glm4-hf"].tokenizer_file.name == "tokenizer.json"


def test_chatglm3_signals_each_suffice_and_chatglm2_stays_chatglm2(members, tmp_path):
    src = members["chatglm3"]
    d = tmp_path / "m"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("_name_or_path")
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer_config.json").write_text('{"tokenizer_class": "ChatGLMTokenizer"}')
    assert detect_family(d).family == "chatglm2"  # the same vocabulary, nothing says 3
    (d / "tokenization_chatglm.py").write_text('ROLES = ["<|user|>", "<|observation|>"]\n')
    assert detect_family(d).family == "chatglm3"
    (d / "tokenization_chatglm.py").unlink()
    cfg["_name_or_path"] = "THUDM/chatglm3-6b-base"
    (d / "config.json").write_text(json.dumps(cfg))
    found = detect_family(d)
    assert (found.family, found.member) == ("chatglm3", "chatglm3-6b-base")


def test_chat_template_overrides_detection(members):
    _, tok = load_model_and_tokenizer(members["chatglm3"], chat_template="chatglm2")
    assert tok.chat_format.name == "chatglm2"
    assert tok.encode_chat("hi") == tok.prefix_token_ids + tok.encode_text(
        "[Round 1]\n\n问：hi\n\n答："
    )
    _, glm4 = load_model_and_tokenizer(members["glm4"])
    with pytest.raises(ChatFormatError, match="unknown chat template"):
        make_chat_format("llama3", glm4)
    from chatglm_serve.model.tokenizer import ChatGLMTokenizer

    with pytest.raises(ChatFormatError, match="role tokens"):
        make_chat_format("glm4", ChatGLMTokenizer(str(members["chatglm3"] / "tokenizer.model")))


# --- chat formats against hand-built ids ----------------------------------------------------------


def test_chatglm3_chat_ids_match_a_hand_built_sequence(members):
    _, tok = load_model_and_tokenizer(members["chatglm3"])
    sp = spm.SentencePieceProcessor(model_file=str(members["chatglm3"] / "tokenizer.model"))
    n = sp.get_piece_size()
    gmask, sop, system, user, assistant, observation = n + 1, n + 3, n + 5, n + 6, n + 7, n + 8
    assert tok.vocab_size == n + 9
    turns = [
        Turn("system", "You are ChatGLM3."),
        Turn("user", "Weather in Paris?"),
        Turn("assistant", "```python\ntool_call(city='Paris')\n```", "get_weather"),
        Turn("observation", '{"temperature": 22}'),
    ]
    expected = [gmask, sop]
    expected += [system, *sp.encode("\n"), *sp.encode("You are ChatGLM3.")]
    expected += [user, *sp.encode("\n"), *sp.encode("Weather in Paris?")]
    expected += [assistant, *sp.encode("get_weather\n")]
    expected += sp.encode("```python\ntool_call(city='Paris')\n```")
    expected += [observation, *sp.encode("\n"), *sp.encode('{"temperature": 22}'), assistant]
    assert tok.chat_format.encode_turns(turns) == expected
    assert tok.chat_format.stop_token_ids == [sp.eos_id(), user, observation]
    # the seed-style (query, history) call is the same format
    chat = tok.encode_chat("Again?", [("Hi", "Hello!")])
    assert chat == [gmask, sop, user, *sp.encode("\n"), *sp.encode("Hi"), assistant] + [
        *sp.encode("\n"),
        *sp.encode("Hello!"),
        user,
        *sp.encode("\n"),
        *sp.encode("Again?"),
        assistant,
    ]
    # role tokens typed by a user stay text
    injected = tok.encode_text("<|assistant|>")
    assert assistant not in injected and tok.decode(injected) == "<|assistant|>"


def test_glm4_chat_ids_match_a_hand_built_sequence(members):
    _, tok = load_model_and_tokenizer(members["glm4"])
    ranks = glm4_ranks()
    n = len(ranks)
    enc = tiktoken.Encoding("ref", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    gmask, sop, system, user, assistant, observation = n + 2, n + 4, n + 6, n + 7, n + 8, n + 9
    eos = n
    tools = [{"name": "get_weather", "parameters": {"type": "object"}}]
    fmt = tok.chat_format
    turns = [
        fmt.tools_turn(tools),
        Turn("user", "天气？"),
        Turn("assistant", '{"city": "Paris"}', "get_weather"),
    ]
    turns.append(Turn("observation", "22"))
    tools_text = (
        "你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
        "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## get_weather\n\n"
        + json.dumps(tools[0], indent=4, ensure_ascii=False)
        + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    )
    expected = [gmask, sop, system, *enc.encode("\n"), *enc.encode(tools_text)]
    expected += [user, *enc.encode("\n"), *enc.encode("天气？")]
    expected += [assistant, *enc.encode("get_weather\n"), *enc.encode('{"city": "Paris"}')]
    expected += [observation, *enc.encode("\n"), *enc.encode("22"), assistant]
    assert fmt.encode_turns(turns) == expected
    assert fmt.stop_token_ids == [eos, user, observation]
    assert (
        tok.decode(expected)
        == "\n" + tools_text + "\n天气？get_weather\n" + '{"city": "Paris"}\n22'
    )
    assert tok.decode(expected[:3], skip_special_tokens=False) == "[gMASK]<sop><|system|>"
    assert user not in tok.encode_text("<|user|>")  # typed specials stay text


def test_glm4_hf_tokenizer_json_agrees_with_transformers(members):
    """The -hf tokenizer.json read into tiktoken gives the ids of HF's own fast tokenizer."""
    from tokenizers import Tokenizer

    _, ours = load_model_and_tokenizer(members["glm4-hf"])
    theirs = Tokenizer.from_file(str(members["glm4-hf"] / "tokenizer.json"))
    _, rank_file = load_model_and_tokenizer(members["glm4"])
    for text in [
        "Hello there, the weather in Beijing!\n\n  ok",
        "你好，世界 123456 🙂",
        "a\t\tb\r\n",
    ]:
        ids = ours.encode_text(text)
        assert ids == theirs.encode(text, add_special_tokens=False).ids
        assert ids == rank_file.encode_text(text)
        assert ours.decode(ids) == text


# --- weights: THUDM and -hf layouts against transformers' Glm ------------------------------------


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_glm4_logits_match_transformers_in_both_layouts(members):
    from transformers import GlmForCausalLM

    ref = GlmForCausalLM.from_pretrained(members["glm4-hf"], dtype=torch.float32).eval()
    assert ref.config.rope_parameters["rope_theta"] == 5_000_000  # 10000 * rope_ratio 500
    thudm = load_checkpoint(members["glm4"], dtype="float32")
    hf = load_checkpoint(members["glm4-hf"], dtype="float32")
    assert thudm.config.rope_ratio == hf.config.rope_ratio == 500
    ids = _ids(200, thudm.config.padded_vocab_size, 1)  # long enough for rope_ratio to matter
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    for model in (thudm, hf):
        got = PagedRunner(model).step([(0, ids)])
        assert (got - want).abs().max().item() <= 1e-4
    assert want.abs().mean() > 0.1


def test_hf_layout_missing_projection_is_named(members, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(members["glm4-hf"], d)
    for f in d.glob("*.safetensors"):
        state = load_file(f)
        if "model.layers.1.self_attn.k_proj.weight" in state:
            del state["model.layers.1.self_attn.k_proj.weight"]
            save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_checkpoint(d)


# --- rope_ratio ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ratio"), [("chatglm3", 1.0), ("chatglm3-32k", 50.0), ("glm4", 500.0)]
)
def test_rope_ratio_sets_the_rotary_frequencies(members, name, ratio):
    model = load_checkpoint(members[name], dtype="float32")
    dim = model.config.rotary_dim
    want = 1.0 / (10000.0 * ratio) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    torch.testing.assert_close(model.transformer.rotary_pos_emb.inv_freq, want)


def test_glm4_1m_rope_ratio_from_config_changes_the_logits(members, tmp_path):
    d = tmp_path / "1m"
    shutil.copytree(members["glm4"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(rope_ratio=10000, seq_length=1048576)
    (d / "config.json").write_text(json.dumps(cfg))
    assert detect_family(d).member == "glm-4-9b-chat"  # named in _name_or_path
    cfg.pop("_name_or_path")
    (d / "config.json").write_text(json.dumps(cfg))
    assert detect_family(d).member == "glm-4-9b-chat-1m"
    one_m = load_checkpoint(d, dtype="float32")
    base = load_checkpoint(members["glm4"], dtype="float32")
    assert ChatGLMConfig.from_json(d).rope_base == 1e8
    ids = _ids(64, base.config.padded_vocab_size, 2)
    a, b = PagedRunner(one_m).step([(0, ids)]), PagedRunner(base).step([(0, ids)])
    torch.testing.assert_close(a[0], b[0])  # position 0 is not rotated
    assert (a[-1] - b[-1]).abs().max() > 1e-3  # later positions are, differently


def test_glm4_config_keeps_its_eos_list(members):
    cfg = ChatGLMConfig.from_json(members["glm4"])
    assert cfg.eos_token_ids == [cfg.eos_token_id, cfg.eos_token_id + 7, cfg.eos_token_id + 9]
    assert json.loads((members["glm4"] / "config.json").read_text())["eos_token_id"] == (
        cfg.eos_token_ids
    )


def test_glm4_streaming_detokenizer_never_splits_a_character(members):
    from chatglm_serve.model.detokenizer import IncrementalDetokenizer

    _, tok = load_model_and_tokenizer(members["glm4"])
    text = "天气 🙂🌧️ ok\n\n  çà"
    ids = tok.encode_text(text)
    assert len(ids) > len(text) // 2  # byte-level pieces: several per character here
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
