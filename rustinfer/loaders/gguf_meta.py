"""Opening GGUF files and reading their metadata values."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import gguf

from rustinfer.errors import ModelLoadError

__all__ = ["field", "open_gguf", "require_field"]

_MISSING = object()


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """A memory-mapped reader for ``path``, shared by config, tokenizer and weight loading.

    Opening is slow for big vocabularies (gguf's reader builds a numpy view per token string: ~3 s
    for SmolLM2's 49k tokens and 49k merges on 2 cores), so readers are cached by path, size and
    modification time; a rewritten file gets a fresh reader.
    """
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError as exc:
        raise ModelLoadError(f"cannot open GGUF file {resolved}: {exc}") from exc
    return _open_cached(resolved, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_cached(path: Path, size: int, mtime_ns: int) -> gguf.GGUFReader:
    del size, mtime_ns  # only part of the cache key
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError/struct errors/KeyError on bad files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from exc


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """The decoded value of metadata ``key`` (str, number, bool or list), else ``default``."""
    entry = reader.fields.get(key)
    if entry is None:
        return default
    return entry.contents()


def require_field(reader: gguf.GGUFReader, key: str) -> Any:
    value = field(reader, key, _MISSING)
    if value is _MISSING:
        raise ModelLoadError(
            f"GGUF file {reader.data.filename} lacks metadata key {key!r}, which rustinfer "
            "needs; the file may come from an old or unusual converter"
        )
    return value
