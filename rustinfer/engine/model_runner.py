"""Turn one scheduled step (a ragged batch of sequences) into a model forward and its logits.

The runner owns the paged KV cache. Each step lists, per sequence, the tokens to compute (a whole
prompt, a prompt chunk, or one decode token), the position of the first of them, and the sequence's
block table; the runner builds the flat batch tensors and :class:`AttentionMetadata` once, runs the
model, and returns logits only for sequences that sample this step.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from rustinfer.engine.host_copy import copy_rows, upload_packed
from rustinfer.models.base import AttentionMetadata, KVCaches, Model

if TYPE_CHECKING:
    from rustinfer.engine.cuda_graphs import StagedDecode

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = (
    16  # tokens per KV block: small enough to waste little, large enough for kernels
)
# On CUDA an eager step's token count is rounded up to a multiple of this (padding tokens write
# their K/V to a block no sequence owns). cuBLAS chooses a GEMM kernel for every new problem
# shape on first use, 2-4 ms per shape on an H200 (neither eager module loading nor cuBLASLt
# avoids it: BENCHMARKS.md), so every unseen step size (a prompt, or a prompt beside some
# decodes) cost ~10 ms once; rounded, there are 64 times fewer sizes and the warm-up covers the
# short ones. The padded rows cost little: up to a few hundred rows a GEMM's time is the read of
# its weights, and past that 63 rows are a few percent.
CUDA_PAD_TOKENS_TO = 64
# Padded step sizes the warm-up runs (prompts up to this many tokens meet no new GEMM shape).
WARM_PADDED_UP_TO = 256


@dataclass
class ScheduledSequence:
    token_ids: Sequence[int]  # tokens whose KV this step computes
    start_pos: int  # position of token_ids[0] in the sequence
    block_table: Sequence[int]  # covers at least start_pos + len(token_ids) tokens
    needs_logits: bool = True  # False for a prompt chunk that does not reach the prompt's end
    # The one token of a decode whose id is still on the device: its row in the previous step's
    # sampled ids (``token_ids`` then holds a placeholder). The runner copies it on the device.
    prev_row: int | None = None


@dataclass
class StepInputs:
    """The flat tensors of one step, built once on the host and copied to the device."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    cu_seqlens_q: list[int]  # host copy of attn.cu_seqlens_q
    # The last new token's row of each sequence that samples this step, in order, on the device.
    logit_rows: torch.Tensor


@dataclass
class StagedStep:
    """A step built on the host and not yet run: a decode graph's filled mirrors or an eager
    step's uploaded inputs, and the rows whose token comes from the previous step's ids."""

    pending: list[tuple[int, int]]  # (row of this step, row of the previous step's ids)
    decode: StagedDecode | None = None
    inputs: StepInputs | None = None


def allocate_kv_caches(
    model: Model, num_blocks: int, block_size: int, device: torch.device
) -> KVCaches:
    """Per layer (k_cache, v_cache). ``empty``, not ``zeros``: attention reads only slots written
    this run (positions < seq_len), and untouched pages of a large CPU pool then cost nothing."""
    shape = model.kv_cache_shape(num_blocks, block_size)
    return [
        (
            torch.empty(shape, dtype=model.dtype, device=device),
            torch.empty(shape, dtype=model.dtype, device=device),
        )
        for _ in range(model.num_kv_layers)
    ]


def kv_bytes_per_block(model: Model, block_size: int) -> int:
    """K and V of every layer for one block of tokens."""
    c = model.config
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    heads = model.kv_heads_budgeted  # under tensor parallelism: the rank that holds the most
    return 2 * model.num_kv_layers * block_size * heads * c.head_dim * itemsize


def num_blocks_for_budget(model: Model, block_size: int, budget_bytes: int) -> int:
    """How many KV blocks fit in ``budget_bytes`` (at least one, or a clear error)."""
    per_block = kv_bytes_per_block(model, block_size)
    blocks = budget_bytes // per_block
    if blocks < 1:
        raise ValueError(
            f"a KV budget of {budget_bytes} bytes holds no block of {block_size} tokens "
            f"({per_block} bytes each); raise the KV cache budget"
        )
    return int(blocks)


