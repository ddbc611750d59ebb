"""Fixtures for the server tests: a shared ``rustinfer serve`` on the embedded model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from server_helpers import LiveServer, running_server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The embedded SmolLM2 served on the CPU, shared by the tests that need a plain server."""
    with running_server(tmp_path_factory.mktemp("live")) as server:
        yield server
