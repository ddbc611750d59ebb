"""The asyncio face of the engine: submit, stream, abort.

``EngineCore`` is synchronous and not thread-safe, so exactly one thread (the engine thread started
here) ever touches it. Coroutines talk to that thread through a command queue guarded by a
condition variable; the thread hands outputs back to each request's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``. The event loop therefore never waits on a model forward pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rustinfer.engine.core import EngineConfig, EngineCore
from rustinfer.engine.outputs import RequestOutput
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.errors import InvalidRequestError, RustinferError
from rustinfer.runtime.loading import LoadedModel

__all__ = ["AsyncEngine", "EngineShutdownError"]

logger = logging.getLogger(__name__)

# After a failed step whose cleanup also failed, wait this long before stepping again, so a
# persistent fault logs a few lines a second instead of spinning a core.
_FAILURE_BACKOFF_S = 0.1


class EngineShutdownError(RustinferError):
    """The engine was shut down: requests in flight end with this, new ones are refused."""


_Item = RequestOutput | BaseException


@dataclass
class _Stream:
    """Engine-thread view of one request's consumer."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Item]
    remaining: int  # sequences (of ``n``) not finished yet


@dataclass
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    stream: _Stream
    done: concurrent.futures.Future[None]  # add_request's outcome, back to the caller


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """Runs an ``EngineCore`` in its own daemon thread and streams its outputs to coroutines.

    ``start()`` is a plain (sync) method because it only spawns the thread; ``generate`` also
    starts the engine on first use. ``async with AsyncEngine(...)`` starts and shuts it down.
    """

    def __init__(self, core: EngineCore) -> None:
        self._core = core
        self._cond = threading.Condition()
        self._commands: deque[_Add | _Abort] = deque()  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Replaced wholesale (never mutated) by the engine thread, so readers get a consistent dict.
        self._stats: dict[str, Any] = {**core.stats(), "requests": 0}

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, config: EngineConfig | None = None) -> AsyncEngine:
        return cls(EngineCore(loaded, config))

    @property
    def core(self) -> EngineCore:
        """The wrapped core. Only the engine thread may call it while the engine runs."""
        return self._core

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (idempotent). Raises EngineShutdownError after shutdown."""
        with self._start_lock:
            if self._stopping:
                raise EngineShutdownError("the engine was shut down: create a new AsyncEngine")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="rustinfer-engine", daemon=True
                )
                self._thread.start()

    async def shutdown(self) -> None:
        """Stop the thread: in-flight requests fail with EngineShutdownError, the thread is joined."""
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

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request (all ``n`` sequences interleaved) as they are made.

        Validation errors (``InvalidRequestError``, ``SamplingParamsError``, ``OverloadedError``)
        raise from the first ``__anext__``. Leaving early or being cancelled aborts the request;
        use ``contextlib.aclosing`` when breaking out of the loop so the abort is immediate
        rather than left to the event loop's async-generator finalizer.
        """
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
        stream = _Stream(loop, asyncio.Queue(), params.n)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        finished: set[int] = set()
        try:
            self._submit(_Add(rid, ids, params, stream, done))
            await asyncio.wrap_future(done)  # add_request's errors raise here
            while len(finished) < params.n:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished.update(range(params.n))  # the engine already dropped the request
                    raise item
                if item.finished:
                    finished.add(item.index)
                yield item
        finally:
            if len(finished) < params.n:
                # Consumer gone (break, cancel, disconnect): free the request's KV blocks. If the
                # add never happened, the abort is a harmless no-op on the engine thread.
                logger.debug("request %s abandoned by its consumer: aborting", rid)
                self._submit(_Abort(rid), allow_stopped=True)

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with a ``finish_reason == "abort"`` output."""
        self._submit(_Abort(request_id), allow_stopped=True)

    def stats(self) -> dict[str, Any]:
        """A snapshot of the engine's stats as of its last step, plus ``requests`` in flight."""
        return dict(self._stats)

    def _submit(self, command: _Add | _Abort, allow_stopped: bool = False) -> None:
        with self._cond:
            if self._stopping:
                if allow_stopped:
                    return  # shutdown aborts everything anyway
                raise EngineShutdownError("the engine was shut down: create a new AsyncEngine")
            self._commands.append(command)
            self._cond.notify()

    # -- engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        logger.info("engine thread started")
        try:
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
                    self._step()
                self._stats = {**self._core.stats(), "requests": len(self._streams)}
        except BaseException as exc:  # a bug here must not leave every consumer hanging
            logger.exception("engine thread crashed")
            self._fail_all(exc)
            raise
        finally:
            self._close()
        logger.info("engine thread stopped")

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            # The finals (finish_reason "abort") come out of the next step, which ends the stream.
            self._core.abort(command.request_id)
            return
        if not command.done.set_running_or_notify_cancel():
            return  # the caller was cancelled before we got here: never add it
        try:
            self._core.add_request(command.request_id, command.prompt, command.params)
        except BaseException as exc:
            command.done.set_exception(exc)
            return
        self._streams[command.request_id] = command.stream
        command.done.set_result(None)

    def _step(self) -> None:
        try:
            outputs = self._core.step()
        except Exception as exc:
            logger.exception("engine step failed: failing %d request(s)", len(self._streams))
            self._fail_all(exc)
            # The aborts leave finals for the next step to drain; if that step fails too, the
            # pause keeps a persistent fault from spinning. New commands end the pause.
            with self._cond:
                if not self._commands and not self._stopping:
                    self._cond.wait(_FAILURE_BACKOFF_S)
            return
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # its consumer is gone (failed, or aborted and finished already)
            batches.setdefault(stream.loop, []).append((stream.queue, out))
            if out.finished:
                stream.remaining -= 1
                if stream.remaining == 0:
                    del self._streams[out.request_id]
        # Refreshed before delivery, so a consumer that sees an output also sees its step's stats.
        self._stats = {**self._core.stats(), "requests": len(self._streams)}
        for loop, items in batches.items():
            self._deliver(loop, items)

    def _deliver(
        self, loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue[_Item], _Item]]
    ) -> None:
        # One wake-up of the loop per step, not one per output.
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed: nobody will read these streams
            dead = [rid for rid, s in self._streams.items() if s.loop is loop]
            logger.warning("event loop closed: aborting %d request(s)", len(dead))
            for rid in dead:
                del self._streams[rid]
                self._core.abort(rid)

    def _fail_all(self, exc: BaseException) -> None:
        """End every in-flight stream with ``exc`` and free its requests in the core."""
        streams, self._streams = self._streams, {}
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]] = {}
        for rid, stream in streams.items():
            batches.setdefault(stream.loop, []).append((stream.queue, exc))
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
        shutdown = EngineShutdownError("the engine was shut down while this request was running")
        for command in commands:
            if isinstance(command, _Add) and command.done.set_running_or_notify_cancel():
                command.done.set_exception(EngineShutdownError("the engine was shut down"))
        self._fail_all(shutdown)
        try:
            self._core.step()  # drain the abort finals so the core holds no blocks
        except Exception:
            logger.exception("final drain step failed")
        self._stats = {**self._core.stats(), "requests": 0}


def _put_all(items: list[tuple[asyncio.Queue[_Item], _Item]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
