"""gRPC servers in-process around real AsyncEngines on a tiny random chat model (CPU, float64).

The servers run on an event loop in a thread of their own, as ``rustinfer serve`` runs them beside
REST; the tests are plain synchronous gRPC clients talking to them over loopback, so a call's
cancel or deadline reaches the server the way a remote client's does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from loader_helpers import tiny_trained_tokenizer, write_tokenizer_dir
from model_helpers import random_weights, tiny_config, write_checkpoint

from rustinfer.engine.async_engine import AsyncEngine
from rustinfer.engine.core import EngineConfig
from rustinfer.engine.outputs import RequestOutput
from rustinfer.runtime.loading import LoadedModel, load_model
from rustinfer.server.grpc.native import add_native_service
from rustinfer.server.state import ServerState

T = TypeVar("T")

# Long enough that a request of a few thousand tokens runs for seconds (about 2 ms a token here):
# a cancel that failed to abort would show as a request still running.
CONTEXT = 4096
MODEL_NAME = "tiny-chat"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class LoopThread:
    """An event loop running in a daemon thread; ``run`` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop")
        self._thread.daemon = True
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Served:
    """A ServerState, the finals its engine produced (by request id), and gRPC servers on it."""

    loop: LoopThread
    state: ServerState
    finals: dict[str, list[RequestOutput]] = field(default_factory=dict)
    servers: list[grpc.aio.Server] = field(default_factory=list)

    @property
    def engine(self) -> AsyncEngine:
        assert self.state.engine is not None
        return self.state.engine

    def serve(
        self,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        extra: Callable[[grpc.aio.Server], None] | None = None,
    ) -> int:
        """Start a gRPC server with the native service on a free port; returns the port."""

        async def start() -> int:
            server = grpc.aio.server(interceptors=list(interceptors))
            add_native_service(server, self.state)
            if extra is not None:
                extra(server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self.servers.append(server)
            return port

        return self.loop.run(start())

    def wait_idle(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Poll until the engine holds no request and no KV block; returns its stats then."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.engine.stats()
            busy = stats["requests"] or stats["running"] or stats["waiting"]
            if not busy and stats["kv_blocks_used"] == 0:
                return stats
            assert time.monotonic() < deadline, f"engine still busy after {timeout_s} s: {stats}"
            time.sleep(0.01)

    def close(self) -> None:
        async def stop() -> None:
            for server in self.servers:
                await server.stop(0)
            await self.state.stop()

        self.loop.run(stop())


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer Llama with a small trained tokenizer and a ChatML template."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    tok = tiny_trained_tokenizer(bos_template=False)
    cfg = {**tiny_config(), "vocab_size": tok.get_vocab_size(), "max_position_embeddings": CONTEXT}
    cfg["eos_token_id"] = tok.token_to_id("<|im_end|>")
    write_checkpoint(folder, cfg, random_weights(cfg, seed=3))
    write_tokenizer_dir(
        folder,
        bos_template=False,
        tokenizer_config={"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"},
    )
    return folder


@pytest.fixture(scope="session")
def tiny_loaded(tiny_chat_model: Path) -> LoadedModel:
    # float64: greedy picks never hinge on rounding, whatever the batch.
    return load_model(str(tiny_chat_model), device="cpu", dtype="float64")


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def _start_state(
    loop: LoopThread,
    loaded: LoadedModel,
    config: EngineConfig,
    gate: threading.Event | None = None,
    wait: bool = True,
) -> Served:
    """A ServerState over ``loaded`` whose engine records every final output; ``gate``, when
    given, holds the loading back until it is set."""
    finals: dict[str, list[RequestOutput]] = {}

    def record(outputs: list[RequestOutput]) -> None:  # engine thread
        for out in outputs:
            if out.finished:
                finals.setdefault(out.request_id, []).append(out)

    def build() -> AsyncEngine:
        if gate is not None:
            gate.wait(60)
        return AsyncEngine.from_loaded(loaded, config, observers=[record])

    state = ServerState(build, MODEL_NAME)
    loop.run(state.start())
    if wait:
        assert state.ready.wait(60), state.load_error
    return Served(loop, state, finals)


StateFactory = Callable[..., Served]


@pytest.fixture(scope="session")
def start_state(loop_thread: LoopThread, tiny_loaded: LoadedModel) -> StateFactory:
    """``start_state(config, gate=None, wait=True)``: a Served on the tiny model (close it)."""

    def start(
        config: EngineConfig, gate: threading.Event | None = None, wait: bool = True
    ) -> Served:
        return _start_state(loop_thread, tiny_loaded, config, gate, wait)

    return start


@pytest.fixture(scope="module")
def served(start_state: StateFactory) -> Iterator[Served]:
    """The main state: room for 64 concurrent streams and a few long ones."""
    s = start_state(EngineConfig(max_num_seqs=96, kv_cache_bytes=64 << 20))
    yield s
    s.close()
