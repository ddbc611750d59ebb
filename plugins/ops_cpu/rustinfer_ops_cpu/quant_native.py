"""``quantized_linear`` and ``quantized_logits`` through our C kernel (``native/qlinear.c``).

The kernel rounds the activations to int16 per block of 32 values and multiplies them with the
weight's codes in integers, exactly, scaling each block's sum in float32 (qlinear.c says why).
Measured against torch's packed int4 kernel (the ``torch`` implementation, kept for machines
without a C compiler) in BENCHMARKS.md, "rustinfer's own C kernels".

The prepared weight is one uint8 tensor ``packed [N / 4, tile bytes]``: rows in tiles of 4, each
tile its numbers then its codes (qlinear.c draws the layout). The numbers are what the kernel
reads per block of 32 values: ``scale`` and, for 4-bit formats, ``shift``, with value = scale *
code + shift (q4_0's offset of 8 folded in as -8 * scale; q4_1's and int4's min as is). GGUF's
fp16 numbers stay fp16 (the weight streams as many bytes as the file holds); our int4/int8's
float32 scales stay float32. N is padded to a multiple of 4 with zero rows, sliced off the output.
"""

from __future__ import annotations

import functools

import torch

from rustinfer.ops.quant import QuantizedWeight
from rustinfer_ops_cpu.native import library, simd
from rustinfer_ops_cpu.quant import prepare_packed
from rustinfer_ops_cpu.quant import quantized_linear as torch_quantized_linear

__all__ = [
    "NATIVE_LAYOUT",
    "plan_of",
    "prepare_quantized_weight",
    "quantized_linear",
    "quantized_logits",
]

NATIVE_LAYOUT = "cpu_native"
# The kernel's block along K (x is rounded per block, one scale and shift per weight block) and
# its tile of rows.
_BLOCK = 32
_TILE = 4
_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)
# From this many rows on (prompts), the weight is widened to float32 once per call and multiplied
# by MKL's GEMM: the block kernel's cost grows with every row of x (233 against 188 ms for the
# 120 matmuls at 32 rows; a 512-token prefill ran at 77 tok/s through it, at 192-266 widened,
# BENCHMARKS.md, "rustinfer's own C kernels").
DENSE_ROWS = 32
# From this many rows up to DENSE_ROWS (batched decode), on a CPU without AVX512-VNNI, torch's
# packed int4 kernel with bf16 activations: it ran SmolLM2's 120 matmuls in 15.8 / 27.1 / 50.1 ms
# at 4 / 8 / 16 rows against the int16 block kernel's 23.4 / 45.8 / 84.1 (BENCHMARKS.md). Its copy
# of the weight is built on the first such call, so a model served one request at a time (and the
# LM head, which never comes here) holds one copy. With VNNI the block kernel keeps up with it
# (14.3 / 23.1 / 41.6 against 12.5 / 22.1 / 39.5 ms, ``bench/cpu_quant_rows.py``) without a
# second copy of the weights, and serves every row count below DENSE_ROWS.
BATCHED_ROWS = 2
BATCHES_IN_C = (simd() or "").endswith("-vnni")


