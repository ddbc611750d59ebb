"""GGUF tensor payloads -> torch tensors: float types reinterpreted, block-quantized types expanded.

Block formats, as llama.cpp's ggml-common.h lays them out (little-endian, fields in this order).
Legacy types hold 32 values per block; in a 4-bit field, byte j holds value j in its low nibble and
value j + 16 in its high nibble:

* Q8_0: fp16 d, 32 x int8 q                              -> d * q
* Q4_0: fp16 d, 16 bytes of 4-bit q                      -> d * (q - 8)
* Q4_1: fp16 d, fp16 m, 16 bytes of 4-bit q              -> d * q + m
* Q5_0: fp16 d, 32 high bits (bit j: value j), 4-bit q   -> d * (q - 16)
* Q5_1: fp16 d, fp16 m, 32 high bits, 4-bit q            -> d * q + m

K-quants hold 256 values per super-block, split into sub-blocks that each have a small integer
scale (and min) under the super-block's fp16 d (and dmin). Below, value v of a super-block:

* Q2_K: 16 scale bytes (low nibble sc, high nibble m, per 16 values), 64 bytes of 2-bit q, fp16 d,
  fp16 dmin -> d * sc * q - dmin * m. Byte l of the 32 in half h holds, at bits 2s,
  value 128h + 32s + l.
* Q3_K: 32 bytes of high bits, 64 bytes of 2-bit low bits (laid out as Q2_K), 12 bytes of 16
  6-bit scales, fp16 d -> d * (sc - 32) * (q - 4), q = low | high << 2. Bit b of high-bit byte l
  belongs to value 32b + l. Scale i: low 4 bits from byte i (i < 8, low nibble) or byte i - 8
  (high nibble); high 2 bits from byte 8 + i % 4 at bits 2 (i // 4).
* Q4_K: fp16 d, fp16 dmin, 12 bytes of 8 6-bit (sc, m) pairs, 128 bytes of 4-bit q
  -> d * sc * q - dmin * m per 32 values. Each 64 values are 32 bytes: low nibbles the first 32,
  high nibbles the next 32. Pair j < 4: sc = byte j & 63, m = byte j + 4 & 63; j >= 4: their low
  4 bits are the low and high nibble of byte j + 4, their top 2 bits the top 2 bits of bytes
  j - 4 (sc) and j (m).
* Q5_K: Q4_K plus 32 bytes of fifth bits between the scales and q (bit b of byte l: value
  32b + l) -> d * sc * (q + 16 * fifth bit) - dmin * m.
* Q6_K: 128 bytes of 4-bit low bits, 64 bytes of 2-bit high bits, 16 int8 scales (per 16
  values), fp16 d -> d * sc * (q - 32). In half h, value 128h + 32p + l (p < 4, l < 32) takes
  its low bits from byte 64h + 32 (p % 2) + l (low nibble for p < 2) and its high bits from byte
  32h + l at bits 2p.
* Q8_K never occurs in a model file: llama.cpp uses it only for activations inside its k-quant
  dot products (no llama-quantize type writes it), so it is not supported here.

Every value is a small integer times an fp16 scale times a <= 8-bit sub-scale, exact in float32
(at most 23 significant bits), and the one addition of a min rounds once: arithmetic in float32
gives each value correctly rounded, and a 16-bit model dtype rounds that once more.

It runs in numpy, single-threaded: on 2 shared cores, torch's many small parallel ops here were
25x slower whenever another process was busy (0.5 s vs 13 s for SmolLM2), while numpy takes
~0.3 s either way. The decoders are our own, not ``gguf.quants.dequantize`` (which gives the same
bits and is the tests' second oracle): codes are built in uint8 and widened to float32 once, a
chunk at a time so every pass runs in cache. On a 2048 x 8192 tensor (2-core dev box, the other
core busy, best of 5, 2026-11-28) ours took 52-90 ms per type and the gguf package 111-200 ms
(Q4_K 59 vs 131, Q6_K 62 vs 115, Q5_K 86 vs 199), both including the 64 MB output's page faults.

Kept quantized (``quantized_tensor``): Q8_0, Q4_0, Q4_1 as shipped, and Q4_K as rustinfer's
``int4`` with groups of 32 (float32 scale d * sc and min -dmin * m per sub-block are exact, and
the nibbles are repacked into llama.cpp's 32-value order). Everything else (Q6_K with its
16-value int8-scaled sub-blocks, Q5_K, Q5_0/Q5_1, Q2_K, Q3_K) is dequantized to the model dtype
at load: none of them is a format the quantized kernels read.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from rustinfer.errors import ModelLoadError
from rustinfer.loaders.gguf_reader import GGMLType as QT
from rustinfer.loaders.gguf_reader import GGUFTensorInfo
from rustinfer.ops.quant import QuantizedWeight

__all__ = [
    "KEEPABLE_TYPES",
    "SUPPORTED_TYPES",
    "dequantize_tensor",
    "quantized_tensor",
]

# Values per block of the legacy types, and per sub-block of Q4_K (the int4 group it keeps).
_BLOCK = 32
# Values per super-block of the k-quants.
_SUPER = 256
# Values decoded at once: 512 KB of float32 output, so the passes over a chunk run in L2 (chunks
# of 32K-512K values measured alike; whole-tensor passes took twice as long on 2048 x 8192).
_CHUNK_VALUES = 1 << 17
# numpy has no bfloat16: BF16 bits travel as int16 and are reinterpreted by torch.
_FLOAT_TYPES = {
    QT.F32: (np.float32, torch.float32),
    QT.F16: (np.float16, torch.float16),
    QT.BF16: (np.int16, torch.bfloat16),
}
_U1, _F2 = "u1", "<f2"
_LAYOUTS = {
    QT.Q8_0: [("d", _F2), ("qs", "i1", (32,))],
    QT.Q4_0: [("d", _F2), ("qs", _U1, (16,))],
    QT.Q4_1: [("d", _F2), ("m", _F2), ("qs", _U1, (16,))],
    QT.Q5_0: [("d", _F2), ("qh", _U1, (4,)), ("qs", _U1, (16,))],
    QT.Q5_1: [("d", _F2), ("m", _F2), ("qh", _U1, (4,)), ("qs", _U1, (16,))],
    QT.Q2_K: [("scales", _U1, (16,)), ("qs", _U1, (64,)), ("d", _F2), ("dmin", _F2)],
    QT.Q3_K: [("hmask", _U1, (32,)), ("qs", _U1, (64,)), ("scales", _U1, (12,)), ("d", _F2)],
    QT.Q4_K: [("d", _F2), ("dmin", _F2), ("scales", _U1, (12,)), ("qs", _U1, (128,))],
    QT.Q5_K: [
        ("d", _F2),
        ("dmin", _F2),
        ("scales", _U1, (12,)),
        ("qh", _U1, (32,)),
        ("qs", _U1, (128,)),
    ],
    QT.Q6_K: [("ql", _U1, (128,)), ("qh", _U1, (64,)), ("scales", "i1", (16,)), ("d", _F2)],
}
_BLOCKS = {kind: np.dtype(fields) for kind, fields in _LAYOUTS.items()}
_K_TYPES = frozenset({QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K})
SUPPORTED_TYPES = tuple(t.name for t in (*_FLOAT_TYPES, *_BLOCKS))
# Block types a matrix can stay in, with the rustinfer.ops.quant format each becomes.
KEEPABLE_TYPES = {QT.Q8_0: "q8_0", QT.Q4_0: "q4_0", QT.Q4_1: "q4_1", QT.Q4_K: "int4"}


class _Scales(NamedTuple):
    """Per sub-block factors of a block type: value = code * scales - minus."""

    scales: np.ndarray  # [blocks, sub-blocks] float32
    minus: np.ndarray | None  # [blocks, sub-blocks] float32, or None for symmetric types


def _block_values(kind: QT) -> int:
    return _SUPER if kind in _K_TYPES else _BLOCK


def _f32(values: np.ndarray) -> np.ndarray:
    # [blocks] fp16 field -> [blocks, 1] float32, to broadcast over a block's sub-blocks.
    return values.astype(np.float32)[:, None]


def _fields(packed: np.ndarray, width: int) -> np.ndarray:
    """The ``width``-bit fields of each byte, lowest first: uint8 [..., n] -> [..., 8 / width, n].

    Each field is one shift over the contiguous bytes; the fields are then interleaved as whole
    n-byte runs (a void dtype of n bytes, so each run is one element). numpy is slow on short
    rows: this is ~2x faster than shifting or concatenating [..., n] rows of 16-32 bytes.
    """
    packed = np.ascontiguousarray(packed)
    lead, n, count = packed.shape[:-1], packed.shape[-1], 8 // width
    out = np.empty((*lead, count, n), dtype=np.uint8)
    runs = out.view(np.dtype((np.void, n)))[..., 0]  # [..., count]
    for i in range(count):
        runs[..., i] = (packed >> (width * i)).view(runs.dtype)[..., 0]
    out &= (1 << width) - 1
    return out


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., n] -> uint8 [..., 2n]: the n low nibbles, then the n high nibbles."""
    return _fields(packed, 4).reshape(*packed.shape[:-1], -1)


