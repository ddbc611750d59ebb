"""What an op is in rustinfer: a spec with a float64 reference and a tolerance per dtype."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Tolerance:
    """Allowed |actual - reference| <= atol + rtol * |reference|, with the reason for the numbers."""

    atol: float
    rtol: float
    reason: str


# Compare-exactly ops (data movement, argmax) use this.
EXACT = Tolerance(0.0, 0.0, "data movement / integer output: any difference is a bug")


@dataclass(frozen=True)
class OpSpec:
    """The contract every implementation of an op meets.

    ``reference`` is plain torch and computes in float64 whatever the input dtype; implementations are
    tested against it (never against another kernel) with ``tolerance(dtype)``.
    """

    name: str
    doc: str
    reference: Callable[..., Any]
    tolerances: dict[torch.dtype, Tolerance] = field(default_factory=dict)
    exact: bool = False

    def tolerance(self, dtype: torch.dtype) -> Tolerance:
        if self.exact:
            return EXACT
        try:
            return self.tolerances[dtype]
        except KeyError:
            raise KeyError(f"op {self.name!r} has no tolerance for {dtype}") from None
