"""Quantized checkpoint tensors packed into a model's fused matmul weights.

A model keeps one QKV and one gate/up matrix per layer; a checkpoint ships q, k, v (gate, up)
apart. Float tensors are copied into row slices of the fused parameter as they arrive; quantized
ones cannot be (the parameter is float), so :class:`QuantizedPacker` collects them by parameter and,
once all have arrived, stacks them along N (rows quantize independently, so stacking is exact),
prepares the result for the device once, and puts it where the parameter was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from rustinfer.errors import ModelLoadError
from rustinfer.ops.quant import QuantizedWeight

__all__ = ["QuantizedPacker"]

logger = logging.getLogger(__name__)


class QuantizedPacker:
    """Collects quantized row blocks per parameter name; :meth:`install` swaps them in."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module
        self._parts: dict[str, list[tuple[int, QuantizedWeight]]] = {}

    def take(self, param_name: str, row_start: int, tensor: object) -> bool:
        """Keep ``tensor`` for rows ``row_start...`` of ``param_name`` if it is quantized (True);
        False: a float tensor the caller copies in itself."""
        if not isinstance(tensor, QuantizedWeight):
            return False
        self._parts.setdefault(param_name, []).append((row_start, tensor))
        return True

    def install(self, prepare: Callable[[QuantizedWeight], QuantizedWeight] | None) -> None:
        """Replace each collected parameter (attribute name: dots as underscores) with its
        stacked, prepared quantized weight. A parameter whose rows are not all quantized alike
        (a GGUF mixing types inside one fused matrix) gets its quantized parts dequantized into
        its float rows instead."""
        for name, parts in self._parts.items():
            attr = name.replace(".", "_")
            param = getattr(self._module, attr)
            parts.sort(key=lambda p: p[0])
            rows = sum(p.shape[0] for _, p in parts)
            alike = {(p.format, p.group_size) for _, p in parts}
            if rows != param.shape[0] or len(alike) != 1:
                logger.info(
                    "%s mixes quantized and float (or differently quantized) rows; "
                    "dequantizing it to %s",
                    name,
                    param.dtype,
                )
                for start, part in parts:
                    param.data[start : start + part.shape[0]] = part.dequantize(param.dtype)
                continue
            starts = [start for start, _ in parts]
            expected = [sum(p.shape[0] for _, p in parts[:i]) for i in range(len(parts))]
            if starts != expected:
                raise ModelLoadError(f"{name}: quantized row blocks overlap or leave gaps")
            if prepare is None:
                raise ModelLoadError(
                    f"{name} arrived quantized, but the model was built without quantized ops "
                    "(load it with a quantization other than 'none')"
                )
            stacked = QuantizedWeight.cat_rows(p for _, p in parts)
            delattr(self._module, attr)  # drop the float parameter (never written: no memory)
            setattr(self._module, attr, prepare(stacked))
        self._parts.clear()
