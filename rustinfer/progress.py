"""Progress bars for long waits (weights loading, kernels warming), shown only to a person at a
terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    """Whether to draw a bar: only when stderr is a TTY, so logs and CI output stay clean."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # stderr replaced by an object without a file behind it
        return False


def progress_bar(total: int, desc: str, unit: str) -> tqdm:
    """A tqdm bar on stderr, drawn only when :func:`progress_enabled` (a no-op bar otherwise)."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not progress_enabled(),
        leave=False,
        file=sys.stderr,
    )


def track(items: Iterable[T], total: int, desc: str, unit: str = "tensor") -> Iterator[T]:
    """Yield ``items`` unchanged, ticking a bar once per item."""
    bar = progress_bar(total, desc, unit)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        # Closes the bar also when the consumer stops early or raises.
        bar.close()
