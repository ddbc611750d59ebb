"""The ASGI application: routes, errors, CORS, the web UI, and the engine's lifecycle."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from rustinfer.engine.async_engine import AsyncEngine
from rustinfer.engine.core import EngineConfig
from rustinfer.server.auth import ApiKeyCheck
from rustinfer.server.body_limit import BodyLimit
from rustinfer.server.openai.errors import install_error_handlers
from rustinfer.server.openai.routes import add_routes
from rustinfer.server.settings import ServeSettings
from rustinfer.server.state import EngineFactory, ServerState

__all__ = ["create_app", "engine_factory"]

logger = logging.getLogger(__name__)

_GIB = 1 << 30


def engine_factory(settings: ServeSettings) -> EngineFactory:
    """Load the model the settings name and wrap it in an engine (called in a worker thread)."""

    def build() -> AsyncEngine:
        from rustinfer.runtime.loading import load_model_from  # torch and plugins: not at import

        loaded = load_model_from(settings)
        config = EngineConfig(
            max_num_seqs=settings.max_num_seqs,
            max_waiting=settings.max_queue,
            max_model_len=settings.max_model_len,
            kv_cache_bytes=int(settings.kv_cache_gb * _GIB) if settings.kv_cache_gb else None,
            enforce_eager=settings.enforce_eager,
        )
        return AsyncEngine.from_loaded(loaded, config)

    return build


def create_app(settings: ServeSettings, factory: EngineFactory | None = None) -> FastAPI:
    """The app for ``settings``; ``factory`` builds the engine (default: load per settings)."""
    state = ServerState(
        factory or engine_factory(settings), settings.served_model_name, settings.tool_call_parser
    )
    auth = ApiKeyCheck(settings.api_keys())

    grpc_server = None
    if settings.grpc_port:
        from rustinfer.server.grpc.server import GrpcServer  # grpc: only when it is served

        grpc_server = GrpcServer(state, settings.host, settings.grpc_port, settings.api_keys())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.start()
        if grpc_server is not None:
            await grpc_server.start()
        try:
            yield
        finally:
            # gRPC calls still running finish on the engine before it stops.
            state.shutting_down = True
            if grpc_server is not None:
                await grpc_server.stop(settings.shutdown_grace_s)
            await state.stop()

    app = FastAPI(
        title="rustinfer",
        summary="OpenAI-compatible LLM server",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.rustinfer = state
    app.state.grpc = grpc_server
    install_error_handlers(app)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(BodyLimit)
    add_routes(app, state, auth)
    _mount_ui(app)
    return app


def _mount_ui(app: FastAPI) -> None:
    from rustinfer.server.web import STATIC_DIR

    if not STATIC_DIR.is_dir():
        logger.warning("web UI files are missing from %s: serving the API only", STATIC_DIR)
        return
    # Mounted last, at "/": every API route above takes precedence over a file of the same path.
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="ui")
