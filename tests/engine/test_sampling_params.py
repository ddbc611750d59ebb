from __future__ import annotations

from typing import Any

import pytest

from rustinfer.engine.sampling_params import (
    MAX_LOGPROBS,
    SamplingParams,
    SamplingParamsError,
    SamplingType,
)
from rustinfer.errors import RustinferError

BAD_VALUES: list[tuple[str, Any]] = [
    ("n", 0),
    ("n", -1),
    ("n", True),
    ("n", 1.0),
    ("max_tokens", 0),
    ("max_tokens", "16"),
    ("max_tokens", False),
    ("min_tokens", -1),
    ("min_tokens", 1.5),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", "1"),
    ("temperature", True),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", -0.5),
    ("top_p", None),
    ("top_k", -2),
    ("top_k", 2.0),
    ("top_k", True),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", float("nan")),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3),
    ("frequency_penalty", -2.5),
    ("logit_bias", {5: 101.0}),
    ("logit_bias", {5: -100.5}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"abc": 1.0}),
    ("logit_bias", {1.5: 1.0}),
    ("logit_bias", {5: float("nan")}),
    ("logit_bias", [(5, 1.0)]),
    ("seed", 1.5),
    ("seed", True),
    ("seed", 2**64),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", [1]),
    ("stop", 3),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", 5),
    ("ignore_eos", 1),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", True),
    ("skip_special_tokens", "yes"),
    ("include_stop_str_in_output", None),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_names_its_field(field: str, value: Any) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)
    # Callers may catch either the project base class or the builtin one.
    assert isinstance(info.value, RustinferError) and isinstance(info.value, ValueError)


GOOD_VALUES: list[tuple[str, Any]] = [
    ("n", 1),
    ("n", 7),
    ("max_tokens", 1),
    ("max_tokens", None),
    ("min_tokens", 16),
    ("temperature", 0),
    ("temperature", 0.0),
    ("temperature", 2.5),
    ("top_p", 1e-6),
    ("top_p", 1),
    ("top_k", 0),
    ("top_k", -1),
    ("top_k", 1),
    ("top_k", 100_000),
    ("min_p", 0),
    ("min_p", 1.0),
    ("repetition_penalty", 1e-3),
    ("repetition_penalty", 5),
    ("presence_penalty", -2),
    ("presence_penalty", 2.0),
    ("frequency_penalty", -2.0),
    ("frequency_penalty", 2),
    ("logit_bias", {}),
    ("logit_bias", {0: -100, 7: 100.0}),
    ("seed", 0),
    ("seed", -5),
    ("seed", 2**64 - 1),
    ("stop", ["a", "bc"]),
    ("stop", ()),
    ("stop_token_ids", [0, 2]),
    ("ignore_eos", True),
    ("logprobs", 0),
    ("logprobs", MAX_LOGPROBS),
    ("skip_special_tokens", False),
    ("include_stop_str_in_output", True),
]


@pytest.mark.parametrize(("field", "value"), GOOD_VALUES)
def test_good_value_passes(field: str, value: Any) -> None:
    params = SamplingParams(**{field: value})
    assert getattr(params, field) == (list(value) if isinstance(value, tuple) else value)


def test_defaults_are_valid() -> None:
    params = SamplingParams()
    assert params.n == 1 and params.max_tokens == 16 and params.stop == []
    assert params.sampling_type is SamplingType.RANDOM


def test_min_tokens_may_not_exceed_max_tokens() -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(min_tokens=5, max_tokens=4)
    assert info.value.field == "min_tokens"
    SamplingParams(min_tokens=4, max_tokens=4)
    SamplingParams(min_tokens=10_000, max_tokens=None)


def test_numbers_are_normalized_to_float() -> None:
    params = SamplingParams(temperature=1, top_p=1, presence_penalty=1, logit_bias={3: 2})
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert isinstance(params.presence_penalty, float)
    assert params.logit_bias == {3: 2.0} and isinstance(params.logit_bias[3], float)


def test_stop_string_becomes_list() -> None:
    assert SamplingParams(stop="###").stop == ["###"]


def test_logit_bias_accepts_json_string_keys() -> None:
    assert SamplingParams(logit_bias={"42": -100}).logit_bias == {42: -100.0}


def test_greedy_with_many_completions_is_allowed() -> None:
    params = SamplingParams(n=4, temperature=0.0)
    assert params.is_greedy and params.sampling_type is SamplingType.GREEDY


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"temperature": 0.0, "seed": 3}, SamplingType.GREEDY),
        ({"temperature": 1e-7}, SamplingType.GREEDY),  # would overflow softmax: greedy instead
        ({"temperature": 0.7}, SamplingType.RANDOM),
        ({"temperature": 0.7, "seed": 3}, SamplingType.RANDOM_SEED),
    ],
)
def test_sampling_type(kwargs: dict[str, Any], expected: SamplingType) -> None:
    assert SamplingParams(**kwargs).sampling_type is expected


def test_check_vocab_rejects_out_of_range_bias() -> None:
    params = SamplingParams(logit_bias={99: 1.0})
    params.check_vocab(100)
    with pytest.raises(SamplingParamsError) as info:
        params.check_vocab(99)
    assert info.value.field == "logit_bias" and "99" in str(info.value)
