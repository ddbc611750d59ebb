"""``ModelSource``: what a loader found (format, config, tokenizer) and its weights on demand."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from rustinfer.config import ModelConfig, QuantizationConfig
from rustinfer.errors import ModelLoadError
from rustinfer.loaders.quantize import quantize_weights
from rustinfer.ops.quant import QuantizedWeight
from rustinfer.progress import track
from rustinfer.tokenizer import Tokenizer

__all__ = ["FORMATS", "ModelSource", "WeightStore", "parse_dtype"]

FORMATS = ("auto", "safetensors", "gguf", "dummy")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,  # the exact-oracle dtype of tests
    "double": torch.float64,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``, ``"torch.float16"``, ``torch.float32``... -> a floating torch dtype."""
    if isinstance(name, torch.dtype):
        if not name.is_floating_point:
            raise ModelLoadError(f"weights load as a floating dtype, not {name}")
        return name
    key = str(name).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ModelLoadError(
            f"unknown dtype {name!r}; use one of: {', '.join(sorted(set(_DTYPES)))}"
        )
    return _DTYPES[key]


class WeightStore(Protocol):
    """A format's weight reader. Names are the file's own spelling."""

    def tensor_names(self) -> list[str]: ...

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]: ...

    def iter_tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]: ...


@dataclass
class ModelSource:
    """A located model: its format, parsed config, tokenizer, and its weights on demand."""

    path: Path | None  # model dir or .gguf file; None for a dummy built from a config dict
    format: str  # "safetensors" | "gguf" | "dummy"
    config: ModelConfig
    tokenizer: Tokenizer | None
    store: WeightStore | None = field(default=None, repr=False)

    @property
    def num_tensors(self) -> int:
        return 0 if self.store is None else len(self.store.tensor_names())

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Torch-layout shape of every stored tensor, read from headers only (nothing loads)."""
        return {} if self.store is None else self.store.tensor_shapes()

    def weights(
        self,
        dtype: torch.dtype,
        quantization: QuantizationConfig | None = None,
        *,
        as_stored: bool = False,
        quantized_head: bool = False,
    ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """Yield ``(name, tensor)`` on CPU in ``dtype`` and torch layout, one tensor at a time.
        ``as_stored``: a safetensors file's tensors come in their stored dtype, as views of the
        mapped file, for a consumer that converts while it copies the part it keeps (a
        tensor-parallel shard then reads only its own pages, whatever the dtypes).

        Names keep the file's spelling (HF ``model.layers.0.self_attn.q_proj.weight``, GGUF
        ``blk.0.attn_q.weight``); mapping them onto parameters is the model's job.
        ``quantization`` (concrete, not ``auto``; default none): ``gguf`` yields a GGUF file's
        block-quantized projections as :class:`QuantizedWeight` (and its LM head too with
        ``quantized_head``, for a model whose ops have ``quantized_logits``); ``int8``/``int4``
        reads every tensor in float32 and quantizes the projections group-wise.
        """
        if self.store is None:
            raise ModelLoadError(
                f"a {self.format!r} model source has no weights file; build random weights with "
                "rustinfer.loaders.dummy_weights(shapes, dtype) from the model's parameter shapes"
            )
        dtype = parse_dtype(dtype)
        method = "none" if quantization is None else quantization.method
        where = self.path.name if self.path is not None else self.format
        if method == "gguf":
            if self.format != "gguf":
                raise ModelLoadError(f"quantization 'gguf' needs a GGUF file, not {self.format}")
            pairs = self.store.iter_tensors(  # type: ignore[call-arg]
                dtype, keep_quantized=True, quantized_head=quantized_head
            )
        elif method in ("int8", "int4"):
            assert quantization is not None
            pairs = quantize_weights(self.store.iter_tensors(torch.float32), quantization, dtype)
        elif method == "none":
            pairs = self.store.iter_tensors(
                None if as_stored and self.format == "safetensors" else dtype
            )
        else:
            raise ModelLoadError(f"quantization {method!r} must be made concrete before loading")
        yield from track(pairs, self.num_tensors, f"Loading {where}")
