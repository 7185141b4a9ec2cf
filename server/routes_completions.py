"""/v1/completions (JSON or SSE) and vLLM's /tokenize, /detokenize and /tokenizer_info.

A completion prompt is raw text: no chat template; ChatGLM's `[gMASK] sop` goes in front unless
`add_special_tokens` is false. A prompt given as token ids is used as given. Each prompt of a
batch is its own engine request (they run side by side); prompt i's n choices answer as indexes
i*n .. i*n+n-1, as OpenAI numbers them. With `echo` the prompt's text comes first, and with
`logprobs` too, its tokens' logprobs (the first one null), computed by the engine in the forward
that prefills the prompt; `max_tokens: 0` then scores the prompt without generating
(lm-evaluation-harness's log-likelihood requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
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
from chatglm_serve.server.chat_turns import role_prompt
from chatglm_serve.server.errors import APIError, from_engine_error
from chatglm_serve.server.generation import ClientDisconnected, EngineStream, until_disconnect
from chatglm_serve.server.metrics import Metrics
from chatglm_serve.server.middleware import request_id
from chatglm_serve.server.prompt import messages_to_chat
from chatglm_serve.server.protocol import ChatCompletionRequest, now
from chatglm_serve.server.protocol_completions import (
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from chatglm_serve.server.routes_openai import (
    _ERRORS,
    CLIENT_CLOSED,
    FIRST_ANSWER_WAIT_S,
    _dumps,
    _finish_reason,
    _Timing,
    answer_name,
    sampling_params,
)
from chatglm_serve.server.state import ServerState
from chatglm_serve.server.structured import compile_constraint

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Prompt:
    ids: list[int]
    text: str  # what echo returns: the prompt string, or the decoded token ids


@dataclasses.dataclass
class _Choice:
    """One choice's reply as it accumulates."""

    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish: str | None = None
    completion_tokens: int = 0


def build_completions_router(state: ServerState, metrics: Metrics, auth: ApiKeyAuth) -> APIRouter:
    settings = state.settings
    router = APIRouter(dependencies=[Depends(auth)], responses=_ERRORS)

    @router.post("/v1/completions", responses={200: {"content": {"text/event-stream": {}}}})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine = state.ready_engine()
        model = answer_name(settings, body.model, state.adapter_names())
        adapter = model if model in state.adapter_names() else None
        prompts = _encode_prompts(engine, body)
        params = sampling_params(body, 0)
        wants_lps = body.logprobs is not None
        params = dataclasses.replace(
            params,
            logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if body.echo and wants_lps else None,
            guided=await compile_constraint(engine, body),
        )
        cid = f"cmpl-{uuid.uuid4().hex}"
        log.info(
            "%s %s: %d prompt(s), %d prompt tokens, n=%d, max_tokens=%s, stream=%s",
            request_id(request.scope),
            cid,
            len(prompts),
            sum(len(p.ids) for p in prompts),
            params.n,
            params.max_tokens,
            body.stream,
        )
        streams = [
            EngineStream(engine, p.ids, params, f"{cid}-{i}", adapter=adapter)
            for i, p in enumerate(prompts)
        ]
        reply = _Reply(engine, body, params, prompts, cid, model, _Timing(metrics))
        if body.stream:
            try:
                await asyncio.gather(*(s.open(FIRST_ANSWER_WAIT_S) for s in streams))
            except EngineError as e:
                await _close_all(streams)
                raise _prompt_error(e) from None
            except BaseException:
                await _close_all(streams)
                raise
            return EventSourceResponse(
                reply.events(streams),
                sep="\n",
                send_timeout=60,
                shutdown_grace_period=settings.stream_grace(),
            )
        try:
            completion = await until_disconnect(request, reply.complete(streams))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        except EngineError as e:
            raise _prompt_error(e) from None
        return JSONResponse(completion)

    @router.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        engine = state.ready_engine()
        answer_name(settings, body.model, state.adapter_names())
        tok = engine.tokenizer
        if body.messages is not None:  # the prompt chat completions would build
            chat = ChatCompletionRequest(messages=body.messages)
            fmt = engine.chat_format
            if not fmt.supports_tools:  # ChatGLM2: the seed's (query, history) prompt
                query, history = messages_to_chat(chat.messages)
                ids = engine.encode_chat(query, history)
            else:  # ChatGLM3 / GLM-4: role turns
                rp = role_prompt(chat, fmt)
                ids = fmt.encode_turns(rp.turns, rp.reply_prefix)
        else:
            ids = tok.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(
            count=len(ids),
            max_model_len=engine.max_model_len,
            tokens=ids,
            token_strs=[engine.token_text(i) for i in ids] if body.return_token_strs else None,
        )

    @router.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        engine = state.ready_engine()
        answer_name(settings, body.model, state.adapter_names())
        _check_ids(engine, body.tokens, "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's; lm-evaluation-harness's remote tokenizer checks for it."""
        engine = state.ready_engine()
        tok = engine.tokenizer
        piece = getattr(tok, "id_to_piece", None)
        eos = getattr(tok, "eos_token_id", None)
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": piece(eos) if piece and eos is not None else None,
            "bos_token": None,  # ChatGLM prompts start with [gMASK] sop, not a BOS token
            "pad_token": piece(tok.pad_token_id)
            if piece and hasattr(tok, "pad_token_id")
            else None,
            "model_max_length": engine.max_model_len,
            "vocab_size": getattr(tok, "vocab_size", None),
        }

    return router


