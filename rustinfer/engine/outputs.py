"""What the engine reports per request after each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestTimings:
    """Seconds, measured from the request's ``arrival_time`` (when it reached the server, so
    tokenization and queueing count) on the ``time.monotonic`` clock."""

    queue_s: float | None = None  # arrival -> first scheduled
    ttft_s: float | None = None  # arrival -> first token
    prefill_s: float | None = None  # first scheduled -> first token
    decode_s: float | None = None  # first token -> finish (or now)
    e2e_s: float | None = None  # arrival -> finish; set on the final output only


@dataclass
class TopLogprob:
    token_id: int
    token: str  # the token's own text (a partial UTF-8 character shows as U+FFFD)
    bytes: bytes  # the token's exact bytes, whole characters or not
    logprob: float


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    token: str = ""
    bytes: bytes = b""
    top: list[TopLogprob] = field(default_factory=list)  # top-k alternatives, most likely first


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
    # Seconds between each new token and the one before it, for the new tokens that have one
    # (the first token of a sequence has none: its latency is the TTFT).
    inter_token_s: list[float] = field(default_factory=list)
    num_output_tokens: int = 0  # tokens of this sequence so far, this output's included

    def merge(self, later: RequestOutput) -> None:
        """Fold a later output of the same sequence into this one (a slow reader gets one output
        covering several steps instead of a queue that grows without bound)."""
        self.new_token_ids.extend(later.new_token_ids)
        self.text_delta += later.text_delta
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.inter_token_s.extend(later.inter_token_s)
        self.finished, self.finish_reason = later.finished, later.finish_reason
        self.stop_reason = later.stop_reason
        self.cached_tokens, self.timings = later.cached_tokens, later.timings
        self.num_output_tokens = later.num_output_tokens
