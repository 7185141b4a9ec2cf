"""Run by test_tensor_parallel under `torchrun --nproc-per-node 2`: rank 0 prints the logits of a
few steps as JSON; rank 1 serves them and returns None."""

from __future__ import annotations

import json
import sys

import torch

from chatglm_serve.engine.tp_worker import TPLoadSpec, start_tensor_parallel
from tests.paged import PagedRunner


def main(path: str) -> None:
    started = start_tensor_parallel(TPLoadSpec(path, "float32", num_threads=1, tokenizer=False), 2)
    if started is None:  # rank 1: rank 0 has closed the group
        return
    model, _ = started
    try:
        r = PagedRunner(model)
        logits = [r.step([(0, list(range(5, 30)))])[-1]]
        for i in range(3):
            logits.append(r.step([(0, [40 + i])])[-1])
        print(json.dumps(torch.stack(logits).tolist()))
    finally:
        model.close()


if __name__ == "__main__":
    main(sys.argv[1])
