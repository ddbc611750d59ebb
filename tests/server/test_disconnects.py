"""A client that goes away aborts its request: streaming or not; queued, in prefill or in decode.

Each case checks the engine's own gauges over ``/v1/metrics``: the request leaves the running
(or waiting) set long before it could have finished, and its KV blocks are freed.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from server_helpers import LiveServer, running_server

# Long enough that finishing instead of aborting would take minutes on the CPU.
ENDLESS = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}
QUESTION = [{"role": "user", "content": "Write a long story about a dragon."}]
ABORT_DEADLINE_S = 10.0  # generous for a loaded CI box; finishing would take far longer


def wait_for(server: LiveServer, key: str, value: int, timeout_s: float = ABORT_DEADLINE_S):
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.engine_stats()
        if stats[key] == value:
            return stats
        assert time.monotonic() < deadline, f"{key} never became {value}: {stats}"
        time.sleep(0.02)


def stream_until(server: LiveServer, body: dict, content_chunks: int) -> None:
    """Open a streaming request, read ``content_chunks`` text chunks, then drop the connection."""
    with (
        httpx.Client(base_url=server.url, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            seen += bool(delta.get("content"))
            if seen >= content_chunks:
                break
    # Leaving the block closes the socket mid-stream.


@pytest.fixture(scope="module")
def single_seat(tmp_path_factory) -> LiveServer:
    """One sequence at a time, so a second request queues."""
    with running_server(tmp_path_factory.mktemp("seat"), "--max-num-seqs", "1") as server:
        yield server


def test_streaming_client_gone_in_decode(live_server: LiveServer) -> None:
    before = live_server.wait_idle()
    stream_until(live_server, {"messages": QUESTION, "stream": True, **ENDLESS}, 3)
    after = wait_for(live_server, "running", before["running"])
    assert after["kv_cache_usage_perc"] == 0


def test_waiting_client_gone_in_decode(live_server: LiveServer) -> None:
    live_server.wait_idle()
    body = {"messages": QUESTION, **ENDLESS}
    with httpx.Client(base_url=live_server.url) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=2.0))
    stats = wait_for(live_server, "running", 0)
    assert stats["kv_cache_usage_perc"] == 0


def test_client_gone_during_prefill(live_server: LiveServer) -> None:
    """A prompt of several thousand tokens prefills in chunks over several steps; dropping the
    connection during the first one ends the request after that step."""
    generated = live_server.wait_idle()["generation_tokens_total"]
    long_prompt = "word " * 6000
    body = {"messages": [{"role": "user", "content": long_prompt}], "stream": True, **ENDLESS}
    body["max_tokens"] = 100
    opened = threading.Event()

    def client() -> None:
        with (
            httpx.Client(base_url=live_server.url, timeout=60) as c,
            c.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            assert r.status_code == 200
            next(r.iter_lines())  # the role chunk: the request is in the engine
            opened.set()
            time.sleep(0.3)  # still prefilling: 6000 tokens take seconds on the CPU

    t = threading.Thread(target=client)
    t.start()
    assert opened.wait(30)
    t.join()
    stats = wait_for(live_server, "running", 0, timeout_s=30)
    assert stats["kv_cache_usage_perc"] == 0
    # Nothing was generated for it: the abort came before its first token.
    assert stats["generation_tokens_total"] == generated


def test_queued_client_gone_leaves_the_running_one_alone(single_seat: LiveServer) -> None:
    single_seat.wait_idle()
    results: dict[str, object] = {}
    first_started = threading.Event()

    def first() -> None:
        # Long enough to outlast the second client's 1 s wait at any CPU speed seen (600 tokens:
        # ~5 s at the quantized path's ~120 tok/s on 2 cores; 60 ended before the check).
        body = {"messages": QUESTION, "stream": True, **ENDLESS, "max_tokens": 600}
        with (
            httpx.Client(base_url=single_seat.url, timeout=120) as c,
            c.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            lines = []
            for line in r.iter_lines():
                if not line:
                    continue  # the blank line after each event
                lines.append(line)
                if '"content": "' in line and '"content": ""' not in line:
                    first_started.set()
            results["first"] = lines

    t = threading.Thread(target=first)
    t.start()
    assert first_started.wait(60)
    # The second request queues behind the first (one seat); its client gives up while waiting.
    with httpx.Client(base_url=single_seat.url) as c, pytest.raises(httpx.ReadTimeout):
        c.post(
            "/v1/chat/completions",
            json={"messages": QUESTION, **ENDLESS},
            timeout=httpx.Timeout(60, read=1.0),
        )
    stats = wait_for(single_seat, "waiting", 0)
    assert stats["running"] == 1  # the first request is untouched
    t.join(120)
    lines = results["first"]
    assert lines[-1] == "data: [DONE]"
    finals = [json.loads(x[6:]) for x in lines if '"finish_reason": "length"' in x]
    assert len(finals) == 1
    single_seat.wait_idle()
