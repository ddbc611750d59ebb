"""Shared helpers for op tests: registry lookup, spec-tolerance checks, strided inputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from rustinfer.ops import SPECS
from rustinfer.plugins import get_registries
from rustinfer.registry import RegistryError

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# The implementation name a test pins (the ``both_cpu_impls`` fixture sets it): ops with C kernels
# and torch ones behind them are checked against the spec through each.
PINNED_IMPL: list[str | None] = [None]


def cpu_impl(op: str, dtype: torch.dtype) -> Callable[..., Any]:
    """The registered CPU implementation, found the way models find it (no env overrides), or
    the pinned one where the op has it for this dtype."""
    registry = get_registries().ops
    pinned = PINNED_IMPL[0]
    if pinned is not None:
        try:
            return registry.lookup(op, "cpu", dtype, overrides={op: pinned}).load()
        except RegistryError:
            pass  # no implementation of that name for this op and dtype: the default serves
    return registry.lookup(op, "cpu", dtype, overrides={}).load()


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Standard normal values (times ``scale``) rounded once to ``dtype``."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def strided(x: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view equal to ``x``: its rows are a slice of a wider, garbage-filled buffer.

    This is what models pass around: q/k/v slices of a fused QKV output, gate/up halves, etc.
    """
    rows = x.shape[0]
    width = math.prod(x.shape[1:])
    wide = torch.full((rows, width + 7), float("nan"), dtype=x.dtype, device=x.device)
    view = wide[:, 3 : 3 + width].view(x.shape)
    view.copy_(x)
    return view


def maybe_strided(x: torch.Tensor, is_strided: bool) -> torch.Tensor:
    return strided(x) if is_strided else x


def assert_matches_spec(
    op: str, actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, slack: float = 1.0
) -> None:
    """|actual - reference| within the spec's tolerance for ``dtype`` (times ``slack``, which is
    2 only where both sides of a comparison carry the implementation's error)."""
    assert actual.dtype == dtype, f"{op}: output dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == reference.shape, f"{op}: shape {actual.shape} != {reference.shape}"
    tol = SPECS[op].tolerance(dtype)
    torch.testing.assert_close(
        actual.to(torch.float64),
        reference.to(torch.float64),
        atol=tol.atol * slack,
        rtol=tol.rtol * slack,
        msg=lambda m: f"{op} [{dtype_id(dtype)}] vs reference ({tol.reason}):\n{m}",
    )


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    # equal_nan: caches hold NaN sentinels in slots nobody may touch.
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0, equal_nan=True)


def assert_float32_logits(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """A ``logits`` result against its float64 reference: the spec's tolerance for ``dtype``
    inputs, and, stricter, the float32 accumulator itself: a result rounded through bf16/fp16 on
    the way would be off by up to 2^-9 / 2^-12 relative."""
    got = out.cpu().double()
    tol = SPECS["logits"].tolerance(dtype)
    torch.testing.assert_close(got, ref, atol=tol.atol, rtol=tol.rtol)
    rel = ((got - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert rel < 2.0**-14, rel
