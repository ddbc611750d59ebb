"""Load a ``.gguf`` file: config and tokenizer from metadata, weights dequantized on demand."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from rustinfer.config import ModelConfig
from rustinfer.errors import ModelLoadError
from rustinfer.loaders.dequant import dequantize_tensor, quantized_tensor
from rustinfer.loaders.gguf_config import config_from_gguf
from rustinfer.loaders.gguf_meta import field, open_gguf
from rustinfer.loaders.gguf_reader import GGUFFile
from rustinfer.loaders.quantize import is_linear_weight
from rustinfer.loaders.source import ModelSource
from rustinfer.ops.quant import QuantizedWeight
from rustinfer.tokenizer import Tokenizer

__all__ = ["GGUFWeights", "load_gguf", "unpermute_qk"]

logger = logging.getLogger(__name__)

# Architectures whose llama.cpp converter reorders Q/K rows for interleaved (GPT-J style) rotary
# pairs. rustinfer's models rotate halves (HF layout), so these rows are put back on load.
QK_PERMUTED_ARCHITECTURES = frozenset({"llama"})
_QK_NAME = re.compile(r"blk\.\d+\.attn_(q|k)\.(weight|bias)")


def unpermute_qk(tensor: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: GGUF rows (interleaved pairs) -> HF (rotate-half).

    Per head, GGUF holds rows ordered [pair 0 (x, y), pair 1 (x, y), ...] = [head_dim/2, 2];
    HF holds [all x, all y] = [2, head_dim/2]. Works for weights [out, in] and biases [out].
    """
    rows = tensor.shape[0]
    if rows % (2 * n_heads):
        raise ModelLoadError(
            f"cannot un-permute a Q/K tensor of {rows} rows into {n_heads} heads of even size"
        )
    rest = tensor.shape[1:]
    # [n_heads, head_dim/2, 2, *rest] -> [n_heads, 2, head_dim/2, *rest]
    grouped = tensor.reshape(n_heads, rows // n_heads // 2, 2, *rest)
    return grouped.transpose(1, 2).reshape(tensor.shape)


# GGUF's names of the token embedding and of an untied LM head.
_EMBEDDING, _HEAD = "token_embd.weight", "output.weight"


class GGUFWeights:
    """The tensors of one GGUF file, in file order, converted one at a time."""

    def __init__(self, reader: GGUFFile, config: ModelConfig) -> None:
        self._reader = reader
        self._heads: dict[str, int] = {}
        if config.architecture in QK_PERMUTED_ARCHITECTURES:
            self._heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads}

    def tensor_names(self) -> list[str]:
        return [t.name for t in self._reader.tensors]

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self._reader.tensors}

    def iter_tensors(
        self, dtype: torch.dtype, keep_quantized: bool = False, quantized_head: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """Tensors in ``dtype``; with ``keep_quantized``, the projection matrices stored as
        Q8_0/Q4_0/Q4_1 (blocks copied as is) or Q4_K (as int4 with groups of 32, exact) come as
        :class:`QuantizedWeight` instead. Other types, Q6_K included, are dequantized.

        ``quantized_head`` (with ``keep_quantized``; for a device with ``quantized_logits``): the
        LM head comes quantized too, ``output.weight``, or in a tied file a second view of
        ``token_embd.weight``'s blocks after the dequantized table (the embedding's lookups)."""
        quantized_head = keep_quantized and quantized_head
        tied = _HEAD not in {t.name for t in self._reader.tensors}
        for tensor in self._reader.tensors:
            keep = is_linear_weight(tensor.name) or (quantized_head and tensor.name == _HEAD)
            kept = quantized_tensor(tensor) if keep_quantized and keep else None
            value: torch.Tensor | QuantizedWeight = (
                kept if kept is not None else dequantize_tensor(tensor, dtype)
            )
            match = _QK_NAME.fullmatch(tensor.name) if self._heads else None
            if match:
                heads = self._heads[match.group(1)]
                if isinstance(value, QuantizedWeight):
                    # Rows are quantized one by one, so the permutation moves whole rows.
                    rows = unpermute_qk(torch.arange(value.shape[0]), heads)
                    value = value.select_rows(rows)
                else:
                    value = unpermute_qk(value, heads)
            yield tensor.name, value
            if quantized_head and tied and tensor.name == _EMBEDDING:
                head = quantized_tensor(tensor)
                if head is not None:
                    yield _HEAD, head


def load_gguf(path: Path, *, with_weights: bool = True) -> ModelSource:
    """A ModelSource for a GGUF file (``with_weights=False``: config + tokenizer only, "dummy")."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    tokenizer = None
    if field(reader, "tokenizer.ggml.model") is not None:
        tokenizer = Tokenizer.from_gguf(reader)
    else:
        logger.warning("%s carries no tokenizer; only token ids can be used with it", path)
    return ModelSource(
        path=path,
        format="gguf" if with_weights else "dummy",
        config=config,
        tokenizer=tokenizer,
        store=GGUFWeights(reader, config) if with_weights else None,
    )
