"""The asyncio face of the engine: submit, stream, abort, and read-only state for servers.

``EngineCore`` is synchronous and not thread-safe, so exactly one thread (the engine thread started
here) ever touches it. Coroutines talk to that thread through a command queue guarded by a
condition variable; the thread hands outputs back to each request's stream with
``loop.call_soon_threadsafe``. The event loop therefore never waits on a model forward pass.

A stream never grows without bound under a slow reader: outputs of a sequence that are still
unread are merged into one (see :class:`RequestStream`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rustinfer.engine.core import EngineConfig, EngineCore
from rustinfer.engine.outputs import RequestOutput
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.engine.structured import StructuredOutput
from rustinfer.errors import InvalidRequestError, ShuttingDownError
from rustinfer.runtime.loading import LoadedModel
from rustinfer.tokenizer import Tokenizer

__all__ = ["AsyncEngine", "EngineShutdownError", "RequestStream", "StepObserver"]

logger = logging.getLogger(__name__)

# After a failed step whose cleanup also failed, wait this long before stepping again, so a
# persistent fault logs a few lines a second instead of spinning a core.
_FAILURE_BACKOFF_S = 0.1

# The name this error had before the one error hierarchy; kept for callers that catch it.
EngineShutdownError = ShuttingDownError

# Called on the engine thread after every step with that step's outputs; must be quick and must
# not raise (a failing observer is logged and skipped). Metrics recorders hang here, so every face
# of the server reports the same numbers.
StepObserver = Callable[[list[RequestOutput]], None]


class RequestStream:
    """One submitted request's outputs, as an async iterator (all ``n`` sequences interleaved).

    Outputs wait in a small buffer: at most one unread output per sequence, since a new output of
    a sequence whose previous one is still unread is merged into it. A slow reader therefore gets
    fewer, larger outputs, and memory is bounded by the request's own size. Leaving early
    (``aclose()``, ``abort()``, cancellation, ``async with`` exit) aborts the request in the engine
    at its next step.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, n: int) -> None:
        self.request_id = request_id
        self._engine = engine
        self._n = n
        self._buffer: deque[RequestOutput | BaseException] = deque()
        self._unread: dict[int, RequestOutput] = {}  # sequence index -> its output in _buffer
        self._wakeup = asyncio.Event()
        self._finished: set[int] = set()
        self._closed = False

    # called on the event loop (through call_soon_threadsafe) by the engine thread
    def _put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput):
            pending = self._unread.get(item.index)
            if pending is not None:
                pending.merge(item)
            else:
                self._unread[item.index] = item
                self._buffer.append(item)
        else:
            self._buffer.append(item)
        self._wakeup.set()

    @property
    def finished(self) -> bool:
        return len(self._finished) >= self._n

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            while not self._buffer:
                if self.finished or self._closed:
                    raise StopAsyncIteration
                self._wakeup.clear()
                await self._wakeup.wait()
        except asyncio.CancelledError:  # cancelled while waiting: the consumer is gone
            self._abandon()
            raise
        if self._closed:
            raise StopAsyncIteration
        item = self._buffer.popleft()
        if isinstance(item, BaseException):
            self._finished.update(range(self._n))  # the engine already dropped the request
            raise item
        self._unread.pop(item.index, None)
        if item.finished:
            self._finished.add(item.index)
        return item

    async def aclose(self) -> None:
        self._abandon()

    async def abort(self) -> None:
        """Stop the request; outputs already buffered are dropped."""
        self._abandon()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._abandon()

    def _abandon(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()  # a reader waiting in __anext__ ends its iteration
        if not self.finished:
            logger.debug("request %s abandoned by its consumer: aborting", self.request_id)
            self._engine._submit(_Abort(self.request_id), allow_stopped=True)


@dataclass
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival_time: float
    loop: asyncio.AbstractEventLoop
    stream: RequestStream
    done: concurrent.futures.Future[None]  # add_request's outcome, back to the caller


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Route:
    """Engine-thread view of one request's consumer."""

    loop: asyncio.AbstractEventLoop
    stream: RequestStream
    remaining: int  # sequences (of ``n``) not finished yet


class AsyncEngine:
    """Runs an ``EngineCore`` in its own daemon thread and streams its outputs to coroutines.

    ``start()`` is a plain (sync) method because it only spawns the thread; ``submit`` also
    starts the engine on first use. ``async with AsyncEngine(...)`` starts and shuts it down.
    """

    def __init__(
        self,
        core: EngineCore,
        model_name: str | None = None,
        observers: Sequence[StepObserver] = (),
    ) -> None:
        self._core = core
        self.model_name: str = model_name or core.loaded.name
        self._observers = list(observers)
        self._cond = threading.Condition()
        self._commands: deque[_Add | _Abort] = deque()  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._routes: dict[str, _Route] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Replaced wholesale (never mutated) by the engine thread, so readers get a consistent dict.
        self._stats: dict[str, Any] = {**core.stats(), "requests": 0}

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        model_name: str | None = None,
        observers: Sequence[StepObserver] = (),
    ) -> AsyncEngine:
        return cls(EngineCore(loaded, config), model_name, observers)

    def add_observer(self, observer: StepObserver) -> None:
        """Call ``observer(outputs)`` on the engine thread after every step (add before start)."""
        self._observers.append(observer)

    @property
    def core(self) -> EngineCore:
        """The wrapped core. Only the engine thread may call it while the engine runs."""
        return self._core

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- read-only state, safe from any thread ----------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer (encode/decode and chat rendering are thread-safe)."""
        return self._core.tokenizer

    @property
    def max_model_len(self) -> int:
        """The most tokens (prompt plus output) one request can hold: model and KV cache limits."""
        return self._core.context_limit

    @property
    def vocab_size(self) -> int:
        return self._core.vocab_size

    def render_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Prompt ids for ``messages`` through the model's chat template."""
        if self.tokenizer is None:
            raise InvalidRequestError(
                "messages", "this model has no tokenizer, so no chat template: send token ids"
            )
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)

    def stats(self) -> dict[str, Any]:
        """A snapshot as of the last step (running, waiting, KV blocks, ...), plus ``requests``
        in flight, ``kv_cache_usage`` in [0, 1] and a current ``tokens_per_second``."""
        stats = dict(self._stats)
        total = stats["kv_blocks_total"]
        stats["kv_cache_usage"] = stats["kv_blocks_used"] / total if total else 0.0
        # The rate decays while idle, so read it now rather than as of the last step.
        stats["tokens_per_second"] = self._core.tokens_per_second()
        return stats

    @property
    def num_running(self) -> int:
        return int(self._stats["running"])

    @property
    def num_waiting(self) -> int:
        return int(self._stats["waiting"])

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (idempotent). Raises ShuttingDownError after shutdown."""
        with self._start_lock:
            if self._stopping:
                raise ShuttingDownError("the engine was shut down: create a new AsyncEngine")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="rustinfer-engine", daemon=True
                )
                self._thread.start()

    async def shutdown(self) -> None:
        """Stop the thread: in-flight requests fail with ShuttingDownError, the thread is joined."""
        with self._start_lock, self._cond:
            self._stopping = True
            self._cond.notify()
        thread = self._thread
        if thread is not None:
            # join() would block the loop for up to one step; wait for it in a worker thread.
            await asyncio.to_thread(thread.join)

    async def __aenter__(self) -> AsyncEngine:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    # -- requests --------------------------------------------------------------------------------

    async def compile_structured(self, structured: StructuredOutput) -> None:
        """Compile a structured-output constraint in a worker thread (cached by the engine), so
        that submitting a request with it costs the engine thread nothing; raises
        InvalidRequestError naming the field when it cannot be compiled."""
        compiler = self._core.grammar_compiler()
        await asyncio.to_thread(compiler.compile, structured)

    async def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue one request and return its stream once the engine has accepted it.

        Refusals raise here, before any work: ``InvalidRequestError`` and its kinds (bad prompt,
        ``SamplingParamsError``, ``ContextLengthExceededError``, ``DuplicateRequestError``),
        ``OverloadedError`` (queue full), ``ShuttingDownError``. A refused request leaves every
        other request untouched, a live one of the same id included. ``arrival_time``
        (``time.monotonic()``) is when the request reached the caller; default: now.
        """
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self.start()
        loop = asyncio.get_running_loop()
        if isinstance(prompt, str):
            tokenizer = self._core.tokenizer
            if tokenizer is None:
                raise InvalidRequestError(
                    "prompt", "this model has no tokenizer: send token ids instead of text"
                )
            # The Rust tokenizer releases the GIL; a long prompt must not stall the loop.
            ids = await asyncio.to_thread(tokenizer.encode, prompt, add_special_tokens=True)
        else:
            ids = [int(t) for t in prompt]
        rid = request_id if request_id is not None else uuid.uuid4().hex
        stream = RequestStream(self, rid, params.n)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._submit(_Add(rid, ids, params, arrival, loop, stream, done))
        try:
            await asyncio.wrap_future(done)  # add_request's errors raise here
        except asyncio.CancelledError:
            # Cancelled while the engine thread adds it: either the add never happens (done is
            # cancelled first), or it happens and is undone once it has. Only our own add is
            # aborted: a refused duplicate must never abort the live request of that id.
            if not done.cancel():
                done.add_done_callback(lambda f: self._abort_if_added(f, rid))
            raise
        return stream

    def _abort_if_added(self, done: concurrent.futures.Future[None], request_id: str) -> None:
        if not done.cancelled() and done.exception() is None:
            self._submit(_Abort(request_id), allow_stopped=True)

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """``submit`` and iterate: the outputs of one request as they are made.

        Refusals raise from the first ``__anext__``. Leaving early or being cancelled aborts the
        request; use ``contextlib.aclosing`` when breaking out of the loop so the abort is
        immediate rather than left to the event loop's async-generator finalizer.
        """
        stream = await self.submit(prompt, params, request_id, arrival_time)
        async with stream:
            async for out in stream:
                yield out

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with a ``finish_reason == "abort"`` output."""
        self._submit(_Abort(request_id), allow_stopped=True)

    def _submit(self, command: _Add | _Abort, allow_stopped: bool = False) -> None:
        with self._cond:
            if self._stopping:
                if allow_stopped:
                    return  # shutdown aborts everything anyway
                raise ShuttingDownError("the engine is shutting down: no new requests")
            self._commands.append(command)
            self._cond.notify()

    # -- engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        logger.info("engine thread started")
        try:
            # This thread serves the model's device alone: make it current here, since a new
            # thread starts on device 0 and Triton, CUDA graphs and argument-less streams and
            # events use the current device (a model on cuda:1 would otherwise launch on GPU 0).
            self._core.loaded.device.make_current()
            while True:
                with self._cond:
                    # Sleep while there is nothing to do: no busy-wait when idle.
                    while not self._commands and not self._stopping:
                        if self._core.has_unfinished():
                            break
                        self._cond.wait()
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    try:
                        self._apply(command)
                    except Exception:  # one bad command must not stop the engine for everyone
                        logger.exception(
                            "%s of %s failed", type(command).__name__, command.request_id
                        )
                if self._core.has_unfinished():
                    self._step()  # refreshes the stats itself, before it delivers
                else:
                    self._refresh_stats()  # commands alone (an abort) changed the counts
        except BaseException as exc:  # a bug here must not leave every consumer hanging
            logger.exception("engine thread crashed")
            self._fail_all(exc)
            raise
        finally:
            self._close()
        logger.info("engine thread stopped")

    def _refresh_stats(self) -> None:
        self._stats = {**self._core.stats(), "requests": len(self._routes)}

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            # The finals (finish_reason "abort") come out of the next step, which ends the stream.
            self._core.abort(command.request_id)
            return
        if not command.done.set_running_or_notify_cancel():
            return  # the caller was cancelled before we got here: never add it
        try:
            self._core.add_request(
                command.request_id, command.prompt, command.params, command.arrival_time
            )
        except BaseException as exc:
            command.done.set_exception(exc)
            return
        self._routes[command.request_id] = _Route(command.loop, command.stream, command.params.n)
        command.done.set_result(None)

    def _step(self) -> None:
        try:
            outputs = self._core.step()
        except Exception as exc:
            logger.exception("engine step failed: failing %d request(s)", len(self._routes))
            self._fail_all(exc)
            # The aborts leave finals for the next step to drain; if that step fails too, the
            # pause keeps a persistent fault from spinning. New commands end the pause.
            with self._cond:
                if not self._commands and not self._stopping:
                    self._cond.wait(_FAILURE_BACKOFF_S)
            return
        for observer in self._observers:
            try:
                observer(outputs)
            except Exception:
                logger.exception("step observer %r failed", observer)
        batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue  # its consumer is gone (failed, or aborted and finished already)
            batches.setdefault(route.loop, []).append((route.stream, out))
            if out.finished:
                route.remaining -= 1
                if route.remaining == 0:
                    del self._routes[out.request_id]
        # Refreshed before delivery, so a consumer that sees an output also sees its step's stats.
        self._refresh_stats()
        for loop, items in batches.items():
            self._deliver(loop, items)

    def _deliver(
        self,
        loop: asyncio.AbstractEventLoop,
        items: list[tuple[RequestStream, RequestOutput | BaseException]],
    ) -> None:
        # One wake-up of the loop per step, not one per output.
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed: nobody will read these streams
            dead = [rid for rid, r in self._routes.items() if r.loop is loop]
            logger.warning("event loop closed: aborting %d request(s)", len(dead))
            for rid in dead:
                del self._routes[rid]
                self._core.abort(rid)

    def _fail_all(self, exc: BaseException) -> None:
        """End every in-flight stream with ``exc`` and free its requests in the core."""
        routes, self._routes = self._routes, {}
        batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, BaseException]]] = {}
        for rid, route in routes.items():
            batches.setdefault(route.loop, []).append((route.stream, exc))
            try:
                self._core.abort(rid)
            except Exception:
                logger.exception("abort of %s failed after a step error", rid)
        for loop, items in batches.items():
            with contextlib.suppress(RuntimeError):  # loop closed: no one is waiting
                loop.call_soon_threadsafe(_put_all, items)

    def _close(self) -> None:
        with self._cond:
            self._stopping = True
            commands = list(self._commands)
            self._commands.clear()
        shutdown = ShuttingDownError("the engine was shut down while this request was running")
        for command in commands:
            if isinstance(command, _Add) and command.done.set_running_or_notify_cancel():
                command.done.set_exception(ShuttingDownError("the engine was shut down"))
        self._fail_all(shutdown)
        try:
            self._core.step()  # drain the abort finals so the core holds no blocks
        except Exception:
            logger.exception("final drain step failed")
        self._stats = {**self._core.stats(), "requests": 0}


def _put_all(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream._put(item)
