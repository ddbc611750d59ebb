"""``rustinfer serve`` with gRPC beside REST: one process, one engine, both faces.

A real server process on the embedded model (CPU), driven by real clients: the standard health
service (Check and Watch across loading and a graceful shutdown), server reflection, the native
``rustinfer.v1`` stubs and tritonclient (in its own venv) against the REST answer for the same
greedy request, and the ``api`` label of the request metrics.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_helpers import LiveServer, free_port, start_server, wait_ready
from test_kserve import tritonclient_python

from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2 as pb
from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2_grpc

HERE = Path(__file__).parent
SERVICES = ("rustinfer.v1.Inference", "inference.GRPCInferenceService")
PROMPT = "The three primary colors are"
MAX_TOKENS = 12


def grpc_target(server: LiveServer) -> str:
    return f"127.0.0.1:{server.args[server.args.index('--grpc-port') + 1]}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("serve"), "--grpc-port", str(free_port()))
    try:
        yield server
    finally:
        server.stop()


def rest_answer(server: LiveServer) -> tuple[str, str]:
    with server.client() as c:
        body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["model"], r.json()["choices"][0]["text"]


def test_health_follows_loading_serving_and_a_graceful_shutdown(tmp_path: Path) -> None:
    port = free_port()
    server = start_server(tmp_path, "--grpc-port", str(port), wait=False)
    seen: list[int] = []
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)  # bound before the model loads
        health = health_pb2_grpc.HealthStub(channel)
        first = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICES[0]))

        def follow() -> None:
            try:
                for update in watch:
                    seen.append(update.status)
            except grpc.RpcError:
                pass  # the server went away: the stream ends

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        wait_ready(server)
        deadline = time.monotonic() + 10
        while health_pb2.HealthCheckResponse.SERVING not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        for service in ("", *SERVICES):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING, service
    finally:
        code = server.stop()
    follower.join(timeout=30)
    channel.close()
    # A cold start loads for seconds, so the first Check normally lands while loading; the watch
    # saw loading (unless the load won the race), serving, then the shutdown.
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert first in (not_serving, serving)
    assert serving in seen, seen
    assert seen[-1] == not_serving, seen
    assert seen.index(serving) < len(seen) - 1
    assert code == 0, server.log()


def test_reflection_lists_every_service(served: LiveServer) -> None:
    with grpc.insecure_channel(grpc_target(served)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in response.list_services_response.service}
    assert names >= {*SERVICES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def test_native_generate_gives_the_rest_answer_and_is_counted_as_grpc(served: LiveServer) -> None:
    model, expected = rest_answer(served)
    with grpc.insecure_channel(grpc_target(served)) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(
            model=model,
            text=PROMPT,
            sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
        )
        responses = list(stub.Generate(request, timeout=120))
    text = "".join(r.chunk.text for r in responses if r.HasField("chunk"))
    assert text == expected
    complete = responses[-1].complete
    assert complete.usage.completion_tokens == MAX_TOKENS
    with served.client() as c:
        metrics = c.get("/metrics").text
    grpc_line = next(
        line
        for line in metrics.splitlines()
        if line.startswith("rustinfer_generation_tokens_total") and 'api="grpc"' in line
    )
    assert float(grpc_line.rpartition(" ")[2]) >= MAX_TOKENS


def test_tritonclient_streams_the_rest_answer(served: LiveServer) -> None:
    model, expected = rest_answer(served)
    python = tritonclient_python()
    result = subprocess.run(
        [str(python), str(HERE / "tritonclient_script.py"), grpc_target(served), model, PROMPT,
         str(MAX_TOKENS)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},  # nothing of this checkout in that process
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["unary"]["text_output"] == [expected]
    streamed = [e for e in report["stream"] if e.get("id") == "streamed"]
    assert "".join(e["text_output"][0] for e in streamed) == expected
    assert streamed[-1]["final"] is True


def test_native_generate_takes_structured_outputs(served: LiveServer) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    with grpc.insecure_channel(grpc_target(served)) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        def generate(structured: pb.StructuredOutput) -> str:
            request = pb.GenerateRequest(
                text="A person:",
                sampling=pb.SamplingParams(max_tokens=60, temperature=0.0, structured=structured),
            )
            responses = list(stub.Generate(request, timeout=120))
            assert responses[-1].complete.choices[0].finish_reason == "stop"
            return "".join(r.chunk.text for r in responses if r.HasField("chunk"))

        jsonschema.validate(
            json.loads(generate(pb.StructuredOutput(json_schema=json.dumps(schema)))), schema
        )
        assert generate(pb.StructuredOutput(choice=pb.Choices(choices=["cat", "dog"]))) in (
            "cat",
            "dog",
        )
        assert re.fullmatch(r"[0-9]{2}", generate(pb.StructuredOutput(regex="[0-9]{2}")))
        bad = pb.GenerateRequest(
            text="x",
            sampling=pb.SamplingParams(structured=pb.StructuredOutput(json_schema='{"type": 5}')),
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(bad, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    metadata = dict(info.value.trailing_metadata())
    assert metadata["rustinfer-error-field"] == "sampling.structured.json_schema"
