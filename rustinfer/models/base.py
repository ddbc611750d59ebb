"""What a model plugin implements, and the attention metadata the runtime hands it each step."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from rustinfer.config import ModelConfig
from rustinfer.models.op_table import OpTable

# Per layer: (k_cache, v_cache), each [num_blocks, block_size, n_kv_heads, head_dim].
KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AttentionMetadata:
    """Where each token of a step goes in the paged KV cache and what it attends to.

    A step is a ragged batch of B sequences; sequence i contributes ``q_len_i`` new tokens (a whole
    prompt, a prompt chunk, or one decode token) and has ``seq_lens[i]`` tokens of context counting them.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1: padding, not stored)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: context length including this step's tokens
    cu_seqlens_q: torch.Tensor  # [B + 1] int32: row offsets of each sequence's new tokens
    max_query_len: int  # host-side max q_len_i, sizes prefill kernel grids without a device sync
    # Host-side max seq_lens[i] where the caller knows it (None: unknown). With max_query_len it
    # tells a kernel, without a device sync, whether any sequence has a cached prefix.
    max_seq_len: int | None = None

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one token: the decode kernel applies."""
        return self.max_query_len == 1


class Model(torch.nn.Module, abc.ABC):
    """A causal LM built from a :class:`ModelConfig` and an :class:`OpTable` resolved for one device.

    Weights arrive as ``(name, tensor)`` pairs in the checkpoint's own spelling (HF or GGUF names); the
    model maps them onto its packed layout.
    """

    # Whether the constructor takes ``tp`` (a :class:`~rustinfer.distributed.parallel.
    # TensorParallel`) and shards itself across its ranks.
    supports_tensor_parallel: ClassVar[bool] = False
    # The ops its forward looks up (``self.ops.<name>``); the loader resolves only these, so a
    # kernel plugin need not implement ops this model never calls. None: every op spec.
    ops_used: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, config: ModelConfig, ops: OpTable, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.ops = ops
        self.dtype = dtype

    @classmethod
    @abc.abstractmethod
    def weight_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor this model expects, HF spelling, with its shape (dummy weights)."""

    @abc.abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in; raise :class:`ModelLoadError` naming any bad or missing one."""

    @abc.abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: KVCaches,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states, [T, hidden_size]."""

    @abc.abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size] -> [N, vocab_size] logits, float32 (float64 for float64 models)."""

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        c = self.config
        return (num_blocks, block_size, c.num_key_value_heads, c.head_dim)

    @property
    def kv_heads_budgeted(self) -> int:
        """KV heads a cache block holds on the rank that holds the most: every rank makes as many
        blocks as the engine counts, so that rank sets the budget (one rank: the model's own)."""
        return self.config.num_key_value_heads

    @property
    def num_kv_layers(self) -> int:
        return self.config.num_hidden_layers
