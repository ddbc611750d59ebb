"""rustinfer: an LLM inference engine with pluggable models and kernels."""

from __future__ import annotations

__version__ = "0.1.0"
