"""tritonclient against a running rustinfer KServe service; prints one JSON object.

Runs in its own virtual environment (tests/grpc/test_kserve.py makes it): tritonclient's generated
``inference`` protos and rustinfer's cannot share one process (one protobuf descriptor pool), and
tritonclient wants a protobuf older than rustinfer's. So this file imports nothing of rustinfer.

    python tritonclient_script.py URL MODEL PROMPT MAX_TOKENS

What it prints: health and metadata as tritonclient reports them, a unary infer, a streamed infer
(with and without the empty final response), the errors tritonclient raises for an unknown model,
a bad sampling parameter in a stream and an RPC we do not serve, and the descriptors of the
messages of tritonclient's own ``grpc_service.proto`` (for the test to compare with ours).
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

STREAM_TIMEOUT_S = 60.0


def llm_inputs(prompt: str, sampling: dict[str, Any], stream: bool | None) -> list[Any]:
    inputs = [grpcclient.InferInput("text_input", [1], "BYTES")]
    inputs[-1].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    inputs.append(grpcclient.InferInput("sampling_parameters", [1], "BYTES"))
    inputs[-1].set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
    inputs.append(grpcclient.InferInput("exclude_input_in_output", [1], "BOOL"))
    inputs[-1].set_data_from_numpy(np.array([True], dtype=bool))
    if stream is not None:
        inputs.append(grpcclient.InferInput("stream", [1], "BOOL"))
        inputs[-1].set_data_from_numpy(np.array([stream], dtype=bool))
    return inputs


def outputs_of(result: Any) -> dict[str, Any]:
    response = result.get_response()
    final = response.parameters.get("triton_final_response")
    out: dict[str, Any] = {
        "id": response.id,
        "final": final.bool_param if final is not None else None,
        "outputs": [o.name for o in response.outputs],
    }
    for name in out["outputs"]:
        value = result.as_numpy(name)
        out[name] = [v.decode() if isinstance(v, bytes) else int(v) for v in value.reshape(-1)]
    return out


def error_of(call: Any) -> dict[str, str]:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    return {"status": "no error", "message": ""}


def streamed(
    client: Any, model: str, requests: list[tuple[str, list[Any], bool]]
) -> list[dict[str, Any]]:
    """Send every (request id, inputs, empty final) on one stream; every response or error, in
    arrival order, until each request has had its final response."""
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    for request_id, inputs, empty_final in requests:
        client.async_stream_infer(
            model, inputs, request_id=request_id, enable_empty_final_response=empty_final
        )
    events: list[dict[str, Any]] = []
    open_ids = {request_id for request_id, _, _ in requests}
    while open_ids:
        result, error = got.get(timeout=STREAM_TIMEOUT_S)
        if error is not None:
            # tritonclient hands only the message over: the request it failed is not known.
            events.append({"error": error.message()})
            open_ids.discard("bad")
            continue
        event = outputs_of(result)
        events.append(event)
        if event["final"]:
            open_ids.discard(event["id"])
    client.stop_stream()
    return events


def describe(message: Descriptor) -> dict[str, Any]:
    return {
        "fields": {
            f.name: [f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name]
            for f in message.fields
        },
        "oneofs": {o.name: sorted(f.name for f in o.fields) for o in message.oneofs},
        "nested": {n.name: describe(n) for n in message.nested_types},
    }


def descriptors() -> dict[str, Any]:
    file = service_pb2.DESCRIPTOR
    service = file.services_by_name["GRPCInferenceService"]
    return {
        "package": file.package,
        "service": service.full_name,
        "methods": {
            m.name: [
                m.input_type.full_name,
                m.output_type.full_name,
                m.client_streaming,
                m.server_streaming,
            ]
            for m in service.methods
        },
        "messages": {name: describe(m) for name, m in file.message_types_by_name.items()},
    }


def main() -> None:
    url, model, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    # Numbers as strings, as Triton's own vLLM examples send them.
    greedy = {"temperature": "0", "max_tokens": max_tokens, "ignore_eos": True}
    report: dict[str, Any] = {"descriptors": descriptors()}
    with grpcclient.InferenceServerClient(url) as client:
        report["live"] = client.is_server_live()
        report["ready"] = client.is_server_ready()
        report["model_ready"] = client.is_model_ready(model)
        report["unknown_model_ready"] = client.is_model_ready("no-such-model")
        report["server_metadata"] = client.get_server_metadata(as_json=True)
        report["model_metadata"] = client.get_model_metadata(model, as_json=True)
        report["unknown_model_metadata"] = error_of(
            lambda: client.get_model_metadata("no-such-model")
        )
        report["model_config"] = error_of(lambda: client.get_model_config(model))

        result = client.infer(model, llm_inputs(prompt, greedy, None), request_id="unary")
        report["unary"] = outputs_of(result)

        bad = {**greedy, "temperature": -1}
        report["stream"] = streamed(
            client,
            model,
            [
                ("streamed", llm_inputs(prompt, greedy, True), False),
                ("bad", llm_inputs(prompt, bad, True), False),
            ],
        )
        report["stream_empty_final"] = streamed(
            client, model, [("empty-final", llm_inputs(prompt, greedy, True), True)]
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
