"""Model loaders: HF safetensors directories, GGUF files, and random "dummy" weights.

``load_model_source(path)`` (a directory, a .gguf file, or None for the default model) parses the
config and tokenizer; the model plugin builds from ``source.config`` and consumes
``source.weights(dtype)``: ``(name, tensor)`` pairs in the file's own naming, read one at a time.
"""

from __future__ import annotations

from rustinfer.loaders.dummy import dummy_source, dummy_weights
from rustinfer.loaders.resolve import load_model_source
from rustinfer.loaders.source import FORMATS, ModelSource, WeightStore, parse_dtype

__all__ = [
    "FORMATS",
    "ModelSource",
    "WeightStore",
    "dummy_source",
    "dummy_weights",
    "load_model_source",
    "parse_dtype",
]
