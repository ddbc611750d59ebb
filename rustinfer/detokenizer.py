"""Incremental detokenization that never emits half a UTF-8 character.

Byte-level BPE splits multi-byte characters (Chinese, emoji) across tokens; decoding a partial
sequence yields U+FFFD. We decode a short window of already-emitted context plus the new tokens and
hold text back while it ends in U+FFFD.
"""

from __future__ import annotations

from rustinfer.tokenizer import Tokenizer

# Tokens of already-emitted text decoded again as context: some tokenizers render a token differently
# at the start of a string (leading-space handling), so a little context keeps spacing right.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens whose text has been emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""  # an incomplete character (or nothing visible) so far: wait for more tokens
        delta = full_text[len(prefix_text) :]
        self._read = len(self.ids)
        self._prefix = max(0, self._read - _CONTEXT_TOKENS)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Text held back at the end of generation (a dangling partial character is dropped)."""
        tail = self._decode(self.ids[self._prefix :])
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        delta = tail[len(prefix_text) :].rstrip("\ufffd")
        self._read = len(self.ids)
        self.text += delta
        return delta