def _scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, uint8 [blocks, 8] each.

    Bytes 0-3 (L), 4-7 (M) and 8-11 (H) are handled as one little-endian uint32 each, so every
    step is one pass over the blocks (byte slices would be rows of 4, slow in numpy); each mask
    keeps whole bytes apart. (x >> 6) << 4 within a byte is (word >> 2) & 0x30 per byte.
    """
    low, mid, high = np.ascontiguousarray(packed).view("<u4").T  # [blocks] each
    top_bits, six_bits, nibbles = np.uint32(0x30303030), np.uint32(0x3F3F3F3F), 0x0F0F0F0F
    scales = np.stack([low & six_bits, (high & nibbles) | ((low >> 2) & top_bits)], axis=-1)
    mins = np.stack([mid & six_bits, ((high >> 4) & nibbles) | ((mid >> 2) & top_bits)], axis=-1)
    return scales.view(np.uint8), mins.view(np.uint8)


def _signed(codes: np.ndarray, offset: int) -> np.ndarray:
    """Unsigned codes minus a fixed offset (in place), wrapped in uint8 and read back as int8."""
    codes -= np.uint8(offset)
    return codes.view(np.int8)


def _add_high(codes: np.ndarray, high: np.ndarray, shift: int) -> np.ndarray:
    """``codes | high << shift`` for 0/1 or 2-bit ``high`` planes, in place (``high`` too)."""
    high *= np.uint8(1 << shift)  # numpy's uint8 left shift is not vectorized: 10x slower
    codes |= high.reshape(codes.shape)
    return codes


# ---- per type: codes [blocks, sub-blocks, values per sub-block] and their scales ---------------
# Scales come for the whole tensor at once (they are small, and per-chunk calls on them cost more
# than the arithmetic); codes come a chunk at a time.


def _d(b: np.ndarray) -> _Scales:
    return _Scales(_f32(b["d"]), None)


def _d_m(b: np.ndarray) -> _Scales:
    return _Scales(_f32(b["d"]), -_f32(b["m"]))


def _q8_0(b: np.ndarray) -> np.ndarray:
    return b["qs"][:, None, :]  # int8 already


def _q4_0(b: np.ndarray) -> np.ndarray:
    return _signed(_nibbles(b["qs"]), 8)[:, None, :]


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _nibbles(b["qs"])[:, None, :]


def _q5_1(b: np.ndarray) -> np.ndarray:
    # Bit j of the little-endian 32 bits is value j's: unpacking all bytes in order gives [blocks,
    # 32] (over contiguous bytes: per-row unpacking of 4-byte rows is 5x slower).
    high = np.unpackbits(np.ascontiguousarray(b["qh"]).reshape(-1), bitorder="little")
    return _add_high(_nibbles(b["qs"]), high, 4)[:, None, :]


def _q5_0(b: np.ndarray) -> np.ndarray:
    return _signed(_q5_1(b), 16)


def _q2_k_scales(b: np.ndarray) -> _Scales:
    packed = b["scales"]  # [blocks, 16]: scale in the low nibble, min in the high one
    return _Scales(_f32(b["d"]) * (packed & 0x0F), _f32(b["dmin"]) * (packed >> 4))


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K's 64 bytes of 2-bit fields -> [blocks, 2, 4, 32], i.e. in value order
    (value 128h + 32s + l at bits 2s of byte 32h + l)."""
    return _fields(qs.reshape(-1, 2, 32), 2)


