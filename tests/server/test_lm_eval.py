"""lm-evaluation-harness's `local-completions` model scores a small local task against the
daemon: log-likelihood requests (echo + logprobs on /v1/completions, token-id prompts) with
the remote tokenizer (/tokenizer_info, /tokenize, /detokenize). No download: the task's JSONL is
written here and read by the `json` dataset builder offline."""

from __future__ import annotations

import json
import math

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the test extra installs lm-eval[api]")

KEY = "sk-lm-eval-0123456789"

TASK = """\
task: chatglm_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"question": "Water is", "choices": [" dry", " wet", " square"], "answer": 1},
    {"question": "北京是", "choices": ["中国的首都", "一种水果"], "answer": 0},
]


def test_local_completions_runs_a_local_task(live, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "chatglm_local_mc.yaml").write_text(TASK.format(data=data))

    server = live(api_keys=[KEY])
    results = simple_evaluate(
        model="local-completions",
        model_args=(
            f"base_url={server.url}/v1/completions,model=chatglm2-6b,"
            f"tokenizer_backend=remote,auth_token={KEY},max_retries=1,max_length=200"
        ),
        tasks=["chatglm_local_mc"],
        task_manager=TaskManager(include_path=str(tasks)),
        num_fewshot=0,
        limit=None,
        log_samples=True,
    )
    scores = results["results"]["chatglm_local_mc"]
    acc = scores["acc,none"]
    assert 0.0 <= acc <= 1.0 and math.isfinite(acc)
    samples = results["samples"]["chatglm_local_mc"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        # one (log-likelihood, is_greedy) per choice, all real scores from the daemon
        lls = [ll for ll, _greedy in (r[0] for r in sample["resps"])]
        assert len(lls) == len(sample["doc"]["choices"])
        assert all(ll < 0 and math.isfinite(ll) for ll in lls)
