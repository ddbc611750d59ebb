"""One worker process per extra rank of a tensor-parallel model, driven from the engine's process.

The driver (rank 0) runs the engine: scheduler, sampler, outputs, and its own shard. Each worker
loads its shard and then only follows: every call the engine makes on its runner (build the
runner, warm it up, run a step) is first sent to the workers through a shared-memory
:class:`~rustinfer.distributed.channel.CommandChannel`, so every rank runs the same step on the
same inputs and the collectives inside the forward meet. Only the driver reads logits. The
scheduler runs once.

Faults: a monitor thread in the driver watches the workers. One that exits (a crash, a failed load,
a kill) marks the group failed, calls the registered failure callbacks (the server reports
unhealthy), and terminates the others; a collective blocked on the dead rank then fails, and if
the driver is still alive after ``failure_exit_s`` it exits with the reason logged. A worker that
hangs makes the driver's next collective time out (``timeout_s``). Workers die with the driver (each
watches its parent), and closing the group joins them, so no process outlives it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from rustinfer.distributed.channel import ChannelError, CommandChannel
from rustinfer.distributed.parallel import CollectiveError, TensorParallel, collective
from rustinfer.errors import RustinferError

if TYPE_CHECKING:
    from tqdm import tqdm

    from rustinfer.engine.model_runner import ModelRunner, ScheduledSequence
    from rustinfer.models.base import Model
    from rustinfer.runtime.loading import LoadedModel

__all__ = ["LoadSpec", "TensorParallelGroup", "TensorParallelRunner", "load_tensor_parallel"]

logger = logging.getLogger(__name__)

# How long a collective may wait for a rank before it fails (a hung worker), and how long the
# driver lives on after a worker died before it exits by itself (a collective that never fails).
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_FAILURE_EXIT_S = 10.0


@dataclass(frozen=True)
class LoadSpec:
    """What every rank loads (picklable: it crosses to the spawned workers)."""

    model: str | None
    device: str = "auto"
    dtype: str = "auto"
    load_format: str = "auto"
    quantization: str = "auto"
    batch_invariant: bool = False
    seed: int = 0
    threads: int | None = None  # torch's CPU threads in each worker (None: the driver's count)

    def load(self, device: str, tp: TensorParallel) -> LoadedModel:
        """This rank's shard on ``device``."""
        from rustinfer.runtime.loading import load_model

        return load_model(
            self.model,
            device,
            self.dtype,
            self.load_format,
            seed=self.seed,
            quantization=self.quantization,
            batch_invariant=self.batch_invariant,
            tp=tp,
        )


def rank_device(device: str, rank: int) -> str:
    """The device of ``rank``: CUDA ranks take consecutive GPUs from the one named (or 0)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        base = int(device.partition(":")[2] or 0)
        return f"cuda:{base + rank}"
    return device


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when torchrun started this process as one of several ranks, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ["RANK"]), world) if world > 1 else None


def spec_from_options(options: Any) -> LoadSpec:
    """The :class:`LoadSpec` of the CLI's model flags or the server's settings."""
    return LoadSpec(
        options.model,
        options.device,
        options.dtype,
        options.load_format,
        str(options.quantization),
        options.batch_invariant,
    )


def _spin_s(device: str) -> float:
    """How long a rank spins for the next command before it sleeps: a GPU rank has cores to
    spare and a step that follows within a millisecond; CPU ranks share the cores they compute on."""
    return 2e-3 if device.startswith("cuda") else 0.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init_group(
    rank: int, size: int, init_method: str, device: str, timeout_s: float
) -> tuple[TensorParallel, dist.ProcessGroup]:
    """Join the group (every rank calls this in the same order); the tensor-parallel handle and
    a gloo group for host objects (it carries the command channel's name once)."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout
    )
    world = dist.group.WORLD
    assert world is not None
    control = world if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    if backend == "nccl":
        # NCCL makes its communicator on the first collective: here, eagerly, and not inside the
        # first CUDA-graph capture of a decode step.
        dist.all_reduce(torch.zeros(1, device=device), group=world)
        torch.cuda.synchronize(device)
    return TensorParallel(rank, size, world), control


def _die_with_parent() -> None:
    """Exit as soon as the driver is gone (no orphan workers). A thread watches the parent's pid:
    the kernel's parent-death signal would fire when the *thread* that started this process
    ends, and the server loads its model on a thread that does."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="rustinfer-tp-parent-watch", daemon=True).start()


def _worker_main(rank: int, size: int, port: int, spec: LoadSpec, timeout_s: float) -> None:
    """A spawned worker's whole life: join, load its shard, follow the driver until stop."""
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")
    try:
        follow(rank, size, f"tcp://127.0.0.1:{port}", spec, timeout_s)
    except RustinferError as exc:  # a message that says what to fix (the driver says it too)
        logger.error("%s", exc)
        sys.exit(1)


