"""Prometheus metrics, recorded from the engine's own outputs so every face reports the same.

``EngineMetrics`` is a step observer of the ``AsyncEngine``: after each step the engine thread hands
it that step's outputs, from which it observes TTFT, queue time, inter-token latency, end-to-end
latency and token counts. Gauges (running, waiting, KV usage) are read from the engine when
Prometheus scrapes, so they are never stale. Each server owns its registry, so two servers in one
process (tests) never share counters.
"""

from __future__ import annotations

import threading

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from rustinfer.engine.async_engine import AsyncEngine
from rustinfer.engine.outputs import RequestOutput

__all__ = ["CONTENT_TYPE", "EngineMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets in seconds: from sub-millisecond GPU decode steps to multi-second CPU prefills.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip


class EngineMetrics:
    """Prometheus series for one engine; call ``attach(engine)`` before it starts."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Per-request series carry the face that took the request (rest, grpc, kserve).
        labels = ["model_name", "api"]
        r = self.registry
        self.ttft = Histogram(
            "rustinfer_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            labels, registry=r, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.itl = Histogram(
            "rustinfer_inter_token_latency_seconds",
            "Time between two consecutive generated tokens of one sequence.",
            labels, registry=r, buckets=_ITL_BUCKETS,
        )  # fmt: skip
        self.e2e = Histogram(
            "rustinfer_e2e_request_latency_seconds",
            "Time from arrival to the final token of a sequence.",
            labels, registry=r, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue = Histogram(
            "rustinfer_request_queue_time_seconds",
            "Time a request waited before it was first scheduled.",
            labels, registry=r, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "rustinfer_prompt_tokens", "Prompt tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "rustinfer_generation_tokens", "Tokens generated.", labels, registry=r
        )
        self.success = Counter(
            "rustinfer_request_success",
            "Sequences finished, by finish reason.",
            [*labels, "finished_reason"],
            registry=r,
        )
        engine_labels = ["model_name"]
        self.running = Gauge(
            "rustinfer_num_requests_running",
            "Sequences in the running batch.",
            engine_labels,
            registry=r,
        )
        self.waiting = Gauge(
            "rustinfer_num_requests_waiting",
            "Sequences waiting to start.",
            engine_labels,
            registry=r,
        )
        self.kv_usage = Gauge(
            "rustinfer_kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (0 to 1).",
            engine_labels,
            registry=r,
        )
        self.model_name = model_name
        self._lock = threading.Lock()
        # request id -> [api, sequences still running]; untracked requests count as REST.
        self._api: dict[str, list[str | int]] = {}
        self.requests_total = 0  # sequences finished, for the UI's live panel
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def attach(self, engine: AsyncEngine) -> None:
        """Observe ``engine``'s steps and read its gauges at scrape time."""
        engine.add_observer(self.observe)
        name = self.model_name
        self.running.labels(name).set_function(lambda: engine.stats()["running"])
        self.waiting.labels(name).set_function(lambda: engine.stats()["waiting"])
        self.kv_usage.labels(name).set_function(lambda: engine.stats()["kv_cache_usage"])

    def track(self, request_id: str, api: str, n: int = 1) -> None:
        """Label the ``n`` sequences of ``request_id`` with the face that took it (call before
        submitting it)."""
        with self._lock:
            self._api[request_id] = [api, n]

    def _api_of(self, out: RequestOutput) -> str:
        with self._lock:
            entry = self._api.get(out.request_id)
            if entry is None:
                return "rest"
            if out.finished:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._api[out.request_id]
            return entry[0]

    def forget(self, request_id: str) -> None:
        """Drop a label of a request the engine refused (it will produce no output)."""
        with self._lock:
            self._api.pop(request_id, None)

    def observe(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs (engine thread)."""
        name = self.model_name
        prompt: dict[str, int] = {}
        generated: dict[str, int] = {}
        finished = 0
        for out in outputs:
            api = self._api_of(out)
            t = out.timings
            n_new = len(out.new_token_ids)
            generated[api] = generated.get(api, 0) + n_new
            first = n_new > 0 and out.num_output_tokens == n_new
            if first:
                # A sequence's first token: the prompt has been processed once for it.
                prompt[api] = prompt.get(api, 0) + out.prompt_tokens
                if t.ttft_s is not None:
                    self.ttft.labels(name, api).observe(t.ttft_s)
                if t.queue_s is not None:
                    self.queue.labels(name, api).observe(t.queue_s)
            for gap in out.inter_token_s:
                self.itl.labels(name, api).observe(gap)
            if out.finished:
                finished += 1
                self.success.labels(name, api, out.finish_reason or "unknown").inc()
                if t.e2e_s is not None:
                    self.e2e.labels(name, api).observe(t.e2e_s)
        for api, count in prompt.items():
            if count:
                self.prompt_tokens.labels(name, api).inc(count)
        for api, count in generated.items():
            if count:
                self.generation_tokens.labels(name, api).inc(count)
        with self._lock:
            self.prompt_tokens_total += sum(prompt.values())
            self.generation_tokens_total += sum(generated.values())
            self.requests_total += finished

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {
                "requests_total": self.requests_total,
                "prompt_tokens_total": self.prompt_tokens_total,
                "generation_tokens_total": self.generation_tokens_total,
            }

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)
