"""Per-request sampling parameters, validated once when the request arrives (vLLM conventions).

Validation lives here rather than in the servers so that REST, gRPC and library callers all get the
same rules and the same messages; every error names the offending field so the OpenAI error shape can
fill its ``param`` from :attr:`SamplingParamsError.field`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from rustinfer.engine.structured import StructuredOutput
from rustinfer.errors import InvalidRequestError, RequestError

__all__ = ["MAX_LOGPROBS", "SamplingParams", "SamplingParamsError", "SamplingType"]

# The OpenAI API caps top_logprobs at 20; a larger k costs a wider top-k on every step for every row.
MAX_LOGPROBS = 20
# Temperatures below this are treated as greedy: dividing logits by ~1e-6 overflows float32 softmax
# into inf - inf = NaN, and the distribution is a point mass anyway (vLLM uses the same threshold).
GREEDY_EPS = 1e-5
# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


class SamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of range or of the wrong type; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        RequestError.__init__(self, f"invalid sampling parameter {field!r}: {message}", field)


class SamplingType(enum.Enum):
    GREEDY = "greedy"
    RANDOM = "random"  # drawn from the shared default generator
    RANDOM_SEED = "random_seed"  # drawn from the request's own generator


def _is_int(value: Any) -> bool:
    # bool subclasses int, but `n=True` is a caller bug, not "one completion".
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if not _is_int(value):
        raise SamplingParamsError(name, f"must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise SamplingParamsError(name, f"must be >= {low}, got {value}")
    if high is not None and value > high:
        raise SamplingParamsError(name, f"must be <= {high}, got {value}")


def _check_float(name: str, value: Any) -> float:
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        raise SamplingParamsError(name, f"must be a finite number, got {value!r}")
    return float(value)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise SamplingParamsError(name, f"must be a bool, got {type(value).__name__}")


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    temperature: float = 1.0  # below GREEDY_EPS: greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0  # [0, 1]
    repetition_penalty: float = 1.0  # > 0; over prompt and output tokens
    presence_penalty: float = 0.0  # [-2, 2]; over output tokens
    frequency_penalty: float = 0.0  # [-2, 2]; times the count in output tokens
    logit_bias: dict[int, float] | None = None  # values in [-100, 100]
    seed: int | None = None
    stop: list[str] | str = field(default_factory=list)  # a str is normalized to [str]
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's logprob plus the top k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # The output must match this (a JSON schema, a regex, choices, a grammar); None: free text.
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, low=1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0, high=self.max_tokens)
        self.temperature = _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise SamplingParamsError("temperature", f"must be >= 0, got {self.temperature}")
        self.top_p = _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise SamplingParamsError("top_k", f"must be 0 or -1 (off) or >= 1, got {self.top_k}")
        self.min_p = _check_float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError("min_p", f"must be in [0, 1], got {self.min_p}")
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise SamplingParamsError(
                "repetition_penalty", f"must be > 0, got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise SamplingParamsError(name, f"must be in [-2, 2], got {value}")
            setattr(self, name, value)
        self._validate_logit_bias()
        if self.seed is not None:
            _check_int("seed", self.seed, low=_SEED_MIN, high=_SEED_MAX)
        self._validate_stop()
        _check_bool("ignore_eos", self.ignore_eos)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise SamplingParamsError("structured", "must be a StructuredOutput")

    def _validate_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise SamplingParamsError("logit_bias", "must be a dict mapping token id to bias")
        normalized: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            # JSON object keys are strings on the wire ({"50256": -100}); accept their int spelling.
            token = int(key) if isinstance(key, str) and key.isdigit() else key
            if not _is_int(token) or token < 0:
                raise SamplingParamsError("logit_bias", f"keys must be token ids >= 0, got {key!r}")
            bias = _check_float("logit_bias", value)
            if not -100 <= bias <= 100:
                raise SamplingParamsError(
                    "logit_bias", f"values must be in [-100, 100], got {bias}"
                )
            normalized[token] = bias
        self.logit_bias = normalized

    def _validate_stop(self) -> None:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise SamplingParamsError("stop", "must be a string or a list of strings")
        if any(s == "" for s in stop):
            raise SamplingParamsError("stop", "must not contain empty strings")
        self.stop = list(stop)
        if not isinstance(self.stop_token_ids, list | tuple):
            raise SamplingParamsError("stop_token_ids", "must be a list of token ids")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids", token, low=0)
        self.stop_token_ids = list(self.stop_token_ids)

    def check_vocab(self, vocab_size: int) -> None:
        """Reject logit_bias ids the model cannot produce; the engine may call it at submit time."""
        for token in self.logit_bias or {}:
            if token >= vocab_size:
                raise SamplingParamsError(
                    "logit_bias", f"token id {token} is outside the vocabulary (size {vocab_size})"
                )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def sampling_type(self) -> SamplingType:
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0