def follow_as_torchrun_rank(spec: LoadSpec, timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """A rank other than 0 of a torchrun launch: hold a shard for rank 0's engine (whatever
    command rank 0 runs), then exit 0 when it stops."""
    launched = torchrun_rank()
    assert launched is not None and launched[0] != 0
    rank, size = launched
    follow(rank, size, "env://", spec, timeout_s, int(os.environ.get("LOCAL_RANK", rank)))
    return 0


def follow(
    rank: int,
    size: int,
    init_method: str,
    spec: LoadSpec,
    timeout_s: float,
    local_rank: int | None = None,
) -> None:
    """Join the group, load this rank's shard, and run the driver's commands until stop."""
    from rustinfer.engine.model_runner import ModelRunner

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    device = rank_device(spec.device, rank if local_rank is None else local_rank)
    tp, control = _init_group(rank, size, init_method, device, timeout_s)
    name: list[Any] = [None]
    collective(dist.broadcast_object_list, name, src=0, group=control)
    channel = CommandChannel.attach(name[0], size - 1, _spin_s(device))
    loaded = spec.load(device, tp)
    runner: ModelRunner | None = None
    while True:
        # An idle server sends nothing for as long as it likes; a dead driver ends this process
        # (the parent watch, or torchrun).
        kind, *args = channel.receive(rank, float("inf"), lambda: True)
        if kind == "stop":
            break
        try:
            if kind == "runner":
                runner = ModelRunner(loaded.model, loaded.device.torch_device, *args)
            elif kind == "warm_up":
                assert runner is not None
                runner.warm_up(*args)
            elif kind == "execute":
                assert runner is not None
                seqs, prev_shape, prev_dtype = args
                prev = None
                if prev_shape is not None:
                    device = loaded.device.torch_device
                    prev = torch.empty(prev_shape, dtype=prev_dtype, device=device)
                    collective(dist.broadcast, prev, src=0, group=tp.group)
                runner.execute(seqs, prev)
        except CollectiveError:
            raise  # the group is broken: this process exits, and the driver hears of it
        except Exception:
            # The driver's runner met the same inputs and fails the same way, before any
            # collective: the ranks stay in step, the engine fails that step's requests.
            logger.exception("rank %d: %s failed", rank, kind)
    channel.close()
    dist.destroy_process_group()


class TensorParallelGroup:
    """The driver's side of the group: its workers, its rank-0 handle, the commands it sends."""

    def __init__(
        self,
        spec: LoadSpec,
        size: int,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        failure_exit_s: float | None = DEFAULT_FAILURE_EXIT_S,
        init_method: str | None = None,
    ) -> None:
        """Spawn the workers of ranks 1..size-1, or (``init_method="env://"``, under torchrun)
        join the ranks torchrun started."""
        if size < 2:
            raise ValueError(f"a tensor-parallel group needs at least 2 ranks, got {size}")
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group")
        if spec.threads is None:
            spec = replace(spec, threads=torch.get_num_threads())
        self.spec = spec
        self.size = size
        self.device = rank_device(spec.device, 0)
        if self.device.startswith("cuda"):
            have = torch.cuda.device_count()
            last = torch.device(rank_device(spec.device, size - 1)).index
            if last is None or last >= have:
                raise ValueError(
                    f"--tensor-parallel-size {size} needs {size} GPUs from {self.device} on, but "
                    f"this machine has {have}"
                )
        self.failure_exit_s = failure_exit_s
        self.failed: str | None = None
        self._fail_lock = threading.Lock()
        self._failure_callbacks: list[Callable[[str], None]] = []
        self._closing = False
        # Under torchrun the other ranks are torchrun's (it stops them all if one dies); here
        # they are this process's children, watched by a monitor thread.
        self.workers: list[mp.process.BaseProcess] = []
        if init_method is None:
            port = _free_port()
            init_method = f"tcp://127.0.0.1:{port}"
            context = mp.get_context("spawn")
            self.workers = [
                context.Process(
                    target=_worker_main,
                    args=(rank, size, port, spec, timeout_s),
                    name=f"rustinfer-tp-rank-{rank}",
                    daemon=True,
                )
                for rank in range(1, size)
            ]
            for worker in self.workers:
                worker.start()
        atexit.register(self.close)
        self._monitor = threading.Thread(
            target=self._watch, name="rustinfer-tp-monitor", daemon=True
        )
        self._monitor.start()
        self.tp, self.control = _init_group(0, size, init_method, self.device, timeout_s)
        self.timeout_s = timeout_s
        self.channel = CommandChannel.create(size - 1, spin_s=_spin_s(self.device))
        collective(dist.broadcast_object_list, [self.channel.name], src=0, group=self.control)
        logger.info("tensor parallelism: %d ranks on %s", size, self.device)

    # -- faults ---------------------------------------------------------------------------------

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` (once, from the monitor thread) when a worker dies."""
        self._failure_callbacks.append(callback)
        if self.failed is not None:
            callback(self.failed)

    def _watch(self) -> None:
        while not self._closing and self.failed is None:
            for rank, worker in enumerate(self.workers, start=1):
                if not worker.is_alive() and not self._closing:
                    self._fail(
                        f"tensor-parallel worker rank {rank} (pid {worker.pid}) exited with code "
                        f"{worker.exitcode}; the model cannot run without it"
                    )
                    return
            time.sleep(0.2)

    def _fail(self, reason: str) -> None:
        with self._fail_lock:  # the first reason is the one reported (stopping the others
            if self.failed is not None:  # makes them exit too)
                return
            self.failed = reason
        logger.error("%s", reason)
        for callback in self._failure_callbacks:
            try:
                callback(reason)
            except Exception:  # a callback must not stop the others or the shutdown
                logger.exception("tensor-parallel failure callback failed")
        self._terminate_workers()
        if self.failure_exit_s is None:
            return
        time.sleep(self.failure_exit_s)
        if not self._closing:
            logger.critical("%s: exiting", reason)
            logging.shutdown()
            os._exit(1)

    # -- commands -------------------------------------------------------------------------------

    def command(self, kind: str, *args: Any) -> None:
        """Send one command to every worker (they run it next, in order)."""
        if self.failed is not None:
            raise CollectiveError(self.failed)
        try:
            self.channel.send((kind, *args), self.timeout_s, lambda: self.failed is None)
        except ChannelError as exc:
            raise CollectiveError(self.failed or str(exc)) from exc

    def fail_later(self, reason: str) -> None:
        """Mark the group failed from another thread (the caller's error propagates now; the
        process exits after ``failure_exit_s`` unless closed first)."""
        if self.failed is None:
            threading.Thread(target=self._fail, args=(reason,), daemon=True).start()

    def runner(
        self,
        model: Model,
        device: torch.device,
        num_blocks: int,
        block_size: int,
        max_model_len: int | None = None,
        graph_max_batch: int = 0,
        progress: tqdm | None = None,
    ) -> TensorParallelRunner:
        """The driver's runner; each worker builds its own with the same arguments."""
        return TensorParallelRunner(
            self, model, device, num_blocks, block_size, max_model_len, graph_max_batch, progress
        )

    def close(self) -> None:
        """Stop the workers and leave the group (idempotent; also run at exit)."""
        if self._closing:
            return
        self._closing = True
        channel = getattr(self, "channel", None)  # absent when the group never formed
        if channel is not None:
            if self.failed is None and all(w.is_alive() for w in self.workers):
                with contextlib.suppress(ChannelError):
                    channel.send(("stop",), 10.0, lambda: True)
            for worker in self.workers:
                worker.join(timeout=10)
            channel.close()
        self._terminate_workers()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    def _terminate_workers(self) -> None:
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
        for worker in self.workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)


class TensorParallelRunner:
    """The driver's :class:`ModelRunner` for a sharded model: each call is sent to the workers
    first, whose runners then make the same call on their shards."""

    def __init__(
        self,
        group: TensorParallelGroup,
        model: Model,
        device: torch.device,
        num_blocks: int,
        block_size: int,
        max_model_len: int | None,
        graph_max_batch: int,
        progress: tqdm | None,
    ) -> None:
        from rustinfer.engine.model_runner import ModelRunner

        self.group = group
        # Workers capture their graphs while this rank captures its own: the collectives inside
        # the captured forward meet.
        group.command("runner", num_blocks, block_size, max_model_len, graph_max_batch)
        self.local = ModelRunner(
            model, device, num_blocks, block_size, max_model_len, graph_max_batch, progress
        )

    def warm_up(self, max_model_len: int, progress: tqdm | None = None) -> None:
        self.group.command("warm_up", max_model_len)
        self.local.warm_up(max_model_len, progress)

    def execute(
        self, seqs: Sequence[ScheduledSequence], prev_token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        seqs = list(seqs)
        shape = None if prev_token_ids is None else tuple(prev_token_ids.shape)
        dtype = None if prev_token_ids is None else prev_token_ids.dtype
        try:
            self.group.command("execute", seqs, shape, dtype)
            if prev_token_ids is not None:
                collective(dist.broadcast, prev_token_ids, src=0, group=self.group.tp.group)
            return self.local.execute(seqs, prev_token_ids)
        except CollectiveError as exc:
            # A rank hung past the timeout or its link broke: no later step can run.
            self.group.fail_later(f"tensor-parallel step failed: {exc}")
            raise

    def __getattr__(self, name: str) -> Any:
        # Everything else (graphs, kv_caches, block_size, ...) is the local runner's.
        return getattr(self.local, name)


def load_tensor_parallel(
    spec: LoadSpec,
    size: int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    failure_exit_s: float | None = DEFAULT_FAILURE_EXIT_S,
    init_method: str | None = None,
) -> LoadedModel:
    """Start ``size - 1`` workers (or join torchrun's ranks: ``init_method="env://"``), load
    rank 0's shard here, and return it with the group attached (an engine built on it drives
    every rank)."""
    group = TensorParallelGroup(spec, size, timeout_s, failure_exit_s, init_method)
    try:
        loaded = group.spec.load(group.device, group.tp)
    except BaseException:
        group.close()
        raise
    return replace(loaded, parallel=group)
