"""``quantized_linear`` on the CPU: torch's packed int4 kernel, bf16 activations, for every format.

rustinfer's own C kernels (quant_native.py) lead where a C compiler builds them; this module serves
machines without one, and batched decode (2-31 rows), where it measured fastest.

Measured on the 2-core dev box (Xeon, AVX-512 + AMX, torch 2.13, 2 threads, 2026-11-28; median
us per call at M = 1; ``python bench/quant_linear.py``, all rows in BENCHMARKS.md). One weight
called repeatedly, so the dense ones sit in cache; in a whole model they stream from memory:

    [N, K]       dense f32  dense bf16  int4pack bf16  int4pack f32  8-bit as 2 planes  deq + f32
    960 x 576         34        112          44            1140              79             695
    3072 x 576       198        286         102            3450             215            3551
    576 x 1536        79        182          70            1609             101            1244

End to end (SmolLM2 Q4_1 GGUF, float32 model, decode): 39.1 tok/s kept quantized, 20.0 dequantized.

* ``_weight_int4pack_mm_for_cpu`` with bf16 activations is the fastest path at decode, 2-3x over
  the dense float32 matmul; its float32 path is ~10x slower than dense float32 and its float16
  path slower still, so float32 activations are rounded to bf16 for it (``quantized_linear``'s
  float32 tolerance allows this) and the bf16 output is widened back.
* 8-bit codes have no group-wise torch kernel (``_weight_int8pack_mm`` scales per row only), so
  an 8-bit weight becomes two 4-bit planes side by side along K: c = 16 h + l with h = c >> 4 in
  -8..7 and l = c & 15, so s*c = (h+8 - 8)*(16 s) + (l - 8)*s + 8 s: the high plane has scale
  16 s and zero 0, the low plane scale s and zero 8 s, both exact; x is repeated along K. Twice
  the int4 time, still faster than either dense path.
* Dequantizing per call (codes -> float -> F.linear) is the slowest: it writes the float weight
  every call. So the CPU serves quantized models in float32 and bfloat16 only (float16 matmuls
  are slow on CPUs anyway, and the float64 oracle runs dequantized weights).

The kernel takes scales and zero points in the activation dtype, so they are stored in bf16
(scales of GGUF files are fp16: one rounding of 2^-9, see the spec). It needs N to be a multiple
of 16: other N are padded with zero rows, sliced off the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rustinfer.ops.quant import QuantizedWeight, unpack_nibbles
from rustinfer_ops_cpu.int4pack import pack_int4

PACKED_LAYOUT = "cpu_int4pack"
# torch's CPU int4 kernel packs rows in tiles of 16 (it refuses other N).
_ROW_TILE = 16
_KERNEL_DTYPE = torch.bfloat16
_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)
# The overload itself, not the packet: skips the overload resolution on every call.
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default


def _planes(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes uint8 [N, P*K] in 0..15, scales and zeros float32 [P*K / g, N] for the kernel's
    rule value = (code - 8) * scale + zero, P = 1 (4-bit) or 2 (8-bit) planes.

    Everything stays uint8 (not the int16/int32 of ``codes_int``): at load this is a pass over
    every code of the model, and narrow tensors keep it a fraction of a second.
    """
    f = weight.spec
    scales = weight.scales.to(torch.float32)  # [N, K / g]
    if f.bits == 4:
        codes = unpack_nibbles(weight.codes)  # [N, K] uint8
        zeros = torch.zeros_like(scales) if f.offset == 8 else weight.mins.float() + 8 * scales
        return codes, scales.t(), zeros.t()
    signed = weight.codes  # [N, K] int8
    high = ((signed >> 4) + 8).to(torch.uint8)  # arithmetic shift: -8..7 -> 0..15
    low = (signed & 0x0F).to(torch.uint8)
    all_scales = torch.cat([16 * scales, scales], dim=1)
    all_zeros = torch.cat([torch.zeros_like(scales), 8 * scales], dim=1)
    return torch.cat([high, low], dim=1), all_scales.t(), all_zeros.t()


def prepare_packed(weight: QuantizedWeight) -> QuantizedWeight:
    """Canonical -> torch's packed int4 layout (float32 and bfloat16 models)."""
    if weight.layout != "canonical":
        raise ValueError(f"prepare_quantized_weight: expected a canonical weight, got {weight}")
    n, k = weight.shape
    codes, scales, zeros = _planes(weight)
    pad = -n % _ROW_TILE
    if pad:
        codes = F.pad(codes, (0, 0, 0, pad), value=8)  # code 8 with scale 0, zero 0: value 0
        scales, zeros = F.pad(scales, (0, pad)), F.pad(zeros, (0, pad))
    scale_zeros = torch.stack([scales, zeros], dim=-1).to(_KERNEL_DTYPE)
    return QuantizedWeight(
        weight.format,
        weight.shape,
        weight.group_size,
        layout=PACKED_LAYOUT,
        packed=pack_int4(codes),  # [N + pad, P * K / 2] uint8, torch's own tiling
        scale_zeros=scale_zeros,  # [P * K / g, N + pad, 2] bf16
    )


def prepare_quantized_weight(weight: QuantizedWeight) -> QuantizedWeight:
    """Canonical -> torch's packed int4 layout, once at load."""
    return prepare_packed(weight)


def quantized_linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [T, K] float32/bfloat16, weight packed by :func:`prepare_packed` -> [T, N] in x's dtype.

    It runs 120 times per SmolLM2 token, so every call it saves counts (~2-6 us each here): the
    buffers are read from the module's dict (its attribute lookup costs ~2 us a buffer) and the
    casts use the shortest torch calls (``.float()`` ~4.5 us against ``.to(float32)`` ~6.4).
    """
    n, k = weight.shape
    assert weight.layout == PACKED_LAYOUT, f"quantized_linear: weight not prepared ({weight})"
    assert x.dim() == 2 and x.shape[1] == k, f"quantized_linear: x {tuple(x.shape)} vs K={k}"
    dtype = x.dtype
    assert dtype in _ACTIVATION_DTYPES, f"quantized_linear: x is {dtype}"
    assert x.device.type == "cpu", "quantized_linear: CPU kernel given a non-CPU tensor"
    buffers = weight._buffers
    xk = (x if dtype == _KERNEL_DTYPE else x.bfloat16()).contiguous()  # [T, K]
    if weight.spec.bits == 8:
        xk = torch.cat([xk, xk], dim=1)  # [T, 2K]: one copy per code plane
    out = _INT4_MM(xk, buffers["packed"], weight.group_size, buffers["scale_zeros"])
    if out.shape[1] != n:  # [T, N + pad] bf16
        out = out[:, :n]
    if bias is not None:
        return (out.float() + bias.float()).to(dtype)
    return out if dtype == _KERNEL_DTYPE else out.float()
