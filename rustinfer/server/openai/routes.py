"""The HTTP routes: thin functions over ``ServerState`` and the serving classes.

Public: ``/health``, ``/ready``, ``/metrics`` (Prometheus) and the UI. Behind the API key (when one
is set): ``/v1/*``, ``/tokenize``, ``/detokenize``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from rustinfer.server.auth import ApiKeyCheck
from rustinfer.server.metrics import CONTENT_TYPE
from rustinfer.server.openai.chat import message_dicts
from rustinfer.server.openai.errors import ApiError, error_body
from rustinfer.server.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from rustinfer.server.openai.tools import ChatTools
from rustinfer.server.requests_common import check_token_ids
from rustinfer.server.state import ServerState

__all__ = ["add_routes"]


def add_routes(app: FastAPI, state: ServerState, auth: ApiKeyCheck) -> None:
    public = APIRouter()
    api = APIRouter(dependencies=[Depends(auth)])
    started = int(time.time())

    @public.get("/health")
    async def health() -> JSONResponse:
        if state.broken is not None:
            body = error_body(
                f"the engine cannot serve: {state.broken}", "service_unavailable", None, "unhealthy"
            )
            return JSONResponse(body, 503)
        return JSONResponse({"status": "ok"})

    @public.get("/ready")
    async def ready() -> JSONResponse:
        if state.shutting_down:
            body = error_body(
                "the server is shutting down", "service_unavailable", None, "shutting_down"
            )
            return JSONResponse(body, 503)
        if state.broken is not None:
            body = error_body(
                f"the engine cannot serve: {state.broken}", "service_unavailable", None, "unhealthy"
            )
            return JSONResponse(body, 503)
        if state.failed.is_set():
            body = error_body(
                f"loading the model failed: {state.load_error}",
                "service_unavailable",
                None,
                "load_failed",
            )
            return JSONResponse(body, 503)
        if not state.ready.is_set():
            body = error_body(
                "the model is still loading", "service_unavailable", None, "model_loading"
            )
            return JSONResponse(body, 503)
        return JSONResponse({"status": "ready", "model": state.model_name})

    @public.get("/metrics")
    async def prometheus() -> Response:
        data = state.metrics.render() if state.metrics is not None else b""
        return Response(data, media_type=CONTENT_TYPE)

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        serving = state.require_serving()
        return {
            "object": "list",
            "data": [
                {
                    "id": serving.model_name,
                    "object": "model",
                    "created": started,
                    "owned_by": "rustinfer",
                    "max_model_len": serving.engine.max_model_len,
                }
            ],
        }

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        serving = state.require_serving()
        serving.check_model(model_id)
        return {
            "id": serving.model_name,
            "object": "model",
            "created": started,
            "owned_by": "rustinfer",
            "max_model_len": serving.engine.max_model_len,
        }

    @api.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
        state.require_serving()
        assert state.chat is not None
        return await state.chat(body, raw)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        state.require_serving()
        assert state.completions is not None
        return await state.completions(body, raw)

    @api.get("/v1/metrics")
    async def system_metrics() -> dict[str, Any]:
        sample = dict(state.system.latest())
        engine = state.engine
        if engine is not None and state.metrics is not None:
            stats = engine.stats()
            sample["engine"] = {
                "model": state.model_name,
                "running": stats["running"],
                "waiting": stats["waiting"],
                "kv_cache_usage_perc": round(stats["kv_cache_usage"], 4),
                "tokens_per_second": round(stats["tokens_per_second"], 2),
                **state.metrics.totals(),
            }
        else:
            sample["engine"] = None
        return sample

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        serving = state.require_serving()
        serving.check_model(body.model)
        engine = serving.engine
        tok = engine.tokenizer
        if tok is None:
            raise ApiError(400, "this model has no tokenizer", param="prompt")
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        if body.messages is not None:
            # The prompt a chat request with these messages and tools would get.
            tools = ChatTools.from_request(body, tok.chat_template, serving.tool_call_parser)
            messages, template_vars = tools.prompt(message_dicts(body.messages))
            ids = await asyncio.to_thread(engine.render_chat, messages, **template_vars)
        else:
            ids = await asyncio.to_thread(tok.encode, body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        serving = state.require_serving()
        serving.check_model(body.model)
        engine = serving.engine
        if engine.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer", param="tokens")
        if body.tokens:  # nothing to decode is "", not an error
            check_token_ids(body.tokens, engine.vocab_size, "tokens")
        text = await asyncio.to_thread(engine.tokenizer.decode, body.tokens, False)
        return {"prompt": text}

    app.include_router(public)
    app.include_router(api)
