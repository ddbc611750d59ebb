"""Load on the CPU with the embedded model: many streaming clients at once, and back-pressure."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest
from server_helpers import LiveServer, running_server

PROMPTS = [
    "What is the capital of France?",
    "Name a primary color.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What animal says moo?",
    "Name a planet.",
    "What is the opposite of hot?",
    "What color is the sky?",
]
MAX_TOKENS = 12


def chat_body(prompt: str, stream: bool) -> dict:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream": stream,
    }


def test_64_concurrent_streaming_clients_get_the_right_text(live_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0)
    # One request at a time first: what each prompt's greedy answer is.
    expected = {
        p: client.chat.completions.create(
            model="SmolLM2-135M-Instruct", **{k: v for k, v in chat_body(p, False).items()}
        )
        .choices[0]
        .message.content
        for p in PROMPTS
    }

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> tuple[str, str, str | None]:
        stream = await aclient.chat.completions.create(
            model="SmolLM2-135M-Instruct", **chat_body(prompt, True)
        )
        parts, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return prompt, "".join(parts), finish

    async def main() -> list[tuple[str, str, str | None]]:
        async with openai.AsyncOpenAI(
            base_url=live_server.url + "/v1", api_key="x", max_retries=0, timeout=300
        ) as aclient:
            return await asyncio.gather(*(one(aclient, PROMPTS[i % 8]) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    wrong = [(p, text, expected[p]) for p, text, _ in results if text != expected[p]]
    assert not wrong, wrong[:3]
    assert all(finish in ("stop", "length") for _, _, finish in results)
    stats = live_server.wait_idle()
    assert stats["kv_cache_usage_perc"] == 0


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory) -> LiveServer:
    with running_server(
        tmp_path_factory.mktemp("queue"), "--max-queue", "16", "--max-num-seqs", "4"
    ) as server:
        yield server


def test_200_at_once_against_a_queue_of_16(small_queue: LiveServer) -> None:
    ready_codes: list[int] = []
    done = threading.Event()

    def watch_ready() -> None:
        with httpx.Client(base_url=small_queue.url, timeout=10) as c:
            while not done.is_set():
                ready_codes.append(c.get("/ready").status_code)

    watcher = threading.Thread(target=watch_ready)
    watcher.start()

    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, str, dict]:
        body = chat_body(PROMPTS[i % 8], True)
        body["max_tokens"] = 4
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            raw = (await r.aread()).decode()
            return r.status_code, raw, dict(r.headers)

    async def main() -> list[tuple[int, str, dict]]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=small_queue.url, timeout=300, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(200)))

    try:
        results = asyncio.run(main())
    finally:
        done.set()
        watcher.join()
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 429}, set(codes)
    assert codes.count(429) > 0 and codes.count(200) >= 16
    for code, raw, headers in results:
        if code == 429:
            err = json.loads(raw)["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "overloaded"
            assert int(headers["retry-after"]) >= 1
        else:
            assert raw.endswith("data: [DONE]\n\n") and '"finish_reason": "' in raw
            assert '"error"' not in raw
    assert ready_codes and set(ready_codes) == {200}
    stats = small_queue.wait_idle()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["kv_cache_usage_perc"] == 0
