"""KServe's Open Inference Protocol over gRPC: our own stubs, and tritonclient in its own venv.

One grpc.aio server (on its own event loop, in a thread) serves a real AsyncEngine on a tiny
random Llama with a small trained tokenizer, on the CPU. Greedy answers are checked against the
engine's own answer for the same prompt; tritonclient runs as a subprocess from a virtual
environment of its own (see ``tritonclient_script.py`` for why).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from loader_helpers import tiny_trained_tokenizer, write_tokenizer_dir
from model_helpers import random_weights, tiny_config, write_checkpoint

import rustinfer
from rustinfer.engine.async_engine import AsyncEngine
from rustinfer.engine.core import EngineConfig
from rustinfer.engine.model_runner import kv_bytes_per_block
from rustinfer.engine.outputs import RequestOutput
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.errors import InvalidRequestError
from rustinfer.runtime.loading import load_model
from rustinfer.server.grpc.generated.inference import grpc_service_pb2 as pb
from rustinfer.server.grpc.generated.inference import grpc_service_pb2_grpc as pb_grpc
from rustinfer.server.grpc.kserve import add_kserve_service
from rustinfer.server.grpc.llm_tensors import decode_bytes_tensor, encode_bytes_tensor
from rustinfer.server.state import ServerState

HERE = Path(__file__).resolve().parent
MODEL = "tiny-kserve"
PROMPT = "Hello world, the quick brown fox"
MAX_TOKENS = 9
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
BLOCK = 16
CALL_TIMEOUT_S = 60.0

TRITONCLIENT = "tritonclient[grpc]==2.73.0"
CACHE = Path(os.environ.get("RUSTINFER_TEST_CACHE", Path.home() / ".cache" / "rustinfer-tests"))
VENV = CACHE / "tritonclient-venv"
PIP_TIMEOUT_S = 900


# -- the server -----------------------------------------------------------------------------------


class KServeServer:
    """A grpc.aio server with the KServe service, on an event loop of its own in a thread."""

    def __init__(self, factory: Callable[[], AsyncEngine], load: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="kserve-test-loop", daemon=True
        )
        self.thread.start()
        self.state = ServerState(factory, MODEL)
        if load:
            self.state.load()  # synchronously: the engine thread starts here
            assert self.state.ready.is_set(), self.state.load_error
        self.server: grpc.aio.Server | None = None
        self.port = self.run(self._start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        add_kserve_service(self.server, self.state)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = CALL_TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def engine(self) -> AsyncEngine:
        assert self.state.engine is not None
        return self.state.engine

    def greedy_answer(self, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> str:
        """The engine's own greedy text for ``prompt``, straight from AsyncEngine."""

        async def generate() -> str:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            return "".join([o.text_delta async for o in self.engine.generate(prompt, params)])

        return self.run(generate())

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.engine.stats()
            if not stats["running"] and not stats["waiting"] and not stats["requests"]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout_s} s: {stats}")
            time.sleep(0.02)

    def close(self) -> None:
        self.channel.close()

        async def stop() -> None:
            if self.server is not None:
                await self.server.stop(0)
            await self.state.stop()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Recorder:
    """A step observer: how each request ended; ``delay_s`` slows every step (to leave time for a
    cancel to land while a request runs)."""

    def __init__(self) -> None:
        self.finished: dict[str, str | None] = {}
        self.delay_s = 0.0

    def __call__(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self.finished[out.request_id] = out.finish_reason
        if self.delay_s:
            time.sleep(self.delay_s)


@pytest.fixture(scope="module")
def kserve_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer Llama with a small trained byte-level BPE tokenizer (gibberish answers,
    but real text in and out, in a fraction of a second)."""
    folder = tmp_path_factory.mktemp("tiny-kserve")
    tok = tiny_trained_tokenizer(bos_template=False)
    cfg = {**tiny_config(), "vocab_size": tok.get_vocab_size()}
    cfg["eos_token_id"] = tok.token_to_id("</s>")
    write_checkpoint(folder, cfg, random_weights(cfg, seed=3))
    write_tokenizer_dir(folder, bos_template=True)
    return folder


@pytest.fixture(scope="module")
def steps() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def kserve(kserve_model: Path, steps: Recorder) -> Iterator[KServeServer]:
    def factory() -> AsyncEngine:
        loaded = load_model(str(kserve_model), device="cpu", dtype="float32")
        kv = 64 * kv_bytes_per_block(loaded.model, BLOCK)
        config = EngineConfig(block_size=BLOCK, kv_cache_bytes=kv)
        return AsyncEngine.from_loaded(loaded, config, observers=[steps])

    server = KServeServer(factory)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def kserve_loading() -> Iterator[KServeServer]:
    """A server whose model never finishes loading."""
    never = threading.Event()

    def factory() -> AsyncEngine:
        never.wait()
        raise RuntimeError("test over")

    server = KServeServer(factory, load=False)
    try:
        yield server
    finally:
        server.close()


# -- building requests as clients do --------------------------------------------------------------


def request(
    prompt: str | bytes = PROMPT,
    sampling: dict[str, Any] | str | None = None,
    *,
    stream: bool | None = None,
    exclude: bool | None = True,
    raw: bool = True,
    model: str = MODEL,
    request_id: str = "",
    **extra_bools: bool,
) -> pb.ModelInferRequest:
    """A ModelInferRequest for the LLM tensors; ``raw``: data in raw_input_contents (as
    tritonclient sends it), else in each input's typed contents."""
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    text = prompt.encode() if isinstance(prompt, str) else prompt
    add_bytes(req, "text_input", text, raw)
    if sampling is not None:
        body = sampling if isinstance(sampling, str) else json.dumps(sampling)
        add_bytes(req, "sampling_parameters", body.encode(), raw)
    bools = {"stream": stream, "exclude_input_in_output": exclude, **extra_bools}
    for name, value in bools.items():
        if value is not None:
            add_bool(req, name, value, raw)
    return req


def add_bytes(req: pb.ModelInferRequest, name: str, value: bytes, raw: bool) -> None:
    tensor = req.inputs.add(name=name, datatype="BYTES", shape=[1])
    if raw:
        req.raw_input_contents.append(struct.pack("<I", len(value)) + value)
    else:
        tensor.contents.bytes_contents.append(value)


def add_bool(req: pb.ModelInferRequest, name: str, value: bool, raw: bool) -> None:
    tensor = req.inputs.add(name=name, datatype="BOOL", shape=[1])
    if raw:
        req.raw_input_contents.append(bytes([value]))
    else:
        tensor.contents.bool_contents.append(value)


def outputs(response: pb.ModelInferResponse) -> dict[str, Any]:
    """Each output's single element, decoded from raw_output_contents."""
    assert len(response.raw_output_contents) == len(response.outputs)
    got: dict[str, Any] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        assert list(tensor.shape) == [1]
        if tensor.datatype == "BYTES":
            (value,) = decode_bytes_tensor(raw, tensor.name)
            got[tensor.name] = value.decode()
        else:
            assert tensor.datatype == "UINT32"
            (got[tensor.name],) = struct.unpack("<I", raw)
    return got


def final_flag(response: pb.ModelInferResponse) -> bool | None:
    if "triton_final_response" not in response.parameters:
        return None
    return response.parameters["triton_final_response"].bool_param


def stream_call(
    kserve: KServeServer, *requests: pb.ModelInferRequest
) -> list[pb.ModelStreamInferResponse]:
    """Every response of one ModelStreamInfer call carrying ``requests``."""
    return list(kserve.stub.ModelStreamInfer(iter(requests), timeout=CALL_TIMEOUT_S))


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- health and metadata --------------------------------------------------------------------------


def test_live_ready_and_metadata(kserve: KServeServer) -> None:
    stub = kserve.stub
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="1")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="other")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="2")).ready

    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert (meta.name, meta.version) == ("rustinfer", rustinfer.__version__)

    model = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
    assert model.name == MODEL and list(model.versions) == ["1"]
    inputs = {t.name: (t.datatype, list(t.shape)) for t in model.inputs}
    assert inputs["text_input"] == ("BYTES", [1])
    assert inputs["sampling_parameters"] == ("BYTES", [1])
    assert inputs["stream"] == inputs["exclude_input_in_output"] == ("BOOL", [1])
    assert {t.name: t.datatype for t in model.outputs} == {
        "text_output": "BYTES",
        "finish_reason": "BYTES",
        "num_input_tokens": "UINT32",
        "num_output_tokens": "UINT32",
    }


