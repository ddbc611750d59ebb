"""Every spec is complete, and rustinfer-ops-cpu registers an importable kernel for each one."""

from __future__ import annotations

import inspect

import pytest
import torch
from rustinfer_ops_cpu.plugin import (
    NATIVE_F32_TARGETS,
    NATIVE_TARGETS,
    QUANTIZED_DTYPES,
)

from rustinfer.ops import SPECS
from rustinfer.plugins import get_registries
from rustinfer.registry import RegistryError

from .helpers import FLOAT_DTYPES, dtype_id

# Optional ops only the C kernels implement.
NATIVE_ONLY = {"decode_layers"}


@pytest.mark.parametrize("op", sorted(SPECS))
def test_spec_is_complete(op: str) -> None:
    spec = SPECS[op]
    assert spec.name == op
    assert f"{op}(" in spec.doc, "the doc starts with the op's signature"
    if not spec.exact:
        assert set(spec.tolerances) == set(FLOAT_DTYPES)
        for dtype, tol in spec.tolerances.items():
            assert 0 <= tol.atol < 0.05 and 0 <= tol.rtol < 0.05, (op, dtype)
            assert tol.reason, f"{op} {dtype}: every tolerance states its reason"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", sorted(SPECS))
def test_cpu_kernel_registered(op: str, dtype: torch.dtype) -> None:
    if op in NATIVE_ONLY and dtype != torch.float32:
        # The C decode step serves float32 models alone: the model runs op by op otherwise.
        with pytest.raises(RegistryError, match=op):
            get_registries().ops.lookup(op, "cpu", dtype, overrides={})
        return
    if op in NATIVE_TARGETS and dtype not in QUANTIZED_DTYPES:
        # Quantized weights run in float32/bfloat16 on the CPU; others are refused, loudly.
        with pytest.raises(RegistryError, match=op):
            get_registries().ops.lookup(op, "cpu", dtype, overrides={})
        return
    impl = get_registries().ops.lookup(op, "cpu", dtype, overrides={})
    # The C kernels (this machine has a compiler: test_native.py checks they build) lead where
    # they are registered; torch's serve the rest, and stand behind them.
    native = op in NATIVE_TARGETS or (op in NATIVE_F32_TARGETS and dtype == torch.float32)
    assert impl.name == ("native" if native else "torch") and impl.plugin == "ops_cpu"
    # torch has no float32-accurate quantized head, and no whole-step op (the ops one by one are
    # torch's path).
    if native and op != "quantized_logits" and op not in NATIVE_ONLY:
        fallback = get_registries().ops.lookup(op, "cpu", dtype, overrides={op: "torch"})
        assert fallback.name == "torch" and fallback.plugin == "ops_cpu"
    kernel = impl.load()
    # The kernel takes the reference's arguments, in the same order.
    assert list(inspect.signature(kernel).parameters) == list(
        inspect.signature(SPECS[op].reference).parameters
    )


def test_cpu_device_registered() -> None:
    assert "cpu" in get_registries().devices
