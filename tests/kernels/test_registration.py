"""The Triton kernels are registered for cuda (bf16/fp16, above the plain-torch ones), take their
spec's arguments, and are never picked where they cannot run (this lane: no GPU)."""

from __future__ import annotations

import inspect

import pytest
import torch
from ops.helpers import dtype_id
from rustinfer_ops_cuda.plugin import TRITON_PRIORITY, TRITON_TARGETS

from rustinfer.ops import SPECS
from rustinfer.plugins import get_registries
from rustinfer.registry import RegistryError


def _triton_impl(op: str):
    impls = [i for i in get_registries().ops.implementations(op) if i.name == "triton"]
    assert len(impls) == 1, f"{op}: expected one triton implementation, got {impls}"
    return impls[0]


@pytest.mark.parametrize("op", sorted(TRITON_TARGETS))
def test_triton_kernel_registered_with_spec_signature(op: str) -> None:
    impl = _triton_impl(op)
    assert impl.device == "cuda" and impl.plugin == "ops_cuda"
    assert impl.dtypes == {torch.bfloat16, torch.float16}
    assert impl.priority == TRITON_PRIORITY > 0
    positional = [
        name
        for name, p in inspect.signature(impl.load()).parameters.items()
        if p.kind is not inspect.Parameter.KEYWORD_ONLY
    ]
    assert positional == list(inspect.signature(SPECS[op].reference).parameters)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("op", sorted(TRITON_TARGETS))
def test_triton_never_picked_without_gpu(op: str, dtype: torch.dtype) -> None:
    assert "CUDA" in (_triton_impl(op).unmet_requirement() or "")
    assert get_registries().ops.lookup(op, "cpu", dtype, overrides={}).name == "torch"
    with pytest.raises(RegistryError, match="cannot run here"):
        get_registries().ops.lookup(op, "cuda", dtype, overrides={op: "triton"})