@pytest.mark.parametrize("name, version", [("other", ""), (MODEL, "7")])
def test_metadata_of_an_unknown_model_or_version_is_not_found(
    kserve: KServeServer, name: str, version: str
) -> None:
    err = rpc_error(
        lambda: kserve.stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version))
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert MODEL in err.details()


def test_while_loading_health_says_not_ready_and_inference_is_unavailable(
    kserve_loading: KServeServer,
) -> None:
    stub = kserve_loading.stub
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert not stub.ServerReady(pb.ServerReadyRequest()).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready
    for call in (
        lambda: stub.ModelInfer(request(sampling=GREEDY), timeout=CALL_TIMEOUT_S),
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL)),
    ):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in err.details()
    (response,) = stream_call(kserve_loading, request(sampling=GREEDY, stream=True, request_id="r"))
    assert "loading" in response.error_message
    assert response.infer_response.id == "r" and final_flag(response.infer_response) is True


def test_an_unimplemented_rpc_says_unimplemented(kserve: KServeServer) -> None:
    # Triton's ModelConfig is not in our service: the gRPC runtime answers for it.
    call = kserve.channel.unary_unary(
        "/inference.GRPCInferenceService/ModelConfig",
        request_serializer=pb.ModelReadyRequest.SerializeToString,
        response_deserializer=pb.ModelReadyResponse.FromString,
    )
    err = rpc_error(lambda: call(pb.ModelReadyRequest(name=MODEL)))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


