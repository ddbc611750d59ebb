"""KServe's Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), with Triton's
``ModelStreamInfer``: what tritonclient's ``InferenceServerClient`` drives.

The served model is the engine's LLM behind the tensors of Triton's vLLM backend (see
``llm_tensors``). Health answers from the first second: ServerLive is true while the model loads,
ServerReady and ModelReady are false until it is ready (and again once shutdown has begun), and
the calls that need the model answer UNAVAILABLE meanwhile.

Failures map as every gRPC face maps them (``status_of``): a bad input, parameter or sampling key
is INVALID_ARGUMENT naming it, an unknown model NOT_FOUND, a full queue RESOURCE_EXHAUSTED. In
ModelStreamInfer a failed request is answered by a response carrying ``error_message`` (and its
request's ``id``), and the stream goes on serving the others.

In a stream each response carries ``triton_final_response``: true on the last one of its request.
With ``triton_enable_empty_final_response`` the request's responses all say false, and one more
response, with no outputs, says true. A client that cancels a call (or closes its stream) aborts
its requests in the engine at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

import rustinfer
from rustinfer.engine.async_engine import RequestStream
from rustinfer.errors import NotFoundError, RequestError, UnavailableError
from rustinfer.server.grpc.generated.inference import grpc_service_pb2 as pb
from rustinfer.server.grpc.generated.inference import grpc_service_pb2_grpc as pb_grpc
from rustinfer.server.grpc.llm_tensors import (
    FINAL_PARAMETER,
    INPUTS,
    OUTPUTS,
    LLMRequest,
    empty_final_response,
    infer_response,
    parse_request,
)
from rustinfer.server.grpc.status import status_of
from rustinfer.server.openai.serving import Serving
from rustinfer.server.requests_common import check_model
from rustinfer.server.state import ServerState

__all__ = ["KServeServicer", "add_kserve_service"]

logger = logging.getLogger(__name__)

# The one version of the one model (KServe versions are strings; Triton's are numbers).
MODEL_VERSION = "1"
PLATFORM = "rustinfer"
# Responses waiting to be written to one stream: a slow reader makes each request's engine stream
# merge its steps (bounded memory) rather than this queue grow.
_STREAM_BACKLOG = 16
_API_LABEL = "kserve"  # the metrics' label for requests taken here


class _Done:
    """Marks the end of a stream's responses."""


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    # -- health and metadata --------------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        state = self.state
        return pb.ServerLiveResponse(live=not state.failed.is_set() and state.broken is None)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready_serving() is not None)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        serving = self._ready_serving()
        ready = (
            serving is not None
            and request.name == serving.model_name
            and request.version in ("", MODEL_VERSION)
        )
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        # "parameters": requests may carry parameters (sampling keys among them).
        return pb.ServerMetadataResponse(
            name="rustinfer", version=rustinfer.__version__, extensions=["parameters"]
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            serving = self.state.require_serving()
            _check_model(serving, request.name, request.version, "name", "version")
        except RequestError as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable: context.abort raises") from exc
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=serving.model_name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=n, datatype=t, shape=s) for n, t, s in INPUTS],
            outputs=[tensor(name=n, datatype=t, shape=s) for n, t, s in OUTPUTS],
        )

    # -- inference ------------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        arrival = time.monotonic()
        try:
            serving = self.state.require_serving()
            _check_model(serving, request.model_name, request.model_version)
            llm = parse_request(request, streaming_rpc=False)
            return await self._run_whole(serving, llm, arrival, final=None)
        except RequestError as exc:
            await _abort(context, exc)
        except Exception as exc:  # the engine failed mid-request: the client learns why
            logger.exception("KServe ModelInfer failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"inference failed: {exc}")
        raise AssertionError("unreachable: context.abort raises")

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests are answered concurrently, each in its own task, as they arrive; responses
        of one request keep their order. The call ends once the client has closed its side and
        every request has had its last response."""
        out: asyncio.Queue[pb.ModelStreamInferResponse | BaseException | _Done] = asyncio.Queue(
            maxsize=_STREAM_BACKLOG
        )
        tasks: set[asyncio.Task[None]] = set()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(self._answer(request, out, time.monotonic()))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(list(tasks))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the request stream broke: end the call
                await out.put(exc)
                return
            await out.put(_Done())

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await out.get()
                if isinstance(item, _Done):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # The client cancelled or went away (or we are done): abort whatever still runs.
            reader.cancel()
            pending = [reader, *tasks]
            for task in pending:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)

    async def _answer(
        self,
        request: pb.ModelInferRequest,
        out: asyncio.Queue[pb.ModelStreamInferResponse | BaseException | _Done],
        arrival: float,
    ) -> None:
        """Every response to one streamed request, an error included, into ``out``."""
        model_name = request.model_name
        try:
            serving = self.state.require_serving()
            model_name = serving.model_name
            _check_model(serving, request.model_name, request.model_version)
            llm = parse_request(request, streaming_rpc=True)
            final = None if llm.empty_final else True
            if llm.stream:
                async with await self._submit(serving, llm, arrival) as stream:
                    async for o in stream:
                        response = infer_response(
                            llm,
                            model_name,
                            o.text_delta,
                            o.finish_reason if o.finished else None,
                            o.prompt_tokens,
                            len(o.new_token_ids),
                            final=bool(o.finished and final),
                        )
                        await out.put(pb.ModelStreamInferResponse(infer_response=response))
            else:
                response = await self._run_whole(serving, llm, arrival, final=bool(final))
                await out.put(pb.ModelStreamInferResponse(infer_response=response))
            if llm.empty_final:
                response = empty_final_response(llm, model_name)
                await out.put(pb.ModelStreamInferResponse(infer_response=response))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, RequestError):
                logger.exception("KServe stream request %r failed", request.id)
            message = str(exc) if isinstance(exc, RequestError) else f"inference failed: {exc}"
            # The id (and the final flag) let a client tell which request failed; tritonclient
            # itself hands only the message to its callback.
            response = pb.ModelInferResponse(
                model_name=model_name, model_version=request.model_version, id=request.id
            )
            response.parameters[FINAL_PARAMETER].bool_param = True
            await out.put(
                pb.ModelStreamInferResponse(error_message=message, infer_response=response)
            )

    async def _run_whole(
        self, serving: Serving, llm: LLMRequest, arrival: float, final: bool | None
    ) -> pb.ModelInferResponse:
        """Run one request to its end: one response with the whole text."""
        text: list[str] = [llm.prompt] if llm.prepend_prompt else []
        finish_reason: str | None = None
        prompt_tokens = tokens = 0
        async with await self._submit(serving, llm, arrival) as stream:
            async for o in stream:
                text.append(o.text_delta)
                tokens += len(o.new_token_ids)
                prompt_tokens = o.prompt_tokens
                if o.finished:
                    finish_reason = o.finish_reason
        return infer_response(
            llm, serving.model_name, "".join(text), finish_reason, prompt_tokens, tokens, final
        )

    async def _submit(self, serving: Serving, llm: LLMRequest, arrival: float) -> RequestStream:
        request_id = f"kserve-{uuid.uuid4().hex}"
        metrics = self.state.metrics
        if metrics is not None:
            metrics.track(request_id, _API_LABEL)
        try:
            return await serving.engine.submit(llm.prompt, llm.params, request_id, arrival)
        except BaseException:
            if metrics is not None:
                metrics.forget(request_id)
            raise

    def _ready_serving(self) -> Serving | None:
        try:
            return self.state.require_serving()
        except UnavailableError:
            return None


def _check_model(
    serving: Serving,
    name: str,
    version: str,
    name_field: str = "model_name",
    version_field: str = "model_version",
) -> None:
    check_model(name, serving.model_name, name_field, " (see ModelMetadata)")
    if version not in ("", MODEL_VERSION):
        raise NotFoundError(
            f"model {serving.model_name!r} has no version {version!r}; its one version is "
            f"{MODEL_VERSION!r} (or leave the version empty)",
            version_field,
        )


async def _abort(context: grpc.aio.ServicerContext, exc: RequestError) -> None:
    await context.abort(status_of(exc), str(exc))


def add_kserve_service(server: grpc.aio.Server, state: ServerState) -> None:
    """Serve KServe's ``inference.GRPCInferenceService`` for ``state``'s engine on ``server``."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(state), server)
