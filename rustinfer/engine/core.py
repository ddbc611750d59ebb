"""The engine core: admit requests, run scheduled steps, sample, detokenize, finish.

Synchronous and single-threaded by design: the asyncio face runs it in its own thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rustinfer.detokenizer import IncrementalDetokenizer
from rustinfer.engine.block_manager import BlockManager
from rustinfer.engine.model_runner import (
    DEFAULT_BLOCK_SIZE,
    ModelRunner,
    ScheduledSequence,
    num_blocks_for_budget,
)
from rustinfer.engine.outputs import RequestOutput, RequestTimings, TokenLogprob
from rustinfer.engine.request import Request, RequestStatus
from rustinfer.engine.sampler import Sampler, SamplerOutput, SamplingBatch
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.engine.scheduler import ScheduledWork, Scheduler, SchedulerConfig
from rustinfer.engine.stop import StopStringMatcher
from rustinfer.errors import InvalidRequestError
from rustinfer.runtime.loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    max_model_len: int | None = None  # None: the model's own limit
    kv_cache_bytes: int | None = None  # CPU budget for the KV cache (default 2 GiB)
    gpu_memory_utilization: float = 0.9  # on CUDA: this fraction of free memory holds the cache
    enable_prefix_caching: bool = True


_DEFAULT_CPU_KV_BYTES = 2 << 30


class _SequenceState:
    """Per-sequence text state: detokenizer, stop-string matcher, the ids that end it."""

    def __init__(self, engine: EngineCore, request: Request, parent_id: str, index: int) -> None:
        p = request.params
        self.parent_id = parent_id
        self.index = index
        tok = engine.tokenizer
        self.detok = IncrementalDetokenizer(tok, p.skip_special_tokens) if tok else None
        self.stop = StopStringMatcher(p.stop, p.include_stop_str_in_output) if p.stop else None
        self.stop_ids = set(p.stop_token_ids)
        self.eos_ids = set() if p.ignore_eos else set(engine.eos_token_ids)


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
        self.runner = ModelRunner(self.model, self.device, num_blocks, cfg.block_size)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_waiting),
            self.blocks,
        )
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}  # live sequences by sequence id
        self.children: dict[str, list[str]] = {}  # request id -> its sequence ids
        self._state: dict[str, _SequenceState] = {}
        self._pending: list[RequestOutput] = []  # finals of aborted sequences, reported next step
        self._tokens_generated = 0
        self._started = time.monotonic()
        logger.info("KV cache: %d blocks of %d tokens", num_blocks, cfg.block_size)

    def _kv_budget(self) -> int:
        if self.device.type == "cpu":
            return self.config.kv_cache_bytes or _DEFAULT_CPU_KV_BYTES
        free, _total = self.loaded.device.memory_info()
        return self.config.kv_cache_bytes or int(free * self.config.gpu_memory_utilization)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    # -- admission ------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        """Queue a request (``n`` sequences); raises before any work if it cannot be served."""
        if request_id in self.children:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise InvalidRequestError("prompt", "the prompt is empty: give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                "prompt", f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )
        params.check_vocab(self.vocab_size)
        limit = min(self.max_model_len, self.kv_capacity_tokens)
        room = limit - len(prompt)
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            asked = params.max_tokens if params.max_tokens is not None else 1
            raise InvalidRequestError(
                "max_tokens",
                f"the prompt has {len(prompt)} tokens and max_tokens is {asked}: "
                f"{len(prompt) + asked} exceeds the context limit of {limit} tokens "
                f"(model {self.max_model_len}, KV cache {self.kv_capacity_tokens})",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        seq_ids = [request_id] if params.n == 1 else [f"{request_id}#{k}" for k in range(params.n)]
        for k, seq_id in enumerate(seq_ids):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + k)
            req = Request(seq_id, list(prompt), params, max_tokens, generator=gen)
            if k > 0 and self.config.enable_prefix_caching:
                req.prefix_parent = self.requests[seq_ids[0]]
            self.scheduler.add(req)  # may raise OverloadedError: nothing was registered yet
            self.requests[seq_id] = req
            self._state[seq_id] = _SequenceState(self, req, request_id, k)
        self.children[request_id] = seq_ids

    def abort(self, request_id: str) -> bool:
        """Stop every sequence of a request now; its blocks are free before this returns."""
        seq_ids = self.children.get(request_id)
        if seq_ids is None:
            return False
        for seq_id in seq_ids:
            req = self.requests.get(seq_id)
            if req is not None and not req.is_finished:
                self._pending.append(
                    self._finish(req, RequestStatus.FINISHED_ABORTED, [], "", None)
                )
        return True

    # -- stepping -------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return outputs
        now = time.monotonic()
        seqs = []
        for work in plan.scheduled:
            req = work.request
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            start = req.num_computed_tokens
            seqs.append(
                ScheduledSequence(
                    req.all_token_ids[start : start + work.num_tokens],
                    start,
                    self.blocks.block_table(req.request_id),
                    needs_logits=work.completes_sequence,
                )
            )
        logits = self.runner.execute(seqs)
        sampling = [w for w in plan.scheduled if w.completes_sequence]
        sampled = self._sample(logits, sampling) if sampling else None
        for work in plan.scheduled:
            req = work.request
            req.num_computed_tokens += work.num_tokens
            self.blocks.commit_computed(req.request_id, req.all_token_ids, req.num_computed_tokens)
        if sampled is not None:
            outputs.extend(self._append_tokens(sampling, sampled))
        return outputs

    def _sample(self, logits: torch.Tensor, works: list[ScheduledWork]) -> SamplerOutput:
        reqs = [w.request for w in works]
        batch = SamplingBatch.build(
            [r.params for r in reqs],
            [r.prompt_token_ids for r in reqs],
            [r.output_token_ids for r in reqs],
            [r.generator for r in reqs],
            self.eos_token_ids,
            self.vocab_size,
            self.device,
        )
        return self.sampler(logits, batch)

    def _append_tokens(self, works: list[ScheduledWork], out: SamplerOutput) -> list[RequestOutput]:
        now = time.monotonic()
        token_ids = out.token_ids.tolist()  # the one device -> host copy of the step
        logprobs = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_logprob_ids.tolist() if out.top_logprob_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        results = []
        for row, work in enumerate(works):
            req = work.request
            token = token_ids[row]
            req.output_token_ids.append(token)
            self._tokens_generated += 1
            if req.first_token_time is None:
                req.first_token_time = now
            lp = None
            if logprobs is not None and req.params.logprobs is not None:
                k = req.params.logprobs
                top = dict(zip(top_ids[row][:k], top_lps[row][:k], strict=True)) if top_ids else {}
                lp = [TokenLogprob(token, logprobs[row], top)]
            results.append(self._process_token(req, token, lp))
        return results

    def _process_token(
        self, req: Request, token: int, lp: list[TokenLogprob] | None
    ) -> RequestOutput:
        st = self._state[req.request_id]
        n_out = len(req.output_token_ids)
        may_stop = n_out >= req.params.min_tokens
        if may_stop and token in st.stop_ids:
            return self._finish(req, RequestStatus.FINISHED_STOPPED, [token], "", token, lp)
        if may_stop and token in st.eos_ids:
            return self._finish(req, RequestStatus.FINISHED_STOPPED, [token], "", None, lp)
        delta = st.detok.add(token) if st.detok else ""
        if st.stop is not None and may_stop:
            delta, matched = st.stop.feed(delta)
            if matched:
                return self._finish(
                    req, RequestStatus.FINISHED_STOPPED, [token], delta, st.stop.matched_stop, lp
                )
        if n_out >= req.max_tokens:
            return self._finish(req, RequestStatus.FINISHED_LENGTH, [token], delta, None, lp)
        return self._output(req, [token], delta, lp)

    def _finish(
        self,
        req: Request,
        status: RequestStatus,
        tokens: list[int],
        delta: str,
        stop_reason: str | int | None,
        lp: list[TokenLogprob] | None = None,
    ) -> RequestOutput:
        st = self._state[req.request_id]
        if not isinstance(stop_reason, str):  # a matched stop string has already cut the text
            # Text held back (a partial character, a possible stop-string start) is released.
            tail = st.detok.flush() if st.detok else ""
            if st.stop is not None:
                more, matched = st.stop.feed(tail)
                delta += more if matched else more + st.stop.flush()
            else:
                delta += tail
        self.scheduler.finish(req, status)
        out = self._output(req, tokens, delta, lp)
        out.finished, out.finish_reason, out.stop_reason = True, status.value, stop_reason
        self._forget(req)
        return out

    def _forget(self, req: Request) -> None:
        st = self._state.pop(req.request_id)
        self.requests.pop(req.request_id, None)
        seq_ids = self.children.get(st.parent_id, [])
        if all(s not in self.requests for s in seq_ids):
            self.children.pop(st.parent_id, None)

    def _output(
        self, req: Request, tokens: list[int], delta: str, lp: list[TokenLogprob] | None
    ) -> RequestOutput:
        st = self._state[req.request_id]
        now = time.monotonic()
        t = RequestTimings()
        if req.first_scheduled_time is not None:
            t.queue_s = req.first_scheduled_time - req.arrival_time
        if req.first_token_time is not None:
            t.ttft_s = req.first_token_time - req.arrival_time
            t.prefill_s = req.first_token_time - (req.first_scheduled_time or req.arrival_time)
            t.decode_s = now - req.first_token_time
        return RequestOutput(
            request_id=st.parent_id,
            index=st.index,
            new_token_ids=tokens,
            text_delta=delta,
            logprobs=lp,
            prompt_tokens=len(req.prompt_token_ids),
            cached_tokens=req.num_cached_tokens,
            timings=t,
        )

    def stats(self) -> dict[str, float | int]:
        b = self.blocks.stats()
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": b["blocks_used"],
            "kv_blocks_total": b["blocks_total"],
            "prefix_cache_queries": b["prefix_cache_queries"],
            "prefix_cache_hits": b["prefix_cache_hits"],
            "preemptions": self.scheduler.num_preemptions,
            "tokens_generated": self._tokens_generated,
            "tokens_per_second": self._tokens_generated / elapsed,
        }
