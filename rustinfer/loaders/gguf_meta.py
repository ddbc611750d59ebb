"""Opening GGUF files and reading their metadata values."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from rustinfer.errors import ModelLoadError
from rustinfer.loaders.gguf_reader import GGUFFile, GGUFFormatError

__all__ = ["field", "open_gguf", "require_field"]

_MISSING = object()


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """A memory-mapped reader for ``path``, shared by config, tokenizer and weight loading.

    Readers are cached by path, size and modification time (a rewritten file gets a fresh one), so
    the server, the CLI and tests that open one file many times decode its vocabulary once.
    """
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError as exc:
        raise ModelLoadError(f"cannot open GGUF file {resolved}: {exc}") from exc
    return _open_cached(resolved, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_cached(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    del size, mtime_ns  # only part of the cache key
    try:
        return GGUFFile(path)
    except GGUFFormatError as exc:
        raise ModelLoadError(f"not a readable GGUF file: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc


def field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    """The decoded value of metadata ``key`` (str, number, bool or list), else ``default``."""
    return reader.fields.get(key, default)


def require_field(reader: GGUFFile, key: str) -> Any:
    value = field(reader, key, _MISSING)
    if value is _MISSING:
        raise ModelLoadError(
            f"GGUF file {reader.path} lacks metadata key {key!r}, which rustinfer "
            "needs; the file may come from an old or unusual converter"
        )
    return value
