"""Stop strings matched across streamed text deltas.

Text arrives in deltas cut at token boundaries, so a stop string may span several of them. The
matcher holds back any trailing text that could still be the start of a stop string: a streaming
client must never see a partial stop string that later turns out to match.
"""

from __future__ import annotations

from collections.abc import Iterable

from rustinfer.emitted_text import EmittedText

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    """Feed text deltas; get back the text safe to emit and whether a stop string matched.

    When several stop strings match, the one that COMPLETES first wins (ties: the one that starts
    first, i.e. the longer one). That is what a character-by-character stream would see, so the
    result does not depend on how the text was cut into deltas: with stops ``["ab", "abc"]``,
    ``"abc"`` stops at ``"ab"``.
    """

    def __init__(self, stop: Iterable[str], include_stop_str_in_output: bool = False) -> None:
        # An empty stop string would match before any text: ignore it rather than stop at once.
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop if s))
        self.include_stop_str_in_output = include_stop_str_in_output
        self.matched_stop: str | None = None  # the stop string that ended generation, if any
        self._held = ""  # received but not emitted: could be the start of a stop string
        self._out = EmittedText()
        # Longest text that may need holding: one character short of the longest stop string.
        self._max_hold = max((len(s) for s in self.stop), default=1) - 1

    @property
    def stopped(self) -> bool:
        return self.matched_stop is not None

    @property
    def text(self) -> str:
        """All text emitted so far (held-back text excluded)."""
        return self._out.text

    def _emit(self, text: str) -> str:
        return self._out.emit(text)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Take the next text delta; return ``(text safe to emit now, whether a stop matched)``.

        After a match, further input is ignored and ``("", True)`` is returned.
        """
        if self.stopped:
            return "", True
        if not self.stop:
            return self._emit(delta), False
        buffer = self._held + delta
        # Earlier feeds found no match, so any match here ends inside the new delta; only the
        # held text plus the delta needs searching (bounded by the longest stop string + delta).
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self.stop:
            start = buffer.find(s)
            if start >= 0:
                candidate = (start + len(s), start, s)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        if best is not None:
            end, start, s = best
            self.matched_stop = s
            self._held = ""
            return self._emit(
                buffer[:end] if self.include_stop_str_in_output else buffer[:start]
            ), True
        hold = self._partial_suffix_len(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return self._emit(buffer[: len(buffer) - hold]), False

    def _partial_suffix_len(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        for k in range(min(self._max_hold, len(buffer)), 0, -1):
            tail = buffer[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        """Release held-back text when generation ends for another reason (EOS, length)."""
        held, self._held = self._held, ""
        return "" if self.stopped else self._emit(held)