def _check_ids(engine: Any, ids: list[int], param: str) -> None:
    vocab = engine.tokenizer.vocab_size
    if any(t >= vocab for t in ids):
        raise APIError(400, f"token ids must be in [0, {vocab})", code="invalid_value", param=param)


def _encode_prompts(engine: Any, body: CompletionRequest) -> list[_Prompt]:
    tok = engine.tokenizer
    out: list[_Prompt] = []
    for p in body.prompts():
        if isinstance(p, str):
            ids = tok.encode(p, add_special_tokens=body.add_special_tokens)
            text = p
        else:
            _check_ids(engine, p, "prompt")
            ids, text = p, tok.decode(p)
        if not ids:
            raise APIError(400, "The prompt has no tokens.", code="invalid_value", param="prompt")
        # a prompt must leave room for one token, unless the request only scores it
        room = engine.max_model_len + (body.max_tokens == 0)
        if len(ids) >= room:
            raise _prompt_error(PromptTooLongError(len(ids), engine.max_model_len))
        out.append(_Prompt(ids, text))
    return out


def _prompt_error(e: EngineError) -> APIError:
    err = from_engine_error(e)
    if err.param == "messages":  # the engine's name for the prompt of a chat
        err.param = "prompt"
    return err


async def _close_all(streams: list[EngineStream]) -> None:
    for s in streams:
        await s.close()


