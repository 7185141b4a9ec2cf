"""The seed's api.py: POST / with {prompt, history, max_length, top_p, temperature}.

Same defaults (max_length 2048 counting prompt and reply, top_p 0.7, temperature 0.95), same
answer {response, history, status, time}, and the reply post-processed as the seed's
model.chat() does (stripped, "[[训练时间]]" -> "2023年").
"""

from __future__ import annotations

import datetime
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from chatglm_serve.engine.types import EngineError, SamplingParams
from chatglm_serve.server.auth import ApiKeyAuth
from chatglm_serve.server.errors import from_engine_error
from chatglm_serve.server.generation import ClientDisconnected, EngineStream, until_disconnect
from chatglm_serve.server.middleware import request_id
from chatglm_serve.server.protocol import LegacyRequest, LegacyResponse, completion_id
from chatglm_serve.server.routes_openai import CLIENT_CLOSED, check_prompt_fits
from chatglm_serve.server.settings import Settings
from chatglm_serve.server.state import ServerState

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
DEFAULT_TOP_P = 0.7
DEFAULT_TEMPERATURE = 0.95


def process_response(text: str) -> str:
    return text.strip().replace("[[训练时间]]", "2023年")


def legacy_reply_limit(max_length: int | None, prompt_tokens: int, settings: Settings) -> int:
    """max_length counts the prompt too; like HF generate, at least one new token. Without one,
    the seed's default length, capped by --default-max-tokens where that is set."""
    if max_length:
        return settings.reply_limit(max(1, max_length - prompt_tokens)) or 1
    seed_default = max(1, DEFAULT_MAX_LENGTH - prompt_tokens)
    return min(settings.reply_limit(None) or seed_default, seed_default)


def build_legacy_router(state: ServerState, auth: ApiKeyAuth) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)])

    @router.post("/", response_model=LegacyResponse, summary="The seed's api.py (ChatGLM2 legacy)")
    async def legacy_chat(body: LegacyRequest, request: Request) -> LegacyResponse | Response:
        engine = state.ready_engine()
        history = [(q, a) for q, a in body.history or []]
        prompt_ids = engine.encode_chat(body.prompt, history)
        check_prompt_fits(len(prompt_ids), engine.max_model_len)
        params = SamplingParams(
            temperature=body.temperature or DEFAULT_TEMPERATURE,
            top_p=body.top_p or DEFAULT_TOP_P,
            max_tokens=legacy_reply_limit(body.max_length, len(prompt_ids), state.settings),
        )
        rid = completion_id()
        log.info("%s %s: legacy, %d prompt tokens", request_id(request.scope), rid, len(prompt_ids))
        stream = EngineStream(engine, prompt_ids, params, rid)

        async def run() -> str:
            parts: list[str] = []
            try:
                async for out in stream.outputs():
                    parts.append(out.text)
            finally:
                await stream.close()
            return "".join(parts)

        try:
            text = await until_disconnect(request, run())
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        except EngineError as e:
            raise from_engine_error(e) from None
        response = process_response(text)
        time = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return LegacyResponse(
            response=response,
            history=[[q, a] for q, a in history] + [[body.prompt, response]],
            time=time,
        )

    return router
