from __future__ import annotations

import zlib
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    # A fixed seed per test id: reruns see the same inputs, different tests see different ones.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=["native", "torch"])
def both_cpu_impls(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test through rustinfer's C kernels and through the torch ones (ops with both)."""
    from .helpers import PINNED_IMPL

    PINNED_IMPL[0] = request.param
    yield request.param
    PINNED_IMPL[0] = None
