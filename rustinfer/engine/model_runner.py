"""Turn one scheduled step (a ragged batch of sequences) into a model forward and its logits.

The runner owns the paged KV cache. Each step lists, per sequence, the tokens to compute (a whole
prompt, a prompt chunk, or one decode token), the position of the first of them, and the sequence's
block table; the runner builds the flat batch tensors and :class:`AttentionMetadata` once, runs the
model, and returns logits only for sequences that sample this step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rustinfer.models.base import AttentionMetadata, KVCaches, Model

DEFAULT_BLOCK_SIZE = (
    16  # tokens per KV block: small enough to waste little, large enough for kernels
)


@dataclass
class ScheduledSequence:
    token_ids: Sequence[int]  # tokens whose KV this step computes
    start_pos: int  # position of token_ids[0] in the sequence
    block_table: Sequence[int]  # covers at least start_pos + len(token_ids) tokens
    needs_logits: bool = True  # False for a prompt chunk that does not reach the prompt's end


@dataclass
class StepInputs:
    """The flat tensors of one step, built once on the host and copied to the device."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    cu_seqlens_q: list[int]  # host copy of attn.cu_seqlens_q: picks logits rows without a sync


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
    return 2 * model.num_kv_layers * block_size * c.num_key_value_heads * c.head_dim * itemsize


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
    def __init__(
        self, model: Model, device: torch.device, num_blocks: int, block_size: int
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(model, num_blocks, block_size, device)

    def prepare(self, seqs: Sequence[ScheduledSequence]) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        cu_q = [0]
        width = max(len(s.block_table) for s in seqs)
        tables: list[list[int]] = []
        for s in seqs:
            n = len(s.token_ids)
            end = s.start_pos + n
            if n == 0 or len(s.block_table) * bs < end:
                raise ValueError(
                    f"scheduled sequence needs {end} slots but its block table covers "
                    f"{len(s.block_table) * bs} (and at least one token per step)"
                )
            ids.extend(s.token_ids)
            for pos in range(s.start_pos, end):
                positions.append(pos)
                slots.append(s.block_table[pos // bs] * bs + pos % bs)
            seq_lens.append(end)
            cu_q.append(cu_q[-1] + n)
            # Padding entries are never read: attention stops at each sequence's seq_len.
            tables.append(list(s.block_table) + [0] * (width - len(s.block_table)))
        dev = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=dev),
            max_query_len=max(len(s.token_ids) for s in seqs),
        )
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            attn=attn,
            cu_seqlens_q=cu_q,
        )

    @torch.inference_mode()
    def execute(self, seqs: Sequence[ScheduledSequence]) -> torch.Tensor:
        """Run one step; logits [number of sequences with needs_logits, vocab], in order."""
        if not seqs:
            raise ValueError("an engine step schedules at least one sequence")
        step = self.prepare(seqs)
        hidden = self.model(step.input_ids, step.positions, self.kv_caches, step.attn)  # [T, H]
        # The last new token of each sequence that samples: row cu_q[i + 1] - 1 (host-side list,
        # so no device sync here).
        ends = step.cu_seqlens_q[1:]
        last_rows = [end - 1 for s, end in zip(seqs, ends, strict=True) if s.needs_logits]
        if not last_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        index = torch.tensor(last_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, index))