# -- unary inference ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "typed_contents"])
def test_unary_infer_is_the_engines_greedy_answer(kserve: KServeServer, raw: bool) -> None:
    expected = kserve.greedy_answer()
    response = kserve.stub.ModelInfer(
        request(sampling=GREEDY, raw=raw, request_id="u1"), timeout=CALL_TIMEOUT_S
    )
    assert (response.model_name, response.id) == (MODEL, "u1")
    assert final_flag(response) is None  # the stream's parameter only
    got = outputs(response)
    assert got["text_output"] == expected and expected
    assert got["finish_reason"] == "length"
    assert got["num_input_tokens"] == len(kserve.engine.tokenizer.encode(PROMPT))
    assert got["num_output_tokens"] == MAX_TOKENS


def test_unary_infer_prepends_the_prompt_unless_excluded(kserve: KServeServer) -> None:
    expected = kserve.greedy_answer()
    response = kserve.stub.ModelInfer(request(sampling=GREEDY, exclude=None))
    assert outputs(response)["text_output"] == PROMPT + expected
    response = kserve.stub.ModelInfer(request(sampling=GREEDY, exclude=False))
    assert outputs(response)["text_output"] == PROMPT + expected


def test_request_parameters_are_sampling_parameters_and_strings_are_numbers(
    kserve: KServeServer,
) -> None:
    req = request()  # no sampling_parameters input: the request's parameters hold them
    req.parameters["max_tokens"].int64_param = 3
    req.parameters["temperature"].string_param = "0.0"
    req.parameters["ignore_eos"].string_param = "true"
    req.parameters["priority"].uint64_param = 5  # a hint, accepted and ignored
    got = outputs(kserve.stub.ModelInfer(req))
    assert got["num_output_tokens"] == 3
    assert got["text_output"] == kserve.greedy_answer(max_tokens=3)
    # Where both name a key, the sampling_parameters input wins.
    req = request(sampling={"max_tokens": "2", "temperature": "0", "ignore_eos": True})
    req.parameters["max_tokens"].int64_param = 5
    assert outputs(kserve.stub.ModelInfer(req))["num_output_tokens"] == 2


def test_outputs_can_be_chosen(kserve: KServeServer) -> None:
    req = request(sampling=GREEDY)
    req.outputs.add(name="num_output_tokens")
    req.outputs.add(name="text_output")
    response = kserve.stub.ModelInfer(req)
    assert [o.name for o in response.outputs] == ["text_output", "num_output_tokens"]
    req = request(sampling=GREEDY, return_num_input_tokens=False, return_finish_reason=True)
    assert set(outputs(kserve.stub.ModelInfer(req))) == {
        "text_output",
        "finish_reason",
        "num_output_tokens",
    }