def _q2_k(b: np.ndarray) -> np.ndarray:
    return _crumbs(b["qs"]).reshape(-1, 16, 16)


def _q3_k_scales(b: np.ndarray) -> _Scales:
    packed = b["scales"]  # [blocks, 12] -> 16 six-bit scales
    low = _nibbles(packed[:, :8])  # scale i < 8: byte i low; i >= 8: byte i - 8 high
    high = _fields(packed[:, 8:12], 2)  # scale i: bits 2 (i // 4) of byte 8 + i % 4
    return _Scales(_f32(b["d"]) * _signed(_add_high(low, high, 4), 32), None)


def _q3_k(b: np.ndarray) -> np.ndarray:
    codes = _add_high(_crumbs(b["qs"]), _fields(b["hmask"], 1), 2)  # bit b of byte l: 32b + l
    return _signed(codes, 4).reshape(-1, 16, 16)


def _k4_scales(b: np.ndarray) -> _Scales:
    scales, mins = _scale_min_k4(b["scales"])
    return _Scales(_f32(b["d"]) * scales, _f32(b["dmin"]) * mins)


def _q4_k(b: np.ndarray) -> np.ndarray:
    # [blocks, 128] -> [blocks, 8, 32]: per 32-byte chunk, its low nibbles then its high nibbles.
    return _fields(b["qs"].reshape(-1, 4, 32), 4).reshape(-1, 8, 32)


