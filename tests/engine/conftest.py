"""Shared fixtures for engine tests: the two real tokenizers (SmolLM2 GGUF, Llama 3 JSON)."""

from __future__ import annotations

import pytest
from loader_helpers import llama3_tokenizer_json, smollm2_source

from rustinfer.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Tokenizer:
    tokenizer = smollm2_source().tokenizer
    assert tokenizer is not None
    return tokenizer


@pytest.fixture(scope="session")
def llama3_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(llama3_tokenizer_json())


@pytest.fixture(scope="session", params=["smollm2", "llama3"])
def real_tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    """Each real tokenizer in turn (byte-level BPE with different vocabularies and merges)."""
    return request.getfixturevalue(f"{request.param}_tokenizer")
