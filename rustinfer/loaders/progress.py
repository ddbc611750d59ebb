"""A progress bar over tensors while weights load, shown only to a person at a terminal."""

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


def track(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """Yield ``items`` unchanged, ticking a tqdm bar once per item when :func:`progress_enabled`."""
    bar = tqdm(
        total=total,
        desc=desc,
        unit="tensor",
        disable=not progress_enabled(),
        leave=False,
        file=sys.stderr,
    )
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        # Closes the bar also when the consumer stops early or raises.
        bar.close()
