"""/v1/chat/completions (JSON or SSE), /v1/models, and Next-Web's billing probes."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from chatglm_serve.engine.types import (
    EngineError,
    PromptTooLongError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from chatglm_serve.server.auth import ApiKeyAuth
from chatglm_serve.server.chat_turns import check_tools_supported, role_prompt
from chatglm_serve.server.errors import APIError, from_engine_error
from chatglm_serve.server.generation import ClientDisconnected, EngineStream, until_disconnect
from chatglm_serve.server.metrics import Metrics
from chatglm_serve.server.middleware import request_id
from chatglm_serve.server.prompt import messages_to_chat
from chatglm_serve.server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    LoadLoRARequest,
    ModelCard,
    ModelList,
    UnloadLoRARequest,
    completion_id,
    now,
)
from chatglm_serve.server.settings import Settings
from chatglm_serve.server.state import ServerState
from chatglm_serve.server.structured import compile_constraint
from chatglm_serve.server.tools import PassThrough, ReplyParser, ToolCall

log = logging.getLogger(__name__)

# ChatGLM2's own chat() defaults, used when a request leaves them out (OpenAI's are 1 and 1).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.8
# How long a streaming request may wait for the engine's first answer before its headers go out.
FIRST_ANSWER_WAIT_S = 1.0
CLIENT_CLOSED = 499  # nginx's "client closed request", only ever seen in our access log

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}


def answer_name(settings: Settings, asked: str | None, adapters: Collection[str] = ()) -> str:
    """The model name a response carries: a fine-tune (LoRA / P-Tuning v2) when `asked` names
    one of `adapters`, else the served name (404 for an unknown one when names are strict)."""
    if asked is not None and asked in adapters:
        return asked
    if settings.strict_model_name and asked not in settings.model_names():
        raise APIError(
            404,
            f"The model {asked!r} does not exist; this server serves "
            f"{', '.join(map(repr, settings.model_names()))}.",
            code="model_not_found",
            param="model",
        )
    return settings.served_model_name


def check_prompt_fits(prompt_tokens: int, max_model_len: int) -> None:
    """A prompt must leave room for at least one reply token; else 400 naming both numbers."""
    if prompt_tokens >= max_model_len:
        raise from_engine_error(PromptTooLongError(prompt_tokens, max_model_len))


def sampling_params(
    body: ChatCompletionRequest | Any, prompt_tokens: int, settings: Settings | None = None
) -> SamplingParams:
    """Chat's sampling parameters (a completion request has the same fields, by the same names).
    With settings, a request that sets no limit gets --default-max-tokens."""
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    top_p = DEFAULT_TOP_P if body.top_p is None else body.top_p
    if top_p == 0.0:  # nucleus of probability 0 = only the top token
        temperature, top_p = 0.0, 1.0
    max_tokens = body.reply_budget()
    if max_tokens is None and body.max_length is not None:
        max_tokens = max(1, body.max_length - prompt_tokens)
    if settings is not None:
        max_tokens = settings.reply_limit(max_tokens)  # --default-max-tokens
    # Larger than what remains of the context is not an error: the engine clips it (finish
    # "length"); None means up to the rest of the context.
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=max(0, body.top_k or 0),
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        stop=body.stop_list(),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        n=body.n,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        logit_bias=dict(body.logit_bias or {}),
    )


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def logprobs_json(items: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": _token_bytes(lp.token),
            "top_logprobs": [
                {"token": t, "logprob": p, "bytes": _token_bytes(t)} for _, t, p in lp.top
            ],
        }
        for lp in items
    ]


class _Timing:
    """TTFT and per-token latency of one request, into the metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last: float | None = None

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        t = time.perf_counter()
        if self.last is None:
            self.metrics.time_to_first_token.observe(t - self.start)
        else:
            per = (t - self.last) / count
            for _ in range(count):
                self.metrics.inter_token_latency.observe(per)
        self.last = t

    def done(self) -> None:
        self.metrics.request_latency.observe(time.perf_counter() - self.start)


