"""StopStringMatcher: stop strings spanning deltas, hold-back, and a real tokenizer end to end."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustinfer.detokenizer import IncrementalDetokenizer
from rustinfer.engine.stop import StopStringMatcher
from rustinfer.tokenizer import Tokenizer


def run(matcher: StopStringMatcher, deltas: list[str]) -> tuple[list[str], bool]:
    out = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_spanning_deltas_is_never_partially_emitted():
    m = StopStringMatcher(["STOP"], include_stop_str_in_output=False)
    assert m.feed("hello S") == ("hello ", False)  # "S" could begin "STOP": held
    assert m.feed("T") == ("", False)
    assert m.feed("OP and more") == ("", True)
    assert m.text == "hello "
    assert m.matched_stop == "STOP"
    assert m.feed("ignored") == ("", True)
    assert m.flush() == ""


def test_false_start_is_released():
    m = StopStringMatcher(["STOP"])
    assert m.feed("a ST") == ("a ", False)
    assert m.feed("ART") == ("START", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"  # generation ended for another reason: held text goes out
    assert m.text == "a STARTS"
    assert not m.stopped


def test_stop_at_very_start():
    m = StopStringMatcher(["\n\n"])
    assert m.feed("\n") == ("", False)
    assert m.feed("\nrest") == ("", True)
    assert m.text == ""


def test_include_stop_str_in_output():
    out, stopped = run(StopStringMatcher(["</answer>"], True), ["42</ans", "wer>", "tail"])
    assert stopped and "".join(out) == "42</answer>"


def test_earliest_completion_wins_and_is_chunking_independent():
    # "ab" completes before "abc" could: a char-by-char stream would stop there.
    for chunks in (["xabcd"], ["xa", "bc"], list("xabc")):
        m = StopStringMatcher(["abc", "ab"])
        out, stopped = run(m, chunks)
        assert stopped and "".join(out) == "x" and m.matched_stop == "ab"
    # "bc" completes before "abcd": it wins although "abcd" starts earlier.
    m = StopStringMatcher(["abcd", "bc"], include_stop_str_in_output=True)
    assert run(m, ["xabcd"]) == (["xabc"], True)
    # Same end: the one starting first (the longer) wins.
    m = StopStringMatcher(["bc", "abc"], include_stop_str_in_output=True)
    assert run(m, ["xab", "cz"]) == (["x", "abc"], True)
    assert m.matched_stop == "abc"


def test_multibyte_stop_string():
    m = StopStringMatcher(["。", "！"])
    out, stopped = run(m, ["北京", "是中国的首都", "。还有"])
    assert stopped and "".join(out) == "北京是中国的首都"


def test_no_stop_strings_pass_through():
    m = StopStringMatcher(["", ""])
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


@settings(max_examples=300, deadline=None)
@given(
    text=st.text("abc\n", max_size=30),
    stops=st.lists(st.text("abc\n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
    include=st.booleans(),
)
def test_random_chunking_matches_char_by_char(text, stops, cuts, include):
    points = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(points, points[1:], strict=False)]
    ref = StopStringMatcher(stops, include)
    ref_out, ref_stopped = run(ref, list(text))
    m = StopStringMatcher(stops, include)
    out, stopped = run(m, chunks)
    assert ("".join(out), stopped, m.matched_stop) == (
        "".join(ref_out),
        ref_stopped,
        ref.matched_stop,
    )
    # Oracle: cut before the first completed stop string (ties: earliest start).
    ends = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if ends:
        end, start, _ = min(ends)
        assert "".join(out) == text[: end if include else start]
    else:
        assert "".join(out) == text
    # A client never saw text beyond what the final answer contains.
    assert all(
        "".join(out[: i + 1]) == "".join(out)[: len("".join(out[: i + 1]))] for i in range(len(out))
    )


@pytest.mark.parametrize("include", [False, True])
def test_end_to_end_stop_word_spanning_tokens(real_tokenizer: Tokenizer, include: bool):
    sentence = "在北京, archaeologists uncovered Quetzalcoatlus fossils. Then more text."
    ids = real_tokenizer.encode(sentence, add_special_tokens=False)
    stop = "Quetzalcoatlus"
    # The stop word must really span several tokens for this test to mean anything.
    assert not any(stop in real_tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(real_tokenizer)
    matcher = StopStringMatcher([stop, "never"], include_stop_str_in_output=include)
    emitted, stopped = [], False
    for token in ids:
        text, stopped = matcher.feed(detok.add(token))
        emitted.append(text)
        assert "Quetz" not in "".join(emitted) or include  # no partial stop leaks out
        if stopped:
            break
    assert stopped
    expected = "在北京, archaeologists uncovered " + (stop if include else "")
    assert "".join(emitted) == matcher.text == expected
