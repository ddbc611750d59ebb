"""From sampled ids to what a client sees: detokenize, stop conditions, logprobs, timings.

``EngineCore`` hands each step's sampled tokens here; this module decides which sequences finished
and why, and builds their ``RequestOutput``s. It never touches the scheduler or the KV cache: it
returns the sequences that finished, and the core releases them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from rustinfer.detokenizer import IncrementalDetokenizer
from rustinfer.engine.outputs import RequestOutput, RequestTimings, TokenLogprob, TopLogprob
from rustinfer.engine.request import Request, RequestStatus
from rustinfer.engine.sampler import SamplerOutput
from rustinfer.engine.stop import StopStringMatcher
from rustinfer.tokenizer import Tokenizer

__all__ = ["Finished", "OutputProcessor"]


class _SequenceState:
    """Per-sequence text state: detokenizer, stop-string matcher, the ids that end it."""

    def __init__(
        self, request: Request, tokenizer: Tokenizer | None, eos_token_ids: list[int]
    ) -> None:
        p = request.params
        self.detok = IncrementalDetokenizer(tokenizer, p.skip_special_tokens) if tokenizer else None
        self.stop = StopStringMatcher(p.stop, p.include_stop_str_in_output) if p.stop else None
        self.stop_ids = set(p.stop_token_ids)
        self.eos_ids = set() if p.ignore_eos else set(eos_token_ids)
        self.last_token_time: float | None = None


@dataclass
class Finished:
    """A sequence this step ended, for the core to release."""

    request: Request
    status: RequestStatus


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._state: dict[str, _SequenceState] = {}

    def add(self, request: Request) -> None:
        self._state[request.request_id] = _SequenceState(
            request, self.tokenizer, self.eos_token_ids
        )

    # -- one step's tokens ---------------------------------------------------------------------

    def process(
        self,
        requests: list[Request],
        sampled: SamplerOutput,
        grammar_done: Mapping[str, bool] | None = None,
    ) -> tuple[list[RequestOutput], list[Finished]]:
        """Append each row's sampled token to its request and report it; rows are ``requests``.

        ``sampled`` holds host tensors (the engine copies them from the device without a wait).
        A row whose request finished meanwhile (it was aborted, or it stopped on the token before
        while this step was in flight) is dropped. ``grammar_done``: requests (by id) whose
        matcher the engine has already advanced with this token (before computing the next step's
        masks), and whether that completed the grammar; those matchers are not advanced again.
        """
        now = time.monotonic()
        token_ids = sampled.token_ids.tolist()
        logprobs = sampled.logprobs.tolist() if sampled.logprobs is not None else None
        top_ids = sampled.top_logprob_ids.tolist() if sampled.top_logprob_ids is not None else None
        top_lps = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
        outputs: list[RequestOutput] = []
        finished: list[Finished] = []
        for row, req in enumerate(requests):
            req.num_pending_tokens = 0
            if req.is_finished:
                continue
            token = token_ids[row]
            req.output_token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            lp = None
            if logprobs is not None and req.params.logprobs is not None:
                k = req.params.logprobs
                top = list(zip(top_ids[row][:k], top_lps[row][:k], strict=True)) if top_ids else []
                lp = [self._logprob(token, logprobs[row], top)]
            done = grammar_done.get(req.request_id) if grammar_done else None
            out, status = self._process_token(req, token, lp, now, done)
            outputs.append(out)
            if status is not None:
                finished.append(Finished(req, status))
        return outputs, finished

    def _logprob(self, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        text, raw = self._token_text(token)
        alternatives = [TopLogprob(t, *self._token_text(t), lp) for t, lp in top]
        return TokenLogprob(token, logprob, text, raw, alternatives)

    def _token_text(self, token: int) -> tuple[str, bytes]:
        if self.tokenizer is None:
            return "", b""
        raw = self.tokenizer.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), raw

    def _process_token(
        self,
        req: Request,
        token: int,
        lp: list[TokenLogprob] | None,
        now: float,
        grammar_done: bool | None = None,
    ) -> tuple[RequestOutput, RequestStatus | None]:
        st = self._state[req.request_id]
        n_out = len(req.output_token_ids)
        may_stop = n_out >= req.params.min_tokens
        if may_stop and token in st.stop_ids:
            return self._final(req, RequestStatus.FINISHED_STOPPED, [token], "", token, lp, now)
        if may_stop and token in st.eos_ids:
            return self._final(req, RequestStatus.FINISHED_STOPPED, [token], "", None, lp, now)
        delta = st.detok.add(token) if st.detok else ""
        matcher = req.matcher
        if matcher is not None:
            if grammar_done is None:  # not advanced by the engine yet
                matcher.consume_token(token)
                grammar_done = matcher.is_stopped()
            if grammar_done:
                # The grammar is complete and allows nothing more: the output is whole.
                return self._final(
                    req, RequestStatus.FINISHED_STOPPED, [token], delta, None, lp, now
                )
        if st.stop is not None and may_stop:
            delta, matched = st.stop.feed(delta)
            if matched:
                stop = st.stop.matched_stop
                return self._final(
                    req, RequestStatus.FINISHED_STOPPED, [token], delta, stop, lp, now
                )
        if n_out >= req.max_tokens:
            return self._final(req, RequestStatus.FINISHED_LENGTH, [token], delta, None, lp, now)
        return self._output(req, [token], delta, lp, now), None

    # -- finishing -----------------------------------------------------------------------------

    def abort(self, req: Request) -> RequestOutput:
        """The final output of a sequence stopped from outside (client gone, shutdown)."""
        out, _ = self._final(
            req, RequestStatus.FINISHED_ABORTED, [], "", None, None, time.monotonic()
        )
        return out

    def _final(
        self,
        req: Request,
        status: RequestStatus,
        tokens: list[int],
        delta: str,
        stop_reason: str | int | None,
        lp: list[TokenLogprob] | None,
        now: float,
    ) -> tuple[RequestOutput, RequestStatus]:
        st = self._state.pop(req.request_id)
        if not isinstance(stop_reason, str):  # a matched stop string has already cut the text
            # Text held back (a partial character, a possible stop-string start) is released.
            tail = st.detok.flush() if st.detok else ""
            if st.stop is not None:
                more, matched = st.stop.feed(tail)
                delta += more if matched else more + st.stop.flush()
            else:
                delta += tail
        out = self._build(st, req, tokens, delta, lp, now)
        out.finished, out.finish_reason, out.stop_reason = True, status.value, stop_reason
        out.timings.e2e_s = now - req.arrival_time
        return out, status

    def _output(
        self, req: Request, tokens: list[int], delta: str, lp: list[TokenLogprob] | None, now: float
    ) -> RequestOutput:
        return self._build(self._state[req.request_id], req, tokens, delta, lp, now)

    @staticmethod
    def _build(
        st: _SequenceState,
        req: Request,
        tokens: list[int],
        delta: str,
        lp: list[TokenLogprob] | None,
        now: float,
    ) -> RequestOutput:
        intervals = []
        if tokens:
            if st.last_token_time is not None:
                intervals.append(now - st.last_token_time)
            st.last_token_time = now
        t = RequestTimings()
        if req.first_scheduled_time is not None:
            t.queue_s = req.first_scheduled_time - req.arrival_time
        if req.first_token_time is not None:
            t.ttft_s = req.first_token_time - req.arrival_time
            t.prefill_s = req.first_token_time - (req.first_scheduled_time or req.arrival_time)
            t.decode_s = now - req.first_token_time
        return RequestOutput(
            request_id=req.parent_id,
            index=req.index,
            new_token_ids=tokens,
            text_delta=delta,
            logprobs=lp,
            prompt_tokens=len(req.prompt_token_ids),
            cached_tokens=req.num_cached_tokens,
            timings=t,
            inter_token_s=intervals,
            num_output_tokens=len(req.output_token_ids),
        )