def _q5_k(b: np.ndarray) -> np.ndarray:
    return _add_high(_q4_k(b), _fields(b["qh"], 1), 4)  # bit b of byte l: value 32b + l


def _q6_k_scales(b: np.ndarray) -> _Scales:
    return _Scales(_f32(b["d"]) * b["scales"], None)


def _q6_k(b: np.ndarray) -> np.ndarray:
    # Per half: low bits of value 32p + l in byte 32 (p % 2) + l, low nibble for p < 2; high
    # bits at bits 2p of byte l of the half's 32.
    low = _fields(b["ql"].reshape(-1, 2, 64), 4)  # [blocks, 2, nibble, 64] = [.., 2, 4, 32]
    codes = _add_high(low, _fields(b["qh"].reshape(-1, 2, 32), 2), 4)
    return _signed(codes, 32).reshape(-1, 16, 16)


_DECODERS: dict[QT, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], _Scales]]] = {
    QT.Q8_0: (_q8_0, _d),
    QT.Q4_0: (_q4_0, _d),
    QT.Q4_1: (_q4_1, _d_m),
    QT.Q5_0: (_q5_0, _d),
    QT.Q5_1: (_q5_1, _d_m),
    QT.Q2_K: (_q2_k, _q2_k_scales),
    QT.Q3_K: (_q3_k, _q3_k_scales),
    QT.Q4_K: (_q4_k, _k4_scales),
    QT.Q5_K: (_q5_k, _k4_scales),
    QT.Q6_K: (_q6_k, _q6_k_scales),
}


def _dequantize_blocks(kind: QT, raw: np.ndarray) -> np.ndarray:
    """[blocks * values per block] float32 values of the blocks in ``raw`` (uint8 bytes)."""
    blocks = raw.view(_BLOCKS[kind])  # structured view, no copy
    decode_codes, decode_scales = _DECODERS[kind]
    scales, minus = decode_scales(blocks)  # [blocks, sub-blocks] float32
    per_chunk = _CHUNK_VALUES // _block_values(kind)
    out = np.empty((len(blocks), _block_values(kind)), dtype=np.float32)
    for start in range(0, len(blocks), per_chunk):
        chunk = slice(start, start + per_chunk)
        codes = decode_codes(blocks[chunk])
        dest = out[chunk].reshape(codes.shape)
        # Widen, then scale in place: faster than one mixed uint8 x float32 multiply, whose
        # casting buffers cost more than the extra pass over a chunk that sits in cache.
        np.copyto(dest, codes, casting="unsafe")
        dest *= scales[chunk, :, None]
        if minus is not None:
            dest -= minus[chunk, :, None]
    return out.reshape(-1)


def _stored_floats(raw: np.ndarray, kind: QT, shape: tuple[int, ...]) -> torch.Tensor:
    np_type, torch_type = _FLOAT_TYPES[kind]
    with warnings.catch_warnings():
        # The view is of the read-only file mapping, which torch warns about; the caller copies it
        # before anything could write to it.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw.view(np_type)).view(torch_type).reshape(shape)


