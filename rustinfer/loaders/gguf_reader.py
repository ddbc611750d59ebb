"""A lean reader for GGUF files (versions 2 and 3, little-endian): metadata and tensor views.

gguf's own ``GGUFReader`` builds several numpy views for every part of every metadata value: for a
vocabulary of 49k tokens and 49k merges that is ~250k memmap slices and 5-8 s on two cores, longer
than everything else a load does. This reader decodes metadata straight from the mapped bytes with
``struct`` (strings are the only per-element work) and hands tensors out as byte views of the same
map, so opening the embedded model takes well under 0.1 s and weights are still never copied until
they are converted.

Layout (llama.cpp's ``docs/gguf.md``): magic ``GGUF``, u32 version, u64 tensor count, u64 metadata
count; the metadata as (string key, u32 type, value); the tensor infos as (string name, u32 rank,
u64 dims innermost first, u32 ggml type, u64 offset); then the tensor data, aligned to
``general.alignment`` (32 unless stated). A string is a u64 byte length and UTF-8 bytes.
"""

from __future__ import annotations

import enum
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGML_BLOCKS", "GGMLType", "GGUFFile", "GGUFFormatError", "GGUFTensorInfo"]

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# Metadata value types: id -> (struct code, numpy dtype) for the fixed-size ones.
_STRING, _ARRAY = 8, 9
_BOOL = 7
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("B", "<u1"),
    1: ("b", "<i1"),
    2: ("H", "<u2"),
    3: ("h", "<i2"),
    4: ("I", "<u4"),
    5: ("i", "<i4"),
    6: ("f", "<f4"),
    _BOOL: ("?", "<u1"),
    10: ("Q", "<u8"),
    11: ("q", "<i8"),
    12: ("d", "<f8"),
}


class GGMLType(enum.IntEnum):
    """ggml's tensor type ids, as stored in a tensor info."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


# Elements and bytes per block of each type. Kept here, not imported from gguf, so opening a
# file needs no more than numpy.
GGML_BLOCKS: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q8_1: (32, 40),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
    GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66),
    GGMLType.IQ2_XS: (256, 74),
    GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50),
    GGMLType.IQ4_NL: (32, 18),
    GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 56),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66),
    GGMLType.MXFP4: (32, 17),
    GGMLType.NVFP4: (64, 36),
    GGMLType.Q1_0: (128, 18),
}


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands (the message says what is wrong)."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of the file: its ggml type, its dims as stored (innermost first) and its bytes."""

    name: str
    tensor_type: GGMLType
    dims: tuple[int, ...]
    data: np.ndarray  # uint8 view of the mapped file, never a copy

    @property
    def shape(self) -> tuple[int, ...]:
        """The torch/numpy shape (outermost first): GGUF lists dims innermost first."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)


class _Cursor:
    """Sequential little-endian reads from a buffer, with errors that name what ran out."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer = buffer
        self.offset = 0
        self.path = path

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        try:
            values = struct.unpack_from(fmt, self.buffer, self.offset)
        except struct.error as exc:
            raise GGUFFormatError(
                f"{self.path} ends early (at byte {self.offset} of {len(self.buffer)})"
            ) from exc
        self.offset += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        return self._strings(1)[0]

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            (item_kind, count) = self.unpack("<IQ")
            return self.array(item_kind, count)
        scalar = _SCALARS.get(kind)
        if scalar is None:
            raise GGUFFormatError(f"{self.path} has a metadata value of unknown type {kind}")
        (value,) = self.unpack("<" + scalar[0])
        return value

    def array(self, kind: int, count: int) -> list[Any]:
        if kind == _STRING:
            return self._strings(count)
        scalar = _SCALARS.get(kind)
        if scalar is None:  # arrays of arrays: rare, decoded one by one
            return [self.value(kind) for _ in range(count)]
        dtype = np.dtype(scalar[1])
        end = self.offset + count * dtype.itemsize
        if end > len(self.buffer):
            raise GGUFFormatError(f"{self.path} has an array running past the end of the file")
        values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset)
        self.offset = end
        if kind == _BOOL:
            return [bool(v) for v in values.tolist()]
        return values.tolist()

    def _strings(self, count: int) -> list[str]:
        # The hot loop of a load (two entries per vocabulary token): local names, one slice each.
        buffer, offset, size = self.buffer, self.offset, len(self.buffer)
        unpack_length = struct.Struct("<Q").unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            if offset + 8 > size:
                raise GGUFFormatError(f"{self.path} ends inside a string")
            (length,) = unpack_length(buffer, offset)
            offset += 8
            end = offset + length
            if end > size:
                raise GGUFFormatError(f"{self.path} has a string running past the end of the file")
            append(buffer[offset:end].decode("utf-8", "replace"))  # mmap slices are bytes
            offset = end
        self.offset = offset
        return out


class GGUFFile:
    """A GGUF file mapped read-only: ``fields`` (decoded metadata) and ``tensors`` (byte views)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            try:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as exc:  # an empty file cannot be mapped
                raise GGUFFormatError(f"{self.path} is empty") from exc
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        cursor = _Cursor(self._map, self.path)
        magic = self._map[:4]
        if magic != _MAGIC:
            raise GGUFFormatError(f"{self.path} does not start with the GGUF magic (got {magic!r})")
        cursor.offset = 4
        (version,) = cursor.unpack("<I")
        if version not in (2, 3):
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            if swapped in (2, 3):
                raise GGUFFormatError(
                    f"{self.path} is a big-endian GGUF file; only little-endian is supported"
                )
            raise GGUFFormatError(
                f"{self.path} is GGUF version {version}; rustinfer reads versions 2 and 3"
            )
        self.version = version
        tensor_count, field_count = cursor.unpack("<QQ")
        self.fields: dict[str, Any] = {}
        for _ in range(field_count):
            key = cursor.string()
            (kind,) = cursor.unpack("<I")
            self.fields[key] = cursor.value(kind)
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            (rank,) = cursor.unpack("<I")
            dims = cursor.unpack(f"<{rank}Q")
            tensor_type, offset = cursor.unpack("<IQ")
            infos.append((name, tensor_type, tuple(int(d) for d in dims), offset))
        alignment = int(self.fields.get("general.alignment", _DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"{self.path} states an alignment of {alignment}")
        self.data_offset = -(-cursor.offset // alignment) * alignment
        self.tensors = [self._tensor(*info) for info in infos]

    def _tensor(
        self, name: str, tensor_type: int, dims: tuple[int, ...], offset: int
    ) -> GGUFTensorInfo:
        try:
            kind = GGMLType(tensor_type)
        except ValueError:
            raise GGUFFormatError(
                f"tensor {name!r} in {self.path} has ggml type {tensor_type}, which this reader "
                "does not know; the file may come from a newer llama.cpp"
            ) from None
        elements = math.prod(dims)
        per_block, block_bytes = GGML_BLOCKS[kind]
        if elements % per_block:
            raise GGUFFormatError(
                f"tensor {name!r} in {self.path} has {elements} elements, not whole blocks of "
                f"{per_block}"
            )
        start = self.data_offset + offset
        end = start + elements // per_block * block_bytes
        if end > len(self._bytes):
            raise GGUFFormatError(f"tensor {name!r} runs past the end of {self.path}")
        return GGUFTensorInfo(name, kind, dims, self._bytes[start:end])

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, {len(self.fields)} fields, {len(self.tensors)} tensors)"
        )