class ModelRunner:
    """Builds each step's batch tensors and runs the model; on CUDA, decode steps of up to
    ``graph_max_batch`` sequences replay captured graphs (``graph_max_batch=0``: always eager)."""

    def __init__(
        self,
        model: Model,
        device: torch.device,
        num_blocks: int,
        block_size: int,
        max_model_len: int | None = None,
        graph_max_batch: int = 0,
        progress: tqdm | None = None,
        pad_tokens_to: int | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Eager steps round their token count up to this (1: no padding; default: on CUDA only).
        if pad_tokens_to is None:
            pad_tokens_to = CUDA_PAD_TOKENS_TO if device.type == "cuda" else 1
        if pad_tokens_to < 1:
            raise ValueError(f"pad_tokens_to must be >= 1, got {pad_tokens_to}")
        self.pad_tokens_to = pad_tokens_to
        # On CUDA, decode block tables are as wide as the model's context, eager or graphed: the
        # decode kernel picks its split-KV count from the table's width, so a graphed step and an
        # eager step of the same batch run the same splits and give the same bits.
        self.decode_table_width: int | None = None
        if device.type == "cuda" and max_model_len is not None:
            self.decode_table_width = -(-max_model_len // block_size)
        # Graphs need every op of a decode step free of host syncs: the Triton kernels (bf16,
        # fp16) are; the plain torch kernels that serve float32 on CUDA read lengths on the host.
        use_graphs = (
            graph_max_batch > 0
            and device.type == "cuda"
            and max_model_len is not None
            and model.dtype in (torch.bfloat16, torch.float16)
        )
        # Graphs and padded eager steps pad with rows that write to a block no sequence owns: one
        # more block.
        padded = use_graphs or pad_tokens_to > 1
        self.scratch_block = num_blocks if padded else None
        self.kv_caches = allocate_kv_caches(model, num_blocks + padded, block_size, device)
        self.graphs = None
        if use_graphs:
            from rustinfer.engine.cuda_graphs import DecodeGraphs

            assert self.decode_table_width is not None
            graphs = DecodeGraphs(
                model,
                self.kv_caches,
                device,
                graph_max_batch,
                self.decode_table_width,
                block_size,
                scratch_block=num_blocks,
            )
            try:
                graphs.capture(progress)
                self.graphs = graphs
            except Exception:  # an op that syncs or allocates on the host cannot be captured
                logger.warning("CUDA-graph capture failed: decode runs eagerly", exc_info=True)

    def warm_up(self, max_model_len: int, progress: tqdm | None = None) -> None:
        """Run the step shapes serving meets first, so Triton compiles their kernel variants
        (specialized on shapes and on integer arguments) at load rather than on a first request.

        Called before any request exists: every KV block is free to scribble on.
        """
        started = time.perf_counter()
        bs = self.block_size
        # The decode after each prefill needs one more position and one more slot.
        longest = max(1, min(2048, max_model_len - 1, self.num_blocks * bs - 1))
        many = max(1, min(64, self.num_blocks // 2))
        vocab = self.model.config.vocab_size
        # Tokens per sequence, per step: a short prompt, a middle one, a long one, and many short
        # ones at once. Kernels may change variant with the prompt's length (rustinfer-ops-cuda's
        # prefill attention picks its tile shape and grid from it).
        shapes = [[min(8, longest)], [min(1024, longest)], [longest], [min(2 * bs, longest)] * many]
        # Every padded size of a short prompt, as a prompt one token short of it: the step then
        # carries a padding sequence, as most prompts' steps do (a batch of two specializes
        # Triton's kernels differently from one), and cuBLAS meets the padded size's shapes.
        if self.pad_tokens_to > 1:
            step = self.pad_tokens_to
            top = min(WARM_PADDED_UP_TO, longest + 1)
            shapes += [[n - 1] for n in range(2 * step, top + 1, step)]
        if progress is not None:
            progress.total += len(shapes)
            progress.refresh()
        for lengths in shapes:
            seqs, next_block = [], 0
            for n in lengths:
                blocks = -(-(n + 1) // bs)
                if next_block + blocks > self.num_blocks:
                    break
                table = list(range(next_block, next_block + blocks))
                seqs.append(ScheduledSequence([i % vocab for i in range(n)], 0, table))
                next_block += blocks
            if seqs:
                self.execute(seqs)
                # One decode token per sequence: the eager decode path when graphs are off.
                self.execute(
                    [ScheduledSequence([5], len(s.token_ids), s.block_table) for s in seqs]
                )
            if progress is not None:
                progress.update(1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        logger.info("warmed the runner's step shapes in %.3f s", time.perf_counter() - started)

    def prepare(self, seqs: Sequence[ScheduledSequence]) -> StepInputs:
        """The step's flat inputs, built with array ops (a 2,048-token prompt is a few numpy
        calls, not a Python loop per token) and uploaded as two packed copies (int64, int32)."""
        bs, n = self.block_size, len(seqs)
        lens_q = np.fromiter((len(s.token_ids) for s in seqs), np.int64, n)
        starts = np.fromiter((s.start_pos for s in seqs), np.int64, n)
        covered = np.fromiter((len(s.block_table) for s in seqs), np.int64, n) * bs
        ends = starts + lens_q
        bad = np.flatnonzero((lens_q == 0) | (covered < ends))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"scheduled sequence needs {int(ends[i])} slots but its block table covers "
                f"{int(covered[i])} (and at least one token per step)"
            )
        width = int(covered.max()) // bs
        if self.decode_table_width is not None and bool((lens_q == 1).all()):
            width = max(width, self.decode_table_width)
        # Padding entries are never read: attention stops at each sequence's seq_len.
        tables = np.zeros((n, width), dtype=np.int32)
        for row, s in enumerate(seqs):
            tables[row, : len(s.block_table)] = s.block_table
        cu_q = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens_q, out=cu_q[1:])
        total = int(cu_q[-1])
        row_of = np.repeat(np.arange(n), lens_q)  # [T] the sequence of each token
        positions = np.arange(total, dtype=np.int64) + np.repeat(starts - cu_q[:-1], lens_q)
        slots = tables[row_of, positions // bs].astype(np.int64) * bs + positions % bs
        ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in seqs), np.int64, total)
        dev = self.device
        samples = np.fromiter((s.needs_logits for s in seqs), bool, n)
        logit_rows = cu_q[1:][samples] - 1
        ids_d, pos_d, slots_d, rows_d = upload_packed(
            [ids, positions, slots, logit_rows], torch.int64, dev
        )
        lens_d, cu_d, tables_d = upload_packed(
            [ends.astype(np.int32), cu_q.astype(np.int32), tables.reshape(-1)], torch.int32, dev
        )
        attn = AttentionMetadata(
            slot_mapping=slots_d,
            block_tables=tables_d.view(n, width),
            seq_lens=lens_d,
            cu_seqlens_q=cu_d,
            max_query_len=int(lens_q.max()),
            max_seq_len=int(ends.max()),
        )
        return StepInputs(
            input_ids=ids_d,
            positions=pos_d,
            attn=attn,
            cu_seqlens_q=cu_q.tolist(),
            logit_rows=rows_d,
        )

    @torch.inference_mode()
    def execute(
        self, seqs: Sequence[ScheduledSequence], prev_token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run one step; logits [number of sequences with needs_logits, vocab], in order.

        ``prev_token_ids`` are the previous step's sampled ids, still on the device: sequences
        with a ``prev_row`` read their input token from it.
        """
        return self.launch(self.stage(seqs), prev_token_ids)

    def stage(self, seqs: Sequence[ScheduledSequence]) -> StagedStep:
        """The host half of :meth:`execute`: build the step's inputs (a decode graph's pinned
        mirrors, or an eager step's uploads, queued behind whatever is on the stream) without
        running the model, so a caller can build a step ahead of its launch or time the halves
        apart (``bench/structured_timeline.py``). At most one step may be staged and not yet
        launched."""
        if not seqs:
            raise ValueError("an engine step schedules at least one sequence")
        pending = [(i, s.prev_row) for i, s in enumerate(seqs) if s.prev_row is not None]
        graphs = self.graphs
        if (
            graphs is not None
            and graphs.can_run(len(seqs))
            and all(len(s.token_ids) == 1 and s.needs_logits for s in seqs)
        ):
            decode = graphs.stage(
                [s.token_ids[0] for s in seqs],
                [s.start_pos for s in seqs],
                [s.block_table for s in seqs],
            )
            return StagedStep(pending, decode=decode)
        return StagedStep(pending, inputs=self.prepare(self.padded(seqs)))

    def padded(self, seqs: Sequence[ScheduledSequence]) -> Sequence[ScheduledSequence]:
        """``seqs`` with padding sequences after them that round the step's token count up to a
        multiple of ``pad_tokens_to``. They write their K/V to the scratch block and sample
        nothing; a step of decodes is padded with one-token sequences (it stays a decode step)."""
        pad = -sum(len(s.token_ids) for s in seqs) % self.pad_tokens_to
        if pad == 0 or self.scratch_block is None:
            return seqs
        scratch = self.scratch_block
        if all(len(s.token_ids) == 1 for s in seqs):
            fill = [ScheduledSequence([0], 0, [scratch], needs_logits=False)] * pad
        else:
            blocks = [scratch] * -(-pad // self.block_size)
            fill = [ScheduledSequence([0] * pad, 0, blocks, needs_logits=False)]
        return [*seqs, *fill]

    @torch.inference_mode()
    def launch(
        self, staged: StagedStep, prev_token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run a staged step on the device; its logits, as :meth:`execute` returns them."""
        pending = staged.pending
        if pending and prev_token_ids is None:
            raise ValueError(
                "a sequence reads its token from the previous step, which is not given"
            )
        if staged.decode is not None:
            assert self.graphs is not None
            return self.graphs.launch(staged.decode, pending, prev_token_ids)
        step = staged.inputs
        assert step is not None
        if pending:
            assert prev_token_ids is not None
            # A pending token is a decode's only token: its row is where the sequence starts.
            rows = [step.cu_seqlens_q[i] for i, _ in pending]
            copy_rows(step.input_ids, rows, prev_token_ids, [r for _, r in pending])
        hidden = self.model(step.input_ids, step.positions, self.kv_caches, step.attn)  # [T, H]
        if step.logit_rows.numel() == 0:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden.index_select(0, step.logit_rows))
