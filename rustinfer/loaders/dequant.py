"""GGUF tensor payloads -> torch tensors: float types reinterpreted, block-quantized types expanded.

The supported block formats (llama.cpp's ggml-common.h layout, little-endian, 32 values per block):

* Q8_0: fp16 scale d, 32 x int8 q                 -> d * q
* Q4_0: fp16 scale d, 16 bytes of 4-bit q         -> d * (q - 8)
* Q4_1: fp16 scale d, fp16 min m, 16 bytes of q   -> d * q + m

In a 4-bit block, byte j holds value j in its low nibble and value j + 16 in its high nibble.
Arithmetic runs in float32, then casts once to the target dtype. It runs in numpy, single-threaded:
on 2 shared cores, torch's many small parallel ops here were 25x slower whenever another process
was busy (0.5 s vs 13 s for SmolLM2), while numpy takes ~0.3 s either way.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf.gguf_reader import ReaderTensor

from rustinfer.errors import ModelLoadError
from rustinfer.ops.quant import QuantizedWeight

__all__ = [
    "KEEPABLE_TYPES",
    "SUPPORTED_TYPES",
    "dequantize_tensor",
    "quantized_tensor",
    "tensor_shape",
]

_BLOCK = 32
# numpy has no bfloat16: BF16 bits travel as int16 and are reinterpreted by torch.
_FLOAT_TYPES = {
    QT.F32: (np.float32, torch.float32),
    QT.F16: (np.float16, torch.float16),
    QT.BF16: (np.int16, torch.bfloat16),
}
_BLOCKS = {
    QT.Q8_0: np.dtype([("d", "<f2"), ("qs", "i1", (32,))]),
    QT.Q4_0: np.dtype([("d", "<f2"), ("qs", "u1", (16,))]),
    QT.Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))]),
}
SUPPORTED_TYPES = tuple(t.name for t in (*_FLOAT_TYPES, *_BLOCKS))
# Block types a matrix can stay in (rustinfer.ops.quant formats of the same name).
KEEPABLE_TYPES = {QT.Q8_0: "q8_0", QT.Q4_0: "q4_0", QT.Q4_1: "q4_1"}


def tensor_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """Torch shape of a GGUF tensor (GGUF lists dims fastest-first: ne0 is the row length)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _column(values: np.ndarray) -> np.ndarray:
    # [n_blocks] fp16 field -> [n_blocks, 1] float32, to broadcast over a block's 32 values.
    return values.astype(np.float32)[:, None]


def _dequantize_blocks(kind: QT, raw: np.ndarray) -> np.ndarray:
    """[n_blocks * 32] float32 values of the blocks in ``raw`` (uint8 bytes)."""
    blocks = raw.view(_BLOCKS[kind])  # structured view, no copy
    if kind == QT.Q8_0:
        out = blocks["qs"].astype(np.float32)
        out *= _column(blocks["d"])
        return out.reshape(-1)
    packed = blocks["qs"]  # [n_blocks, 16]
    out = np.empty((len(blocks), _BLOCK), dtype=np.float32)
    np.bitwise_and(packed, 0x0F, out=out[:, :16], casting="unsafe")
    np.right_shift(packed, 4, out=out[:, 16:], casting="unsafe")
    if kind == QT.Q4_0:
        out -= 8.0
    out *= _column(blocks["d"])
    if kind == QT.Q4_1:
        out += _column(blocks["m"])
    return out.reshape(-1)


def _stored_floats(raw: np.ndarray, kind: QT, shape: tuple[int, ...]) -> torch.Tensor:
    np_type, torch_type = _FLOAT_TYPES[kind]
    with warnings.catch_warnings():
        # The view is of the read-only file mapping, which torch warns about; the caller copies it
        # before anything could write to it.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw.view(np_type)).view(torch_type).reshape(shape)


def dequantize_tensor(tensor: ReaderTensor, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous ``dtype`` tensor in torch layout holding ``tensor``'s values."""
    kind = QT(int(tensor.tensor_type))
    shape = tensor_shape(tensor)
    raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)  # the file's bytes, not copied
    if kind in _FLOAT_TYPES:
        # copy=True: never hand out a view of the read-only mapping (writing it would crash).
        return _stored_floats(raw, kind, shape).to(dtype, copy=True)
    if kind not in _BLOCKS:
        raise ModelLoadError(
            f"tensor {tensor.name!r} has GGUF type {kind.name}, which rustinfer cannot dequantize; "
            f"supported types: {', '.join(SUPPORTED_TYPES)}. Re-quantize the model to one of "
            "them (e.g. llama-quantize ... Q8_0) or use a safetensors checkpoint"
        )
    if shape[-1] % _BLOCK or raw.size % _BLOCKS[kind].itemsize:
        raise ModelLoadError(
            f"tensor {tensor.name!r} ({kind.name}, shape {shape}) does not split into whole "
            f"{_BLOCK}-value blocks; the file is damaged"
        )
    return torch.from_numpy(_dequantize_blocks(kind, raw)).reshape(shape).to(dtype)


def _field(blocks: np.ndarray, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    # ascontiguousarray copies the strided field out of the read-only file mapping.
    return torch.from_numpy(np.ascontiguousarray(blocks[name]).reshape(shape))


def quantized_tensor(tensor: ReaderTensor) -> QuantizedWeight | None:
    """A 2-D Q8_0/Q4_0/Q4_1 tensor as a canonical :class:`QuantizedWeight` (its block bytes
    copied, not decoded: llama.cpp's layout is the canonical one), else None."""
    kind = QT(int(tensor.tensor_type))
    shape = tensor_shape(tensor)
    if kind not in KEEPABLE_TYPES or len(shape) != 2:
        return None
    n, k = shape
    raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
    if k % _BLOCK or raw.size != n * (k // _BLOCK) * _BLOCKS[kind].itemsize:
        raise ModelLoadError(
            f"tensor {tensor.name!r} ({kind.name}, shape {shape}) does not split into whole "
            f"{_BLOCK}-value blocks; the file is damaged"
        )
    blocks = raw.view(_BLOCKS[kind])
    groups = (n, k // _BLOCK)
    tensors = {
        "codes": _field(blocks, "qs", (n, k if kind == QT.Q8_0 else k // 2)),
        "scales": _field(blocks, "d", groups),
    }
    if kind == QT.Q4_1:
        tensors["mins"] = _field(blocks, "m", groups)
    return QuantizedWeight(KEEPABLE_TYPES[kind], (n, k), _BLOCK, **tensors)
