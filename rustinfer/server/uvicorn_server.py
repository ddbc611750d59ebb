"""uvicorn's server, with signals that mark the server as shutting down and exit cleanly."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

import uvicorn

from rustinfer.server.state import ServerState

__all__ = ["Server"]

logger = logging.getLogger(__name__)


class Server(uvicorn.Server):
    """On SIGINT/SIGTERM: ``/ready`` turns 503 and new requests get 503 at once, running ones
    finish within uvicorn's graceful timeout, then the engine stops.

    uvicorn re-raises a captured signal after its graceful shutdown, which would end the process
    with 130/143; a service manager should see exit 0 after a clean shutdown, so the signal is
    handled here and not recorded. A second Ctrl-C forces the exit, as in uvicorn.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.bind_failed = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.state.shutting_down:
            logger.info("shutting down: finishing running requests")
        self.state.shutting_down = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.should_exit and not self.started:
            self.bind_failed = True  # uvicorn logged why (port in use, bad address)
