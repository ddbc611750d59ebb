"""Structured outputs: a grammar per request that masks the tokens the sampler may pick.

A request may carry a :class:`StructuredOutput`: a JSON schema, "any JSON object", a regular
expression, a list of choices, or a grammar (Lark, or llama.cpp's GBNF). llguidance compiles it
against the model's tokenizer and keeps, per sequence, a matcher that knows which tokens may come
next; the sampler sets every other token's logit to -inf, so the output always parses. EOS is
allowed only where the grammar may end, and a sequence whose grammar cannot continue stops there.

Why llguidance and not xgrammar: llguidance is one self-contained wheel (no dependencies), reads
the ``tokenizers`` JSON the engine already has, and compiles lazily (a JSON schema in about 0.1 ms,
its first mask in a few ms); xgrammar pulls in transformers and triton as runtime dependencies.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rustinfer.errors import InvalidRequestError

if TYPE_CHECKING:
    import llguidance
    import numpy as np

    from rustinfer.tokenizer import Tokenizer

__all__ = [
    "KINDS",
    "GrammarCompiler",
    "StructuredOutput",
    "banned_from_bitmask",
    "banned_tokens",
    "fill_bitmask",
]

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# Compiled grammars kept per compiler (schemas repeat across requests: agents send the same ones).
_CACHE_SIZE = 256
# JSON on one line, single spaces after separators: a model free to add whitespace can spend its
# whole token budget on newlines (and the output is cut, unparsable); it also costs fewer tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}
# Bits per word of llguidance's token bitmask.
_WORD_BITS = 32


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match. ``spec``: the JSON schema (JSON text) for "json", the pattern
    for "regex", a JSON list of strings for "choice", the grammar text for "grammar" (Lark or
    GBNF, told apart by their syntax), ignored for "json_object". ``field`` names the request field
    it came from, for errors."""

    kind: str
    spec: str = ""
    field: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(self.field, f"unknown kind {self.kind!r}; one of {KINDS}")
        if not isinstance(self.spec, str):
            raise InvalidRequestError(self.field, "the constraint must be given as text")

    @classmethod
    def json_schema(cls, schema: Any, field: str = "response_format") -> StructuredOutput:
        if not isinstance(schema, dict | bool):
            raise InvalidRequestError(field, "a JSON schema must be a JSON object")
        return cls("json", json.dumps(schema), field)

    @classmethod
    def choice(cls, choices: Any, field: str = "guided_choice") -> StructuredOutput:
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise InvalidRequestError(field, "must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(choices), field)


class GrammarCompiler:
    """Compiles constraints for one tokenizer; caches compiled grammars. Thread-safe.

    Building llguidance's view of the tokenizer takes most of a second, so it starts in a thread
    at construction and is joined when the first constraint needs it.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._grammars: dict[StructuredOutput, str] = {}
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._error: BaseException | None = None
        self._executor: llguidance.LLExecutor | None = None

        def build() -> None:
            try:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(
                    tokenizer.hf_tokenizer.to_str(),
                    n_vocab=vocab_size,
                    eos_token=list(eos_token_ids) or None,
                )
            except BaseException as exc:  # reported when a constraint first needs it
                self._error = exc

        self._builder = threading.Thread(target=build, name="rustinfer-grammar-tokenizer")
        self._builder.start()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        self._builder.join()
        if self._ll_tokenizer is None:
            raise RuntimeError(f"llguidance could not read the tokenizer: {self._error}")
        return self._ll_tokenizer

    def compile(self, so: StructuredOutput) -> str:
        """The llguidance grammar of ``so`` (cached), or an InvalidRequestError naming the field
        and what is wrong with the constraint."""
        with self._lock:
            grammar = self._grammars.get(so)
        if grammar is not None:
            return grammar
        import llguidance

        grammar = _to_grammar(so)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error:
            raise InvalidRequestError(so.field, f"cannot compile the {so.kind} constraint: {error}")
        with self._lock:
            if len(self._grammars) >= _CACHE_SIZE:
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[so] = grammar
        return grammar

    @property
    def executor(self) -> llguidance.LLExecutor:
        """llguidance's thread pool for computing a batch's masks in parallel (made on first
        use: a process that never constrains a batch never starts its threads)."""
        with self._lock:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor()
            return self._executor

    def matcher(self, so: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher at the start of ``so``'s grammar (one per sequence)."""
        import llguidance

        return llguidance.LLMatcher(self.ll_tokenizer, self.compile(so))


def _to_grammar(so: StructuredOutput) -> str:
    import llguidance

    build = llguidance.LLMatcher
    try:
        if so.kind == "json":
            return build.grammar_from_json_schema(so.spec, defaults=_JSON_OPTIONS)
        if so.kind == "json_object":
            return build.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_OPTIONS)
        if so.kind == "regex":
            return build.grammar_from_regex(so.spec)
        if so.kind == "choice":
            choices = json.loads(so.spec)
            return build.grammar_from_regex("|".join(_regex_escape(c) for c in choices))
        from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

        try:
            lark = any_to_lark(so.spec)  # GBNF is translated; Lark passes through
        except GbnfToLarkError as exc:
            raise InvalidRequestError(so.field, f"cannot read the grammar: {exc}") from exc
        return build.grammar_from_lark(lark)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(so.field, f"cannot read the {so.kind} constraint: {exc}") from exc


