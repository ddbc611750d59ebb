"""Real ``rustinfer serve`` processes on loopback, for tests that talk to them as clients do."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

READY_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[str]
    log_path: Path
    api_key: str | None = None
    args: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120, **kw)

    def engine_stats(self) -> dict:
        with self.client() as c:
            return c.get("/v1/metrics").json()["engine"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_idle(self, timeout_s: float = 30.0) -> dict:
        """Poll until nothing runs or waits; returns the engine's stats then."""
        deadline = time.monotonic() + timeout_s
        stats = self.engine_stats()
        while stats["running"] or stats["waiting"]:
            if time.monotonic() > deadline:
                raise AssertionError(f"server still busy after {timeout_s} s: {stats}")
            time.sleep(0.05)
            stats = self.engine_stats()
        return stats

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode


def start_server(
    tmp: Path, *args: str, api_key: str | None = None, wait: bool = True, device: str = "cpu"
) -> LiveServer:
    """Start ``rustinfer serve`` on a free port (default: the embedded model on the CPU)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "rustinfer", "serve", "--port", str(port), "--device", device,
        "--log-level", "warning", *args,
    ]  # fmt: skip
    if device == "cpu":
        cmd += ["--threads", "2"]
    if "--grpc-port" not in args:
        cmd += ["--grpc-port", "0"]  # REST tests: no gRPC port to collide on
    if api_key:
        cmd += ["--api-key", api_key]
    log_path = tmp / f"server-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log_path, api_key, list(args))
    if wait:
        wait_ready(server)
    return server


def wait_ready(server: LiveServer, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready after {timeout_s} s:\n{server.log()}")


@contextlib.contextmanager
def running_server(tmp: Path, *args: str, api_key: str | None = None) -> Iterator[LiveServer]:
    server = start_server(tmp, *args, api_key=api_key)
    try:
        yield server
    finally:
        server.stop()
