"""``rustinfer bench serve``: the server under N concurrent streaming clients, beside the offline
``LLM`` on the same prompts in the same run.

Both sides get the same random prompts (token ids, EOS ignored, so every request makes exactly
``--output-len`` tokens) and the same engine limits. They run one after the other, never at once:
on a small CPU two torch processes fight over the cores and both measure wrong. The clients are
closed-loop: each of the ``--concurrency`` clients sends its next request when the last one ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rustinfer.cli.common import add_model_options, apply_threads

__all__ = ["add_serve_parser"]


def add_serve_parser(bench_sub: Any) -> None:
    p = bench_sub.add_parser(
        "serve", help="serving throughput and latency under concurrent streaming clients"
    )
    add_model_options(p)
    p.add_argument("--concurrency", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--num-prompts", type=int, default=64, help="requests in all")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens of each request")
    p.add_argument("--output-len", type=int, default=64, help="generated tokens (EOS ignored)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: --concurrency")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--url", default=None, help="drive this running server instead of starting one")
    p.add_argument("--skip-offline", action="store_true", help="do not run the offline peer")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="alternate offline and served runs this many times; medians are reported (a shared "
        "CPU drifts by 10-20%% over minutes, which a single pair cannot tell from a real gap)",
    )
    p.add_argument(
        "--api",
        choices=("rest", "grpc", "both"),
        default="rest",
        help="which face the clients use: REST (SSE), gRPC (rustinfer.v1 Generate streams), or "
        "both against the same server, one after the other",
    )
    p.add_argument("--grpc-url", default=None, help="with --url: the server's gRPC host:port")
    p.add_argument("--json", action="store_true", help="print one JSON line with the result last")
    p.set_defaults(func=run_serve_bench)


@dataclass
class _RequestTiming:
    ttft_s: float
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(args: argparse.Namespace) -> tuple[list[list[int]], Any]:
    """Random prompts from the model's own vocabulary; the loaded model is freed by the caller."""
    from rustinfer.cli.bench import random_prompt
    from rustinfer.runtime.loading import load_model_from

    loaded = load_model_from(args)
    prompts = [
        random_prompt(loaded, args.input_len, args.seed + i) for i in range(args.num_prompts)
    ]
    return prompts, loaded


