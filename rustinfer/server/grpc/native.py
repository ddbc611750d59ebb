"""The native ``rustinfer.v1.Inference`` service: streaming generation, the tokenizer, model info
and aborts, over the same ``ServerState`` (and engine) as REST.

A call's life mirrors REST's: checked (key, readiness, model, fields), tokenized off the loop,
turned into ``SamplingParams`` (which validate), submitted (the engine refuses before any work),
then streamed. Tools, tool choice and past calls go through the same shared code as REST's
(``native_tools``), and so do structured outputs (``native_params``). Refusals are statuses
whose message names the field; the field's path in this service's messages
(``sampling.temperature``, ``tools[0].parameters``) and the error's stable code ride in the
trailing metadata. A call that ends early, by cancel or deadline (grpc.aio cancels the
handler's task), aborts its request in the engine at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

import grpc

from rustinfer.engine.async_engine import AsyncEngine, RequestStream
from rustinfer.engine.outputs import RequestOutput, RequestTimings, TokenLogprob
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.errors import (
    ChatTemplateError,
    DuplicateRequestError,
    InvalidRequestError,
    RequestError,
)
from rustinfer.server.grpc.auth import ERROR_CODE_KEY
from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2 as pb
from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2_grpc as pb_grpc
from rustinfer.server.grpc.native_params import sampling_params_of
from rustinfer.server.grpc.native_tools import (
    CallReaders,
    chat_messages,
    request_tools,
    wire_path,
)
from rustinfer.server.grpc.status import status_of
from rustinfer.server.openai.serving import Serving
from rustinfer.server.requests_common import check_model, check_token_ids
from rustinfer.server.state import ServerState
from rustinfer.tool_calls import RequestTools

__all__ = ["InferenceServicer", "add_native_service", "sampling_params_of"]

logger = logging.getLogger(__name__)

# The trailing metadata key naming the request field to fix (its path in this service's messages).
ERROR_FIELD_KEY = "rustinfer-error-field"
_MODEL_HINT = " (see GetModelInfo)"

# The engine's errors name its parameters bare; on this wire they sit under `sampling.`.
_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def _wire_field(field: str | None, prompt_field: str | None) -> str | None:
    """An engine error's field as its path in this service's request messages."""
    if field is not None and field.startswith("sampling."):
        return field
    if field in _SAMPLING_FIELDS:
        return f"sampling.{field}"
    if field in ("prompt", "messages"):  # the engine's names for whichever input was given
        return prompt_field or field
    return wire_path(field) if field is not None else None


T = TypeVar("T")


async def _guarded(
    context: grpc.aio.ServicerContext, call: Awaitable[T], prompt_field: str | None = None
) -> T:
    """``call``'s result; a refused request ends the call with its status, anything unexpected
    with INTERNAL."""
    try:
        return await call
    except grpc.aio.AbortError:
        raise  # the call was ended on purpose already
    except RequestError as exc:
        field = _wire_field(exc.field, prompt_field)
        message = str(exc)
        if exc.field and wire_path(exc.field) != exc.field:
            # A tool's part, named by the shared readers' OpenAI path: named as this wire does.
            message = message.replace(repr(exc.field), repr(field), 1)
        await _abort(context, status_of(exc), message, exc.code, field)
    except ChatTemplateError as exc:
        code = grpc.StatusCode.INVALID_ARGUMENT
        await _abort(context, code, str(exc), "chat_template_error", "chat")
    except Exception as exc:
        logger.exception("unexpected error in a gRPC call")
        message = f"internal error: {type(exc).__name__}"
        await _abort(context, grpc.StatusCode.INTERNAL, message, None, None)


async def _abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    error_code: str | None,
    field: str | None,
) -> NoReturn:
    metadata = [(ERROR_CODE_KEY, error_code)] if error_code else []
    if field:
        metadata.append((ERROR_FIELD_KEY, field))
    await context.abort(code, message, trailing_metadata=tuple(metadata))
    raise AssertionError("context.abort returned")  # it raises AbortError


def _logprobs(lps: list[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            token=lp.token,
            token_bytes=lp.bytes,
            logprob=lp.logprob,
            top_logprobs=[
                pb.TopLogprob(
                    token_id=t.token_id, token=t.token, token_bytes=t.bytes, logprob=t.logprob
                )
                for t in lp.top
            ],
        )
        for lp in lps
    ]


def _timings(t: RequestTimings) -> pb.Timings:
    return pb.Timings(**{k: v for k, v in dataclasses.asdict(t).items() if v is not None})


def _choice_result(out: RequestOutput) -> pb.ChoiceResult:
    """How a sequence ended, from its final output."""
    result = pb.ChoiceResult(
        index=out.index,
        finish_reason=out.finish_reason or "",
        completion_tokens=out.num_output_tokens,
        timings=_timings(out.timings),
    )
    if isinstance(out.stop_reason, str):
        result.stop_string = out.stop_reason
    elif isinstance(out.stop_reason, int):
        result.stop_token_id = out.stop_reason
    return result


class InferenceServicer(pb_grpc.InferenceServicer):
    """``rustinfer.v1.Inference`` over ``state``'s engine (API keys are the server's
    ``ApiKeyInterceptor``'s job, for every service at once)."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._live: dict[str, RequestStream] = {}  # this service's requests in flight, for Abort

    # -- the RPCs: statuses around the work ------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        which = request.WhichOneof("input")
        await _guarded(context, self._generate(request, context, time.monotonic()), which)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        which = request.WhichOneof("input")
        return await _guarded(context, self._tokenize(request, context), which)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        return await _guarded(context, self._detokenize(request, context))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return await _guarded(context, self._model_info(request, context))

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        return await _guarded(context, self._abort(request, context))

    # -- shared checks -----------------------------------------------------------------------------

    async def _serving(self, context: grpc.aio.ServicerContext, model: str = "") -> Serving:
        """The serving object once readiness and the model check out."""
        serving = self._state.require_serving()  # UNAVAILABLE while loading or shutting down
        check_model(model, serving.model_name, hint=_MODEL_HINT)
        return serving

    @staticmethod
    def _tools(
        serving: Serving, request: pb.GenerateRequest | pb.TokenizeRequest
    ) -> RequestTools | None:
        """The request's tools, checked before any work (None: it has none)."""
        tok = serving.engine.tokenizer
        template = tok.chat_template if tok is not None else None
        return request_tools(request, template, serving.tool_call_parser)

    @staticmethod
    async def _prompt_ids(
        engine: AsyncEngine,
        request: Any,
        which: str | None,
        inputs: str,
        tools: RequestTools | None = None,
    ) -> list[int]:
        """Token ids of a request's input (``which``: its oneof case; ``inputs``: the cases it
        has, for the message when none is set; ``tools``: what a chat prompt offers)."""
        if which == "token_ids":
            return check_token_ids(request.token_ids.ids, engine.vocab_size, "token_ids")
        if which == "chat":
            messages, template_vars = chat_messages(request.chat), {}
            if tools is not None:
                messages, template_vars = tools.prompt(messages)
            # Rendering and encoding a long history takes milliseconds: keep it off the loop.
            return await asyncio.to_thread(engine.render_chat, messages, **template_vars)
        if which == "text":
            tok = engine.tokenizer
            if tok is None:
                raise InvalidRequestError("text", "this model has no tokenizer: send token_ids")
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            return await asyncio.to_thread(tok.encode, request.text, add_special_tokens=add)
        raise InvalidRequestError("input", f"no input: give one of {inputs}")

    # -- Generate ----------------------------------------------------------------------------------

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, arrival: float
    ) -> None:
        serving = await self._serving(context, request.model)
        engine = serving.engine
        params = sampling_params_of(request.sampling)
        tools = self._tools(serving, request)
        if tools is not None:
            tools.constrain(params)  # a forced call is the request's output constraint
        which = request.WhichOneof("input")
        inputs = "'text', 'token_ids' or 'chat'"
        ids = await self._prompt_ids(engine, request, which, inputs, tools)
        rid = request.request_id or f"grpc-{uuid.uuid4().hex}"
        if rid in self._live:
            raise DuplicateRequestError(
                "request_id", f"request id {rid!r} is already in use: pick a unique id"
            )
        if params.structured is not None:
            await engine.compile_structured(params.structured)  # off the engine's thread
        stream = await self._submit(engine, ids, params, rid, arrival)
        self._live[rid] = stream
        try:
            readers = CallReaders(tools, params.n)
            await self._stream(context, rid, stream, len(ids), readers)
        finally:
            # Cancelled (client gone, deadline) or failed: abort in the engine at once.
            if self._live.get(rid) is stream:
                del self._live[rid]
            await stream.aclose()

    async def _submit(
        self,
        engine: AsyncEngine,
        ids: list[int],
        params: SamplingParams,
        rid: str,
        arrival: float,
    ) -> RequestStream:
        metrics = self._state.metrics
        if metrics is not None:
            metrics.track(rid, "grpc", params.n)
        try:
            return await engine.submit(ids, params, rid, arrival)
        except BaseException:
            if metrics is not None:
                metrics.forget(rid)
            raise

    @staticmethod
    async def _stream(
        context: grpc.aio.ServicerContext,
        rid: str,
        stream: RequestStream,
        prompt_tokens: int,
        readers: CallReaders,
    ) -> None:
        finals: dict[int, RequestOutput] = {}
        cached_tokens = 0
        async for out in stream:
            content, calls = readers.read(out)
            # A call's last piece may come with the final output, which brings no new token.
            if out.new_token_ids or out.text_delta or out.logprobs or content or calls:
                chunk = pb.GenerateChunk(
                    index=out.index,
                    text=out.text_delta,
                    token_ids=out.new_token_ids,
                    logprobs=_logprobs(out.logprobs or []),
                    content=content,
                    tool_calls=calls,
                )
                await context.write(pb.GenerateResponse(request_id=rid, chunk=chunk))
            if out.index == 0:
                cached_tokens = out.cached_tokens  # the others share sequence 0's prompt blocks
            if out.finished:
                finals[out.index] = out
        choices = [_choice_result(finals[k]) for k in sorted(finals)]
        for choice in choices:
            readers.complete(choice)
        completion = sum(c.completion_tokens for c in choices)
        usage = pb.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
            cached_tokens=cached_tokens,
        )
        complete = pb.GenerateComplete(choices=choices, usage=usage)
        await context.write(pb.GenerateResponse(request_id=rid, complete=complete))

    # -- unary calls -------------------------------------------------------------------------------

    async def _tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        serving = await self._serving(context, request.model)
        tools = self._tools(serving, request)
        which = request.WhichOneof("input")
        ids = await self._prompt_ids(serving.engine, request, which, "'text' or 'chat'", tools)
        engine = serving.engine
        return pb.TokenizeResponse(token_ids=ids, max_model_len=engine.max_model_len)

    async def _detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        engine = (await self._serving(context, request.model)).engine
        tok = engine.tokenizer
        if tok is None:
            raise InvalidRequestError("token_ids", "this model has no tokenizer")
        ids = list(request.token_ids)
        if ids:
            check_token_ids(ids, engine.vocab_size, "token_ids")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else False
        return pb.DetokenizeResponse(text=await asyncio.to_thread(tok.decode, ids, skip))

    async def _model_info(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        serving = await self._serving(context, request.model)
        engine = serving.engine
        loaded = engine.core.loaded  # facts fixed at load: safe to read beside the engine thread
        tok = engine.tokenizer
        bos = tok.bos_token_id if tok is not None else loaded.config.bos_token_id
        return pb.GetModelInfoResponse(
            model=serving.model_name,
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            has_tokenizer=tok is not None,
            eos_token_ids=engine.core.eos_token_ids,
            bos_token_id=bos,
            architecture=loaded.config.architecture,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
        )

    async def _abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        # No readiness check: running requests may still be stopped during a graceful shutdown,
        # and before the engine exists nothing is live.
        if not request.request_id:
            raise InvalidRequestError("request_id", "give the request_id of a Generate call")
        stream = self._live.get(request.request_id)
        engine = self._state.engine
        if stream is None or stream.finished or engine is None:
            return pb.AbortResponse(aborted=False)
        await engine.abort(request.request_id)  # the stream ends with "abort" finals
        return pb.AbortResponse(aborted=True)


def add_native_service(server: grpc.aio.Server, state: ServerState) -> None:
    """Serve ``rustinfer.v1.Inference`` on ``server`` over ``state``'s engine."""
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(state), server)
