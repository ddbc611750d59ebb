"""``rustinfer serve --tensor-parallel-size 2`` on the CPU (gloo): it answers the OpenAI SDK as one
rank does, and a worker that dies makes it report unhealthy and exit, leaving no process behind."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import psutil
from server_helpers import LiveServer, start_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _workers(pid: int) -> list[psutil.Process]:
    """The server's tensor-parallel workers: its children started by multiprocessing's spawn."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # a short-lived helper that already exited
            continue
    return found


def _tp2_server(tmp_path: Path) -> tuple[LiveServer, list[psutil.Process]]:
    """The embedded model served at TP=2 (dense float32), and its one worker process."""
    server = start_server(
        tmp_path, "--tensor-parallel-size", "2", "--quantization", "none", "--dtype", "float32"
    )
    workers = _workers(server.process.pid)
    assert len(workers) == 1, server.log()
    return server, workers


def _answer(url: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=QUESTION, max_tokens=24, temperature=0
    )
    return out.choices[0].message.content or ""


def test_tensor_parallel_server_answers_and_dies_cleanly_with_a_worker(tmp_path, live_server):
    server, workers = _tp2_server(tmp_path)
    try:
        answer = _answer(server.url)
        assert "Paris" in answer
        # One rank's answer: the shared server's (the same model, dense float32, greedy).
        assert _answer(live_server.url) == answer

        workers[0].kill()
        deadline = time.monotonic() + 10
        status = 200
        while status == 200 and time.monotonic() < deadline:
            try:
                status = httpx.get(server.url + "/health", timeout=2).status_code
            except httpx.HTTPError:
                break  # already gone
            time.sleep(0.1)
        assert status != 200, "the server stayed healthy without its worker"
        code = server.process.wait(timeout=60)
        assert code != 0
        assert "tensor-parallel worker rank 1" in server.log()
        assert not _running(workers[0])
    finally:
        server.stop()


def test_tensor_parallel_server_stops_with_its_workers(tmp_path):
    server, workers = _tp2_server(tmp_path)
    code = server.stop()  # SIGTERM: a clean shutdown
    assert code == 0, server.log()
    gone = time.monotonic() + 15
    while time.monotonic() < gone and any(_running(w) for w in workers):
        time.sleep(0.1)
    assert not any(_running(w) for w in workers), "a worker outlived the server"


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