def _regex_escape(text: str) -> str:
    # llguidance's regex syntax is Rust's, which lets any ASCII punctuation but < and > be escaped
    # (and refuses escaped letters, digits and non-ASCII characters): escape exactly those.
    return "".join(
        "\\" + c if c.isascii() and not c.isalnum() and c not in " <>" else c for c in text
    )


def banned_tokens(
    matchers: list[llguidance.LLMatcher | None],
    vocab_size: int,
    device: torch.device,
    executor: llguidance.LLExecutor | None = None,
) -> torch.Tensor:
    """[rows, vocab] bool on ``device``: True where a row's matcher forbids the token next (no
    token for None), what the sampler sets to -inf.

    With an ``executor`` and more than one constrained row, the masks are computed in parallel
    on llguidance's own threads (outside the GIL): a mask takes tens of microseconds, so at batch
    16 a serial loop is most of a GPU decode step spent on one core. The packed bits are unpacked
    on the host for the CPU (numpy's unpackbits, one pass, where torch's bit ops would make four
    [rows, vocab] passes on a few cores), and on the GPU after a 32x smaller upload, by two
    kernels.
    """
    return banned_from_bitmask(fill_bitmask(matchers, vocab_size, executor), vocab_size, device)


def banned_from_bitmask(
    bitmask: np.ndarray | torch.Tensor, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """:func:`fill_bitmask`'s packed masks as :func:`banned_tokens` returns them (a pinned
    tensor goes to the GPU in one asynchronous copy, with no staging copy)."""
    import numpy as np

    from rustinfer.engine.host_copy import upload

    if device.type == "cpu":
        if isinstance(bitmask, torch.Tensor):
            bitmask = bitmask.numpy()
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
        return torch.from_numpy(bits == 0)
    if isinstance(bitmask, torch.Tensor) and bitmask.is_pinned():
        return _unpack_banned(bitmask.to(device, non_blocking=True), vocab_size)
    return _unpack_banned(upload(bitmask, torch.int32, device), vocab_size)


def _unpack_banned(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 bitmask (bit t % 32 of word t // 32: token t allowed) -> [rows,
    vocab] bool, True where banned: two kernels on the words' device."""
    bits = words.unsqueeze(-1) & _bit_values(words.device)  # [rows, words, 32]: 0 where banned
    return (bits == 0).view(words.shape[0], -1)[:, :vocab_size]


def mask_words(vocab_size: int) -> int:
    """int32 words in one row of a packed mask (:func:`fill_bitmask`)."""
    return -(-vocab_size // _WORD_BITS)


def fill_bitmask(
    matchers: list[llguidance.LLMatcher | None],
    vocab_size: int,
    executor: llguidance.LLExecutor | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """[rows, words] int32: bit t % 32 of word t // 32 set where token t is allowed (every bit
    for None), into ``out`` when given. Host work only, most of it in llguidance outside the
    GIL: it may run on another thread while this one goes on."""
    import llguidance.numpy as llg_numpy
    import numpy as np

    bitmask = (
        out if out is not None else np.empty((len(matchers), mask_words(vocab_size)), np.int32)
    )
    bitmask.fill(-1)
    rows = [(m, row) for row, m in enumerate(matchers) if m is not None]
    if executor is not None and len(rows) > 1:
        llg_numpy.fill_next_token_bitmask_par(executor, rows, bitmask)
    else:
        for matcher, row in rows:
            llg_numpy.fill_next_token_bitmask(matcher, bitmask, row)
    return bitmask


@functools.cache
def _bit_values(device: torch.device) -> torch.Tensor:
    """[32] int32 on ``device``: 1 << i (bit 31 as int32's sign bit), made once per device."""
    values = [1 << i for i in range(_WORD_BITS - 1)] + [-(1 << (_WORD_BITS - 1))]
    return torch.tensor(values, dtype=torch.int32, device=device)
