"""What both OpenAI endpoints share: parameters, submission, disconnects, usage, SSE framing.

A request's life: checked (model, refused fields), tokenized off the event loop, turned into
``SamplingParams`` (which validate), submitted (the engine refuses before any work: too long,
queue full), then either collected or streamed. A client that goes away, at any point after
submission, aborts its request in the engine at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from rustinfer.engine.async_engine import AsyncEngine, RequestStream
from rustinfer.engine.outputs import RequestOutput, RequestTimings
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.server.openai.errors import ApiError, ClientDisconnected, error_body, error_for
from rustinfer.server.openai.protocol import _SamplingFields
from rustinfer.server.requests_common import (
    build_sampling_params,
    check_model,
    structured_output,
)

__all__ = ["Choice", "Serving", "sse", "usage_dict"]

logger = logging.getLogger(__name__)

# Upper bound on choices per request, so one request cannot queue the whole waiting room.


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event line (``data: ...`` and a blank line)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def finite(value: float) -> float:
    """JSON has no -inf: a token the model rules out entirely reports a very low logprob."""
    return value if math.isfinite(value) else -9999.0


@dataclass
class Choice:
    """One sequence's accumulated result (for non-streaming answers and the usage chunk)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    timings: RequestTimings = field(default_factory=RequestTimings)
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text += out.text_delta
        self.token_ids.extend(out.new_token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.finished:
            # "abort" reaches a client only when the server stops the request itself (shutdown).
            self.finish_reason = out.finish_reason
        self.timings = out.timings
        self.prompt_tokens, self.cached_tokens = out.prompt_tokens, out.cached_tokens


def usage_dict(choices: Sequence[Choice], prompts: Sequence[int], n: int = 1) -> dict[str, Any]:
    """OpenAI usage for a request (prompts counted once, outputs summed) plus the original's
    ``performance`` extension; ``choices`` hold ``n`` per prompt, in prompt order."""
    prompt_tokens = sum(prompts)
    completion = sum(len(c.token_ids) for c in choices)
    ttft = [c.timings.ttft_s for c in choices if c.timings.ttft_s is not None]
    prefill = [c.timings.prefill_s for c in choices if c.timings.prefill_s is not None]
    decode = [c.timings.decode_s for c in choices if c.timings.decode_s is not None]
    iterations = max((len(c.token_ids) - 1 for c in choices), default=0)
    decode_s = max(decode, default=0.0)
    decode_tokens = sum(max(len(c.token_ids) - 1, 0) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in choices[::n])},
        "performance": {
            "prefill_ms": round(min(prefill, default=0.0) * 1000, 3),
            "decode_ms": round(decode_s * 1000, 3),
            "decode_iterations": max(iterations, 0),
            "tokens_per_second": round(decode_tokens / decode_s, 3) if decode_s > 0 else 0.0,
            "time_to_first_token_ms": round(min(ttft, default=0.0) * 1000, 3),
        },
    }


class Serving:
    """The engine as the OpenAI endpoints see it."""

    def __init__(
        self, engine: AsyncEngine, model_name: str, tool_call_parser: str | None = None
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        # The format tool calls are read in (rustinfer.tool_calls.parsers); None: the template's.
        self.tool_call_parser = tool_call_parser

    # -- checks ------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        check_model(model, self.model_name, hint=" (see GET /v1/models)")

    @staticmethod
    def refuse(field_name: str, what: str) -> ApiError:
        return ApiError(
            400,
            f"{what} is not supported by this server yet: remove {field_name!r} from the request",
            param=field_name,
            code="unsupported_parameter",
        )

    def sampling_params(
        self, req: _SamplingFields, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        """The request's sampling fields as engine parameters (validated by SamplingParams)."""
        fields = {
            "logprobs": logprobs,
            "ignore_eos": req.ignore_eos,
            "skip_special_tokens": req.skip_special_tokens,
            "include_stop_str_in_output": req.include_stop_str_in_output,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "min_p": req.min_p,
            "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty,
            "repetition_penalty": req.repetition_penalty,
            "logit_bias": req.logit_bias,
            "seed": req.seed,
            "stop": req.stop,
            "stop_token_ids": req.stop_token_ids,
            "min_tokens": req.min_tokens,
            "structured": structured_output(
                req.response_format,
                req.guided_json,
                req.guided_regex,
                req.guided_choice,
                req.guided_grammar,
            ),
        }
        return build_sampling_params(req.n, max_tokens, fields)

    # -- running --------------------------------------------------------------------------------

    async def submit_all(
        self,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        arrival: float,
        prefix: str,
    ) -> list[RequestStream]:
        """Submit every prompt; if one is refused, the ones already in are aborted."""
        if params.structured is not None:
            # Compiling a grammar (the first one also reads the tokenizer) takes milliseconds
            # to a second: done here, off the engine's thread, it never delays others' steps.
            await self.engine.compile_structured(params.structured)
        streams: list[RequestStream] = []
        try:
            for ids in prompts:
                rid = f"{prefix}-{uuid.uuid4().hex}"
                streams.append(await self.engine.submit(ids, params, rid, arrival))
        except BaseException:
            for stream in streams:
                await stream.abort()
            raise
        return streams

    async def collect(self, streams: list[RequestStream], n: int, raw: Request) -> list[Choice]:
        """Run every stream to its end; a client that disconnects raises ClientDisconnected (and
        ``merged`` has aborted its requests)."""
        choices = [Choice(k) for k in range(len(streams) * n)]
        async for p, out in self.merged(streams, raw):
            choices[p * n + out.index].add(out)
        return choices

    async def merged(
        self, streams: list[RequestStream], raw: Request
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from every stream as they come; the streams are aborted when
        the consumer stops early or the client disconnects."""
        queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue(
            maxsize=2 * len(streams)  # a slow reader makes the streams merge outputs instead
        )

        async def pump(p: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    await queue.put((p, out))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises
                await queue.put(exc)
                return
            await queue.put(None)

        async def watch() -> None:
            await wait_for_disconnect(raw)
            for stream in streams:
                await stream.abort()
            await queue.put(ClientDisconnected())

        pumps = [asyncio.ensure_future(pump(p, s)) for p, s in enumerate(streams)]
        watcher = asyncio.ensure_future(watch())
        try:
            remaining = len(streams)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            watcher.cancel()
            for task in pumps:
                task.cancel()
            for stream in streams:
                await stream.abort()

    def streaming_response(self, events: AsyncIterator[str], what: str) -> StreamingResponse:
        """``events`` as an SSE response (see ``stream_events``)."""
        return StreamingResponse(
            self.stream_events(events, what),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def stream_events(self, events: AsyncIterator[str], what: str) -> AsyncIterator[str]:
        """SSE framing around ``events``: an error after the stream began becomes an error event,
        and the stream always ends with ``data: [DONE]``."""
        try:
            async for event in events:
                yield event
        except ClientDisconnected:
            return
        except Exception as exc:
            err = error_for(exc)
            logger.info("%s stream ended with an error: %s", what, err.message)
            yield sse(error_body(err.message, err.type, err.param, err.code))
        yield sse("[DONE]")


async def wait_for_disconnect(raw: Request) -> None:
    """Return once the client has closed the connection (the body has been read already)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


def now_s() -> int:
    return int(time.time())
