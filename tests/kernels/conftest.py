"""The Triton kernel lanes.

- interpret: on a machine without a GPU, Triton's interpreter runs the kernels on CPU tensors.
  TRITON_INTERPRET must be set before any kernel module is imported (``@triton.jit`` reads it),
  hence in lanes.py, imported here at collection (test modules import it too). Small shapes;
  fp16/fp32 for kernels that use ``tl.dot`` (the interpreter's bf16 dot is wrong), bf16 for the
  rest.
- cuda: the compiled kernels on the GPU, the full bf16 matrix.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

# Sets TRITON_INTERPRET without a GPU, before any test module imports a kernel module.
from .lanes import INTERPRET, LANE_DEVICE

__all__ = ["INTERPRET", "LANE_DEVICE"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here not in Path(item.path).parents:
            continue  # this hook sees the whole session's items; the lanes are this folder's
        if item.get_closest_marker("interpret") and not INTERPRET:
            item.add_marker(pytest.mark.skip(reason="interpret lane: set TRITON_INTERPRET=1"))
        if item.get_closest_marker("cuda") and (INTERPRET or not torch.cuda.is_available()):
            item.add_marker(pytest.mark.skip(reason="cuda lane: needs a GPU, no TRITON_INTERPRET"))


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
