"""``quantized_linear`` and ``quantized_logits`` through our C kernel (``native/qlinear.c``).

The kernel rounds the activations to int16 per block of 32 values and multiplies them with the
weight's codes in integers, exactly, scaling each block's sum in float32 (qlinear.c says why).
Measured against torch's packed int4 kernel (the ``torch`` implementation, kept for machines
without a C compiler) in BENCHMARKS.md, "CPU, quantized weights".

The prepared weight is one uint8 tensor ``packed [N / 4, tile bytes]``: rows in tiles of 4, each
tile its numbers then its codes (qlinear.c draws the layout). The numbers are what the kernel
reads per block of 32 values: ``scale`` and, for 4-bit formats, ``shift``, with value = scale *
code + shift (q4_0's offset of 8 folded in as -8 * scale; q4_1's and int4's min as is). GGUF's
fp16 numbers stay fp16 (the weight streams as many bytes as the file holds); our int4/int8's
float32 scales stay float32. N is padded to a multiple of 4 with zero rows, sliced off the output.
"""

from __future__ import annotations

import torch

from rustinfer.ops.quant import QuantizedWeight
from rustinfer_ops_cpu.native import library

__all__ = ["NATIVE_LAYOUT", "prepare_quantized_weight", "quantized_linear", "quantized_logits"]

NATIVE_LAYOUT = "cpu_native"
# The kernel's block along K (x is rounded per block, one scale and shift per weight block) and
# its tile of rows.
_BLOCK = 32
_TILE = 4
_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)


def _as_tiles(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """[N, X] -> the bytes of each tile of 4 rows, [N_pad / 4, 4 * X * itemsize] uint8."""
    t = torch.nn.functional.pad(t, (0, 0, 0, n_pad - t.shape[0])) if n_pad > t.shape[0] else t
    return t.contiguous().view(torch.uint8).reshape(n_pad // _TILE, -1)


def prepare_quantized_weight(weight: QuantizedWeight) -> QuantizedWeight:
    """Canonical -> the C kernel's tiled layout (the same codes and numbers, regrouped)."""
    if weight.layout != "canonical":
        raise ValueError(f"prepare_quantized_weight: expected a canonical weight, got {weight}")
    f, (n, k), g = weight.spec, weight.shape, weight.group_size
    nb, n_pad = k // _BLOCK, -(-n // _TILE) * _TILE
    half = f.scale_dtype == torch.float16 and bool(library().rq_half())
    dtype = torch.float16 if half else torch.float32
    scales = weight.scales.to(dtype).repeat_interleave(g // _BLOCK, dim=1)  # [N, K / 32]
    parts = [_as_tiles(scales, n_pad)]
    if f.bits == 4:
        # -8 * an fp16 scale is exact in fp16 (a power of two, far from overflow at GGUF sizes).
        shift = weight.mins.to(dtype) if f.has_mins else -float(f.offset) * weight.scales.to(dtype)
        parts.append(_as_tiles(shift.repeat_interleave(g // _BLOCK, dim=1), n_pad))
    codes = weight.codes.view(torch.uint8).reshape(n, nb, -1)  # [N, K / 32, block bytes]
    if n_pad > n:
        # Padding rows: code 0 (4-bit) or 0 (8-bit) with scale 0 and shift 0: value 0.
        codes = torch.nn.functional.pad(codes, (0, 0, 0, 0, 0, n_pad - n))
    # [tiles, 4, K / 32, bytes] -> [tiles, K / 32, 4, bytes]: block b of the tile's rows together.
    tiled = codes.reshape(n_pad // _TILE, _TILE, nb, -1).transpose(1, 2).reshape(n_pad // _TILE, -1)
    parts.append(tiled)
    packed = torch.cat(parts, dim=1).contiguous()
    expect = library().rq_tile_bytes(k, f.bits, int(half), int(f.bits == 4))
    assert packed.shape[1] == expect, f"tile of {packed.shape[1]} bytes, kernel reads {expect}"
    prepared = QuantizedWeight(weight.format, weight.shape, g, layout=NATIVE_LAYOUT, packed=packed)
    prepared.half_numbers = half  # read per call, so a plain attribute (not a tensor)
    return prepared


def _run(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] -> float32 [T, N] through ``rq_linear``."""
    n, k = weight.shape
    assert weight.layout == NATIVE_LAYOUT, f"quantized op: weight not prepared here ({weight})"
    assert x.dim() == 2 and x.shape[1] == k, f"quantized op: x {tuple(x.shape)} vs K={k}"
    assert x.dtype in _ACTIVATION_DTYPES, f"quantized op: x is {x.dtype}"
    if x.dtype != torch.float32 or x.stride(1) != 1:
        x = x.float().contiguous()
    packed = weight._buffers["packed"]  # the module's dict: an attribute lookup costs ~2 us
    n_pad = packed.shape[0] * _TILE
    if bias is not None and (bias.dtype != torch.float32 or n_pad != n):
        bias = torch.nn.functional.pad(bias.float(), (0, n_pad - n))
    t = x.shape[0]
    out = torch.empty((t, n_pad), dtype=torch.float32)
    spec = weight.spec
    status = library().rq_linear(
        x.data_ptr(),
        t,
        k,
        x.stride(0),
        packed.data_ptr(),
        spec.bits,
        int(weight.half_numbers),
        int(spec.bits == 4),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        n_pad,
        n_pad,
    )
    if status != 0:
        raise MemoryError(f"quantized op: no scratch memory for {t} x {k} activations")
    return out if n_pad == n else out[:, :n]


def quantized_linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [T, K] float32/bfloat16 -> [T, N] in x's dtype."""
    out = _run(x, weight, bias)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def quantized_logits(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """The LM head on a quantized weight: x [T, K] -> float32 [T, N]."""
    return _run(x, weight, None)
