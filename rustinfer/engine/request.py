"""One generation request as the engine tracks it: tokens, progress, status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rustinfer.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context limit
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
}


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what the context limit leaves
    arrival_time: float = field(default_factory=time.monotonic)
    parent_id: str = ""  # the client's request id ("" : this sequence's own id)
    index: int = 0  # this sequence's place among the request's n
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    # Sampled on the device by the step in flight, not yet read back (0 or 1): the newest token.
    # It counts in ``num_tokens`` (the scheduler plans with it) but not in ``output_token_ids``.
    num_pending_tokens: int = 0
    num_cached_tokens: int = 0  # of the prompt, served by the prefix cache at admission
    status: RequestStatus = RequestStatus.WAITING
    generator: torch.Generator | None = None  # per-request RNG when params.seed is set
    num_preemptions: int = 0
    # For sequences 1..n-1 of an n > 1 request: sequence 0. They are admitted once it has computed
    # its prompt, so its full prompt blocks are in the prefix cache and shared rather than recomputed.
    prefix_parent: Request | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # For a structured output: where this sequence is in its grammar (an llguidance matcher).
    matcher: Any = None

    def __post_init__(self) -> None:
        self.parent_id = self.parent_id or self.request_id

    @property
    def all_token_ids(self) -> list[int]:
        """The tokens known on the host (a pending one is not among them)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list (a decode step needs
        one token of a long sequence)."""
        n_prompt = len(self.prompt_token_ids)
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens, counting one still on the device."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Output tokens, counting one still on the device."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        # Identity tests, not a set lookup: this runs several times per sequence per step, and
        # hashing an enum member goes through Python code.
        status = self.status
        return status is not RequestStatus.RUNNING and status is not RequestStatus.WAITING
