"""Ops resolved once, at model build, for one device type and dtype."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from rustinfer.registry import OpRegistry


class OpTable:
    """Attribute access to the chosen implementation of each op: ``ops.rmsnorm(x, w, eps)``."""

    def __init__(self, fns: dict[str, Callable[..., Any]], chosen: dict[str, str]) -> None:
        self._fns = fns
        self.chosen = chosen  # op -> description of the implementation picked, for logs and `bench`

    @classmethod
    def resolve(
        cls,
        registry: OpRegistry,
        device_type: str,
        dtype: torch.dtype,
        ops: Iterable[str] | None = None,
        overrides: dict[str, str] | None = None,
    ) -> OpTable:
        """``overrides``: implementation names pinned per op (default: ``RUSTINFER_OP_IMPL``)."""
        from rustinfer.ops import SPECS

        fns: dict[str, Callable[..., Any]] = {}
        chosen: dict[str, str] = {}
        for name in ops if ops is not None else SPECS:
            impl = registry.lookup(name, device_type, dtype, overrides)
            fns[name] = impl.load()
            chosen[name] = impl.describe()
        return cls(fns, chosen)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        try:
            return self.__dict__["_fns"][name]
        except KeyError:
            raise AttributeError(f"op table has no op {name!r}") from None
