"""Which Triton lane this session runs, importable by test modules (conftest modules are not).

TRITON_INTERPRET must be set before any kernel module is imported (``@triton.jit`` reads it), so
importing this module sets it on a machine without a GPU; conftest imports it at collection.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Where the tensors of each lane live.
LANE_DEVICE = "cpu" if INTERPRET else "cuda"
# For tests that run unchanged in both lanes (argument checks): parametrize over ``device``.
BOTH_LANES = [
    pytest.param("cpu", marks=pytest.mark.interpret, id="interpret"),
    pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"),
]


def _round_bf16_to_nearest_even() -> None:
    """Make the interpreter's fp32 -> bf16 cast round to nearest even, as the GPU's does.

    Triton's interpreter (3.x) casts fp32 to bf16 by dropping the low 16 bits (round toward zero),
    while compiled kernels round to nearest even (cvt.rn.bf16.f32). Truncation doubles every bf16
    rounding error, so a correct kernel misses the spec's bf16 tolerances in the interpreter only.
    This swaps in torch's (round-to-nearest-even) conversion for that one cast; every other cast
    (fp32 -> fp16 goes through numpy, which rounds correctly) is left alone.
    """
    from triton import language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if getattr(original, "_rounds_bf16_to_nearest", False):
        return  # already patched
    if original is None:
        # Another interpreter layout: say so, or the bf16 tests' misses would look like bugs.
        warnings.warn(
            "cannot make Triton's interpreter round fp32 -> bf16 to nearest (no "
            "InterpreterBuilder.cast_impl): bf16 interpret tests may miss their tolerances",
            stacklevel=2,
        )
        return

    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f32 = torch.from_numpy(np.array(src.data, dtype=np.float32))  # keeps 0-d shapes
            bits = f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._rounds_bf16_to_nearest = True  # type: ignore[attr-defined]
    builder.cast_impl = cast_impl


if INTERPRET:
    _round_bf16_to_nearest_even()