async def _merged(streams: list[EngineStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) of all streams as they come; every stream closed at the end."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: EngineStream) -> None:
        try:
            async for out in stream.outputs():
                queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        await _close_all(streams)


class _Reply:
    """Turns the engine's outputs of one completion request into OpenAI's shapes."""

    def __init__(
        self,
        engine: Any,
        body: CompletionRequest,
        params: SamplingParams,
        prompts: list[_Prompt],
        cid: str,
        model: str,
        timing: _Timing,
    ) -> None:
        self.engine = engine
        self.body = body
        self.n = params.n
        self.prompts = prompts
        self.cid = cid
        self.model = model
        self.timing = timing
        self.created = now()
        self.echo = body.echo
        self.want_logprobs = body.logprobs is not None
        self.prompt_lps: list[list[TokenLogprob | None] | None] = [None] * len(prompts)
        self.choices = [_Choice() for _ in range(len(prompts) * self.n)]

    # ---- logprobs ----
    def _token(self, token_id: int, text: str) -> str:
        return f"token_id:{token_id}" if self.body.return_tokens_as_token_ids else text

    def _logprobs(
        self, items: list[TokenLogprob | None], first_id: int | None, offset: int
    ) -> dict[str, list]:
        """OpenAI's completion logprobs for items (None = the prompt's first token, first_id)."""
        block: dict[str, list] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for lp in items:
            if lp is None:
                assert first_id is not None
                text = self.engine.token_text(first_id)
                block["tokens"].append(self._token(first_id, text))
                block["token_logprobs"].append(None)
                block["top_logprobs"].append(None)
            else:
                text = lp.token
                block["tokens"].append(self._token(lp.token_id, text))
                block["token_logprobs"].append(lp.logprob)
                top = {self._token(i, t): v for i, t, v in lp.top}
                top.setdefault(self._token(lp.token_id, text), lp.logprob)
                block["top_logprobs"].append(top)
            block["text_offset"].append(offset)
            offset += len(text)
        return block

    def _echo_logprobs(self, p: int) -> dict[str, list] | None:
        lps = self.prompt_lps[p]
        if not self.want_logprobs or lps is None:
            return None
        return self._logprobs(lps, self.prompts[p].ids[0], 0)

    def _note(self, p: int, out: RequestOutput) -> _Choice:
        if out.prompt_logprobs is not None:
            self.prompt_lps[p] = out.prompt_logprobs
        self.timing.tokens(len(out.token_ids))
        c = self.choices[p * self.n + out.index]
        c.completion_tokens = out.completion_tokens
        if out.finished:
            c.finish = _finish_reason(out)
        return c

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p.ids) for p in self.prompts)
        completion = sum(c.completion_tokens for c in self.choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    # ---- JSON ----
    async def complete(self, streams: list[EngineStream]) -> dict[str, Any]:
        try:
            async for p, out in _merged(streams):
                c = self._note(p, out)
                c.text.append(out.text)
                c.logprobs += out.logprobs or []
        finally:
            self.timing.done()
        choices = []
        for k, c in enumerate(self.choices):
            p = k // self.n
            text = "".join(c.text)
            logprobs = None
            if self.want_logprobs:
                head = self._echo_logprobs(p) if self.echo else None
                start = len(self.prompts[p].text) if self.echo else 0
                if head is not None and head["tokens"]:
                    start = head["text_offset"][-1] + len(
                        self.engine.token_text(self.prompts[p].ids[-1])
                    )
                logprobs = self._logprobs(list(c.logprobs), None, start)
                if head is not None:
                    logprobs = {key: head[key] + logprobs[key] for key in logprobs}
            if self.echo:
                text = self.prompts[p].text + text
            choices.append(
                {"index": k, "text": text, "logprobs": logprobs, "finish_reason": c.finish}
            )
        return {
            "id": self.cid,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }

    # ---- SSE ----
    def _chunk(self, index: int, text: str, logprobs: Any, finish: str | None) -> str:
        obj: dict[str, Any] = {
            "id": self.cid,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            ],
        }
        if self.include_usage:
            obj["usage"] = None
        return _dumps(obj)

    @property
    def include_usage(self) -> bool:
        opts = self.body.stream_options
        return bool(opts and opts.include_usage)

    async def events(self, streams: list[EngineStream]) -> AsyncIterator[str]:
        offsets = [0] * len(self.choices)  # text_offset of each choice's next token
        started = [False] * len(self.choices)
        # choices whose echo waits for their prompt's logprobs (they come with choice 0)
        held: list[list[RequestOutput]] = [[] for _ in self.prompts]
        error: dict[str, Any] | None = None

        def emit(p: int, out: RequestOutput) -> list[str]:
            k = p * self.n + out.index
            c = self._note(p, out)
            chunks = []
            if self.echo and not started[k]:
                lps = self._echo_logprobs(p)
                text = self.prompts[p].text
                if lps is not None and lps["tokens"]:
                    offsets[k] = lps["text_offset"][-1] + len(
                        self.engine.token_text(self.prompts[p].ids[-1])
                    )
                else:
                    offsets[k] = len(text)
                chunks.append(self._chunk(k, text, lps, None))
            started[k] = True
            lps = None
            if self.want_logprobs and out.logprobs:
                lps = self._logprobs(list(out.logprobs), None, offsets[k])
                offsets[k] += sum(len(lp.token) for lp in out.logprobs)
            if out.text or lps is not None or out.finished:
                chunks.append(self._chunk(k, out.text, lps, c.finish))
            return chunks

        try:
            async for p, out in _merged(streams):
                if out.prompt_logprobs is not None:
                    self.prompt_lps[p] = out.prompt_logprobs
                waiting = self.echo and self.want_logprobs and self.prompt_lps[p] is None
                if waiting and out.index != 0:
                    held[p].append(out)
                    continue
                for chunk in emit(p, out):
                    yield chunk
                for later in held[p]:
                    for chunk in emit(p, later):
                        yield chunk
                held[p] = []
            for p, outs in enumerate(held):  # their prompt's logprobs never came (aborted)
                for out in outs:
                    for chunk in emit(p, out):
                        yield chunk
        except EngineError as e:
            error = _prompt_error(e).body()
        except Exception:
            log.exception("%s: generation failed mid-stream", self.cid)
            error = APIError(500, "Generation failed.", code="internal_error").body()
        finally:
            self.timing.done()
        if error is not None:
            yield _dumps(error)
        elif self.include_usage:
            yield _dumps(
                {
                    "id": self.cid,
                    "object": "text_completion",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": self.usage(),
                }
            )
        yield "[DONE]"