def _offline(loaded: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    from rustinfer.cli.bench import timed_offline_run
    from rustinfer.engine.core import EngineConfig, EngineCore

    engine = EngineCore(loaded, EngineConfig(max_num_seqs=args.max_num_seqs))
    generated, elapsed = timed_offline_run(engine, prompts, args.output_len)
    return {
        "offline_output_tok_s": round(generated / elapsed, 2),
        "offline_requests_per_s": round(len(prompts) / elapsed, 3),
        "offline_elapsed_s": round(elapsed, 3),
    }


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str, str]:
    port, grpc_port = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "rustinfer", "serve", "--port", str(port)]
    cmd += ["--grpc-port", str(grpc_port)]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--load-format", args.load_format]
    cmd += ["--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(args.num_prompts + 16)]
    cmd += ["--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return proc, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"


async def _wait_ready(url: str, proc: subprocess.Popen[bytes] | None) -> None:
    import httpx

    deadline = time.monotonic() + 300
    async with httpx.AsyncClient(timeout=5) as c:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{err[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get(url + "/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the server at {url} was not ready within 300 s")


async def _one(client: Any, url: str, prompt: list[int], output_len: int) -> _RequestTiming:
    body = {
        "prompt": prompt,
        "max_tokens": output_len,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    last = None
    timing: _RequestTiming | None = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"request failed: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            now = time.perf_counter()
            if timing is None:
                timing = _RequestTiming(now - start)
            elif last is not None:
                timing.gaps_s.append(now - last)
            last = now
            timing.tokens += 1
    if timing is None:
        raise RuntimeError("a stream ended without any token")
    return timing


async def _one_grpc(stub: Any, prompt: list[int], output_len: int) -> _RequestTiming:
    """One rustinfer.v1 Generate stream; a message may carry several tokens (the engine merges
    a slow reader's outputs), each counted."""
    from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2 as pb

    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0),
    )
    start = time.perf_counter()
    last = None
    timing: _RequestTiming | None = None
    async for response in stub.Generate(request):
        if not response.HasField("chunk") or not response.chunk.token_ids:
            continue
        now = time.perf_counter()
        if timing is None:
            timing = _RequestTiming(now - start)
        elif last is not None:
            timing.gaps_s.append(now - last)
        last = now
        timing.tokens += len(response.chunk.token_ids)
    if timing is None:
        raise RuntimeError("a stream ended without any token")
    return timing


async def _drive(url: str, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await _closed_loop(
            lambda prompt, n: _one(client, url, prompt, n), prompts, args, "serve"
        )


async def _drive_grpc(
    target: str, prompts: list[list[int]], args: argparse.Namespace
) -> dict[str, Any]:
    import grpc

    from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return await _closed_loop(
            lambda prompt, n: _one_grpc(stub, prompt, n), prompts, args, "grpc"
        )


async def _closed_loop(
    one: Any, prompts: list[list[int]], args: argparse.Namespace, prefix: str
) -> dict[str, Any]:
    """``--concurrency`` clients, each sending its next request when the last one ends."""
    await one(prompts[0], 2)  # warm-up, untimed
    queue = list(range(len(prompts)))
    timings: list[_RequestTiming] = []

    async def worker() -> None:
        while queue:
            i = queue.pop()
            timings.append(await one(prompts[i], args.output_len))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - start
    return _summary(timings, elapsed, prefix)


def _summary(timings: list[_RequestTiming], elapsed: float, prefix: str) -> dict[str, Any]:
    tokens = sum(t.tokens for t in timings)
    ttft = [t.ttft_s * 1000 for t in timings]
    itl = [g * 1000 for t in timings for g in t.gaps_s]
    # REST keeps its historical key names ("serve_*", "ttft_ms_*"); gRPC's carry "grpc_".
    latency = "" if prefix == "serve" else f"{prefix}_"
    return {
        f"{prefix}_requests_per_s": round(len(timings) / elapsed, 3),
        f"{prefix}_output_tok_s": round(tokens / elapsed, 2),
        f"{prefix}_elapsed_s": round(elapsed, 3),
        f"{latency}ttft_ms_p50": round(statistics.median(ttft), 2),
        f"{latency}ttft_ms_p99": round(_percentile(ttft, 99), 2),
        f"{latency}itl_ms_p50": round(statistics.median(itl), 2) if itl else 0.0,
        f"{latency}itl_ms_p99": round(_percentile(itl, 99), 2),
    }


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}


def run_serve_bench(args: argparse.Namespace) -> int:
    from rustinfer.cli.bench import emit, machine_fields

    apply_threads(args.threads)
    if args.concurrency < 1 or args.num_prompts < 1 or args.repeat < 1:
        raise ValueError("--concurrency, --num-prompts and --repeat must be >= 1")
    args.max_num_seqs = args.max_num_seqs or args.concurrency
    prompts, loaded = _prompts(args)
    result: dict[str, Any] = {
        "concurrency": args.concurrency,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "max_num_seqs": args.max_num_seqs,
        "repeat": args.repeat,
        **machine_fields(loaded),
    }
    offline_runs: list[dict[str, Any]] = []
    served_runs: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        if not args.skip_offline:
            offline_runs.append(_offline(loaded, prompts, args))
        served_runs.append(_served(prompts, args))
    if offline_runs:
        result.update(_median_of(offline_runs))
    result.update(_median_of(served_runs))
    for face in ("serve", "grpc"):
        key = f"{face}_output_tok_s"
        if offline_runs and key in served_runs[0]:
            ratios = [
                s[key] / o["offline_output_tok_s"]
                for o, s in zip(offline_runs, served_runs, strict=True)
            ]
            result[f"{face}_vs_offline"] = round(statistics.median(ratios), 3)
            result[f"{face}_vs_offline_each"] = [round(r, 3) for r in ratios]
    if "serve_output_tok_s" in result and "grpc_output_tok_s" in result:
        result["grpc_vs_rest"] = round(
            result["grpc_output_tok_s"] / result["serve_output_tok_s"], 3
        )
    return emit(result, args.json)


def _served(prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """One served run: a fresh server (unless --url), the clients, then the server stopped, so
    it never runs beside the offline engine."""
    proc = None
    url, grpc_target = args.url, args.grpc_url
    if url is None:
        proc, url, grpc_target = _start_server(args)
    try:
        asyncio.run(_wait_ready(url, proc))
        result: dict[str, Any] = {}
        if args.api in ("rest", "both"):
            result.update(asyncio.run(_drive(url.rstrip("/"), prompts, args)))
        if args.api in ("grpc", "both"):
            if grpc_target is None:
                raise ValueError("--api grpc with --url needs --grpc-url host:port")
            result.update(asyncio.run(_drive_grpc(grpc_target, prompts, args)))
        return result
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
