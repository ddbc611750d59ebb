"""The gRPC server beside REST: native ``rustinfer.v1``, KServe's OIP, health and reflection.

It runs on the same event loop as the REST app and serves the same engine (``ServerState``): it
starts while the model loads (health NOT_SERVING, inference calls UNAVAILABLE), turns SERVING
once the engine is ready, and on shutdown turns NOT_SERVING, lets running calls finish within the
grace period, then stops, before the engine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rustinfer.server.grpc.auth import ApiKeyInterceptor
from rustinfer.server.grpc.generated.inference import grpc_service_pb2
from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2
from rustinfer.server.grpc.kserve import add_kserve_service
from rustinfer.server.grpc.native import add_native_service
from rustinfer.server.state import ServerState

__all__ = ["GrpcServer"]

logger = logging.getLogger(__name__)

# Prompts and answers can be long (a whole document as text_input): the default 4 MiB limit on
# messages would refuse them before the engine could say why.
_MAX_MESSAGE_BYTES = 64 << 20
# While loading, how often the health task looks at the loader's events.
_READY_POLL_S = 0.05


class GrpcServer:
    def __init__(self, state: ServerState, host: str, port: int, api_keys: list[str]) -> None:
        self.state = state
        self.host = host
        self.port = port
        self.api_keys = api_keys
        self.bound_port: int | None = None
        self.health = health.aio.HealthServicer()
        self.service_names = [
            inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        ]
        self._server: grpc.aio.Server | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        interceptors = [ApiKeyInterceptor(self.api_keys)] if self.api_keys else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ],
        )
        add_native_service(server, self.state)
        add_kserve_service(server, self.state)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        bound = server.add_insecure_port(f"{self.host}:{self.port}")
        if bound == 0:
            raise OSError(f"cannot bind gRPC to {self.host}:{self.port} (in use?)")
        await server.start()
        self._server, self.bound_port = server, bound
        self._watch = asyncio.create_task(self._serving_when_ready())
        logger.info("gRPC listening on %s:%d", self.host, bound)
        return bound

    async def _set_all(self, status: int) -> None:
        for name in ["", *self.service_names]:  # "": the server as a whole
            await self.health.set(name, status)

    async def _serving_when_ready(self) -> None:
        state = self.state
        while not (state.ready.is_set() or state.failed.is_set()):
            await asyncio.sleep(_READY_POLL_S)
        if state.ready.is_set() and not state.shutting_down:
            await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING at once, then let running calls finish for up to ``grace_s``."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)
            logger.info("gRPC stopped")