def build_openai_router(state: ServerState, metrics: Metrics, auth: ApiKeyAuth) -> APIRouter:
    settings = state.settings
    router = APIRouter(dependencies=[Depends(auth)], responses=_ERRORS)

    def card(name: str, parent: str | None = None) -> ModelCard:
        engine = state.engine
        if engine is None:
            return ModelCard(id=name, created=state.started, parent=parent)
        return ModelCard(
            id=name,
            created=state.started,
            # a fine-tune is its own root and names its base as parent (vLLM's LoRA listing)
            root=name if parent else getattr(engine, "model_member", None),
            parent=parent,
            chat_template=engine.chat_format.name,
        )

    def model_cards() -> list[ModelCard]:
        base = settings.served_model_name
        return [card(n) for n in settings.model_names()] + [
            card(n, parent=base) for n in state.adapter_names()
        ]

    @router.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=model_cards())

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str) -> ModelCard:
        for c in model_cards():
            if c.id == model_id:
                return c
        raise APIError(
            404,
            f"The model {model_id!r} does not exist.",
            code="model_not_found",
            param="model",
        )

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRARequest) -> dict[str, str]:
        engine = state.ready_engine()
        if body.lora_name in settings.model_names() or body.lora_name in state.adapter_names():
            raise APIError(400, f"The name {body.lora_name!r} is in use.", param="lora_name")
        try:
            await engine.load_adapter(body.lora_name, body.lora_path)
        except EngineError as e:
            raise from_engine_error(e) from None
        return {"status": "ok", "lora_name": body.lora_name}

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRARequest) -> dict[str, str]:
        engine = state.ready_engine()
        try:
            await engine.unload_adapter(body.lora_name)
        except EngineError as e:
            raise from_engine_error(e) from None
        return {"status": "ok", "lora_name": body.lora_name}

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        engine = state.ready_engine()
        model = answer_name(settings, body.model, state.adapter_names())
        fmt = engine.chat_format
        if not fmt.supports_tools:  # ChatGLM2: the seed's (query, history) prompt
            check_tools_supported(body, fmt.name)
            query, history = messages_to_chat(body.messages)
            prompt_ids = engine.encode_chat(query, history)
            parser: Callable[[], Any] = PassThrough
        else:  # ChatGLM3 / GLM-4: role turns, tools, the reply's metadata line parsed
            rp = role_prompt(body, fmt)
            prompt_ids = fmt.encode_turns(rp.turns, rp.reply_prefix)
            parser = partial(ReplyParser, fmt.name, rp.tools, rp.forced, fmt.segment_token_id)
        check_prompt_fits(len(prompt_ids), engine.max_model_len)
        params = sampling_params(body, len(prompt_ids), settings)
        params.guided = await compile_constraint(engine, body)
        cid = completion_id()
        log.info(
            "%s %s: %d prompt tokens, n=%d, max_tokens=%s, stream=%s",
            request_id(request.scope),
            cid,
            len(prompt_ids),
            params.n,
            params.max_tokens,
            body.stream,
        )
        adapter = model if model in state.adapter_names() else None
        stream = EngineStream(engine, prompt_ids, params, cid, adapter=adapter)
        timing = _Timing(metrics)
        if body.stream:
            try:
                await stream.open(FIRST_ANSWER_WAIT_S)
            except EngineError as e:
                await stream.close()
                raise from_engine_error(e) from None
            except BaseException:
                await stream.close()
                raise
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse_events(
                stream, cid, model, len(prompt_ids), params.n, include_usage, timing, parser
            )
            return EventSourceResponse(
                events,
                sep="\n",
                send_timeout=60,
                shutdown_grace_period=settings.stream_grace(),
            )
        try:
            completion = await until_disconnect(
                request, _complete(stream, cid, model, len(prompt_ids), params.n, timing, parser)
            )
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        except EngineError as e:
            raise from_engine_error(e) from None
        return JSONResponse(completion)

    # ChatGPT-Next-Web's usage panel. We keep no money accounts: a clean 404 (token counts are in
    # every response's `usage` and in /metrics).
    @router.get("/dashboard/billing/subscription", include_in_schema=False)
    @router.get("/dashboard/billing/usage", include_in_schema=False)
    @router.get("/v1/dashboard/billing/subscription", include_in_schema=False)
    @router.get("/v1/dashboard/billing/usage", include_in_schema=False)
    async def billing() -> None:
        raise APIError(
            404,
            "Billing is not provided by this server; token counts are in each response's "
            "usage and in /metrics.",
            code="not_supported",
        )

    return router