def _as_tiles(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """Numbers [N, K / 32] -> the bytes of each tile of 4 rows, block by block ([K / 32][4]: block
    b's 4 rows side by side), [N_pad / 4, 4 * K / 32 * itemsize] uint8."""
    t = torch.nn.functional.pad(t, (0, 0, 0, n_pad - t.shape[0])) if n_pad > t.shape[0] else t
    tiles = t.reshape(n_pad // _TILE, _TILE, -1).transpose(1, 2).contiguous()
    return tiles.view(torch.uint8).reshape(n_pad // _TILE, -1)


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
        # Padding rows: code 0 with scale 0 and shift 0, value 0.
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


def _dequantized(
    packed: torch.Tensor, bits: int, half: int, shift: int, n_pad: int, k: int
) -> torch.Tensor:
    """The weight's values in float32 [N_pad, K], widened by the C code."""
    out = torch.empty((n_pad, k), dtype=torch.float32)
    library().rq_dequantize(packed.data_ptr(), bits, half, shift, n_pad, k, out.data_ptr())
    return out


def canonical_from_packed(weight: QuantizedWeight) -> QuantizedWeight:
    """The prepared weight back in canonical form, as our own int4/int8 format with one float32
    scale (and min) per block of 32: the very same values (fp16 numbers widen exactly)."""
    f, (n, k) = weight.spec, weight.shape
    nb, bb = k // _BLOCK, (_BLOCK // 2 if f.bits == 4 else _BLOCK)
    packed = weight._buffers["packed"]
    tiles = packed.shape[0]
    dtype = torch.float16 if weight.half_numbers else torch.float32
    width = _TILE * nb * dtype.itemsize

    def numbers(i: int) -> torch.Tensor:
        raw = packed[:, i * width : (i + 1) * width].contiguous().view(dtype)
        return raw.reshape(tiles, nb, _TILE).transpose(1, 2).reshape(tiles * _TILE, nb)[:n].float()

    codes = packed[:, width * (2 if f.bits == 4 else 1) :].reshape(tiles, nb, _TILE, bb)
    codes = codes.transpose(1, 2).reshape(tiles * _TILE, nb * bb)[:n].contiguous()
    if f.bits == 4:
        return QuantizedWeight(
            "int4", (n, k), _BLOCK, codes=codes, scales=numbers(0), mins=numbers(1)
        )
    return QuantizedWeight("int8", (n, k), _BLOCK, codes=codes.view(torch.int8), scales=numbers(0))


def _batched_copy(weight: QuantizedWeight) -> QuantizedWeight:
    """torch's packed int4 copy of ``weight``, made on first use."""
    copy = weight.__dict__.get("batched_copy")
    if copy is None:
        copy = prepare_packed(canonical_from_packed(weight))
        weight.__dict__["batched_copy"] = copy  # a plain attribute: not state, not a submodule
    return copy


def plan_of(weight: QuantizedWeight) -> tuple:
    """What a call passes for ``weight``, made on its first call and kept on it (each attribute
    and property read costs ~0.3-2 us here, and the op runs 120 times a token)."""
    plan = weight.__dict__.get("plan")
    if plan is None or plan[0] is not weight._buffers.get("packed"):
        if weight.layout != NATIVE_LAYOUT:
            raise ValueError(
                f"quantized op: weight not prepared by rustinfer's C kernels ({weight})"
            )
        packed, spec, (n, k) = weight._buffers["packed"], weight.spec, weight.shape
        n_pad = packed.shape[0] * _TILE
        plan = (packed, spec.bits, int(weight.half_numbers), int(spec.bits == 4), n_pad, n, k)
        weight.__dict__["plan"] = plan
    return plan


def _run(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] -> float32 [T, N] through ``rq_linear`` (few rows) or a dense GEMM (prompts)."""
    packed, bits, half, shift, n_pad, n, k = plan_of(weight)
    t, width = x.shape
    if width != k:
        raise ValueError(f"quantized op: x {tuple(x.shape)} against a weight of K={k}")
    if x.dtype is not torch.float32 or x.stride(1) != 1:
        if x.dtype not in _ACTIVATION_DTYPES:
            raise ValueError(f"quantized op: x is {x.dtype}; the CPU serves float32 and bfloat16")
        x = x.float().contiguous()
    if bias is not None and (bias.dtype is not torch.float32 or n_pad != n):
        bias = torch.nn.functional.pad(bias.float(), (0, n_pad - n))
    if t >= DENSE_ROWS:
        dense = _dequantized(packed, bits, half, shift, n_pad, k)
        out = torch.nn.functional.linear(x, dense, bias)
        return out if n_pad == n else out[:, :n]
    out = torch.empty((t, n_pad), dtype=torch.float32)
    status = _rq_linear()(
        x.data_ptr(),
        t,
        k,
        x.stride(0),
        packed.data_ptr(),
        bits,
        half,
        shift,
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        n_pad,
        n_pad,
    )
    if status != 0:
        raise MemoryError(f"quantized op: no scratch memory for {t} x {k} activations")
    return out if n_pad == n else out[:, :n]


@functools.cache
def _rq_linear():  # type: ignore[no-untyped-def]
    return library().rq_linear


def quantized_linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [T, K] float32/bfloat16 -> [T, N] in x's dtype."""
    if BATCHED_ROWS <= x.shape[0] < DENSE_ROWS and not BATCHES_IN_C:
        return torch_quantized_linear(x, _batched_copy(weight), bias)
    out = _run(x, weight, bias)
    return out if x.dtype is torch.float32 else out.to(x.dtype)


def quantized_logits(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """The LM head on a quantized weight: x [T, K] -> float32 [T, N]."""
    return _run(x, weight, None)
