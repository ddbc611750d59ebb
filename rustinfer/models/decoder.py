"""A dense decoder-only transformer over a paged KV cache: the forward Llama-like families share.

GQA attention with rope (optionally Llama 3 scaled), a SwiGLU MLP and RMSNorm, with the optional
parts a family switches on through its :class:`DecoderLayout`: q/k/v and output biases (Qwen2,
Llama with ``attention_bias``), MLP biases, and a per-head RMSNorm of q and k before rope (Qwen3).
A model plugin subclasses :class:`DenseDecoderForCausalLM`, says its layout in
``decoder_layout`` (refusing configs it cannot run there) and registers its architecture names.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable

import torch

from rustinfer.config import ModelConfig
from rustinfer.distributed.parallel import DecoderShards, TensorParallel
from rustinfer.errors import ModelLoadError
from rustinfer.models.base import AttentionMetadata, KVCaches, Model
from rustinfer.models.decoder_weights import (
    IGNORED,
    DecoderLayout,
    decoder_weight_shapes,
    slot_for,
    to_hf_name,
)
from rustinfer.models.op_table import OpTable
from rustinfer.models.quantized_params import QuantizedPacker
from rustinfer.ops import DecodeDims, build_cos_sin_cache
from rustinfer.ops.decode_layers import LayerStack
from rustinfer.ops.quant import QuantizedWeight

__all__ = ["DecoderLayout", "DenseDecoderForCausalLM", "sliding_window_refusal"]

logger = logging.getLogger(__name__)

# Per-layer tensors the forward reads; the optional ones are None when the layout lacks them.
_LAYER_KEYS = (
    "qkv_weight",
    "qkv_bias",
    "q_norm",
    "k_norm",
    "o_weight",
    "o_bias",
    "gate_up_weight",
    "gate_up_bias",
    "down_weight",
    "down_bias",
    "input_norm",
    "post_attn_norm",
)


def sliding_window_refusal(config: ModelConfig) -> str | None:
    """Why ``config`` needs sliding-window attention (which this forward lacks), or None.

    HF semantics: Mistral slides whenever ``sliding_window`` is set; Qwen2/Qwen3 only with
    ``use_sliding_window`` true, and then only layers from ``max_window_layers`` on. A window that
    covers ``max_position_embeddings`` never cuts anything off, so it is plain causal attention.
    """
    extra = config.extra
    window = extra.get("sliding_window")
    use = extra.get("use_sliding_window")
    if window is None or use is False:
        return None
    if int(window) >= config.max_position_embeddings:
        return None
    first_sliding = extra.get("max_window_layers")
    if use is True and first_sliding is not None and first_sliding >= config.num_hidden_layers:
        return None
    setting = f"sliding_window={window}"
    if use is True:
        setting = f"use_sliding_window=true with {setting}"
    return (
        f"{config.architecture} config sets {setting}, smaller than "
        f"max_position_embeddings={config.max_position_embeddings}: sliding-window attention is "
        "not supported yet (a checkpoint with sliding_window null, or use_sliding_window false, "
        "loads)"
    )


class DenseDecoderForCausalLM(Model):
    """GQA attention, rope, SwiGLU MLP, RMSNorm, optionally tied embeddings.

    Parameters are packed: per layer one QKV matrix ``[(Hq + 2 Hkv) * D, H]`` and one gate/up matrix
    ``[2 I, H]``, so each layer runs 4 matmuls. Under tensor parallelism (``tp`` of more than one
    rank) each rank holds its heads, its part of the MLP and of the vocabulary
    (:class:`~rustinfer.distributed.parallel.DecoderShards`), and the forward joins them with two
    all-reduces a layer, one for the embedding and an all-gather of the logits.
    """

    supports_tensor_parallel = True

    ops_used = (
        "embedding",
        "rmsnorm",
        "fused_add_rmsnorm",
        "linear",
        "prepare_linear_weight",
        "rope_kv_store",
        "attention_decode",
        "attention_prefill",
        "silu_and_mul",
        "logits",
    )

    @classmethod
    @abc.abstractmethod
    def decoder_layout(cls, config: ModelConfig) -> DecoderLayout:
        """The optional tensors this family has under ``config``; raise ModelLoadError for a
        config the forward cannot run (it is called before any weight is read)."""

    def __init__(
        self,
        config: ModelConfig,
        ops: OpTable,
        dtype: torch.dtype,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__(config, ops, dtype)
        refusal = sliding_window_refusal(config)
        if refusal is not None:
            raise ModelLoadError(refusal)
        self.layout = type(self).decoder_layout(config)
        c, layout = config, self.layout
        h, d = c.hidden_size, c.head_dim
        self.tp = tp or TensorParallel()
        self.shards = (
            DecoderShards.plan(c, self.tp.rank, self.tp.size) if self.tp.size > 1 else None
        )
        shards = self.shards
        # This rank's heads, MLP rows and vocabulary rows (the whole model at one rank).
        self.num_q_heads = shards.num_q_heads if shards else c.num_attention_heads
        self.num_kv_heads = shards.num_kv_heads if shards else c.num_key_value_heads
        inter = shards.intermediate_size if shards else c.intermediate_size
        vocab_rows = shards.vocab_rows if shards else c.vocab_size
        self.q_size = self.num_q_heads * d
        self.kv_size = self.num_kv_heads * d
        self.scale = d**-0.5
        self._dims = DecodeDims(self.num_q_heads, self.num_kv_heads, d, c.rms_norm_eps, self.scale)

        def empty(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.embed_tokens = empty(vocab_rows, h)
        for i in range(c.num_hidden_layers):
            p = f"layers.{i}."
            params = {
                "qkv_weight": empty(self.q_size + 2 * self.kv_size, h),
                "o_weight": empty(h, self.q_size),
                "gate_up_weight": empty(2 * inter, h),
                "down_weight": empty(h, inter),
                "input_norm": empty(h),
                "post_attn_norm": empty(h),
            }
            if layout.qkv_bias:
                params["qkv_bias"] = empty(self.q_size + 2 * self.kv_size)
            if layout.o_bias:
                params["o_bias"] = empty(h)
            if layout.qk_norm:
                params["q_norm"] = empty(d)  # one scale per head dimension, shared by all heads
                params["k_norm"] = empty(d)
            if layout.mlp_bias:
                params["gate_up_bias"] = empty(2 * inter)
                params["down_bias"] = empty(h)
            for name, param in params.items():
                self.register_parameter((p + name).replace(".", "_"), param)
        self.norm = empty(h)
        self.lm_head = self.embed_tokens if c.tie_word_embeddings else empty(vocab_rows, h)
        # float32 for every half/single dtype (the rope op rotates in fp32, see its spec); float64
        # models keep float64 angles so they stay an exact oracle.
        cache_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        cos_sin = build_cos_sin_cache(
            d, c.max_position_embeddings, c.rope_theta, c.rope_scaling, dtype=cache_dtype
        )
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)
        self._layers = LayerStack()

    # -- weights ---------------------------------------------------------------------------------

    @classmethod
    def weight_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        return decoder_weight_shapes(config, cls.decoder_layout(config))

    def _param(self, packed_name: str) -> torch.nn.Parameter | None:
        param = getattr(self, packed_name.replace(".", "_"), None)
        return param if isinstance(param, torch.nn.Parameter) else None

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        expected = set(self.weight_shapes(self.config))
        seen: set[str] = set()
        packer = QuantizedPacker(self)
        for name, tensor in weights:
            hf_name = to_hf_name(name)
            if IGNORED.search(name):
                continue
            if hf_name == "lm_head.weight" and isinstance(tensor, QuantizedWeight):
                self._hold_quantized_head(tensor)
                continue
            if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
                # Some tied checkpoints also store a copy of the embedding; the model reads one.
                continue
            slot = slot_for(hf_name, self.config)
            param = None if slot is None else self._param(slot.param)
            if slot is None or param is None:
                raise ModelLoadError(
                    f"checkpoint tensor {name!r} has no place in {self.config.architecture} "
                    f"(num_hidden_layers={self.config.num_hidden_layers}, {self.layout}); "
                    "is the config right?"
                )
            row_start = slot.row_start
            if self.shards is not None:
                tensor, row_start = self.shards.take(hf_name, tensor, self.config.head_dim)
            rows = slot.rows if self.shards is None or slot.rows is None else tensor.shape[0]
            target = param if rows is None else param[row_start : row_start + rows]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ModelLoadError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the config implies "
                    f"{tuple(target.shape)}"
                )
            if not packer.take(slot.param, row_start, tensor):  # quantized: stacked below
                target.copy_(tensor)
            seen.add(hf_name)
        missing = sorted(expected - seen)
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise ModelLoadError(f"checkpoint lacks tensors: {shown}")
        packer.install(getattr(self.ops, "prepare_quantized_weight", None))
        self._prepare_linear_weights()
        self._bind_layers()

    def _hold_quantized_head(self, head: QuantizedWeight) -> None:
        """Hold a quantized LM head as it came (a GGUF's Q8_0 embedding: a quarter of float32's
        bytes, read in full every step) through ``quantized_logits``, which keeps the logits
        float32-accurate; the head is then its own tensor, no longer the embedding's. The loader
        yields one only for ops that have ``quantized_logits`` (``weights(quantized_head=)``)."""
        prepare = getattr(self.ops, "prepare_quantized_weight", None)
        if getattr(self.ops, "quantized_logits", None) is None or prepare is None:
            raise ModelLoadError(
                "a quantized LM head arrived, but the ops have no quantized_logits"
            )
        if head.shape != (self.config.vocab_size, self.config.hidden_size):
            raise ModelLoadError(
                f"the quantized LM head has shape {head.shape}, the config implies "
                f"{(self.config.vocab_size, self.config.hidden_size)}"
            )
        if isinstance(self._parameters.get("lm_head"), torch.nn.Parameter):
            del self._parameters["lm_head"]  # the float head (or the tied table) is not read
        self.lm_head = prepare(head)

    def _prepare_linear_weights(self) -> None:
        """Give every matmul weight the layout this device's ``linear`` reads fastest (once, here).

        A tied float ``lm_head`` is the embedding table itself, so the embedding reads the same
        tensor; with a quantized head the table only serves row lookups and keeps its layout.
        """
        table_is_head = self.config.tie_word_embeddings and not isinstance(
            self.lm_head, QuantizedWeight
        )
        for name, param in self.named_parameters():
            if param.dim() == 2 and not (name == "embed_tokens" and not table_is_head):
                param.data = self.ops.prepare_linear_weight(param.data)

    def _bind_layers(self) -> None:
        """Per-layer tensor lookups done once, so the forward loop does no string work."""
        self._layers = LayerStack(
            {key: getattr(self, f"layers_{i}_{key}", None) for key in _LAYER_KEYS}
            for i in range(self.config.num_hidden_layers)
        )

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to(device) replaces parameter tensors: re-bind the per-layer lookups afterwards.
        out = super()._apply(fn, recurse)
        if self._layers:
            self._bind_layers()
        return out

    # -- forward ---------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: KVCaches,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        ops, c, tp = self.ops, self.config, self.tp
        eps = c.rms_norm_eps
        n_tokens = input_ids.shape[0]
        hq, hkv, d = self.num_q_heads, self.num_kv_heads, c.head_dim
        hidden = self._embed(input_ids)  # [T, H]
        residual = hidden
        x = ops.rmsnorm(hidden, self._layers[0]["input_norm"], eps)  # layer 0's input
        decode_layers = getattr(ops, "decode_layers", None) if attn.is_decode else None
        if decode_layers is not None and tp.size == 1:
            # The device may run the whole stack in one call (None: it does not serve this one).
            done = decode_layers(
                x,
                hidden,
                self._layers,
                positions,
                self.cos_sin_cache,
                kv_caches,
                attn.slot_mapping,
                attn.block_tables,
                attn.seq_lens,
                self._dims,
            )
            if done is not None:
                out, _ = ops.fused_add_rmsnorm(done[0], done[1], self.norm, eps)
                return out
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self._layers, kv_caches, strict=True)):
            if i > 0:
                x, residual = ops.fused_add_rmsnorm(hidden, residual, layer["input_norm"], eps)
            qkv = ops.linear(x, layer["qkv_weight"], layer["qkv_bias"])  # [T, (Hq + 2 Hkv) * D]
            q = qkv[:, : self.q_size].view(n_tokens, hq, d)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n_tokens, hkv, d)
            v = qkv[:, self.q_size + self.kv_size :].view(n_tokens, hkv, d)
            if layer["q_norm"] is not None:
                # Each head's vector is normalised on its own: rows of [T * heads, D].
                q = ops.rmsnorm(q.reshape(n_tokens * hq, d), layer["q_norm"], eps)
                k = ops.rmsnorm(k.reshape(n_tokens * hkv, d), layer["k_norm"], eps)
                q, k = q.view(n_tokens, hq, d), k.view(n_tokens, hkv, d)
            q = ops.rope_kv_store(
                q, k, v, positions, self.cos_sin_cache, k_cache, v_cache, attn.slot_mapping
            )
            if attn.is_decode:
                o = ops.attention_decode(
                    q, k_cache, v_cache, attn.block_tables, attn.seq_lens, self.scale
                )
            else:
                o = ops.attention_prefill(
                    q,
                    k_cache,
                    v_cache,
                    attn.block_tables,
                    attn.cu_seqlens_q,
                    attn.seq_lens,
                    attn.max_query_len,
                    self.scale,
                    attn.max_seq_len,
                )
            hidden = ops.linear(o.reshape(n_tokens, hq * d), layer["o_weight"], layer["o_bias"])
            tp.all_reduce(hidden)  # the ranks' heads' partial sums (identity at one rank)
            x, residual = ops.fused_add_rmsnorm(hidden, residual, layer["post_attn_norm"], eps)
            gate_up = ops.linear(x, layer["gate_up_weight"], layer["gate_up_bias"])
            hidden = ops.linear(ops.silu_and_mul(gate_up), layer["down_weight"], layer["down_bias"])
            tp.all_reduce(hidden)
        out, _ = ops.fused_add_rmsnorm(hidden, residual, self.norm, eps)
        return out

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shards is None:
            return self.ops.embedding(input_ids, self.embed_tokens)
        # Each rank looks up the ids in its vocabulary rows (others read row 0 and are zeroed);
        # the all-reduce then hands every rank every row.
        start, end = self.shards.vocab
        inside = (input_ids >= start) & (input_ids < end)
        local = torch.where(inside, input_ids - start, 0)
        rows = self.ops.embedding(local, self.embed_tokens)
        rows = rows * inside.unsqueeze(1).to(rows.dtype)
        return self.tp.all_reduce(rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # float32 out (samplers work in it; float64 models keep float64, the exact oracle).
        if isinstance(self.lm_head, QuantizedWeight):
            return self.ops.quantized_logits(hidden, self.lm_head)
        logits = self.ops.logits(hidden, self.lm_head)
        if self.shards is None:
            return logits
        return self.tp.all_gather_columns(logits)[:, : self.config.vocab_size]

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.num_kv_heads, self.config.head_dim)

    @property
    def kv_heads_budgeted(self) -> int:
        if self.shards is None:
            return self.num_kv_heads
        size = self.tp.size
        return max(DecoderShards.plan(self.config, rank, size).num_kv_heads for rank in range(size))
