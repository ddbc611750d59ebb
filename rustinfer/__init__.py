"""rustinfer: an LLM inference engine with pluggable models and kernels.

``from rustinfer import LLM, SamplingParams`` is the offline API; both are imported on first use, so
``import rustinfer`` (which every plugin does) stays cheap.
"""

from __future__ import annotations

from typing import Any

# The version of every distribution in this repository: the root pyproject.toml reads it, and
# scripts/version.py writes it into the plugins' (a test fails when they drift).
__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from rustinfer.llm import LLM

        return LLM
    if name == "SamplingParams":
        from rustinfer.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'rustinfer' has no attribute {name!r}")
