"""The driver's commands to its workers through shared memory: one writer, several readers.

Every engine step sends the workers a command (the scheduled sequences). Through gloo that is two
collectives a step (the pickle's size, then its bytes): 6-8 ms on a 2-core VM, where a decode step
of a tensor-parallel 8B model on two H200s is predicted at ~3 ms. Through one shared-memory block
it is a memcpy and a counter: the driver waits until every worker has taken the previous command,
writes the next one's bytes, then bumps the sequence number the workers poll. Readers poll with a
short spin, then sleep in growing steps (an idle server does not burn its cores).

Layout: int64 header ``[sequence, length, ack of worker 1, ..., ack of worker N-1]``, then the
pickled command. x86's stores are seen in order, so a reader that sees the new sequence sees the
bytes written before it.
"""

from __future__ import annotations

import contextlib
import pickle
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

import numpy as np

__all__ = ["CommandChannel", "ChannelError"]

# Bytes of one command (shared memory: pages never written cost nothing). A step of 2,048 new
# tokens pickles to 6.6 KB, 256 decodes with 8,192-entry block tables (a 128k context) to 6.2 MB.
DEFAULT_CAPACITY = 64 << 20


class ChannelError(RuntimeError):
    """A command could not be sent or received (a worker never took it, or it is too large)."""


def _wait(
    ready: Callable[[], bool], timeout_s: float, alive: Callable[[], bool], spin_s: float
) -> bool:
    """Poll ``ready`` until true (True), ``timeout_s`` passes or ``alive`` turns false (False):
    a spin of ``spin_s`` (yielding the core) for a command that follows at once, then sleeps
    growing to 1 ms. Spinning pays where the waiter has a core of its own (a GPU rank); where
    ranks share the cores that compute (the CPU), it takes them from the rank that works."""
    start = time.perf_counter()
    pause = 1e-5
    while not ready():
        waited = time.perf_counter() - start
        if waited < spin_s:
            time.sleep(0)
            continue
        if waited > timeout_s or not alive():
            return False
        time.sleep(pause)
        pause = min(1e-3, pause * 1.5)
    return True


class CommandChannel:
    """One shared block: the driver (``create``) writes, ``readers`` workers (``attach``) read."""

    def __init__(
        self, shm: shared_memory.SharedMemory, readers: int, owner: bool, spin_s: float = 0.0
    ) -> None:
        self.shm = shm
        self.spin_s = spin_s
        self.readers = readers
        self.owner = owner
        self.header = np.ndarray((2 + readers,), dtype=np.int64, buffer=shm.buf)
        self.offset = self.header.nbytes
        self.capacity = shm.size - self.offset
        self.seen = 0  # a reader: the last sequence it took

    @classmethod
    def create(
        cls, readers: int, capacity: int = DEFAULT_CAPACITY, spin_s: float = 0.0
    ) -> CommandChannel:
        shm = shared_memory.SharedMemory(create=True, size=8 * (2 + readers) + capacity)
        channel = cls(shm, readers, owner=True, spin_s=spin_s)
        channel.header[:] = 0
        return channel

    @classmethod
    def attach(cls, name: str, readers: int, spin_s: float = 0.0) -> CommandChannel:
        try:
            shm = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
        except TypeError:
            # Python < 3.13 registers an attached block with the resource tracker too. A spawned
            # worker shares the driver's tracker, where the driver's unlink unregisters it once;
            # unregistering here as well would make that a KeyError in the tracker.
            shm = shared_memory.SharedMemory(name=name)
        return cls(shm, readers, owner=False, spin_s=spin_s)

    @property
    def name(self) -> str:
        return self.shm.name

    def send(self, command: Any, timeout_s: float, alive: Callable[[], bool]) -> None:
        """Driver: publish ``command`` once every reader has taken the previous one."""
        data = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > self.capacity:
            raise ChannelError(
                f"a command of {len(data)} bytes exceeds the channel's {self.capacity}"
            )
        header = self.header
        sequence = int(header[0])
        acks = header[2:]
        if not _wait(lambda: bool((acks == sequence).all()), timeout_s, alive, self.spin_s):
            raise ChannelError(f"a worker did not take command {sequence} within {timeout_s:.0f} s")
        self.shm.buf[self.offset : self.offset + len(data)] = data
        header[1] = len(data)
        header[0] = sequence + 1

    def receive(self, reader: int, timeout_s: float, alive: Callable[[], bool]) -> Any:
        """Worker ``reader`` (1-based): the next command."""
        header = self.header
        expected = self.seen + 1
        if not _wait(lambda: int(header[0]) >= expected, timeout_s, alive, self.spin_s):
            raise ChannelError(f"no command from the driver within {timeout_s:.0f} s")
        length = int(header[1])
        data = bytes(self.shm.buf[self.offset : self.offset + length])
        self.seen = expected
        header[1 + reader] = expected
        return pickle.loads(data)

    def close(self) -> None:
        del self.header
        with contextlib.suppress(Exception):
            self.shm.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()
