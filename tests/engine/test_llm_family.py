"""The Python API (`chat`, `stream_chat`, `generate`) on ChatGLM3 and GLM-4 checkpoints: each
model's own chat format and seed-style history; replies scripted by a test-only sampler."""

from __future__ import annotations

import pytest

from chatglm_serve import ChatGLM
from chatglm_serve.engine.config import EngineConfig
from chatglm_serve.model.chat_format import Turn
from tests.glm_family import ScriptedSampler, write_member


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-family")
    return {
        "glm4": write_member(root / "glm4", "glm4")[0],
        "chatglm3": write_member(root / "chatglm3", "chatglm3")[0],
    }


def _load(path, **kw) -> ChatGLM:
    glm = ChatGLM.load(str(path), device="cpu", config=EngineConfig(kv_cache_tokens=4096), **kw)
    glm.engine.sampler = ScriptedSampler(glm.engine.vocab_size)
    return glm


@pytest.mark.parametrize("family", ["glm4", "chatglm3"])
def test_chat_uses_the_models_format_and_returns_its_history_shape(dirs, family):
    with _load(dirs[family]) as glm:
        tok, sampler = glm.tokenizer, glm.engine.sampler
        sampler.script, sampler.end = tok.encode_text("\nFine, thanks."), tok.eos_token_id
        response, history = glm.chat("How are you?", history=[("Hi", "Hello")])
        assert response == "Fine, thanks."
        assert history == [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "metadata": "", "content": "Hello"},
            {"role": "user", "content": "How are you?"},
            {"role": "assistant", "metadata": "", "content": "Fine, thanks."},
        ]
        fmt = glm.engine.chat_format
        turns = [Turn("user", "Hi"), Turn("assistant", "Hello"), Turn("user", "How are you?")]
        assert sampler.prompts == [fmt.encode_turns(turns)]
        # THUDM's dict history goes back in as is
        sampler.prompts.clear()
        *_, (last, history2) = glm.stream_chat("And now?", history=history)
        assert last == "Fine, thanks." and history2[:4] == history
        assert sampler.prompts == [
            fmt.encode_turns([*turns, Turn("assistant", "Fine, thanks."), Turn("user", "And now?")])
        ]


def test_chat_template_override_gives_chatglm2_format_and_history(dirs):
    with _load(dirs["chatglm3"], chat_template="chatglm2") as glm:
        tok, sampler = glm.tokenizer, glm.engine.sampler
        assert glm.encode_chat("hi") == tok.encode("[Round 1]\n\n问：hi\n\n答：")
        sampler.script, sampler.end = tok.encode_text("ok"), tok.eos_token_id
        assert glm.chat("hi", history=[]) == ("ok", [("hi", "ok")])
