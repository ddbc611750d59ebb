"""Text handed out piece by piece and read back whole, now and then."""

from __future__ import annotations


class EmittedText:
    """Pieces of streamed text, joined only when read: emitting stays O(piece), not O(text)."""

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._joined = ""

    def emit(self, piece: str) -> str:
        """Record ``piece`` (if any) and return it, so callers can ``return out.emit(delta)``."""
        if piece:
            self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        if self._pieces:
            self._joined += "".join(self._pieces)
            self._pieces.clear()
        return self._joined
