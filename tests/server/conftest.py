"""Fixtures for the server tests: a shared ``rustinfer serve`` on the embedded model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from server_helpers import LiveServer, running_server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The embedded SmolLM2 served on the CPU, shared by the tests that need a plain server.

    Dequantized (float32): these tests compare answers across batch compositions (64 concurrent
    clients against one at a time), and torch's packed int4 CPU kernel that serves the GGUF's
    quantized tensors rounds differently with the number of rows it is given (one of the six
    prompts answered differently under load). The quantized default is served by the lifecycle
    tests."""
    with running_server(tmp_path_factory.mktemp("live"), "--quantization", "none") as server:
        yield server