async def _complete(
    stream: EngineStream,
    cid: str,
    model: str,
    prompt_tokens: int,
    n: int,
    timing: _Timing,
    parser: Callable[[], Any] = PassThrough,
) -> dict[str, Any]:
    texts: list[list[str]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    completion_tokens = [0] * n
    logprobs: list[list[dict[str, Any]] | None] = [None] * n
    parsers = [parser() for _ in range(n)]
    calls: list[ToolCall | None] = [None] * n
    try:
        async for out in stream.outputs():
            timing.tokens(len(out.token_ids))
            texts[out.index].append(parsers[out.index].feed(out.text, out.token_ids))
            completion_tokens[out.index] = out.completion_tokens
            if out.logprobs is not None:
                logprobs[out.index] = (logprobs[out.index] or []) + logprobs_json(out.logprobs)
            if out.finished:
                finish[out.index] = _finish_reason(out)
                tail, calls[out.index] = parsers[out.index].finish()
                texts[out.index].append(tail)
                if calls[out.index] is not None:
                    finish[out.index] = "tool_calls"
    finally:
        await stream.close()
        timing.done()
    total = sum(completion_tokens)
    return {
        "id": cid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": _message("".join(texts[i]), calls[i]),
                "finish_reason": finish[i],
                "logprobs": None if logprobs[i] is None else {"content": logprobs[i]},
            }
            for i in range(n)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": total,
            "total_tokens": prompt_tokens + total,
        },
    }


def _message(content: str, call: ToolCall | None) -> dict[str, Any]:
    if call is None:
        return {"role": "assistant", "content": content}
    return {"role": "assistant", "content": content or None, "tool_calls": [call.json()]}


def _tool_call_deltas(call: ToolCall) -> list[dict[str, Any]]:
    """OpenAI's streamed tool call: id + name first, then the arguments piece by piece."""
    head = {"index": 0, "id": call.id, "type": "function"}
    deltas = [{"tool_calls": [{**head, "function": {"name": call.name, "arguments": ""}}]}]
    deltas += [
        {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in call.pieces
    ]
    return deltas


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason.value if out.finish_reason is not None else None


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def _sse_events(
    stream: EngineStream,
    cid: str,
    model: str,
    prompt_tokens: int,
    n: int,
    include_usage: bool,
    timing: _Timing,
    parser: Callable[[], Any] = PassThrough,
) -> AsyncIterator[str]:
    created = now()
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return _dumps(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
                **usage_field,
            }
        )

    completion_tokens = [0] * n
    parsers = [parser() for _ in range(n)]
    error: dict[str, Any] | None = None
    try:
        # The role first: the stream is open (headers sent) even while the request still queues.
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for out in stream.outputs():
            timing.tokens(len(out.token_ids))
            completion_tokens[out.index] = out.completion_tokens
            lp = {"content": logprobs_json(out.logprobs)} if out.logprobs else None
            text = parsers[out.index].feed(out.text, out.token_ids)
            if text or lp is not None:
                yield chunk(out.index, {"content": text}, lp=lp)
            if out.finished:
                tail, call = parsers[out.index].finish()
                if tail:
                    yield chunk(out.index, {"content": tail})
                if call is not None:
                    for delta in _tool_call_deltas(call):
                        yield chunk(out.index, delta)
                yield chunk(out.index, {}, "tool_calls" if call else _finish_reason(out))
    except EngineError as e:
        error = from_engine_error(e).body()
    except Exception:
        log.exception("%s: generation failed mid-stream", cid)
        error = APIError(500, "Generation failed.", code="internal_error").body()
    finally:
        await stream.close()
        timing.done()
    if error is not None:
        yield _dumps(error)
    elif include_usage:
        total = sum(completion_tokens)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": total,
            "total_tokens": prompt_tokens + total,
        }
        yield _dumps(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
        )
    yield "[DONE]"
