"""The exact bytes of one token, for logprobs (OpenAI's ``bytes`` field).

Decoding a single token id gives U+FFFD where a token holds part of a multi-byte character, so the
bytes have to come from the vocabulary itself: byte-level BPE (GPT-2, Llama 3, SmolLM2) spells each
byte as one printable character of a fixed table; SentencePiece spells spaces as U+2581 and raw
bytes as ``<0xNN>`` pieces. Special and added tokens are their own text.
"""

from __future__ import annotations

import json
import re

import tokenizers

__all__ = ["TokenBytes"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPIECE_SPACE = "\u2581"


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte <-> printable character map, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(printable)
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shift)
            shift += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_kinds(hf: tokenizers.Tokenizer) -> set[str]:
    if hf.decoder is None:
        return set()
    state = json.loads(hf.decoder.__getstate__())
    kinds, pending = set(), [state]
    while pending:
        node = pending.pop()
        kinds.add(node.get("type", ""))
        pending.extend(node.get("decoders", []) or [])
    return kinds


class TokenBytes:
    """``of(token_id) -> bytes``, memoized (a logprobs request asks for the same ids often)."""

    def __init__(self, hf: tokenizers.Tokenizer) -> None:
        self._hf = hf
        self._byte_level = "ByteLevel" in _decoder_kinds(hf)
        self._table = _byte_level_table() if self._byte_level else {}
        self._added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()}
        self._cache: dict[int, bytes] = {}

    def of(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(int(token_id))
        return cached

    def _compute(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._hf.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(ch in self._table for ch in piece):
            return bytes(self._table[ch] for ch in piece)
        match = _BYTE_PIECE.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace(_SPIECE_SPACE, " ").encode()