def test_stop_strings_end_the_answer_with_finish_reason_stop(kserve: KServeServer) -> None:
    full = kserve.greedy_answer(max_tokens=30)
    stop = full[len(full) // 2 :][:3]
    assert stop.strip(), f"a usable stop string from {full!r}"
    sampling = {**GREEDY, "max_tokens": 30, "stop": [stop]}
    got = outputs(kserve.stub.ModelInfer(request(sampling=sampling)))
    assert got["finish_reason"] == "stop"
    assert got["text_output"] == full[: full.index(stop)]


def _mutated(mutate: Callable[[pb.ModelInferRequest], None]) -> pb.ModelInferRequest:
    """A greedy request, then changed by ``mutate``."""
    req = request(sampling=GREEDY)
    mutate(req)
    return req


def _two_prompts(req: pb.ModelInferRequest) -> None:
    req.inputs[0].shape[:] = [2]
    req.raw_input_contents[0] = encode_bytes_tensor([b"a", b"b"])


INVALID = {
    "negative temperature": (request(sampling={"temperature": -1}), "temperature"),
    "unknown sampling key": (request(sampling={"best_of": 2}), "best_of"),
    "max_tokens not a number": (request(sampling={"max_tokens": "many"}), "max_tokens"),
    "ignore_eos not a bool": (request(sampling={"ignore_eos": "yes"}), "ignore_eos"),
    "n above one": (request(sampling={"n": 2}), "'n'"),
    "sampling_parameters not JSON": (request(sampling="{temperature"), "sampling_parameters"),
    "sampling_parameters a list": (request(sampling="[1]"), "sampling_parameters"),
    "no text_input": (pb.ModelInferRequest(model_name=MODEL), "text_input"),
    "text_input not UTF-8": (request(b"\xff\xfe"), "text_input"),
    "unknown input": (request(sampling=GREEDY, verbose=True), "verbose"),
    "stream in ModelInfer": (request(sampling=GREEDY, stream=True), "stream"),
    "two prompts": (_mutated(_two_prompts), "text_input"),
    "raw contents short": (
        _mutated(lambda r: r.raw_input_contents.pop()),
        "raw_input_contents",
    ),
    "raw BYTES cut short": (
        _mutated(lambda r: r.raw_input_contents.__setitem__(0, b"\x10\x00\x00\x00abc")),
        "text_input",
    ),
    "wrong datatype": (
        _mutated(lambda r: setattr(r.inputs[2], "datatype", "INT32")),
        "exclude_input_in_output",
    ),
    "unknown output": (_mutated(lambda r: r.outputs.add(name="logits")), "logits"),
    "sequence batching": (
        _mutated(lambda r: r.parameters["sequence_id"].MergeFrom(pb.InferParameter(int64_param=7))),
        "sequence_id",
    ),
}


@pytest.mark.parametrize("req, field", INVALID.values(), ids=list(INVALID))
def test_invalid_requests_are_invalid_argument_naming_the_field(
    kserve: KServeServer, req: pb.ModelInferRequest, field: str
) -> None:
    err = rpc_error(lambda: kserve.stub.ModelInfer(req, timeout=CALL_TIMEOUT_S))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert field in err.details()


def test_an_unknown_model_is_not_found(kserve: KServeServer) -> None:
    err = rpc_error(lambda: kserve.stub.ModelInfer(request(sampling=GREEDY, model="gpt-9")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "gpt-9" in err.details() and MODEL in err.details()


def test_a_prompt_beyond_the_context_is_invalid_argument(kserve: KServeServer) -> None:
    sampling = {**GREEDY, "max_tokens": 250}
    err = rpc_error(lambda: kserve.stub.ModelInfer(request(PROMPT * 10, sampling)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["stream", "streaming"])
def test_stream_deltas_add_up_to_the_greedy_answer_and_the_last_is_final(
    kserve: KServeServer, steps: Recorder, flag: str
) -> None:
    expected = kserve.greedy_answer()
    req = request(sampling=GREEDY, request_id="s1", **{flag: True})
    # The tiny model's steps can outrun the reader, whose unread outputs the engine then merges
    # into one response: slow the steps so each one reaches the client on its own.
    steps.delay_s = 0.02
    try:
        responses = stream_call(kserve, req)
    finally:
        steps.delay_s = 0.0
    assert all(not r.error_message for r in responses)
    infer = [r.infer_response for r in responses]
    assert all(r.id == "s1" and r.model_name == MODEL for r in infer)
    assert [final_flag(r) for r in infer] == [False] * (len(infer) - 1) + [True]
    got = [outputs(r) for r in infer]
    assert "".join(g["text_output"] for g in got) == expected
    assert sum(g["num_output_tokens"] for g in got) == MAX_TOKENS
    assert len(got) > 1  # one per step, not one at the end
    assert [g["finish_reason"] for g in got] == [""] * (len(got) - 1) + ["length"]


def test_enable_empty_final_response_ends_with_an_empty_final(kserve: KServeServer) -> None:
    expected = kserve.greedy_answer()
    req = request(sampling=GREEDY, stream=True, request_id="e1")
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    infer = [r.infer_response for r in stream_call(kserve, req)]
    *data, last = infer
    assert all(final_flag(r) is False for r in data)
    assert final_flag(last) is True and not last.outputs and not last.raw_output_contents
    assert last.id == "e1"
    assert "".join(outputs(r)["text_output"] for r in data) == expected


@pytest.mark.parametrize("empty_final", [False, True])
def test_a_request_without_stream_is_answered_once_in_the_stream(
    kserve: KServeServer, empty_final: bool
) -> None:
    expected = kserve.greedy_answer()
    req = request(sampling=GREEDY, exclude=None, request_id="once")  # the prompt leads
    if empty_final:
        req.parameters["triton_enable_empty_final_response"].bool_param = True
    infer = [r.infer_response for r in stream_call(kserve, req)]
    assert outputs(infer[0])["text_output"] == PROMPT + expected
    assert [final_flag(r) for r in infer] == ([False, True] if empty_final else [True])


def test_stream_errors_come_as_error_message_and_the_stream_goes_on(kserve: KServeServer) -> None:
    expected = kserve.greedy_answer()
    bad_exclude = request(sampling=GREEDY, stream=True, exclude=False, request_id="bad2")
    responses = stream_call(
        kserve,
        request(sampling=GREEDY, stream=True, request_id="a"),
        request(sampling={"temperature": -1}, stream=True, request_id="bad1"),
        bad_exclude,
        request(sampling=GREEDY, stream=True, request_id="b", model="nope"),
        request(sampling=GREEDY, stream=True, request_id="c"),
    )
    errors = {r.infer_response.id: r.error_message for r in responses if r.error_message}
    assert set(errors) == {"bad1", "bad2", "b"}
    assert "temperature" in errors["bad1"]
    assert "exclude_input_in_output" in errors["bad2"]
    assert "nope" in errors["b"]
    for rid in ("a", "c"):
        mine = [r.infer_response for r in responses if r.infer_response.id == rid]
        assert "".join(outputs(r)["text_output"] for r in mine) == expected
        assert final_flag(mine[-1]) is True


def test_cancelling_a_stream_aborts_its_engine_request(
    kserve: KServeServer, steps: Recorder
) -> None:
    kserve.wait_idle()
    before = set(steps.finished)
    steps.delay_s = 0.02  # 200 steps take 4 s: the cancel lands long before the end
    try:
        sampling = {**GREEDY, "max_tokens": 200}
        call = kserve.stub.ModelStreamInfer(
            iter([request(sampling=sampling, stream=True)]), timeout=CALL_TIMEOUT_S
        )
        first = next(call)
        assert final_flag(first.infer_response) is False
        call.cancel()
        kserve.wait_idle(timeout_s=10)
    finally:
        steps.delay_s = 0.0
    ended = {rid: why for rid, why in steps.finished.items() if rid not in before}
    assert list(ended.values()) == ["abort"] and all(r.startswith("kserve-") for r in ended)


def test_cancelling_a_unary_call_aborts_its_engine_request(
    kserve: KServeServer, steps: Recorder
) -> None:
    kserve.wait_idle()
    before = set(steps.finished)
    steps.delay_s = 0.02
    try:
        future = kserve.stub.ModelInfer.future(request(sampling={**GREEDY, "max_tokens": 200}))
        deadline = time.monotonic() + 10
        while not kserve.engine.stats()["running"]:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
        future.cancel()
        kserve.wait_idle(timeout_s=10)
    finally:
        steps.delay_s = 0.0
    ended = {rid: why for rid, why in steps.finished.items() if rid not in before}
    assert list(ended.values()) == ["abort"]


# -- BYTES tensors --------------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=40), max_size=6))
def test_bytes_tensors_round_trip(items: list[bytes]) -> None:
    raw = encode_bytes_tensor(items)
    assert decode_bytes_tensor(raw, "x") == items
    if raw:
        with pytest.raises(InvalidRequestError, match="'x'"):
            decode_bytes_tensor(raw[:-1], "x")


# -- tritonclient, from its own virtual environment -----------------------------------------------


def _pip_failed(what: str, result: subprocess.CompletedProcess[str]) -> None:
    message = (
        f"cannot {what} for the tritonclient tests ({TRITONCLIENT} into {VENV}); pip said:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def tritonclient_python() -> Path:
    """The venv's python with tritonclient installed (made once, then reused across runs)."""
    python = VENV / "bin" / "python"
    marker = VENV / f".installed-{TRITONCLIENT.replace('[', '-').replace(']', '')}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "tritonclient-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test processes must not build it at once
        if marker.exists() and python.exists():
            return python
        result = subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(VENV)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            _pip_failed("create a virtual environment", result)
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             TRITONCLIENT],
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT_S,
        )  # fmt: skip
        if result.returncode != 0:
            _pip_failed("pip install", result)
        marker.write_text(TRITONCLIENT + "\n")
    return python


@pytest.fixture(scope="module")
def tritonclient_report(kserve: KServeServer) -> dict[str, Any]:
    python = tritonclient_python()
    result = subprocess.run(
        [str(python), str(HERE / "tritonclient_script.py"), f"127.0.0.1:{kserve.port}", MODEL,
         PROMPT, str(MAX_TOKENS)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": ""},  # nothing of this checkout in that process
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_tritonclient_health_metadata_and_unimplemented(tritonclient_report: dict) -> None:
    r = tritonclient_report
    assert r["live"] and r["ready"] and r["model_ready"] and not r["unknown_model_ready"]
    assert r["server_metadata"]["name"] == "rustinfer"
    assert r["server_metadata"]["version"] == rustinfer.__version__
    meta = r["model_metadata"]
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert {i["name"] for i in meta["inputs"]} >= {"text_input", "stream", "sampling_parameters"}
    assert r["unknown_model_metadata"]["status"] == "StatusCode.NOT_FOUND"
    assert r["model_config"]["status"] == "StatusCode.UNIMPLEMENTED"


def test_tritonclient_unary_and_streamed_text_are_the_engines_greedy_answer(
    kserve: KServeServer, tritonclient_report: dict
) -> None:
    expected = kserve.greedy_answer()
    unary = tritonclient_report["unary"]
    assert unary["id"] == "unary"
    assert unary["text_output"] == [expected] and unary["num_output_tokens"] == [MAX_TOKENS]

    events = tritonclient_report["stream"]
    (error,) = [e["error"] for e in events if "error" in e]
    assert "temperature" in error
    mine = [e for e in events if e.get("id") == "streamed"]
    assert "".join(e["text_output"][0] for e in mine) == expected
    assert [e["final"] for e in mine] == [False] * (len(mine) - 1) + [True]
    assert mine[-1]["finish_reason"] == ["length"]

    *data, last = tritonclient_report["stream_empty_final"]
    assert last["final"] is True and last["outputs"] == []
    assert all(e["final"] is False for e in data)
    assert "".join(e["text_output"][0] for e in data) == expected


def _describe(message: Any) -> dict[str, Any]:
    return {
        "fields": {
            f.name: [f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name]
            for f in message.fields
        },
        "oneofs": {o.name: sorted(f.name for f in o.fields) for o in message.oneofs},
        "nested": {n.name: _describe(n) for n in message.nested_types},
    }


def test_our_proto_is_wire_compatible_with_tritonclients(tritonclient_report: dict) -> None:
    theirs = tritonclient_report["descriptors"]
    ours = pb.DESCRIPTOR
    service = ours.services_by_name["GRPCInferenceService"]
    assert (ours.package, service.full_name) == (theirs["package"], theirs["service"])
    for method in service.methods:
        assert theirs["methods"][method.name] == [
            method.input_type.full_name,
            method.output_type.full_name,
            method.client_streaming,
            method.server_streaming,
        ]
    assert len(service.methods) == 7
    for name, message in ours.message_types_by_name.items():
        assert _describe(message) == theirs["messages"][name], name
