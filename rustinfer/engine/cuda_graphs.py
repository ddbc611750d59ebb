"""Decode steps replayed from CUDA graphs: one launch per step instead of hundreds.

A decode step of a small model is launch-bound on a GPU: every op of every layer is a kernel whose
Python dispatch costs more than the kernel itself. The graphs are captured once, at load, for a
ladder of batch sizes; a step pads its batch to the next captured size and replays that graph.

Everything a graph reads lives in static buffers sized for the largest captured batch: token ids,
positions, cache slots, sequence lengths, and block tables as wide as ``max_model_len /
block_size`` (so a table never outgrows them, and the attention launcher's split count, which
depends on shapes alone, is fixed per graph). A step fills pinned host mirrors and copies them with
non-blocking copies. Padding rows write their K/V to a scratch block no sequence owns and attend to
that one slot, so they cost a row of compute and are never read.

The forward and the logits of every row are captured on a side stream with one shared memory
pool (graphs of different sizes never run at once, so they can share it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from rustinfer.engine.host_copy import copy_rows
from rustinfer.models.base import AttentionMetadata, KVCaches, Model

__all__ = ["DecodeGraphs", "StagedDecode", "graph_batch_sizes"]

logger = logging.getLogger(__name__)

# Captured batch sizes: powers of two up to 8 (batch 1-8 is where launches dominate and padding
# would waste the most), then steps of 8, then of 16 past 64; a step pads to the next one.
_SMALL = (1, 2, 4, 8)


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in _SMALL if s <= max_batch]
    size = 16
    while size <= max_batch:
        sizes.append(size)
        size += 8 if size < 64 else 16
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


@dataclass(frozen=True)
class StagedDecode:
    """A decode step whose inputs sit in the pinned host mirrors, ready to upload and replay."""

    num_seqs: int
    size: int  # the captured batch size it pads to
    cols: int  # block-table columns in use


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [size, vocab] float32, written by every replay


class DecodeGraphs:
    """Captured decode graphs over one model and its KV cache."""

    def __init__(
        self,
        model: Model,
        kv_caches: KVCaches,
        device: torch.device,
        max_batch: int,
        max_blocks_per_seq: int,
        block_size: int,
        scratch_block: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        b, w = self.max_batch, max_blocks_per_seq
        self.width = w

        def dev(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        def host(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=True)

        # Device buffers the graphs read, and pinned host mirrors filled each step.
        self.ids, self.h_ids = dev(b, dtype=torch.int64), host(b, dtype=torch.int64)
        self.pos, self.h_pos = dev(b, dtype=torch.int64), host(b, dtype=torch.int64)
        self.slots, self.h_slots = dev(b, dtype=torch.int64), host(b, dtype=torch.int64)
        self.lens, self.h_lens = dev(b, dtype=torch.int32), host(b, dtype=torch.int32)
        self.tables = dev(b, w, dtype=torch.int32)
        # A step's tables travel as one dense [batch, columns in use] block through these.
        self.tables_flat = dev(b * w, dtype=torch.int32)
        self.h_tables_flat = host(b * w, dtype=torch.int32)
        self.cu_q = torch.arange(b + 1, dtype=torch.int32, device=device)  # one token per row
        self._graphs: dict[int, _Graph] = {}
        self._pool: tuple[int, int] | None = None
        self.replays = 0  # steps served from a graph (tests and stats read it)
        # Recorded after each step's uploads: the pinned host mirrors may be rewritten only once
        # those asynchronous copies have read them. The engine syncs every step anyway (it reads
        # the sampled ids), so waiting here costs nothing there; a caller that does not sync
        # would otherwise race the copies and feed the graph the next step's inputs.
        self._uploaded = torch.cuda.Event()

    # -- capture -------------------------------------------------------------------------------

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:size],
            block_tables=self.tables[:size],
            seq_lens=self.lens[:size],
            cu_seqlens_q=self.cu_q[: size + 1],
            max_query_len=1,
        )

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.ids[:size], self.pos[:size], self.kv_caches, self._metadata(size))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self, progress: tqdm | None = None) -> None:
        """Capture every size, largest first (its pool then fits the smaller ones); ``progress``
        ticks once per size."""
        if progress is not None:
            progress.total += len(self.sizes)
            progress.refresh()
        started = time.perf_counter()
        tables = self.h_tables_flat.numpy()[: self.max_batch].reshape(self.max_batch, 1)
        self._pad_rows(0, self.max_batch, tables)
        self._upload(self.max_batch, 1)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                # One eager run first: Triton compiles (and autotunes) outside the capture.
                self._forward(size)
                graph = torch.cuda.CUDAGraph()
                # capture_begin/end rather than ``torch.cuda.graph``: that context also empties
                # torch's device and pinned-host caches before every capture, so each of the
                # ladder's graphs paid cudaFree/cudaFreeHost and the next eager run paid the
                # cudaMalloc back. The side stream is already current here.
                if self._pool is None:
                    graph.capture_begin()
                else:
                    graph.capture_begin(pool=self._pool)
                try:
                    logits = self._forward(size)
                finally:
                    graph.capture_end()
                if self._pool is None:
                    self._pool = graph.pool()
                self._graphs[size] = _Graph(graph, logits)
                if progress is not None:
                    progress.update(1)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured decode graphs for batch sizes %s in %.3f s",
            self.sizes,
            time.perf_counter() - started,
        )

    # -- replay --------------------------------------------------------------------------------

    def can_run(self, num_seqs: int) -> bool:
        return 0 < num_seqs <= self.max_batch and bool(self._graphs)

    def run(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        pending: Sequence[tuple[int, int]] = (),
        prev_token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [n, vocab] of one decode step of n sequences (a view into the graph's output,
        valid until the next replay). ``pending`` pairs (row, row of ``prev_token_ids``) name
        rows whose token is still on the device: it is copied there, after the upload."""
        return self.launch(self.stage(token_ids, positions, block_tables), pending, prev_token_ids)

    def stage(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> StagedDecode:
        """Fill the pinned host mirrors for a step (nothing is queued on the GPU yet): the host
        half of :meth:`run`, which a caller may do ahead of the launch. Until that step is
        launched, no other step may be staged."""
        n = len(token_ids)
        size = next(s for s in self.sizes if s >= n)
        bs = self.block_size
        self._uploaded.synchronize()
        ids, pos = self.h_ids.numpy(), self.h_pos.numpy()
        slots, lens = self.h_slots.numpy(), self.h_lens.numpy()
        ids[:n] = token_ids
        pos[:n] = positions
        # Tables go up as a dense [size, cols] block of only the columns in use (the buffers are
        # as wide as the model's context: thousands of columns, mostly never read).
        cols = max(len(t) for t in block_tables)
        tables = self.h_tables_flat.numpy()[: size * cols].reshape(size, cols)
        for i, (p, table) in enumerate(zip(positions, block_tables, strict=True)):
            slots[i] = table[p // bs] * bs + p % bs
            lens[i] = p + 1
            tables[i, : len(table)] = table
        self._pad_rows(n, size, tables)
        return StagedDecode(n, size, cols)

    def launch(
        self,
        staged: StagedDecode,
        pending: Sequence[tuple[int, int]] = (),
        prev_token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queue the uploads of a staged step and replay its graph; its logits [n, vocab]."""
        self._upload(staged.size, staged.cols)
        if pending:
            assert prev_token_ids is not None
            copy_rows(self.ids, [r for r, _ in pending], prev_token_ids, [r for _, r in pending])
        self._uploaded.record(torch.cuda.current_stream(self.device))
        entry = self._graphs[staged.size]
        entry.graph.replay()
        self.replays += 1
        return entry.logits[: staged.num_seqs]

    def _pad_rows(self, start: int, end: int, tables: np.ndarray) -> None:
        """Rows [start, end) write one K/V entry to the scratch block and attend to it alone."""
        if start >= end:
            return
        self.h_ids.numpy()[start:end] = 0
        self.h_pos.numpy()[start:end] = 0
        self.h_slots.numpy()[start:end] = self.scratch_block * self.block_size
        self.h_lens.numpy()[start:end] = 1
        tables[start:end, 0] = self.scratch_block

    def _upload(self, size: int, cols: int) -> None:
        # Pinned sources: the copies are asynchronous and ordered before the replay on the stream.
        self.ids[:size].copy_(self.h_ids[:size], non_blocking=True)
        self.pos[:size].copy_(self.h_pos[:size], non_blocking=True)
        self.slots[:size].copy_(self.h_slots[:size], non_blocking=True)
        self.lens[:size].copy_(self.h_lens[:size], non_blocking=True)
        staged = self.tables_flat[: size * cols]
        staged.copy_(self.h_tables_flat[: size * cols], non_blocking=True)
        self.tables[:size, :cols].copy_(staged.view(size, cols))