def _check_whole_blocks(
    tensor: GGUFTensorInfo, kind: QT, shape: tuple[int, ...], raw: np.ndarray
) -> None:
    values = _block_values(kind)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    if shape[-1] % values or raw.size != rows * (shape[-1] // values) * _BLOCKS[kind].itemsize:
        raise ModelLoadError(
            f"tensor {tensor.name!r} ({kind.name}, shape {shape}) does not split into whole "
            f"{values}-value blocks; the file is damaged"
        )


def dequantize_tensor(tensor: GGUFTensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous ``dtype`` tensor in torch layout holding ``tensor``'s values."""
    kind = tensor.tensor_type
    shape = tensor.shape
    raw = tensor.data  # the file's bytes, not copied
    if kind in _FLOAT_TYPES:
        # copy=True: never hand out a view of the read-only mapping (writing it would crash).
        return _stored_floats(raw, kind, shape).to(dtype, copy=True)
    if kind not in _BLOCKS:
        raise ModelLoadError(
            f"tensor {tensor.name!r} has GGUF type {kind.name}, which rustinfer cannot dequantize; "
            f"supported types: {', '.join(SUPPORTED_TYPES)}. Re-quantize the model to one of "
            "them (e.g. llama-quantize ... Q4_K_M) or use a safetensors checkpoint"
        )
    _check_whole_blocks(tensor, kind, shape, raw)
    return torch.from_numpy(_dequantize_blocks(kind, raw)).reshape(shape).to(dtype)


def _field(blocks: np.ndarray, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    # ascontiguousarray copies the strided field out of the read-only file mapping.
    return torch.from_numpy(np.ascontiguousarray(blocks[name]).reshape(shape))


def _q4_k_codes(qs: np.ndarray) -> np.ndarray:
    """Q4_K nibbles [blocks, 128] -> canonical int4 bytes [blocks, 128].

    A Q4_K chunk of 64 values is 32 bytes (byte l: value l low, value 32 + l high); canonical
    order wants each run of 32 values as 16 bytes (byte j: value j low, value j + 16 high).
    """
    chunks = np.ascontiguousarray(qs).reshape(-1, 4, 2, 16)  # [blocks, chunk, l < 16?, 16]
    first, second = chunks[:, :, 0], chunks[:, :, 1]
    out = np.empty_like(chunks)
    # values 0..31 of the chunk (x16, not <<4: numpy's uint8 left shift is not vectorized)
    np.bitwise_or(first & 0x0F, second * np.uint8(16), out=out[:, :, 0])
    np.bitwise_or(first >> 4, second & 0xF0, out=out[:, :, 1])  # values 32..63
    return out.reshape(-1, 128)


def _q4_k_weight(blocks: np.ndarray, n: int, k: int) -> QuantizedWeight:
    scales, minus = _k4_scales(blocks)  # [blocks, 8] float32 each, exact (fp16 x 6 bits)
    assert minus is not None
    groups = (n, k // _BLOCK)
    return QuantizedWeight(
        KEEPABLE_TYPES[QT.Q4_K],
        (n, k),
        _BLOCK,
        codes=torch.from_numpy(_q4_k_codes(blocks["qs"]).reshape(n, k // 2)),
        scales=torch.from_numpy(scales.reshape(groups)),
        mins=torch.from_numpy(np.negative(minus).reshape(groups)),
    )


def quantized_tensor(tensor: GGUFTensorInfo) -> QuantizedWeight | None:
    """A 2-D tensor of a :data:`KEEPABLE_TYPES` type as a canonical :class:`QuantizedWeight`, else
    None. Q8_0/Q4_0/Q4_1 blocks are copied, not decoded (llama.cpp's layout is the canonical
    one); Q4_K becomes int4 with groups of 32, its nibbles repacked."""
    kind = tensor.tensor_type
    shape = tensor.shape
    if kind not in KEEPABLE_TYPES or len(shape) != 2:
        return None
    n, k = shape
    raw = tensor.data
    _check_whole_blocks(tensor, kind, shape, raw)
    blocks = raw.view(_BLOCKS[kind])
    if kind == QT.Q4_K:
        return _q4_k_weight(blocks, n, k)
    groups = (n, k // _BLOCK)
    tensors = {
        "codes": _field(blocks, "qs", (n, k if kind == QT.Q8_0 else k // 2)),
        "scales": _field(blocks, "d", groups),
    }
    if kind == QT.Q4_1:
        tensors["mins"] = _field(blocks, "m", groups)
    return QuantizedWeight(KEEPABLE_TYPES[kind], (n, k), _BLOCK, **tensors)
