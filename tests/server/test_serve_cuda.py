"""``rustinfer serve`` on a GPU: graphs captured in the loader thread, replayed in the engine
thread, under concurrent clients; a clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch
from server_helpers import start_server

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

CONFIG = Path(__file__).parents[2] / "bench" / "configs" / "llama-3.2-1b" / "config.json"


def test_serve_on_cuda_answers_concurrent_clients(tmp_path) -> None:
    server = start_server(
        tmp_path,
        "--model", str(CONFIG), "--load-format", "dummy", "--dtype", "bfloat16",
        "--max-num-seqs", "16",
        device="cuda",
    )  # fmt: skip
    try:
        body = {"prompt": list(range(100, 160)), "max_tokens": 24, "ignore_eos": True,
                "temperature": 0}  # fmt: skip
        with httpx.Client(base_url=server.url, timeout=120) as c:
            whole = c.post("/v1/completions", json=body).json()
            assert whole["usage"]["completion_tokens"] == 24
            assert whole["choices"][0]["finish_reason"] == "length"

        async def stream_one(c: httpx.AsyncClient) -> tuple[int, str | None, str]:
            req = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with c.stream("POST", "/v1/completions", json=req) as r:
                assert r.status_code == 200
                lines = [line async for line in r.aiter_lines() if line]
            events = [json.loads(x[6:]) for x in lines[:-1]]
            finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
            return events[-1]["usage"]["completion_tokens"], finish[-1], lines[-1]

        async def main() -> list[tuple[int, str | None, str]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                return await asyncio.gather(*(stream_one(c) for _ in range(16)))

        # Sixteen at once: padded graph batches. (Random bf16 weights give near-tied logits, so
        # texts may differ with the batch's shape; graphed-against-eager equality is
        # tests/test_cuda_graphs.py's job.)
        for tokens, finish, last in asyncio.run(main()):
            assert (tokens, finish, last) == (24, "length", "data: [DONE]")
        stats = server.wait_idle()
        assert stats["kv_cache_usage_perc"] == 0
    finally:
        code = server.stop()
    assert code == 0, server.log()
    assert "capture failed" not in server.log()  # the decode steps above ran on graphs
