"""Schemathesis against a running daemon, judged by our contract rather than by the schema alone.

Shared by tests/reliability/test_fuzz.py (bounded, in CI) and bench/fuzz_long.py (the long run).
Every operation in the daemon's own /openapi.json (legacy `POST /` included) gets generated
requests, positive (fits the schema) and negative (breaks it). An answer passes when it is
- a 4xx whose body is OpenAI's error shape {"error": {message, type, param, code}}, or
- a 2xx that conforms to the schema (JSON), or a well-formed SSE stream ending in [DONE];
anything else (a 5xx, a timeout, a dropped connection, a malformed body) is a problem, recorded
with a curl command that replays it. Problems are collected, not raised, so one run reports all.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import hypothesis.errors
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class FuzzResult:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)  # status code -> count
    per_operation: Counter = field(default_factory=Counter)  # "POST /" -> count
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        ops = ", ".join(f"{op}: {n}" for op, n in sorted(self.per_operation.items()))
        return (
            f"{self.requests} requests in {self.seconds:.1f}s; {self.server_errors} 5xx; "
            f"{len(self.problems)} problems\n  statuses: {statuses}\n  operations: {ops}"
        )


def error_shape_problem(body: Any) -> str | None:
    """None when `body` is OpenAI's error object, else what is wrong with it."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return f"not an error object: {str(body)[:200]}"
    err = body["error"]
    if not isinstance(err, dict) or set(err) != ERROR_KEYS:
        return f"error keys {sorted(err) if isinstance(err, dict) else err!r}"
    if not (isinstance(err["message"], str) and err["message"]):
        return "error.message is not a non-empty string"
    if not (isinstance(err["type"], str) and err["type"]):
        return "error.type is not a non-empty string"
    for key in ("param", "code"):
        if err[key] is not None and not isinstance(err[key], str):
            return f"error.{key} is neither null nor a string"
    return None


# What a streamed event's "object" is, per OpenAI: chat chunks, and completions' own objects.
CHUNK_OBJECTS = {"chat.completion.chunk", "text_completion"}


def sse_problem(text: str, complete: bool = True) -> str | None:
    """None when `text` is a (chat) completion stream (chunks, maybe an error, then [DONE]; only
    whole events when the client stopped reading early: complete=False)."""
    events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    if complete and (not events or events[-1] != "[DONE]"):
        return f"stream does not end with [DONE]: ...{text[-300:]!r}"
    for event in events:
        if event == "[DONE]":
            continue
        try:
            obj = json.loads(event)
        except json.JSONDecodeError:
            return f"stream event is not JSON: {event[:200]!r}"
        if "error" in obj:
            problem = error_shape_problem(obj)
            if problem:
                return f"stream error event: {problem}"
        elif obj.get("object") not in CHUNK_OBJECTS or not isinstance(obj.get("choices"), list):
            return f"stream event is not a chunk: {event[:200]!r}"
    return None


def judge(case: schemathesis.Case, response: schemathesis.Response) -> str | None:
    """None when the answer keeps the contract, else what is wrong."""
    status = response.status_code
    text = response.content.decode("utf-8", "replace")
    if status >= 500:
        return f"{status}: {text[:300]!r}"
    if 400 <= status < 500:
        try:
            return error_shape_problem(json.loads(response.content))
        except ValueError:
            return f"{status} body is not JSON: {text[:200]!r}"
    if not 200 <= status < 300:
        return f"unexpected status {status}"
    content_type = ",".join(response.headers.get("content-type", []))
    if content_type.startswith("text/event-stream"):
        # schemathesis stops reading a stream after so many events (then it hangs up)
        return sse_problem(text, complete=not response.stream_cut_short)
    try:
        case.validate_response(
            response, checks=[response_schema_conformance, content_type_conformance]
        )
    except FailureGroup as e:  # the answer breaks the schema
        kinds = "; ".join(f"{f.title}: {f.message}" for f in e.exceptions)
        return f"{status} does not conform: {kinds[:800]}"
    return None


def _curl(case: schemathesis.Case, base_url: str) -> str:
    try:
        return case.as_curl_command(base_url=base_url)
    except Exception:  # some generated requests cannot be written as curl; the case says enough
        return repr(case)


def _caller(
    label: str,
    base_url: str,
    session: requests.Session,
    headers: dict[str, str] | None,
    timeout: float,
    result: FuzzResult,
):
    """The body of one operation's property: send the case, judge the answer, record."""

    def one(case: schemathesis.Case) -> None:
        result.requests += 1
        result.per_operation[label] += 1
        try:
            response = case.call(
                base_url=base_url, session=session, headers=headers, timeout=timeout
            )
        except requests.RequestException as e:  # a hang (timeout) or a dropped connection
            result.problems.append(f"{label}: {type(e).__name__}: {e}\n  {_curl(case, base_url)}")
            return
        result.statuses[response.status_code] += 1
        problem = judge(case, response)
        if problem is not None:
            result.problems.append(f"{label}: {problem}\n  {_curl(case, base_url)}")

    return one


def fuzz(
    base_url: str,
    *,
    max_examples: int = 30,
    modes: tuple[GenerationMode, ...] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
    headers: dict[str, str] | None = None,
    seed: int | None = 0,
    timeout: float = 60.0,
) -> FuzzResult:
    """Fuzz every operation of the daemon at `base_url`, `max_examples` per operation and mode.

    `headers` go on every request (an API key). `seed` makes the run repeatable (None = random).
    """
    schema = schemathesis.openapi.from_url(base_url.rstrip("/") + "/openapi.json")
    # Repro commands must show the request as sent ("max_tokens" looks like a secret to it); the
    # headers given here (an API key) are not part of them anyway.
    schema.config.output.sanitization.update(enabled=False)
    result = FuzzResult()
    session = requests.Session()
    start = time.perf_counter()
    for op_result in schema.get_all_operations():
        op = op_result.ok()
        label = f"{op.method.upper()} {op.path}"
        one = _caller(label, base_url, session, headers, timeout, result)
        for mode in modes:
            test = hypothesis.given(op.as_strategy(generation_mode=mode))(one)
            test = hypothesis.settings(
                max_examples=max_examples,
                deadline=None,
                database=None,  # no example database left in the working tree
                phases=[Phase.explicit, Phase.generate],  # no shrinking: problems are collected
                suppress_health_check=list(HealthCheck),
            )(test)
            if seed is not None:
                test = hypothesis.seed(seed)(test)
            # Unsatisfiable: nothing in this operation can be made invalid (no parameters, no body)
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):
                test()
    result.seconds = time.perf_counter() - start
    return result
