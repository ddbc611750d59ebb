"""Build a HF ``tokenizers.Tokenizer`` from the ``tokenizer.*`` metadata of a GGUF file.

Two vocabulary kinds are read:

* ``gpt2``: byte-level BPE. Vocabulary and merges are stored; the pre-tokenizer is not, only its
  llama.cpp name in ``tokenizer.ggml.pre``. Each supported name maps to the split the
  vocabulary's merges were learned with (e.g. SmolLM2's ``smollm`` isolates every digit first).
* ``llama``: SentencePiece BPE. Tokens and scores are stored, not merges: a pair merges when their
  concatenation is a token, higher-scoring results first. Unknown bytes fall back to ``<0xNN>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from rustinfer.errors import ModelLoadError
from rustinfer.loaders.gguf_meta import field, require_field
from rustinfer.loaders.gguf_reader import GGUFFile

__all__ = [
    "SUPPORTED_PRE_TOKENIZERS",
    "GGUFTokenizerSpec",
    "add_special_tokens",
    "build_gguf_tokenizer",
    "byte_level_bpe",
]

# llama.cpp's token types (gguf.TokenType): which tokens are matched whole in the text.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2/2.5/3's split (their tokenizer.json, llama.cpp's "qwen2"): Llama 3's, except that numbers
# are cut into single digits rather than runs of up to three.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # StarCoder-family vocabularies (SmolLM, SmolLM2) were trained on text whose digits were split
    # one by one before the GPT-2 regex ran; a whitespace run before a number then stays one piece.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _llama3() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _qwen2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2,
    "gpt2": _gpt2,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "llama-bpe": _llama3,
    "llama3": _llama3,
    "llama-v3": _llama3,
    "qwen2": _qwen2,  # what llama.cpp names Qwen2, Qwen2.5 and Qwen3 files' split
}
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_PRE_TOKENIZERS))


@dataclass
class GGUFTokenizerSpec:
    hf_tokenizer: HFTokenizer
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None


def build_gguf_tokenizer(reader: GGUFFile) -> GGUFTokenizerSpec:
    """Read the tokenizer a GGUF file describes; unsupported kinds raise ModelLoadError."""
    kind = field(reader, "tokenizer.ggml.model")
    tokens: list[str] = list(require_field(reader, "tokenizer.ggml.tokens"))
    token_types: list[int] = list(field(reader, "tokenizer.ggml.token_type", []))
    bos_id = field(reader, "tokenizer.ggml.bos_token_id")
    if kind == "gpt2":
        hf = _byte_level_bpe(reader, tokens)
        add_bos_default = False
    elif kind == "llama":
        hf = _sentencepiece_bpe(reader, tokens, token_types)
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise ModelLoadError(
            f"GGUF file {reader.path} uses tokenizer model {kind!r}; rustinfer reads "
            "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE) vocabularies"
        )
    add_special_tokens(hf, tokens, token_types)
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", add_bos_default)) and (
        bos_id is not None
    )
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False))
    eos_id = field(reader, "tokenizer.ggml.eos_token_id")
    _set_post_processor(hf, tokens, bos_id if add_bos else None, eos_id if add_eos else None)
    # EOT/EOM end a turn in chat models (Llama 3's <|eot_id|>, <|eom_id|>): generation stops there.
    stop_ids = [eos_id, *(field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom"))]
    return GGUFTokenizerSpec(
        hf_tokenizer=hf,
        bos_token_id=None if bos_id is None else int(bos_id),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in stop_ids if i is not None)),
        add_bos=add_bos,
        chat_template=field(reader, "tokenizer.chat_template"),
    )


def _byte_level_bpe(reader: GGUFFile, tokens: list[str]) -> HFTokenizer:
    return byte_level_bpe(
        tokens,
        list(require_field(reader, "tokenizer.ggml.merges")),
        field(reader, "tokenizer.ggml.pre", "default"),
        where=f"GGUF file {reader.path}",
    )


def byte_level_bpe(
    tokens: list[str], merges: list[str], pre_name: str, where: str = "the model"
) -> HFTokenizer:
    """A byte-level BPE tokenizer from llama.cpp's pieces: tokens by id, "a b" merges, pre name."""
    make_pre = _PRE_TOKENIZERS.get(pre_name)
    if make_pre is None:
        raise ModelLoadError(
            f"{where} names pre-tokenizer {pre_name!r}, which rustinfer does not know; "
            f"supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # Llama 3's vocabulary is used with ignore_merges (a word already in the vocabulary is one
    # token), as in its own tokenizer.json and in llama.cpp.
    bpe = models.BPE(vocab, pairs, ignore_merges=make_pre is _llama3)
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = make_pre()
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges a SentencePiece vocabulary implies: higher-scoring joined tokens merge first."""
    ids = {tok: i for i, tok in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for merged_id, merged in enumerate(tokens):
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[merged_id], merged_id, ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(reader: GGUFFile, tokens: list[str], token_types: list[int]) -> HFTokenizer:
    scores = [float(s) for s in field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))]
    unk_id = field(reader, "tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(token_types) if t == _UNKNOWN), None)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = models.BPE(
        vocab,
        _sentencepiece_merges(tokens, scores),
        unk_token=None if unk_id is None else tokens[unk_id],
        fuse_unk=True,
        byte_fallback=True,
    )
    hf = HFTokenizer(bpe)
    prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
    # Spaces become "▁"; one is prepended to the text (not after each special token) if asked.
    hf.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # the space the pre-tokenizer prepended
    hf.decoder = decoders.Sequence(steps)
    return hf


def add_special_tokens(hf: HFTokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Mark control (and unknown) tokens special, user-defined ones as added (matched whole)."""
    # Control tokens (<|im_start|>, <s>) are special: matched whole, skipped when decoding with
    # skip_special_tokens. User-defined ones are matched whole but are ordinary text.
    if len(token_types) != len(tokens):
        return  # no (or inconsistent) type list: nothing is known to be special
    special = [
        t for t, kind in zip(tokens, token_types, strict=True) if kind in (_CONTROL, _UNKNOWN)
    ]
    user = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _USER_DEFINED]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _set_post_processor(
    hf: HFTokenizer, tokens: list[str], bos_id: int | None, eos_id: int | None
) -> None:
    single, pair, specials = "$A:0", "$A:0 $B:1", []
    if bos_id is not None:
        bos = tokens[bos_id]
        single, pair = f"{bos}:0 {single}", f"{bos}:0 $A:0 {bos}:1 $B:1"
        specials.append((bos, int(bos_id)))
    if eos_id is not None:
        eos = tokens[eos_id]
        single, pair = f"{single} {eos}:0", f"{pair} {eos}:1"
        specials.append((eos, int(eos_id)))
    hf.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict.fromkeys(specials))
    )
