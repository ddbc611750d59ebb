"""The engine core: admit requests, then step: schedule -> run -> sample -> process outputs.

Synchronous and single-threaded by design: the asyncio face runs it in its own thread. Output work
(detokenizing, stop conditions, logprobs, timings) lives in :mod:`rustinfer.engine.output_processor`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

if TYPE_CHECKING:
    import llguidance
    import numpy as np

from rustinfer.engine.block_manager import BlockManager
from rustinfer.engine.host_copy import HostTensors
from rustinfer.engine.model_runner import (
    DEFAULT_BLOCK_SIZE,
    ModelRunner,
    ScheduledSequence,
    num_blocks_for_budget,
)
from rustinfer.engine.output_processor import Finished, OutputProcessor
from rustinfer.engine.outputs import RequestOutput
from rustinfer.engine.rate import RecentRate
from rustinfer.engine.request import Request, RequestStatus
from rustinfer.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    is_plain_greedy,
    needs_output_history,
)
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.engine.scheduler import ScheduledWork, Scheduler, SchedulerConfig, SchedulerOutput
from rustinfer.engine.structured import (
    GrammarCompiler,
    banned_from_bitmask,
    fill_bitmask,
    mask_words,
)
from rustinfer.errors import ContextLengthExceededError, DuplicateRequestError, InvalidRequestError
from rustinfer.progress import progress_bar
from rustinfer.runtime.loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024  # sequences waiting beyond this are refused (OverloadedError)
    max_model_len: int | None = None  # None: the model's own limit
    kv_cache_bytes: int | None = None  # CPU budget for the KV cache (default 2 GiB)
    gpu_memory_utilization: float = 0.9  # on CUDA: this fraction of free memory holds the cache
    enable_prefix_caching: bool = True
    # CUDA: decode batches up to this size replay captured graphs (None: max_num_seqs, at most
    # 256); enforce_eager turns graphs off (for debugging, or ops that cannot be captured).
    cuda_graph_max_batch: int | None = None
    enforce_eager: bool = False
    # Keep one step in flight: schedule and launch the next step while the GPU runs this one,
    # and read its tokens back afterwards (None: on CUDA only; on the CPU a launch is the whole
    # forward, so overlapping would only delay each token by a step).
    overlap: bool | None = None


@dataclass
class _InFlight:
    """A launched step: the sequences that sample, their rows, the sampled ids on the device
    (the next step's decodes read theirs from it) and their copy on the way to the host."""

    reqs: list[Request]
    rows: dict[str, int]
    token_ids: torch.Tensor | None
    host: HostTensors | None


def sampling_key(reqs: list[Request]) -> tuple[tuple[str, bool], ...]:
    """What a SamplingBatch depends on besides the sampled tokens: the rows (in order) and
    whether each still holds its stops back for min_tokens."""
    return tuple((r.request_id, r.num_output_tokens < r.params.min_tokens) for r in reqs)


@dataclass
class _SamplingState:
    """The last SamplingBatch built, kept on the device while the batch stays the same."""

    key: tuple[tuple[str, bool], ...]
    batch: SamplingBatch
    last_token_ids: torch.Tensor | None = None  # what the batch sampled last, on the device

    def count_last_tokens(self) -> None:
        """Add the tokens the last step sampled to the penalties' output counts (on the device:
        those tokens may not have reached the host yet)."""
        counts, last = self.batch.output_counts, self.last_token_ids
        if counts is None or last is None:
            return
        counts.scatter_add_(
            1,
            last.view(-1, 1),
            torch.ones((last.numel(), 1), dtype=counts.dtype, device=counts.device),
        )


_DEFAULT_CPU_KV_BYTES = 2 << 30
_WARM_UP_PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
# Larger decode batches are compute-bound: launches no longer dominate and graphs gain little.
_MAX_GRAPH_BATCH = 256


class EngineCore:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        cfg = self.config
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device.torch_device
        self.vocab_size = loaded.config.vocab_size
        eos = set(loaded.config.eos_token_ids)
        if loaded.tokenizer is not None:
            eos |= set(loaded.tokenizer.eos_token_ids)
        self.eos_token_ids = sorted(eos)
        self.max_model_len = min(
            cfg.max_model_len or loaded.config.max_position_embeddings,
            loaded.config.max_position_embeddings,
        )
        num_blocks = num_blocks_for_budget(self.model, cfg.block_size, self._kv_budget())
        graph_batch = 0
        if not cfg.enforce_eager:
            graph_batch = cfg.cuda_graph_max_batch or min(cfg.max_num_seqs, _MAX_GRAPH_BATCH)
        # Loading compiles kernels and captures graphs on CUDA: seconds a person at a terminal
        # should see pass (the bar grows as each stage learns its count).
        warm = self.device.type == "cuda"
        started = time.perf_counter()
        progress = progress_bar(1, "warming kernels and graphs", "step") if warm else None
        # The model's device made current while capturing and warming (the caller's thread may
        # have another one current: graphs and streams made without a device land there).
        # A tensor-parallel model's runner sends each call to the other ranks' workers first.
        make_runner = ModelRunner if loaded.parallel is None else loaded.parallel.runner
        with loaded.device.as_current():
            self.runner = make_runner(
                self.model,
                self.device,
                num_blocks,
                cfg.block_size,
                self.max_model_len,
                graph_batch,
                progress,
            )
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_waiting),
            self.blocks,
        )
        self.sampler = Sampler()
        # Structured outputs need the tokenizer (and llguidance): built on first constraint.
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids)
        self.requests: dict[str, Request] = {}  # live sequences by sequence id
        self.children: dict[str, list[str]] = {}  # request id -> its sequence ids
        self._pending: list[RequestOutput] = []  # finals of aborted sequences, reported next step
        self._in_flight: _InFlight | None = None  # launched, tokens not yet read back
        # Pinned host buffers for grammar masks on CUDA (see _pinned_mask_buffer), made on use.
        self._mask_buffers = [torch.empty((0, 0), dtype=torch.int32)] * 3
        self._mask_ring = 0
        self._sampling: _SamplingState | None = None
        self.overlap = cfg.overlap if cfg.overlap is not None else self.device.type == "cuda"
        self._tokens_generated = 0
        self._generation_rate = RecentRate()
        logger.info("KV cache: %d blocks of %d tokens", num_blocks, cfg.block_size)
        if progress is not None:
            try:
                with loaded.device.as_current():
                    self._warm_up(progress)
            finally:
                progress.close()
            logger.info("kernels warm, graphs captured in %.2f s", time.perf_counter() - started)
            # Everything alive now (model, tokenizer, graphs, torch's and Triton's caches) lives
            # as long as the engine: moved out of the collector's view, a full collection no
            # longer walks it, which otherwise lands as a multi-millisecond pause inside some
            # request's step.
            gc.collect()
            gc.freeze()

    def _warm_up(self, progress: tqdm | None = None) -> None:
        """Compile kernels and touch every first-use path before the first request: the runner's
        step shapes, then one short request through the whole engine (scheduler, sampler,
        output processing), leaving no trace in the prefix cache or the counters. ``progress``
        (its total counts this request) ticks as each part is done."""
        self.runner.warm_up(self.max_model_len, progress)
        prompt = [i % self.vocab_size for i in range(min(64, self.context_limit - 8))]
        if len(prompt) < 1:
            return
        started = time.perf_counter()
        self.add_request("rustinfer-warm-up", prompt, _WARM_UP_PARAMS)
        while self.has_unfinished():
            self.step()
        logger.info("warm-up request through the engine in %.3f s", time.perf_counter() - started)
        if progress is not None:
            progress.update(1)
        self.blocks.reset_prefix_cache()
        self._tokens_generated = 0
        self._generation_rate = RecentRate()

    def _kv_budget(self) -> int:
        if self.device.type == "cpu":
            return self.config.kv_cache_bytes or _DEFAULT_CPU_KV_BYTES
        free, _total = self.loaded.device.memory_info()
        return self.config.kv_cache_bytes or int(free * self.config.gpu_memory_utilization)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    @property
    def context_limit(self) -> int:
        """The most tokens (prompt plus output) one sequence can hold."""
        return min(self.max_model_len, self.kv_capacity_tokens)

    # -- admission ------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request (``n`` sequences); raises before any work if it cannot be served.

        ``arrival_time`` (``time.monotonic()``) is when the request reached the caller, so queue
        time and TTFT include what happened before this call (tokenization, queueing).
        """
        if request_id in self.children:
            raise DuplicateRequestError(
                "request_id", f"request id {request_id!r} is already in use: pick a unique id"
            )
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise InvalidRequestError("prompt", "the prompt is empty: give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                "prompt", f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )
        params.check_vocab(self.vocab_size)
        limit = self.context_limit
        room = limit - len(prompt)
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            asked = params.max_tokens if params.max_tokens is not None else 1
            raise ContextLengthExceededError(
                "max_tokens" if room >= 1 else "prompt",
                f"the prompt has {len(prompt)} tokens and max_tokens is {asked}: "
                f"{len(prompt) + asked} exceeds the context limit of {limit} tokens "
                f"(model {self.max_model_len}, KV cache {self.kv_capacity_tokens}); "
                "shorten the prompt or lower max_tokens",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        matchers = None
        if params.structured is not None:
            grammars = self.grammar_compiler()
            matchers = [grammars.matcher(params.structured) for _ in range(params.n)]
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seq_ids = [request_id] if params.n == 1 else [f"{request_id}#{k}" for k in range(params.n)]
        reqs = []
        for k, seq_id in enumerate(seq_ids):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + k)
            req = Request(
                seq_id, list(prompt), params, max_tokens, arrival, request_id, k, generator=gen
            )
            if k > 0 and self.config.enable_prefix_caching:
                req.prefix_parent = reqs[0]
            if matchers is not None:
                req.matcher = matchers[k]
            reqs.append(req)
        self.scheduler.add(reqs)  # all or none; may raise OverloadedError before any bookkeeping
        for req in reqs:
            self.requests[req.request_id] = req
            self.outputs.add(req)
        self.children[request_id] = seq_ids

    def grammar_compiler(self) -> GrammarCompiler:
        """The compiler of structured-output constraints for this model's tokenizer."""
        with self._grammars_lock:  # the servers' threads and the engine's may ask at once
            return self._grammar_compiler()

    def _grammar_compiler(self) -> GrammarCompiler:
        if self._grammars is None:
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "response_format", "structured outputs need a model with a tokenizer"
                )
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._grammars

    def abort(self, request_id: str) -> bool:
        """Stop every sequence of a request now; its blocks are free before this returns."""
        seq_ids = self.children.get(request_id)
        if seq_ids is None:
            return False
        for seq_id in seq_ids:
            req = self.requests.get(seq_id)
            if req is not None and not req.is_finished:
                self._pending.append(self.outputs.abort(req))
                self._release(Finished(req, RequestStatus.FINISHED_ABORTED))
        return True

    # -- stepping -------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return (
            self.scheduler.num_unfinished > 0 or bool(self._pending) or self._in_flight is not None
        )

    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step; return the outputs that are ready.

        With ``overlap`` (CUDA), a step's sampled tokens stay on the device while the next step is
        scheduled and launched: its decodes read their input tokens from the device, and the
        host reads the tokens back (detokenizes, checks stops) while the GPU runs. A step's
        outputs then come out of the next call. A sequence that stops on a token computes one
        more row that is thrown away; one that reaches max_tokens is not scheduled again.
        """
        outputs, self._pending = self._pending, []
        prev, self._in_flight = self._in_flight, None
        plan = self.scheduler.schedule()
        if prev is not None and (
            not plan.scheduled or not self.overlap or self._needs_known_tokens(plan)
        ):
            outputs.extend(self._finish(prev))
            prev = None
            plan.scheduled = [w for w in plan.scheduled if not w.request.is_finished]
        if not plan.scheduled:
            return outputs
        # A grammar needs the previous token before it can mask this step's logits, but the
        # forward does not: with constrained rows waiting on the step in flight, that step is
        # read back (and their matchers advanced) between this step's forward and its sampler.
        read_back_first = prev is not None and self._grammar_waits_on(plan)
        launched = self._launch(plan, prev, outputs if read_back_first else None)
        if prev is not None and not read_back_first:
            outputs.extend(self._finish(prev))  # while the GPU runs the step just launched
        # After the previous step's tokens are known: the prefix cache hashes what this step
        # computes, which may include the token the previous step sampled.
        self.scheduler.advance(plan)
        for req in launched.reqs:
            if not req.is_finished:
                req.num_pending_tokens = 1
        if self.overlap:
            self._in_flight = launched
        else:
            outputs.extend(self._finish(launched))
        return outputs

    def _grammar_waits_on(self, plan: SchedulerOutput) -> bool:
        """Whether a constrained sequence of ``plan`` waits on the step in flight's token: its
        matcher must see that token before this step's mask (not before its forward)."""
        return any(
            w.request.matcher is not None and w.request.num_pending_tokens
            for w in plan.scheduled
            if w.completes_sequence
        )

    def _needs_known_tokens(self, plan: SchedulerOutput) -> bool:
        """Whether the step in flight must be read back before ``plan`` launches: a sequence
        that waits on a device-side token samples with a rule that reads its output tokens
        (penalties, min_tokens) and the sampling state has to be built afresh (the batch
        changed), so the host needs that token. (A grammar needs it too, but only before the
        sampler: :meth:`step` reads the step back between this one's forward and sampler.)"""
        reqs = [w.request for w in plan.scheduled if w.completes_sequence]
        pending = [r for r in reqs if r.num_pending_tokens]
        if not any(needs_output_history(r.params) for r in pending):
            return False
        cached = self._sampling
        return cached is None or cached.key != sampling_key(reqs)

    def _launch(
        self,
        plan: SchedulerOutput,
        prev: _InFlight | None,
        prev_outputs: list[RequestOutput] | None = None,
    ) -> _InFlight:
        """Run the forward and the sampler of ``plan`` (asynchronously on CUDA; its pending
        decodes read the step in flight ``prev``'s ids) and queue the copy of the sampled tokens
        to the host. With ``prev_outputs``, ``prev`` is read back between the two (its outputs
        appended there) and this step's grammar masks computed."""
        seqs = self._sequences(plan.scheduled, prev.rows if prev is not None else None)
        logits = self.runner.execute(seqs, prev.token_ids if prev is not None else None)
        reqs = [w.request for w in plan.scheduled if w.completes_sequence]
        masks = None
        if prev is not None and prev_outputs is not None:
            masks = self._finish_with_masks(prev, reqs, prev_outputs)
        if not reqs:
            return _InFlight([], {}, None, None)
        rows = {r.request_id: i for i, r in enumerate(reqs)}
        return self._in_flight_of(reqs, rows, self._sample(logits, reqs, masks))

    def _in_flight_of(
        self, reqs: list[Request], rows: dict[str, int], sampled: SamplerOutput
    ) -> _InFlight:
        host = HostTensors(
            [
                sampled.token_ids,
                sampled.logprobs,
                sampled.top_logprob_ids,
                sampled.top_logprobs,
            ],
            self.device,
        )
        return _InFlight(reqs, rows, sampled.token_ids, host)

    def _finish_with_masks(
        self, flight: _InFlight, reqs: list[Request], outputs: list[RequestOutput]
    ) -> np.ndarray | torch.Tensor | None:
        """Read the step in flight back for a step whose rows ``reqs`` sample under grammars:
        advance their matchers with the tokens, compute this step's masks, then turn the tokens
        into outputs (detokenizing, stop strings). The packed masks, or None when no row has a
        grammar left."""
        if flight.host is None:
            return None
        sampled = self._wait(flight)
        tokens = sampled.token_ids.tolist()
        grammar_done: dict[str, bool] = {}
        for row, req in enumerate(flight.reqs):
            if req.matcher is not None and not req.is_finished:
                req.matcher.consume_token(tokens[row])
                grammar_done[req.request_id] = req.matcher.is_stopped()
        # Rows that finish on these tokens (a stop, the grammar's end) still get a mask: their
        # row of this step is thrown away.
        rows = self._grammar_rows(reqs)
        masks = self._fill_masks(*rows) if rows is not None else None
        outputs.extend(self._outputs_of(flight, sampled, grammar_done))
        return masks

    def _fill_masks(
        self, matchers: list[llguidance.LLMatcher | None], executor: llguidance.LLExecutor | None
    ) -> np.ndarray | torch.Tensor:
        """A step's packed masks (:func:`fill_bitmask`); on CUDA into one of the engine's pinned
        buffers, returned as a tensor, which goes up in one asynchronous copy."""
        if self.device.type != "cuda":
            return fill_bitmask(matchers, self.vocab_size, executor)
        buffer = self._pinned_mask_buffer(len(matchers))
        fill_bitmask(matchers, self.vocab_size, executor, buffer.numpy())
        return buffer

    def _pinned_mask_buffer(self, rows: int) -> torch.Tensor:
        """[rows, words] int32 pinned host memory for a step's masks, from a ring of three
        (allocating pinned memory costs more than the masks). Reuse is safe by the engine's
        order of work: a step fills at most once and at most one step is in flight unread, so the
        buffer three fills back served a step whose tokens have reached the host, and that copy
        ran on the stream after the buffer's upload."""
        self._mask_ring = (self._mask_ring + 1) % len(self._mask_buffers)
        buffer = self._mask_buffers[self._mask_ring]
        if buffer.shape[0] < rows:
            words = mask_words(self.vocab_size)
            buffer = torch.empty((max(rows, 16), words), dtype=torch.int32, pin_memory=True)
            self._mask_buffers[self._mask_ring] = buffer
        return buffer[:rows]

    def _grammar_rows(
        self, reqs: list[Request]
    ) -> tuple[list[llguidance.LLMatcher | None], llguidance.LLExecutor | None] | None:
        """The matchers that mask a step's rows ``reqs`` (None for a row without a grammar or
        already finished) and llguidance's executor where several rows compute theirs at once;
        None when no row has one."""
        matchers = [None if r.is_finished else r.matcher for r in reqs]
        if all(m is None for m in matchers):
            return None
        return matchers, self.grammar_compiler().executor if len(reqs) > 1 else None

    def _wait(self, flight: _InFlight) -> SamplerOutput:
        assert flight.host is not None
        token_ids, logprobs, top_ids, top_lps = flight.host.wait()
        assert token_ids is not None
        return SamplerOutput(token_ids, logprobs, top_ids, top_lps)

    def _finish(self, flight: _InFlight) -> list[RequestOutput]:
        """Read a launched step's tokens back and turn them into outputs."""
        if flight.host is None:
            return []
        return self._outputs_of(flight, self._wait(flight))

    def _outputs_of(
        self,
        flight: _InFlight,
        sampled: SamplerOutput,
        grammar_done: Mapping[str, bool] | None = None,
    ) -> list[RequestOutput]:
        new, finished = self.outputs.process(flight.reqs, sampled, grammar_done)
        self._tokens_generated += len(new)
        self._generation_rate.add(len(new))
        for done in finished:
            self._release(done)
        return new

    def _sequences(
        self, scheduled: list[ScheduledWork], prev_rows: Mapping[str, int] | None
    ) -> list[ScheduledSequence]:
        """The runner's view of ``scheduled``; ``prev_rows`` are the rows of the step whose
        sampled ids (still on the device) the pending decodes read."""
        now = time.monotonic()
        seqs = []
        for work in scheduled:
            req = work.request
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            start = req.num_computed_tokens
            table = self.blocks.block_table_view(req.request_id)
            if req.num_pending_tokens:
                # Its one new token is the one the step in flight sampled: read on the device.
                assert prev_rows is not None and work.num_tokens == 1, "a pending token is a decode"
                seq = ScheduledSequence([0], start, table, True, prev_rows[req.request_id])
            else:
                tokens = req.token_ids_between(start, start + work.num_tokens)
                seq = ScheduledSequence(tokens, start, table, work.completes_sequence)
            seqs.append(seq)
        return seqs

    def _sample(
        self,
        logits: torch.Tensor,
        reqs: list[Request],
        masks: np.ndarray | torch.Tensor | None = None,
    ) -> SamplerOutput:
        if all(is_plain_greedy(r.params, r.num_output_tokens) for r in reqs):
            self._sampling = None
            return self.sampler.greedy(logits)
        # The sampling state lives on the device and is rebuilt only when the batch changes:
        # while the same sequences sample in the same order, the token counts the penalties read
        # are brought up to date on the device with the tokens the last step sampled.
        key = sampling_key(reqs)
        cached = self._sampling
        if cached is not None and cached.key == key:
            cached.count_last_tokens()
            batch = cached.batch
        else:
            batch = SamplingBatch.build(
                [r.params for r in reqs],
                [r.prompt_token_ids for r in reqs],
                [r.output_token_ids for r in reqs],
                [r.generator for r in reqs],
                self.eos_token_ids,
                self.vocab_size,
                self.device,
            )
            self._sampling = cached = _SamplingState(key, batch)
        batch.banned = None
        if masks is None and (rows := self._grammar_rows(reqs)) is not None:
            # The grammar's mask is this step's (its matcher has seen every earlier token). A
            # sequence that finished on the token read back just before (a stop, its grammar's
            # end) still has a row here, thrown away: no mask for it.
            masks = self._fill_masks(*rows)
        if masks is not None:
            batch.banned = banned_from_bitmask(masks, self.vocab_size, self.device)
        out = self.sampler(logits, batch)
        cached.last_token_ids = out.token_ids
        return out

    def _release(self, done: Finished) -> None:
        """Free a finished sequence's blocks and forget it; its request goes with its last one."""
        req = done.request
        self.scheduler.finish(req, done.status)
        self.requests.pop(req.request_id, None)
        seq_ids = self.children.get(req.parent_id, [])
        if all(s not in self.requests for s in seq_ids):
            self.children.pop(req.parent_id, None)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last few seconds (safe from any thread)."""
        return self._generation_rate.per_second()

    def stats(self) -> dict[str, float | int]:
        """Counters and gauges as of now; ``tokens_per_second`` is the rate over the last few
        seconds, so it falls back to zero when the engine goes idle."""
        b = self.blocks.stats()
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": b["blocks_used"],
            "kv_blocks_total": b["blocks_total"],
            "prefix_cache_queries": b["prefix_cache_queries"],
            "prefix_cache_hits": b["prefix_cache_hits"],
            "preemptions": self.scheduler.num_preemptions,
            "tokens_generated": self._tokens_generated,
            "tokens_per_second": self.tokens_per_second(),
        }
