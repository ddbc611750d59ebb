"""Continuous batching: which requests run this step, and how many of their tokens.

Each step has a token budget (``max_num_batched_tokens``) and a seat limit (``max_num_seqs``).
Running requests go first, in arrival order: a decode costs one token, a prompt still being
prefilled costs the next chunk that fits the budget (chunked prefill), so long prompts never stall
decodes. Waiting requests are then admitted in arrival order (FCFS) while budget, seats and KV blocks
last. When a running request cannot get a block for its next token, the most recently arrived running
request is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed later (the prefix cache usually makes that cheap). Nothing here ever waits on memory, so
there is no deadlock; a request that could never fit is rejected before it is queued.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

from rustinfer.engine.block_manager import BlockManager
from rustinfer.engine.request import Request, RequestStatus
from rustinfer.errors import OverloadedError

__all__ = ["OverloadedError", "ScheduledWork", "Scheduler", "SchedulerConfig", "SchedulerOutput"]

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024  # bounded queue: overflow is an OverloadedError, not unbounded memory

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledWork:
    request: Request
    num_tokens: int  # tokens to compute this step, from request.num_computed_tokens on
    # Whether this chunk reaches the request's last known token, so it samples a new one (fixed
    # when scheduled: the request's progress moves on once the step has run).
    completes_sequence: bool = field(init=False)

    def __post_init__(self) -> None:
        req = self.request
        self.completes_sequence = req.num_computed_tokens + self.num_tokens == req.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledWork] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(w.num_tokens for w in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in arrival order
        self.num_preemptions = 0

    # -- queue ----------------------------------------------------------------------------------

    def add(self, requests: list[Request]) -> None:
        """Queue the sequences of one request, all or none (an ``n > 1`` request is never left
        half queued)."""
        if len(self.waiting) + len(requests) > self.config.max_waiting:
            raise OverloadedError(
                f"the server is overloaded: {len(self.waiting)} requests are already waiting "
                f"(max_waiting={self.config.max_waiting}); retry later"
            )
        for request in requests:
            request.status = RequestStatus.WAITING
            self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request (finished or aborted) wherever it is, freeing its blocks."""
        if request in self.running:
            self.running.remove(request)
            self.blocks.free(request.request_id)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def advance(self, plan: SchedulerOutput) -> None:
        """Record that ``plan`` ran: each request's KV now covers its scheduled tokens.

        Call it before the step's sampled tokens are appended; with a step in flight, after the
        previous step's tokens are appended (the prefix cache hashes the tokens this step
        computed, so they must be known). The scheduler is the one writer of
        ``num_computed_tokens`` (admission sets the cached prefix, preemption resets it, this
        advances it), so a sequence's progress cannot be updated from two places that disagree.
        """
        blocks = self.blocks
        for work in plan.scheduled:
            req = work.request
            if req.is_finished or req.status is RequestStatus.WAITING:
                continue  # finished (or preempted) while its step was in flight: nothing to keep
            req.num_computed_tokens += work.num_tokens
            if blocks.has_blocks_to_commit(req.request_id, req.num_computed_tokens):
                blocks.commit_computed(req.request_id, req.all_token_ids, req.num_computed_tokens)

    # -- one step -------------------------------------------------------------------------------

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.blocks.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        victim.status = RequestStatus.WAITING
        self.waiting.appendleft(victim)  # first back in: it arrived before everything waiting
        out.preempted.append(victim)
        logger.info("preempted request %s (KV blocks exhausted)", victim.request_id)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # Running requests, oldest first; the youngest ones are the preemption victims.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_output_tokens >= req.max_tokens:
                # Its last token is still on the device: it finishes (by length) when that token
                # is read back, so it computes nothing more.
                i += 1
                continue
            n = min(req.num_uncomputed_tokens, budget)
            if n == 1 and self.blocks.has_room(req.request_id, req.num_computed_tokens + 1):
                # The common decode step: its token fits in the last block it already has.
                out.scheduled.append(ScheduledWork(req, 1))
                budget -= 1
                i += 1
                continue
            while not self.blocks.can_append(req.request_id, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                self.blocks.append_slots(req.request_id, req.num_computed_tokens + n)
                out.scheduled.append(ScheduledWork(req, n))
                budget -= n
                i += 1
                continue
            # ``req`` preempted itself: the loop index now points at the next request.

        # Waiting requests, FCFS, unless something was just preempted (it would only bounce).
        while (
            self.waiting
            and budget > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            if req.num_pending_tokens:
                break  # preempted with its newest token still on the device: admit it next step
            parent = req.prefix_parent
            if (
                parent is not None
                and not parent.is_finished
                and parent.num_computed_tokens < len(parent.prompt_token_ids)
            ):
                break  # one more step, and the sibling's prompt blocks are cached for this one
            tokens = req.all_token_ids
            if not self.blocks.can_allocate(tokens):
                break  # FCFS: later requests do not overtake the head of the queue
            self.waiting.popleft()
            cached = self.blocks.allocate(req.request_id, tokens)
            req.num_computed_tokens = cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = cached
            n = min(req.num_uncomputed_tokens, budget)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledWork(req, n))
            budget -= n
        return out
