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

    def without(self, *names: str) -> OpTable:
        """A copy without the optional ops ``names`` (a model then takes its other path)."""
        fns = {k: v for k, v in self._fns.items() if k not in names}
        return OpTable(fns, {k: v for k, v in self.chosen.items() if k not in names})

    def with_op(self, name: str, fn: Callable[..., Any], described: str | None = None) -> OpTable:
        """A copy whose op ``name`` is ``fn``, ``described`` (default: as the op it replaces)."""
        chosen = dict(self.chosen)
        if described is not None:
            chosen[name] = described
        return OpTable({**self._fns, name: fn}, chosen)
