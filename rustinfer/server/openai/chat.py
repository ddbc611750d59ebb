"""``POST /v1/chat/completions``: messages through the chat template, answers in OpenAI's shapes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from rustinfer.engine.async_engine import RequestStream
from rustinfer.engine.outputs import TokenLogprob
from rustinfer.server.openai.errors import ApiError
from rustinfer.server.openai.protocol import ChatCompletionRequest, ChatMessage
from rustinfer.server.openai.serving import Choice, Serving, finite, now_s, sse, usage_dict
from rustinfer.server.openai.tools import (
    ChatTools,
    assistant_message,
    finish_reason,
    stream_deltas,
)
from rustinfer.server.requests_common import chat_message
from rustinfer.tool_calls import read_message_tool_calls

__all__ = ["ChatCompletions", "message_dicts"]


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Wire messages as the chat template expects them (content as one string)."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise Serving.refuse(
                        f"messages.{i}.content.{j}", f"content of type {part.type!r} (only text)"
                    )
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        message = chat_message(m.role, content, m.name)
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            if m.role != "assistant":
                raise ApiError(
                    400,
                    "only assistant messages carry tool_calls",
                    param=f"messages.{i}.tool_calls",
                )
            message["tool_calls"] = read_message_tool_calls(
                m.tool_calls, f"messages.{i}.tool_calls"
            )
        out.append(message)
    return out


def logprob_content(lps: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [
        {
            "token": lp.token,
            "logprob": finite(lp.logprob),
            "bytes": list(lp.bytes),
            "top_logprobs": [
                {"token": t.token, "logprob": finite(t.logprob), "bytes": list(t.bytes)}
                for t in lp.top
            ],
        }
        for lp in lps
    ]


class ChatCompletions:
    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    def _check(self, req: ChatCompletionRequest) -> None:
        s = self.serving
        s.check_model(req.model)
        if req.functions:
            raise s.refuse("functions", "the deprecated functions API (use tools)")
        if req.function_call not in (None, "none"):
            raise s.refuse("function_call", "the deprecated functions API (use tool_choice)")
        if req.modalities and set(req.modalities) != {"text"}:
            raise s.refuse("modalities", "output other than text")
        for name in ("audio", "prediction", "web_search_options"):
            if getattr(req, name) is not None:
                raise s.refuse(name, name.replace("_", " "))
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    async def __call__(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self._check(req)
        s = self.serving
        template = s.engine.tokenizer.chat_template if s.engine.tokenizer else None
        tools = ChatTools.from_request(req, template, s.tool_call_parser)
        messages, template_vars = tools.prompt(message_dicts(req.messages))
        # Rendering and encoding a long history takes milliseconds: keep it off the loop.
        ids = await asyncio.to_thread(s.engine.render_chat, messages, **template_vars)
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = s.sampling_params(req, max_tokens, logprobs)
        tools.constrain(params)
        streams = await s.submit_all([ids], params, arrival, "chatcmpl")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._stream(rid, streams, params.n, len(ids), include_usage, raw, tools)
            return s.streaming_response(events, "chat")
        choices = await s.collect(streams, params.n, raw)
        return JSONResponse(self._response(rid, choices, len(ids), req.logprobs, tools))

    def _response(
        self,
        rid: str,
        choices: list[Choice],
        prompt_tokens: int,
        logprobs: bool,
        tools: ChatTools,
    ) -> dict[str, Any]:
        parsers = [tools.new_parser() for _ in choices]
        messages = [assistant_message(c.text, p) for c, p in zip(choices, parsers, strict=True)]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now_s(),
            "model": self.serving.model_name,
            "choices": [
                {
                    "index": c.index,
                    "message": m,
                    "logprobs": {"content": logprob_content(c.logprobs), "refusal": None}
                    if logprobs
                    else None,
                    "finish_reason": finish_reason(c.finish_reason, p),
                }
                for c, m, p in zip(choices, messages, parsers, strict=True)
            ],
            "usage": usage_dict(choices, [prompt_tokens], len(choices)),
        }

    async def _stream(
        self,
        rid: str,
        streams: list[RequestStream],
        n: int,
        prompt_tokens: int,
        include_usage: bool,
        raw: Request,
        tools: ChatTools,
    ) -> AsyncIterator[str]:
        created = now_s()
        model = self.serving.model_name
        choices = [Choice(k) for k in range(n)]
        parsers = [tools.new_parser() for _ in range(n)]

        def chunk(index: int, delta: dict[str, Any], **extra: Any) -> str:
            body: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": None, **extra}],
            }
            if include_usage:
                body["usage"] = None
            return sse(body)

        for k in range(n):  # the role first, before any token: clients show the turn at once
            yield chunk(k, {"role": "assistant", "content": ""}, finish_reason=None)
        async for _, out in self.serving.merged(streams, raw):
            choice = choices[out.index]
            choice.add(out)
            extra: dict[str, Any] = {"finish_reason": None}
            if out.logprobs:
                extra["logprobs"] = {"content": logprob_content(out.logprobs), "refusal": None}
            parser = parsers[out.index]
            if parser is None:
                deltas = [{"content": out.text_delta}] if out.text_delta else []
            else:  # text that may open a tool call waits until the parser knows
                deltas = stream_deltas(parser, out.text_delta, out.finished)
            if not deltas and out.logprobs:
                deltas = [{"content": ""}]
            for k, delta in enumerate(deltas):
                yield chunk(out.index, delta, **(extra if k == 0 else {"finish_reason": None}))
            if out.finished:
                yield chunk(
                    out.index, {}, finish_reason=finish_reason(choice.finish_reason, parser)
                )
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage_dict(choices, [prompt_tokens], len(choices)),
                }
            )
