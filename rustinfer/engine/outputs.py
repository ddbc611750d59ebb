"""What the engine reports per request after each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestTimings:
    queue_s: float | None = None  # arrival -> first scheduled
    ttft_s: float | None = None  # arrival -> first token
    prefill_s: float | None = None  # first scheduled -> first token
    decode_s: float | None = None  # first token -> finish (or now)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # top-k alternatives, most likely first


@dataclass
class RequestOutput:
    """New results of one sequence (``index`` among the ``n`` of its request) after one step."""

    request_id: str
    index: int
    new_token_ids: list[int]
    text_delta: str
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    timings: RequestTimings = field(default_factory=RequestTimings)
