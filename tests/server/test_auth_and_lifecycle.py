"""API keys, CORS, loading, graceful shutdown and a clean exit, through real processes."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest
from server_helpers import LiveServer, running_server, start_server, wait_ready

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> LiveServer:
    with running_server(
        tmp_path_factory.mktemp("keyed"),
        "--api-key",
        "other-key",
        "--allowed-origins",
        "http://ui.example",
        api_key=KEY,
    ) as server:
        yield server


API_ROUTES = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/metrics", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1]}),
]


@pytest.mark.parametrize(("method", "path", "body"), API_ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic sk-test-123", "Bearer"])
def test_api_routes_need_a_key(keyed: LiveServer, method, path, body, header) -> None:
    headers = {"Authorization": header} if header else {}
    r = httpx.request(method, keyed.url + path, json=body, headers=headers, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(("method", "path", "body"), API_ROUTES)
@pytest.mark.parametrize("key", [KEY, "other-key"])
def test_any_configured_key_works(keyed: LiveServer, method, path, body, key) -> None:
    if body and "messages" in body:
        body = {**body, "max_tokens": 1}
    r = httpx.request(
        method, keyed.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/", "/index.html", "/health", "/ready", "/metrics"])
def test_ui_health_and_metrics_stay_public(keyed: LiveServer, path) -> None:
    assert httpx.get(keyed.url + path, timeout=30).status_code == 200


def test_openai_sdk_with_a_key(keyed: LiveServer) -> None:
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    assert good.models.list().data[0].id == "SmolLM2-135M-Instruct"
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_cors_allows_the_configured_origin_only(keyed: LiveServer) -> None:
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(
            keyed.url + "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )

    ok = preflight("http://ui.example")
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://ui.example"
    assert "access-control-allow-origin" not in preflight("http://evil.example").headers


def test_loading_then_ready_then_graceful_shutdown(tmp_path) -> None:
    server = start_server(tmp_path, "--shutdown-grace-s", "30", wait=False)
    try:
        # Up before the model is: alive, not ready, the API says so instead of hanging.
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(server.url + "/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.02)
        assert health.status_code == 200
        ready = httpx.get(server.url + "/ready", timeout=2)
        if ready.status_code == 503:  # the model may already be loaded on a fast machine
            assert ready.json()["error"]["code"] == "model_loading"
            early = httpx.get(server.url + "/v1/models", timeout=2)
            assert early.status_code in (200, 503)
        wait_ready(server)

        # A request in flight when SIGTERM arrives still finishes, then the process exits 0.
        lines: list[str] = []
        got_first = threading.Event()

        def stream() -> None:
            body = {
                "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "max_tokens": 40,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
            }
            with (
                httpx.Client(timeout=120) as c,
                c.stream("POST", server.url + "/v1/chat/completions", json=body) as r,
            ):
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        if '"content": "' in line and '"content": ""' not in line:
                            got_first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert got_first.wait(60)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Shutting down: no new work is taken (a refused connection, or a 503 if it got in).
        try:
            late = httpx.get(server.url + "/ready", timeout=5)
            assert late.status_code == 503
        except httpx.TransportError:
            pass
        t.join(120)
        assert server.process.wait(60) == 0
        assert lines[-1] == "data: [DONE]"
        final = json.loads(lines[-2][6:])
        assert final["choices"][0]["finish_reason"] == "length"
    finally:
        server.stop(signal.SIGKILL)


def test_a_bad_model_path_exits_nonzero_with_the_reason(tmp_path) -> None:
    server = start_server(tmp_path, "--model", str(tmp_path / "missing"), wait=False)
    try:
        code = server.process.wait(120)
    finally:
        server.stop(signal.SIGKILL)
    assert code != 0
    assert "missing" in server.log()


def test_a_bad_quantization_is_refused_before_loading(tmp_path) -> None:
    server = start_server(tmp_path, "--quantization", "int3", wait=False)
    try:
        code = server.process.wait(120)
    finally:
        server.stop(signal.SIGKILL)
    assert code != 0
    assert "unknown quantization" in server.log() and "int4" in server.log()


@pytest.mark.parametrize(
    "args, shown", [((), "float32, quantization gguf"), (("--quantization", "none"), "none")]
)
def test_serve_keeps_the_gguf_quantized_unless_asked(tmp_path, args, shown) -> None:
    """By default the embedded GGUF is served from its quantized tensors; --quantization none
    serves float weights; both answer, and the ready line says which."""
    server = start_server(tmp_path, *args)
    try:
        body = {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12,
            "temperature": 0,
        }
        with server.client() as c:
            reply = c.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
        assert f"{shown})" in server.log()
    finally:
        server.stop()
