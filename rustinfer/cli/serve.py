"""``rustinfer serve``: the OpenAI-compatible API and the web UI on one port.

Every option is a field of :class:`ServeSettings`, so each flag also reads from its ``RUSTINFER_*``
environment variable. The HTTP server is up from the first second (``/health``, the UI, ``/ready``
saying 503); the model loads in the background and the URLs are printed once it is ready.
SIGTERM or Ctrl-C: stop accepting, let running requests finish for ``--shutdown-grace-s``, abort
the rest, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import typing
from typing import Any

from pydantic_core import PydanticUndefined

from rustinfer.cli.common import apply_threads

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

_REPEATABLE = {"api_key", "allowed_origins"}


def add_parser(sub: Any) -> None:
    from rustinfer.server.settings import ServeSettings

    p = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible API and the web chat UI",
        description="Serve a model over the OpenAI API with a browser chat UI at '/'. Each "
        "option can also be set by its environment variable, e.g. RUSTINFER_PORT=9000.",
    )
    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"RUSTINFER_{name.upper()}"
        help_text = f"{field.description} [env {env}]"
        if name in _REPEATABLE:
            p.add_argument(flag, action="append", default=None, help=help_text + " (repeatable)")
            continue
        if field.annotation is bool:
            p.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        # Values stay strings here: pydantic converts and validates them, with one message style.
        choices = typing.get_args(field.annotation)
        literal = typing.get_origin(field.annotation) is typing.Literal
        default = (
            "" if field.default in (None, PydanticUndefined) else f" (default {field.default})"
        )
        p.add_argument(
            flag,
            default=None,
            choices=list(choices) if literal else None,
            metavar=None if literal else name.upper(),
            help=help_text.replace(" [env", f"{default} [env", 1),
        )
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    """Flags given on the command line override the environment, which overrides defaults."""
    from rustinfer.server.settings import ServeSettings

    given = {
        name: getattr(args, name)
        for name in ServeSettings.model_fields
        if getattr(args, name, None) is not None
    }
    return ServeSettings(**given)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
            for e in exc.errors()
        )
        raise ValueError(f"invalid option: {problems}") from None
    apply_threads(settings.threads)
    return asyncio.run(_serve(settings))


async def _serve(settings: Any) -> int:
    import uvicorn

    from rustinfer.server.app import create_app
    from rustinfer.server.uvicorn_server import Server

    app = create_app(settings)
    state = app.state.rustinfer
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # uvicorn reads None as "wait forever": a grace of 0 means "abort at once" here.
        timeout_graceful_shutdown=max(settings.shutdown_grace_s, 0.01),
        # Keep-alive connections of finished requests must not hold up a shutdown.
        timeout_keep_alive=5,
    )
    server = Server(config, state)
    exit_code = 0

    def failed(exc: BaseException) -> None:
        nonlocal exit_code
        exit_code = 1
        print(f"rustinfer: error: loading the model failed: {exc}", file=sys.stderr, flush=True)
        server.should_exit = True

    state.on_failure.append(failed)
    announce = asyncio.ensure_future(_announce_when_ready(server, state, settings))
    try:
        await server.serve()
    finally:
        announce.cancel()
    if server.bind_failed:
        return 1
    return exit_code


async def _announce_when_ready(server: Any, state: Any, settings: Any) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    host, port = settings.host, settings.port
    for s in server.servers:
        for sock in s.sockets:
            host, port = sock.getsockname()[:2]
            break
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1"
    base = f"http://{shown}:{port}"
    print(f"rustinfer: listening on {base} (loading the model...)", file=sys.stderr, flush=True)
    while not (state.ready.is_set() or state.failed.is_set()):
        await asyncio.sleep(0.05)
    if state.ready.is_set():
        engine = state.engine
        print(
            f"rustinfer: ready: {state.model_name} on {engine.core.device} "
            f"({_weights_text(engine.core.loaded)})\n"
            f"  web UI:      {base}/\n"
            f"  OpenAI API:  {base}/v1  (e.g. {base}/v1/chat/completions)\n"
            f"  metrics:     {base}/metrics" + _grpc_line(server, shown),
            flush=True,
        )


def _weights_text(loaded: Any) -> str:  # a rustinfer.runtime.loading.LoadedModel
    """The compute dtype and how the matmul weights are held, e.g. "float32, quantization gguf"."""
    dtype = str(loaded.dtype).removeprefix("torch.")
    invariant = ", batch-invariant" if loaded.batch_invariant else ""
    return f"{dtype}, quantization {loaded.quantization}{invariant}"


def _grpc_line(server: Any, host: str) -> str:
    grpc_server = server.config.app.state.grpc
    if grpc_server is None or grpc_server.bound_port is None:
        return ""
    return f"\n  gRPC:        {host}:{grpc_server.bound_port}  (rustinfer.v1, KServe v2, health)"
