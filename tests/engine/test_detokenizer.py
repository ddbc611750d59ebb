"""IncrementalDetokenizer on the real SmolLM2 and Llama 3 tokenizers."""

from __future__ import annotations

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers

from rustinfer.detokenizer import IncrementalDetokenizer
from rustinfer.tokenizer import Tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "北京是中国的首都。",
    "I ❤️ 🦀 and 👨‍👩‍👧",
    "flags 🇫🇷🇯🇵 skin 👍🏽 family 👨‍👩‍👧‍👦!",
    "def fib(n):\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)\n",
    "   leading spaces\n\n\ntrailing  ",
    "mixed: café naïve — “quotes” … 日本語のテキスト 한국어",
]


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("skip_special", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(real_tokenizer: Tokenizer, text: str, skip_special: bool):
    ids = real_tokenizer.encode(text, add_special_tokens=False)
    eos = real_tokenizer.eos_token_ids[0]
    ids = [*ids, eos]  # a special token at the end: dropped or spelled out per skip_special
    detok = IncrementalDetokenizer(real_tokenizer, skip_special_tokens=skip_special)
    deltas = stream(detok, ids)
    expected = real_tokenizer.decode(ids, skip_special_tokens=skip_special)
    assert "".join(deltas) == expected == detok.text
    assert expected.startswith(text)
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_are_held_until_complete(real_tokenizer: Tokenizer):
    # 🦀 is four UTF-8 bytes; byte-level BPE usually splits rare emoji over several tokens.
    ids = real_tokenizer.encode("🦀🦀", add_special_tokens=False)
    detok = IncrementalDetokenizer(real_tokenizer)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == "🦀🦀"
    assert all(d in ("", "🦀", "🦀🦀") for d in deltas)
    assert detok.flush() == ""


def test_dangling_partial_character_is_flushed_as_replacement(real_tokenizer: Tokenizer):
    ids = real_tokenizer.encode("ok 🦀", add_special_tokens=False)
    # Find a prefix that ends mid-character (the crab spans several byte-level tokens).
    cut = next(n for n in range(1, len(ids)) if real_tokenizer.decode(ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(real_tokenizer)
    deltas = [detok.add(i) for i in ids[:cut]]
    assert "\ufffd" not in "".join(deltas)
    # Documented choice: flush() emits the incomplete character as U+FFFD, like decode() does.
    assert detok.flush().endswith("\ufffd")
    assert detok.text == real_tokenizer.decode(ids[:cut])


def test_long_output_uses_bounded_decode_windows(real_tokenizer: Tokenizer):
    text = "北京是中国的首都。 I ❤️ 🦀. " * 60
    ids = real_tokenizer.encode(text, add_special_tokens=False)
    seen: list[int] = []
    original = real_tokenizer.decode

    class Spy:
        def __getattr__(self, name: str):
            return getattr(real_tokenizer, name)

        def decode(self, window, skip_special_tokens=True):
            seen.append(len(window))
            return original(window, skip_special_tokens=skip_special_tokens)

    detok = IncrementalDetokenizer(Spy())  # type: ignore[arg-type]
    assert "".join(stream(detok, ids)) == text
    assert max(seen) <= 40  # a window, never the whole output (hundreds of tokens)
    assert len(seen) <= 2 * len(ids) + 1


def sentencepiece_like() -> Tokenizer:
    """A tiny Metaspace + byte-fallback tokenizer: '▁' marks spaces, dropped at string start."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁Hello", "▁world", "▁", "!", "\n", "▁the", "▁code", "▁▁", "x"]:
        vocab[piece] = len(vocab)
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True)
    hf = tokenizers.Tokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    hf.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(hf, bos_token_id=1, eos_token_ids=[2])


def test_sentencepiece_leading_space_tokens():
    tok = sentencepiece_like()
    v = tok.hf_tokenizer.token_to_id
    pieces = ["<s>", "▁Hello", "▁world", "!", "\n", "▁the", "▁▁", "▁code", "</s>"]
    ids = [v(p) for p in pieces] * 5
    # Byte-fallback Chinese: 北 = E5 8C 97, one token per byte.
    ids += [v("▁")] + [v(f"<0x{b:02X}>") for b in "北京".encode()] + [v("x")]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        deltas = stream(detok, ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)
    assert detok.text.startswith("<s> Hello world!\n the   code</s>")
    assert detok.text.endswith(" 北京x")


@pytest.fixture(scope="module")
def vocab_ids(real_tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    ids = list(range(real_tokenizer.vocab_size))
    return [i for i in ids if not real_tokenizer.is_special(i)], ids


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data(), skip_special=st.booleans())
def test_random_token_sequences(real_tokenizer, vocab_ids, data, skip_special: bool):
    normal, everything = vocab_ids
    pool = normal if skip_special else everything
    # Indices into the pool; small ones are favoured so byte tokens and specials show up often.
    idx = st.one_of(st.integers(0, len(pool) - 1), st.integers(0, 600))
    ids = [pool[i] for i in data.draw(st.lists(idx, max_size=40))]
    detok = IncrementalDetokenizer(real_tokenizer, skip_special_tokens=skip_special)
    deltas = stream(detok, ids)
    final = real_tokenizer.decode(ids, skip_special_tokens=skip_special)
    if "\ufffd" not in final:
        assert "".join(deltas) == final
        assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\ufffd"), max_size=60))
def test_random_text_roundtrip(text: str):
    # Covers arbitrary Unicode (rare CJK, astral emoji) split by SmolLM2's byte-level merges; the
    # tokenizer is opened once per process, so a plain module-level fetch is cheap.
    from loader_helpers import smollm2_source

    tok = smollm2_source().tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tok), ids)
    final = tok.decode(ids)
    assert "".join(deltas) == final
    # SmolLM2's GGUF vocabulary lacks a few byte tokens (e.g. 0xF1), so some astral characters
    # decode to U+FFFD even whole; only otherwise must every delta be clean.
    if "\ufffd" not in final:
        assert not any("\ufffd" in d for d in deltas)
