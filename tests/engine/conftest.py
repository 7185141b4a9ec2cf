"""Session fixtures for engine tests: the demo tokenizer and a tiny fp32 ChatGLM2 built once."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.demo import demo_config
from chatglm_serve.model.demo_tokenizer import demo_corpus_lines, train_demo_tokenizer_bytes
from chatglm_serve.model.tokenizer import ChatGLMTokenizer


@pytest.fixture(scope="session")
def tokenizer() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_bytes(train_demo_tokenizer_bytes())


@pytest.fixture(scope="session")
def model(tokenizer) -> ChatGLMForCausalLM:
    # The demo model's shape (narrow: 2 layers, hidden 64), fp32, with a shorter context so the
    # tests' KV caches stay small. std=0.5 gives peaked logits: greedy choices have clear margins.
    cfg = dataclasses.replace(demo_config(tokenizer.vocab_size), seq_length=512)
    return ChatGLMForCausalLM.random(cfg, seed=1234, std=0.5)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return demo_corpus_lines()


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # The tiny model's matrices are far too small to split across threads; with the CPU shared
    # (other tests, 2 cores) OpenMP hand-offs would cost 50x the math itself.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
