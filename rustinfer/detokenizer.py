"""Incremental detokenization that never emits half a UTF-8 character.

Byte-level BPE (Llama 3, SmolLM2) and SentencePiece byte fallback split multi-byte characters
(Chinese, emoji) across tokens; decoding a partial sequence yields U+FFFD at the end. We decode only
a short window of tokens (a little already-emitted context plus the new ones) and emit the part of it
that extends past what was already emitted, holding back any trailing U+FFFD until the bytes that
complete the character arrive.

Invariant (for decoders whose output for a prefix of the ids is a prefix of the output for all of
them, apart from a trailing U+FFFD run: ByteLevel, Metaspace, ByteFallback+Fuse): after ``flush()``,
``text == tokenizer.decode(ids, skip_special_tokens)``. In particular ``flush()`` EMITS a dangling
incomplete character at the very end as U+FFFD, exactly as ``decode`` renders it, rather than
silently dropping it: the client then sees that the output was cut mid-character.
"""

from __future__ import annotations

from rustinfer.emitted_text import EmittedText
from rustinfer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"

# Tokens of already-emitted text kept at the start of the decode window: some decoders render a
# token differently at the start of a string (SentencePiece drops the leading space of the first
# token), so the window must start a few tokens back for the new token's text to come out right.
_CONTEXT_TOKENS = 4

# The window is cut back to _CONTEXT_TOKENS once it is this long, so each add() decodes at most
# about this many tokens (plus any still-incomplete character): bounded cost per token.
_MAX_WINDOW = 3 * _CONTEXT_TOKENS

# Output that never reaches a clean character boundary (garbage bytes, or tokens that each end
# mid-character for a long stretch) may still be re-anchored past this window length, at a cut
# checked to fall on a character boundary, so the cost stays bounded even then.
_MAX_DIRTY_WINDOW = 8 * _CONTEXT_TOKENS


class IncrementalDetokenizer:
    """Token ids in, text deltas out: ``add(id) -> str`` per token, ``flush() -> str`` at the end.

    Concatenating every delta (and the flush) gives ``tokenizer.decode(ids)``; no delta ends in a
    partial character, so a delta holds U+FFFD only where the final text does too.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0  # first token of the decode window
        # Characters of decode(ids[_start:]) already emitted (or belonging to context before them).
        self._emitted = 0
        self._out = EmittedText()

    @property
    def text(self) -> str:
        """All text emitted so far (joined lazily, so add() never copies the whole output)."""
        return self._out.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, delta: str) -> str:
        return self._out.emit(delta)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (possibly empty)."""
        self.ids.append(int(token_id))
        window = self._decode(self.ids[self._start :])
        dirty = window.endswith(_REPLACEMENT)
        # A trailing U+FFFD run may be a character whose remaining bytes are still to come (byte
        # fallback renders each pending byte as its own U+FFFD, hence the whole run).
        safe = len(window.rstrip(_REPLACEMENT)) if dirty else len(window)
        delta = window[self._emitted : safe] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        self._maybe_reanchor(window, dirty)
        return self._emit(delta)

    def _maybe_reanchor(self, window: str, dirty: bool) -> None:
        """Move the window start forward, keeping ``_emitted`` pointing at the same character."""
        size = len(self.ids) - self._start
        if size <= (_MAX_DIRTY_WINDOW if dirty else _MAX_WINDOW):
            return
        # Try a few cut points: a cut inside a multi-byte character shows up as a leading U+FFFD
        # (or a tail that no longer matches), and is rejected.
        for cut in range(len(self.ids) - _CONTEXT_TOKENS, len(self.ids) - 2 * _CONTEXT_TOKENS, -1):
            if cut <= self._start:
                break
            tail = self._decode(self.ids[cut:])
            if not tail or tail.startswith(_REPLACEMENT) or not window.endswith(tail):
                continue
            dropped = len(window) - len(tail)
            # Measured from the end, so a leading space the decoder strips at a string's start
            # (SentencePiece) simply counts as dropped context.
            if dropped > self._emitted:
                continue
            self._start = cut
            self._emitted -= dropped
            return

    def flush(self) -> str:
        """Text still held at the end of generation.

        A dangling incomplete character is emitted as U+FFFD (as ``decode`` renders it), so that
        ``text`` equals ``tokenizer.decode(ids)`` however generation ended.
        """
        window = self._decode(self.ids[self._start :])
        delta = window[self._emitted :]
        self._emitted = max(self._emitted, len(window))
        return self._emit(delta)
