"""POST /v1/completions, /tokenize, /detokenize on the real engine (the demo model)."""

from __future__ import annotations

import pytest
import torch

from chatglm_serve.model.hf_glm import glm_from_state
from tests.server.conftest import MAX_MODEL_LEN, sse_json, wait_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def reference(model_and_tokenizer):
    model, _ = model_and_tokenizer
    return glm_from_state(model.state_dict(), model.config)


def reference_logprobs(reference, tokenizer, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 by transformers' GlmForCausalLM, fp32, over the
    tokenizer's vocabulary (the output layer's padding rows are no tokens)."""
    with torch.inference_mode():
        logits = reference(torch.tensor([ids])).logits[0, :, : tokenizer.vocab_size].float()
    lps = torch.log_softmax(logits, dim=-1)
    return lps[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist()


async def tokenize(client, text: str, **kw) -> list[int]:
    r = await client.post("/tokenize", json={"prompt": text, **kw})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


async def test_loglikelihood_of_a_continuation_matches_transformers(
    client, model_and_tokenizer, reference
):
    """lm-evaluation-harness's request: context + continuation ids, echo, logprobs, scored."""
    _, tokenizer = model_and_tokenizer
    context = await tokenize(client, "The capital of France is")
    continuation = await tokenize(client, " Paris, of course.", add_special_tokens=False)
    ids = context + continuation
    for max_tokens in (0, 1):  # score only, and lm-eval's max_tokens 1 (drops the last token)
        r = await client.post(
            "/v1/completions",
            json={"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": max_tokens, **GREEDY},
        )
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = reference_logprobs(reference, tokenizer, ids)
        assert lp["token_logprobs"][1 : len(ids)] == [pytest.approx(v, abs=1e-4) for v in ref]
        ours = sum(lp["token_logprobs"][len(context) : len(ids)])
        theirs = sum(ref[len(context) - 1 :])
        assert abs(ours - theirs) <= 1e-4
        assert abs(ours) > 1.0  # a real score, not zeros
        for tok_lp, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            assert tok_lp <= max(top.values()) + 1e-6  # the top-1 is in the dict


async def test_echo_with_max_tokens_zero_returns_exactly_the_prompt(client):
    text = "one two three, four"
    ids = await tokenize(client, text)
    r = await client.post(
        "/v1/completions",
        json={
            "prompt": text,
            "echo": True,
            "logprobs": 2,
            "max_tokens": 0,
            "return_tokens_as_token_ids": True,
        },
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{i}" for i in ids]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert all(len(t) >= 2 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert r.json()["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "total_tokens": len(ids),
    }
    # without special tokens the prompt has no [gMASK] sop in front
    r = await client.post(
        "/v1/completions",
        json={
            "prompt": text,
            "echo": True,
            "logprobs": 0,
            "max_tokens": 0,
            "add_special_tokens": False,
            "return_tokens_as_token_ids": True,
        },
    )
    assert r.json()["choices"][0]["logprobs"]["tokens"] == [f"token_id:{i}" for i in ids[2:]]


@pytest.mark.parametrize(
    "prompts", [["alpha beta", "gamma", "delta"], [[5, 6, 7, 8], [9, 10], [11, 12, 13]]]
)
async def test_streaming_equals_non_streaming_under_greedy(client, prompts):
    body = {
        "prompt": prompts,
        "max_tokens": 12,
        "n": 2,
        "logprobs": 2,
        "echo": True,
        **GREEDY,
    }
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    whole = r.json()
    r = await client.post(
        "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200
    chunks, done = sse_json(r.text)
    assert done
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert len(whole["choices"]) == 6
    for choice in whole["choices"]:
        k = choice["index"]
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == k]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"] == "length"
        streamed: dict[str, list] = {}
        for c in mine:
            for key, values in (c["logprobs"] or {}).items():
                streamed.setdefault(key, []).extend(values)
        whole_lp = choice["logprobs"]
        assert streamed.keys() == whole_lp.keys()
        assert streamed["tokens"] == whole_lp["tokens"]
        assert streamed["text_offset"] == whole_lp["text_offset"]
        # the same tokens; their logprobs may differ in the last bits (other batch shapes)
        assert streamed["token_logprobs"] == [
            None if v is None else pytest.approx(v, abs=1e-4) for v in whole_lp["token_logprobs"]
        ]
        assert [None if t is None else sorted(t) for t in streamed["top_logprobs"]] == [
            None if t is None else sorted(t) for t in whole_lp["top_logprobs"]
        ]
    # prompt i's n choices are i*n .. i*n+n-1 and greedy choices agree
    texts = [c["text"] for c in sorted(whole["choices"], key=lambda c: c["index"])]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[4] == texts[5]
    if isinstance(prompts[0], str):
        assert texts[0].startswith("alpha beta") and texts[2].startswith("gamma")


async def test_sampling_parameters_and_stop(client):
    body = {
        "prompt": "hello",
        "max_tokens": 30,
        "seed": 7,
        "temperature": 1.0,
        "top_k": 5,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "min_tokens": 3,
        "ignore_eos": True,
    }
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    first = r.json()["choices"][0]["text"]
    r = await client.post("/v1/completions", json=body)
    assert r.json()["choices"][0]["text"] == first  # seeded: the same reply
    assert len(first) > 3
    stop = first[len(first) // 2 :][:2]
    r = await client.post("/v1/completions", json={**body, "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and stop not in choice["text"]
    assert first.startswith(choice["text"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "n": 2, "best_of": 3}, "best_of"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "", "add_special_tokens": False}, "prompt"),
        ({"prompt": "word " * 400}, "prompt"),
        ({"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format"),
        ({"prompt": "x", "guided_regex": "(", "max_tokens": 3}, "guided_regex"),
        ({"prompt": "x", "guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ],
)
async def test_bad_completion_requests_are_400_naming_the_parameter(client, engine, body, param):
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] is not None
    assert r.json()["error"]["param"].startswith(param)
    wait_idle(engine)


async def test_a_prompt_filling_the_context_can_be_scored(client):
    ids = [5] * MAX_MODEL_LEN
    r = await client.post(
        "/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == MAX_MODEL_LEN
    r = await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


async def test_tokenize_and_detokenize(client, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    r = await client.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True})
    body = r.json()
    assert body["tokens"] == tokenizer.encode("hello world")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    assert len(body["token_strs"]) == body["count"]
    r = await client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["tokens"] == tokenizer.encode_chat("hi", [])
    r = await client.post("/detokenize", json={"tokens": body["tokens"]})
    assert r.json() == {"prompt": "hello world"}
    r = await client.post("/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = await client.post("/tokenize", json={})
    assert r.status_code == 400


async def test_new_endpoints_sit_behind_the_api_key(make_app):
    import httpx

    app = make_app(api_keys=["sk-test-123456"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        for path, body in (
            ("/v1/completions", {"prompt": "x", "max_tokens": 1}),
            ("/tokenize", {"prompt": "x"}),
            ("/detokenize", {"tokens": [5]}),
        ):
            assert (await c.post(path, json=body)).status_code == 401
            ok = await c.post(path, json=body, headers={"Authorization": "Bearer sk-test-123456"})
            assert ok.status_code == 200, ok.text
        assert (await c.get("/tokenizer_info")).status_code == 401
