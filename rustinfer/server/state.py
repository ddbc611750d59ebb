"""The server's lifecycle: loading (in the background), ready, shutting down.

The HTTP server answers from its first second: ``/health`` says it is alive, ``/ready`` says 503
until the model is loaded (and again once shutdown has begun), the UI loads, and API routes say
503 with a message instead of hanging.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from rustinfer.engine.async_engine import AsyncEngine
from rustinfer.errors import (
    NotReadyError,
    RustinferError,
    ShuttingDownError,
    UnavailableError,
)
from rustinfer.server.metrics import EngineMetrics
from rustinfer.server.openai.chat import ChatCompletions
from rustinfer.server.openai.completions import Completions
from rustinfer.server.openai.serving import Serving
from rustinfer.server.system_metrics import SystemSampler

__all__ = ["EngineFactory", "ServerState"]

logger = logging.getLogger(__name__)

# Builds the engine (loading the model): runs in a worker thread, may take minutes.
EngineFactory = Callable[[], AsyncEngine]


class ServerState:
    def __init__(
        self,
        factory: EngineFactory,
        served_model_name: str | None = None,
        tool_call_parser: str | None = None,
    ) -> None:
        self._factory = factory
        self._served_name = served_model_name
        self._tool_call_parser = tool_call_parser
        self.engine: AsyncEngine | None = None
        self.serving: Serving | None = None
        self.chat: ChatCompletions | None = None
        self.completions: Completions | None = None
        self.metrics: EngineMetrics | None = None
        self.system = SystemSampler()
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.failed = threading.Event()
        self.shutting_down = False
        self.on_failure: list[Callable[[BaseException], None]] = []
        # Why a loaded engine can no longer serve (a tensor-parallel worker died), else None.
        self.broken: str | None = None

    def mark_broken(self, reason: str) -> None:
        """The engine cannot serve any more: health checks fail from now on (the process
        exits soon after; see :mod:`rustinfer.distributed.workers`)."""
        self.broken = reason

    @property
    def model_name(self) -> str | None:
        return self.serving.model_name if self.serving is not None else self._served_name

    def load(self) -> None:
        """Build the engine (worker thread); ``ready`` or ``failed`` is set when it is done, and
        ``on_failure`` callbacks hear why it failed."""
        try:
            engine = self._factory()
            name = self._served_name or engine.model_name
            engine.model_name = name
            self.metrics = EngineMetrics(name)
            self.metrics.attach(engine)
            engine.start()
            device = engine.core.device
            if device.type == "cuda":
                self.system.set_gpu(device.index or 0)
            self.engine = engine
            parallel = engine.core.loaded.parallel
            if parallel is not None:
                parallel.on_failure(self.mark_broken)
            self.serving = Serving(engine, name, self._tool_call_parser)
            self.chat = ChatCompletions(self.serving)
            self.completions = Completions(self.serving)
        except BaseException as exc:
            if isinstance(exc, RustinferError):
                # A problem the message explains (bad path, flag, plugin): no traceback.
                logger.error("loading the model failed: %s", exc)
            else:
                logger.exception("loading the model failed")
            self.load_error = exc
            self.failed.set()
            for callback in self.on_failure:
                callback(exc)
            return
        self.ready.set()

    def require_serving(self) -> Serving:
        """The serving object, or a 503-mapped error while loading or shutting down."""
        if self.shutting_down:
            raise ShuttingDownError("the server is shutting down: no new requests")
        if self.broken is not None:
            raise UnavailableError(f"the engine cannot serve: {self.broken}")
        if self.serving is None:
            raise NotReadyError(
                "the model is still loading: retry in a few seconds (GET /ready, or the gRPC health service)"
            )
        return self.serving

    async def start(self) -> None:
        self.system.start()
        threading.Thread(target=self.load, name="rustinfer-loader", daemon=True).start()

    async def stop(self) -> None:
        self.shutting_down = True
        self.system.stop()
        if self.engine is not None:
            await self.engine.shutdown()
