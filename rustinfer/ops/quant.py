"""Quantized matmul weights and the ``quantized_linear`` / ``prepare_quantized_weight`` specs.

A :class:`QuantizedWeight` holds the integer codes of a ``[N, K]`` weight, one scale (and for the
asymmetric formats one min) per group of ``group_size`` consecutive values along K, and the format
that says how codes become values. Formats:

========  =====  ============================  =========  ===============  ====================
format    bits   value of code c in a group    scales     group size       from
========  =====  ============================  =========  ===============  ====================
q8_0      8      d * c,  c int8                fp16       32               GGUF Q8_0
q4_0      4      d * (c - 8),  c in 0..15      fp16       32               GGUF Q4_0
q4_1      4      d * c + m,  c in 0..15        fp16 d, m  32               GGUF Q4_1
int8      8      s * c,  c in -127..127        float32    32, 64, 128      a float checkpoint
int4      4      s * c + m,  c in 0..15        float32    32, 64, 128      a float checkpoint
========  =====  ============================  =========  ===============  ====================

Codes are stored as llama.cpp stores them, so a GGUF tensor loads with a reshape and no repacking:
8-bit codes as ``int8 [N, K]``; 4-bit codes as ``uint8 [N, K / 2]`` where, in each run of 32
values along K, byte j holds value j in its low nibble and value j + 16 in its high nibble. Our own
int8 is symmetric (8 bits leave a rounding step of absmax/127, well under 1%, and a zero point would
cost a second plane in the CPU kernel for nothing); int4 is asymmetric (with 16 levels, spending
one on a sign wastes a sixteenth of the range, and trained rows are rarely centred on zero).

Why a separate op and not ``linear`` taking quantized weights: ``quantized_linear`` has its own
contract (below: its reference dequantizes first, and its tolerances admit kernels that round the
activations and the scales to bf16, which ``linear``'s do not), so it is specified, registered and
tested on its own. Models still call ``linear``: the runtime, when a model is loaded quantized,
gives its op table a ``linear`` that sends quantized weights here (``quantized_op_table``), so one
forward serves float and quantized checkpoints and a weight that stays float (an embedding, an LM
head, a GGUF tensor stored as F16) takes the float path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from rustinfer.ops.spec import OpSpec, Tolerance

__all__ = [
    "FORMATS",
    "PREPARE_QUANTIZED_WEIGHT",
    "QUANTIZED_LINEAR",
    "QUANTIZED_LOGITS",
    "QuantFormat",
    "QuantizedWeight",
    "pack_nibbles",
    "quantize",
    "unpack_nibbles",
]

logger = logging.getLogger(__name__)

# llama.cpp interleaves nibbles within runs of this many values (its block size).
NIBBLE_RUN = 32


@dataclass(frozen=True)
class QuantFormat:
    name: str
    bits: int
    has_mins: bool
    scale_dtype: torch.dtype
    group_sizes: tuple[int, ...]
    offset: int  # subtracted from a code before scaling (q4_0 stores c + 8)


FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("q8_0", 8, False, torch.float16, (32,), 0),
        QuantFormat("q4_0", 4, False, torch.float16, (32,), 8),
        QuantFormat("q4_1", 4, True, torch.float16, (32,), 0),
        QuantFormat("int8", 8, False, torch.float32, (32, 64, 128), 0),
        QuantFormat("int4", 4, True, torch.float32, (32, 64, 128), 0),
    )
}


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K / 2]`` in llama.cpp's nibble order -> uint8 codes ``[N, K]`` in 0..15."""
    n = packed.shape[0]
    runs = packed.reshape(n, -1, NIBBLE_RUN // 2)  # [N, K / 32, 16]
    return torch.cat([runs & 0x0F, runs >> 4], dim=-1).reshape(n, -1)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` in 0..15 (K a multiple of 32) -> uint8 ``[N, K / 2]``, llama.cpp order."""
    n = codes.shape[0]
    runs = codes.to(torch.uint8).reshape(n, -1, 2, NIBBLE_RUN // 2)  # [N, K / 32, lo|hi, 16]
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(n, -1)


class QuantizedWeight(torch.nn.Module):
    """A ``[N, K]`` matmul weight kept quantized. A module, so ``model.to(device)`` moves it.

    ``layout`` is ``"canonical"`` (the storage described in this module's docstring, which
    :meth:`dequantize` reads) or a backend's own, made by its ``prepare_quantized_weight`` and read
    only by that backend's ``quantized_linear``; its tensors are then whatever it chose.
    """

    def __init__(
        self,
        format: str,
        shape: tuple[int, int],
        group_size: int,
        layout: str = "canonical",
        **tensors: torch.Tensor | None,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"unknown quantization format {format!r}; known: {', '.join(FORMATS)}")
        self.format = format
        self.shape = (int(shape[0]), int(shape[1]))
        self.group_size = int(group_size)
        self.layout = layout
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)
        if layout == "canonical":
            self._check_canonical()

    @property
    def spec(self) -> QuantFormat:
        return FORMATS[self.format]

    def _check_canonical(self) -> None:
        f, (n, k), g = self.spec, self.shape, self.group_size
        if g not in f.group_sizes or k % g or k % NIBBLE_RUN:
            raise ValueError(
                f"{self.format}: group size {g} with K={k} (groups allowed: {f.group_sizes}; "
                f"K must be a multiple of the group size and of {NIBBLE_RUN})"
            )
        code_shape, code_dtype = ((n, k), torch.int8) if f.bits == 8 else ((n, k // 2), torch.uint8)
        want = {"codes": (code_shape, code_dtype), "scales": ((n, k // g), f.scale_dtype)}
        if f.has_mins:
            want["mins"] = ((n, k // g), f.scale_dtype)
        for name, (shape, dtype) in want.items():
            t = getattr(self, name, None)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ValueError(f"{self.format} {name}: expected {shape} {dtype}, got {got}")

    def extra_repr(self) -> str:
        return f"{self.format}, shape={self.shape}, group_size={self.group_size}, {self.layout}"

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def codes_int(self) -> torch.Tensor:
        """The codes as stored, int16 ``[N, K]`` (signed for 8-bit formats, 0..15 for 4-bit)."""
        self._need_canonical()
        if self.spec.bits == 8:
            return self.codes.to(torch.int16)
        return unpack_nibbles(self.codes).to(torch.int16)

    def dequantize(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The weight's values, ``[N, K]`` in ``dtype``, computed in float64 (exact: the codes are
        small integers and the scales fp16 or fp32, so each value rounds only in the final cast)."""
        f, (n, k), g = self.spec, self.shape, self.group_size
        codes = (self.codes_int() - f.offset).to(torch.float64).view(n, k // g, g)
        values = codes * self.scales.to(torch.float64)[..., None]
        if f.has_mins:
            values = values + self.mins.to(torch.float64)[..., None]
        return values.view(n, k).to(dtype)

    def _need_canonical(self) -> None:
        if self.layout != "canonical":
            raise ValueError(
                f"a {self.layout!r} weight is a backend's private layout; dequantize the "
                "canonical weight it was prepared from"
            )

    @classmethod
    def cat_rows(cls, parts: Iterable[QuantizedWeight]) -> QuantizedWeight:
        """Stack canonical weights along N (fused QKV, gate/up): same format, group size and K."""
        parts = list(parts)
        first = parts[0]
        for p in parts:
            p._need_canonical()
            if (p.format, p.group_size, p.shape[1]) != (
                first.format,
                first.group_size,
                first.shape[1],
            ):
                raise ValueError(
                    "cannot stack quantized weights of different formats, groups or widths: "
                    + ", ".join(p.extra_repr() for p in parts)
                )
        tensors = {
            name: torch.cat([getattr(p, name) for p in parts])
            for name in ("codes", "scales", "mins")
            if getattr(first, name, None) is not None
        }
        n = sum(p.shape[0] for p in parts)
        return cls(first.format, (n, first.shape[1]), first.group_size, **tensors)

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The rows ``index`` (a permutation, say): rows are quantized independently."""
        self._need_canonical()
        tensors = {
            name: getattr(self, name).index_select(0, index)
            for name in ("codes", "scales", "mins")
            if getattr(self, name, None) is not None
        }
        return QuantizedWeight(self.format, (len(index), self.shape[1]), self.group_size, **tensors)


def quantize(weight: torch.Tensor, format: str, group_size: int) -> QuantizedWeight:
    """A float ``[N, K]`` weight in our own ``int8`` (symmetric) or ``int4`` (asymmetric) format.

    Round to nearest in float32: int8's error is at most absmax/254 per group, int4's span/30.
    """
    if format not in ("int8", "int4"):
        raise ValueError(f"quantize makes int8 or int4 weights, not {format!r}")
    n, k = weight.shape
    g = group_size
    if g not in FORMATS[format].group_sizes or k % g or k % NIBBLE_RUN:
        raise ValueError(
            f"{format}: cannot split K={k} into groups of {g} (allowed group sizes: "
            f"{FORMATS[format].group_sizes}; K must also be a multiple of {NIBBLE_RUN})"
        )
    w = weight.detach().to(torch.float32).reshape(n, k // g, g)
    if format == "int8":
        scale = w.abs().amax(dim=-1) / 127.0  # [N, K / g]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(w / safe[..., None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", (n, k), g, codes=codes.reshape(n, k), scales=scale)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = (hi - lo) / 15.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((w - lo[..., None]) / safe[..., None]).clamp_(0, 15)
    packed = pack_nibbles(codes.reshape(n, k))
    return QuantizedWeight("int4", (n, k), g, codes=packed, scales=scale, mins=lo)


def quantized_linear_reference(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ dequantize(weight).T + bias in float64 (``weight`` canonical)."""
    out = x.to(torch.float64) @ weight.dequantize(torch.float64).T  # [T, N]
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out


def prepare_quantized_weight_reference(weight: QuantizedWeight) -> QuantizedWeight:
    """The same weight: preparing may change only the layout, never the values."""
    return weight


# Tolerances assume O(1) outputs, as linear's do: randn activations and a dequantized weight whose
# rows have norm ~1 (values ~1/sqrt(K), as trained layers). The sources of error an implementation
# may add on top of the float64 reference, for unit-scale outputs:
#  * scales and zero points rounded to bf16 (the CPU's packed int4 kernel takes them in the
#    activation dtype): one relative error <= 2^-9 per group, shared by its values, so the output
#    error is a random walk over the K / g group partial sums: ~2^-9.8 rms, twice that with zero
#    points;
#  * float32 activations rounded to bf16 before the products (the same kernel: measured 20x
#    faster than its float32 path, see rustinfer_ops_cpu.quant): 2^-9 per term, ~2^-9.8 rms;
#  * the output rounded once to bf16 (2^-9 relative) or fp16 (2^-11).
# Estimated at ~2^-9 rms each; measured on the CPU kernel (which equals, bit for bit, float64
# math on the bf16-rounded activations and scales): 2^-8 rms against the reference for outputs of
# rms 1.28 (Q4_0/Q4_1/Q8_0/int4, 960 x 576), largest of 7,680 outputs 0.023. So 2^-5 absolute
# (~8 sigma) plus one bf16 output rounding relative, while a wrong code, nibble or scale moves
# outputs by O(1). llama.cpp's own CPU path rounds activations to 8 bits per block, far coarser:
# for a quantized model these roundings are small next to the quantization itself.
_HALF_RULES = "scales/zeros and activations may round to bf16 (see the comment above the specs)"
QUANTIZED_LINEAR = OpSpec(
    name="quantized_linear",
    doc="""quantized_linear(x, weight, bias) -> out

    x:      [T, K] float32, bfloat16, float16 or float64 (rows may be strided).
    weight: a QuantizedWeight of logical shape [N, K], as this device's
            ``prepare_quantized_weight`` returned it.
    bias:   [N] in x's dtype, or None.
    out:    [T, N], x's dtype: x @ dequantize(weight).T + bias, accumulated in at least float32.

    The reference takes the canonical weight (before preparing): the GGUF block values exactly
    as llama.cpp defines them. The CPU serves float32 and bfloat16 (rustinfer's C kernel, or
    torch's packed int4 kernel where no C compiler is found); Triton (CUDA) serves bfloat16,
    float16 and float32.
    """,
    reference=quantized_linear_reference,
    tolerances={
        torch.float64: Tolerance(
            2.0**-40,
            2.0**-44,
            "the dequantized values are exact in float64; what remains is linear's float64 case",
        ),
        torch.float32: Tolerance(
            2.0**-5, 2.0**-8, _HALF_RULES + "; rtol: one bf16 output rounding"
        ),
        torch.bfloat16: Tolerance(
            2.0**-5, 2.0**-8, _HALF_RULES + "; rtol: one bf16 output rounding"
        ),
        torch.float16: Tolerance(
            2.0**-8,
            2.0**-10,
            "dequantized weights rounded once to fp16 (2^-11 each, a random walk: ~2^-11.8 rms) "
            "and the output rounded once to fp16; scales stay at least fp16-exact",
        ),
    },
)

# The LM head on a quantized weight must keep ``logits``' promise of a float32 result (sampling
# reads near-ties), so its tolerance is far tighter than quantized_linear's. What it admits: the
# activations rounded to 16 bits per block of 32 values (the CPU kernel: 2^-16 of the block's
# largest value, a random walk over K terms; measured ~1e-4 at most for O(1) logits at K = 576,
# where bf16 activations would move them by ~1e-2) and float32 accumulation.
_LOGITS_RULES = "activations rounded to 16 bits per block of 32 values, float32 sums"
QUANTIZED_LOGITS = OpSpec(
    name="quantized_logits",
    doc="""quantized_logits(x, weight) -> out

    The LM head of a model whose head matrix is held quantized (a GGUF file's Q8_0 embedding,
    say): x [T, K] float32 or bfloat16; weight a QuantizedWeight [N, K] prepared by this device's
    ``prepare_quantized_weight``; out [T, N] float32 = x @ dequantize(weight).T.

    Optional: a device without it keeps the head in the model dtype (the model asks for it only
    when a quantized head arrives). Its tolerance is ``logits``' float32 one at most: the point
    of the op is a float32-accurate result from a quarter of the bytes.
    """,
    reference=lambda x, weight: quantized_linear_reference(x, weight, None),
    tolerances={
        torch.float64: Tolerance(
            2.0**-40,
            2.0**-44,
            "the dequantized values are exact in float64; what remains is linear's float64 case",
        ),
        torch.float32: Tolerance(2.0**-11, 2.0**-16, _LOGITS_RULES),
        torch.bfloat16: Tolerance(2.0**-11, 2.0**-16, _LOGITS_RULES),
        torch.float16: Tolerance(2.0**-11, 2.0**-16, _LOGITS_RULES),
    },
)

PREPARE_QUANTIZED_WEIGHT = OpSpec(
    name="prepare_quantized_weight",
    doc="""prepare_quantized_weight(weight) -> prepared

    weight:   a canonical QuantizedWeight [N, K] (on the CPU, at load).
    prepared: a QuantizedWeight of the same format, shape and group size in whatever layout this
              device's ``quantized_linear`` reads fastest (the CPU: torch's packed int4 planes).
              Models call it once per quantized weight, after fusing QKV and gate/up.

    A backend layout may drop what its kernel does not read, so the prepared weight need not
    dequantize; its contract is checked through ``quantized_linear`` against the reference on
    the canonical weight (with ``quantized_linear``'s tolerances).
    """,
    reference=prepare_quantized_weight_reference,
    exact=True,
)


def quantized_op_table(
    fns: dict[str, Callable[..., Any]], quantized_linear: Callable[..., Any]
) -> dict[str, Callable[..., Any]]:
    """``fns`` with a ``linear`` that sends :class:`QuantizedWeight` weights to
    ``quantized_linear`` and every float weight to the ``linear`` it had."""
    float_linear = fns["linear"]

    def linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(weight, QuantizedWeight):
            return quantized_linear(x, weight, bias)
        return float_linear(x, weight, bias)

    return {**fns, "linear": linear}
