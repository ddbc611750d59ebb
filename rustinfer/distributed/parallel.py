"""Tensor parallelism inside one model: which slice of each weight a rank holds, and the
collectives that join the slices (through ``torch.distributed``: gloo on the CPU, NCCL on CUDA).

Megatron-style: the QKV and gate/up projections are split by output rows (column-parallel: each
rank computes its own heads and its own part of the MLP), the output and down projections by input
columns (row-parallel: each rank's partial sums meet in one all-reduce), the embedding and the LM
head by vocabulary rows (the embedding's rows meet in an all-reduce, the logits' columns in an
all-gather). Norms and rope tables are replicated. The KV cache holds each rank's KV heads only.

Heads are split by KV group so that a rank's query heads read only its own KV heads: with N ranks
and ``Hkv`` KV heads, N <= Hkv gives each rank a contiguous run of KV groups (as even as the counts
allow: SmolLM2-135M's 3 KV heads split 1 + 2 at N = 2), and N > Hkv needs N to be a multiple of Hkv
and to divide the query heads; each KV head is then replicated on the N / Hkv ranks that share it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rustinfer.config import ModelConfig
from rustinfer.errors import ModelLoadError

__all__ = ["CollectiveError", "DecoderShards", "TensorParallel", "collective", "even_range"]


class CollectiveError(RuntimeError):
    """A collective across the ranks failed: a rank died, hung past the timeout, or its link
    broke. The group cannot be used after it."""


def collective(op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``op(*args, **kwargs)``, a torch.distributed call, its failure as :class:`CollectiveError`
    (torch raises a plain RuntimeError, e.g. gloo's timeout)."""
    try:
        return op(*args, **kwargs)
    except RuntimeError as exc:
        raise CollectiveError(
            f"{getattr(op, '__name__', op)} across the ranks failed: {exc}"
        ) from exc


def even_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s [start, end) of ``total`` items cut into ``size`` runs as even as the counts
    allow (the first runs are the shorter ones when ``total`` does not divide)."""
    return total * rank // size, total * (rank + 1) // size


@dataclass(frozen=True)
class TensorParallel:
    """One rank of a tensor-parallel group. ``group`` is None at size 1 (every collective is then
    the identity, so a model built with it runs exactly as without)."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} outside a group of {self.size}")
        if self.size > 1 and self.group is None:
            raise ValueError("a tensor-parallel group of more than one rank needs a process group")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks, in place."""
        if self.size > 1:
            collective(dist.all_reduce, x, group=self.group)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] on every rank -> [N, size * C], the ranks' columns side by side in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        collective(dist.all_gather, parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class DecoderShards:
    """The slices of a dense decoder one rank holds (counts in heads, rows or vocabulary ids)."""

    rank: int
    size: int
    q_heads: tuple[int, int]  # [start, end) of the query heads
    kv_heads: tuple[int, int]  # [start, end) of the KV heads (one replicated head past Hkv ranks)
    intermediate: tuple[int, int]  # [start, end) of the MLP's intermediate rows
    vocab: tuple[int, int]  # [start, end) of the vocabulary rows held
    vocab_rows: int  # rows of the embedding/LM-head shard: the same on every rank (padded)

    @classmethod
    def plan(cls, config: ModelConfig, rank: int, size: int) -> DecoderShards:
        """The shard of ``rank`` in a group of ``size``; a clear error for a size the heads do not
        allow."""
        hq, hkv = config.num_attention_heads, config.num_key_value_heads
        if size < 1:
            raise ModelLoadError(f"tensor-parallel size must be >= 1, got {size}")
        if size <= hkv:
            kv = even_range(hkv, rank, size)
            group = hq // hkv
            q = (kv[0] * group, kv[1] * group)
        elif size % hkv == 0 and hq % size == 0:
            per_kv = size // hkv
            kv = (rank // per_kv, rank // per_kv + 1)
            q = (rank * hq // size, (rank + 1) * hq // size)
        else:
            raise ModelLoadError(
                f"tensor-parallel size {size} does not fit {config.architecture}'s heads: it must "
                f"be at most its {hkv} KV heads, or a multiple of them that divides its {hq} query "
                "heads"
            )
        rows = -(-config.vocab_size // size)
        vocab = (min(rank * rows, config.vocab_size), min((rank + 1) * rows, config.vocab_size))
        return cls(
            rank,
            size,
            q,
            kv,
            even_range(config.intermediate_size, rank, size),
            vocab,
            rows,
        )

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def intermediate_size(self) -> int:
        return self.intermediate[1] - self.intermediate[0]

    def take(self, hf_name: str, tensor: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, int]:
        """This rank's part of the checkpoint tensor ``hf_name`` (HF spelling) and the first row
        it fills in its packed parameter (the QKV and gate/up matrices stack several tensors).
        Slicing a memory-mapped tensor reads only the slice's pages."""
        module, _, kind = hf_name.rpartition(".")
        part = module.rpartition(".")[2]
        d = head_dim
        q0, q1 = (h * d for h in self.q_heads)
        k0, k1 = (h * d for h in self.kv_heads)
        i0, i1 = self.intermediate
        q_rows, kv_rows = q1 - q0, k1 - k0
        if part == "q_proj":
            return tensor[q0:q1], 0
        if part == "k_proj":
            return tensor[k0:k1], q_rows
        if part == "v_proj":
            return tensor[k0:k1], q_rows + kv_rows
        if part == "gate_proj":
            return tensor[i0:i1], 0
        if part == "up_proj":
            return tensor[i0:i1], i1 - i0
        if part in ("o_proj", "down_proj"):
            if kind == "bias":  # added once, after the all-reduce of the partial sums
                return (tensor if self.rank == 0 else torch.zeros_like(tensor)), 0
            lo, hi = (q0, q1) if part == "o_proj" else (i0, i1)
            return tensor[:, lo:hi], 0
        if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = tensor[self.vocab[0] : self.vocab[1]]
            # The last shard of a vocabulary that does not divide is padded with zero rows.
            if rows.shape[0] < self.vocab_rows:
                pad = rows.new_zeros((self.vocab_rows - rows.shape[0], *rows.shape[1:]))
                rows = torch.cat([rows, pad])
            return rows, 0
        return tensor, 0  # norms: every rank holds them whole
