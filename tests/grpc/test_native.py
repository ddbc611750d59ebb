"""The native ``rustinfer.v1.Inference`` service through its generated stubs, against a real engine:
tokenizer round trips, generation by text, token ids and chat (equal to the engine's own output),
n > 1, logprobs, stops, every error status, API keys, cancels, deadlines, Abort, and many streams
at once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from rustinfer.engine.core import EngineConfig
from rustinfer.engine.outputs import RequestOutput
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.server.grpc.auth import ApiKeyInterceptor
from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2 as pb
from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2_grpc as pb_grpc

MODEL_NAME = "tiny-chat"  # what conftest's states serve
GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
MESSAGES = [("system", "Be brief."), ("user", "Hello world, the quick brown fox?")]
# Several thousand tokens: seconds of work, so a request that was not aborted would still run.
LONG = pb.SamplingParams(temperature=0.0, max_tokens=3000, ignore_eos=True)


def stub(port: int) -> tuple[grpc.Channel, pb_grpc.InferenceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def port(served: Any) -> int:
    return served.serve()


@pytest.fixture(scope="module")
def client(port: int) -> Any:
    channel, inference = stub(port)
    yield inference
    channel.close()


def chat_pb(messages: list[tuple[str, str]]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])


def run(served: Any, prompt: Any, **params: Any) -> list[RequestOutput]:
    """The engine's own outputs for ``prompt`` (ids or text), on the server's loop."""

    async def go() -> list[RequestOutput]:
        return [o async for o in served.engine.generate(prompt, SamplingParams(**params))]

    return served.loop.run(go())


def generate(client: Any, **fields: Any) -> tuple[list[pb.GenerateChunk], pb.GenerateComplete]:
    """Chunks and the final message of one Generate call; the final message comes last."""
    responses = list(client.Generate(pb.GenerateRequest(**fields), timeout=60))
    assert responses and responses[-1].HasField("complete")
    assert all(r.HasField("chunk") for r in responses[:-1])
    assert len({r.request_id for r in responses}) == 1 and responses[0].request_id
    return [r.chunk for r in responses[:-1]], responses[-1].complete


def refusal(call: Any) -> grpc.RpcError:
    """The error a call ends with; a streaming call must end with it before its first message."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, grpc.Call):  # a stream: read its first message
            next(result)
    return info.value


def trailing(err: grpc.RpcError) -> dict[str, str]:
    return dict(err.trailing_metadata() or ())


# -- unary calls ------------------------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip(served: Any, client: Any) -> None:
    tok = served.engine.tokenizer
    text = "Hello world, the quick brown fox <|im_end|> jumps"
    got = client.Tokenize(pb.TokenizeRequest(text=text))
    assert list(got.token_ids) == tok.encode(text) and len(got.token_ids) > 3
    assert got.max_model_len == served.engine.max_model_len
    back = client.Detokenize(pb.DetokenizeRequest(token_ids=got.token_ids))
    assert back.text == text  # special tokens kept unless asked
    skipped = client.Detokenize(
        pb.DetokenizeRequest(token_ids=got.token_ids, skip_special_tokens=True)
    )
    assert "<|im_end|>" not in skipped.text and skipped.text == tok.decode(got.token_ids, True)

    chat = client.Tokenize(pb.TokenizeRequest(model=MODEL_NAME, chat=chat_pb(MESSAGES)))
    expected = served.engine.render_chat([{"role": r, "content": c} for r, c in MESSAGES])
    assert list(chat.token_ids) == expected


def test_get_model_info(served: Any, client: Any) -> None:
    info = client.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model == MODEL_NAME
    assert info.max_model_len == served.engine.max_model_len == 4096
    assert info.vocab_size == served.engine.vocab_size
    assert info.has_tokenizer and list(info.eos_token_ids) == served.engine.core.eos_token_ids
    assert info.architecture == "LlamaForCausalLM"
    assert (info.device, info.dtype) == ("cpu", "float64")
    assert client.GetModelInfo(pb.GetModelInfoRequest(model=MODEL_NAME)).model == MODEL_NAME


# -- Generate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["text", "token_ids", "chat"])
def test_greedy_generate_equals_the_engines_own_output(served: Any, client: Any, form: str) -> None:
    tok = served.engine.tokenizer
    text = "The quick brown fox"
    fields: dict[str, Any]
    if form == "text":
        ids, fields = tok.encode(text), {"text": text}
    elif form == "token_ids":
        ids = [5, 17, 42, 3, 88, 9, 60, 61, 62, 7, 300]
        fields = {"token_ids": pb.TokenIds(ids=ids)}
    else:
        ids = served.engine.render_chat([{"role": r, "content": c} for r, c in MESSAGES])
        fields = {"chat": chat_pb(MESSAGES)}
    expected = run(served, ids, **GREEDY)
    chunks, complete = generate(
        client, model=MODEL_NAME, sampling=pb.SamplingParams(**GREEDY), **fields
    )
    assert [t for c in chunks for t in c.token_ids] == [
        t for o in expected for t in o.new_token_ids
    ]
    assert "".join(c.text for c in chunks) == "".join(o.text_delta for o in expected)
    assert all(c.index == 0 and not c.logprobs for c in chunks)
    (choice,) = complete.choices
    assert (choice.index, choice.finish_reason, choice.completion_tokens) == (0, "length", 8)
    assert choice.WhichOneof("stop_reason") is None
    t = choice.timings
    assert 0 <= t.queue_s <= t.ttft_s <= t.e2e_s and t.HasField("decode_s")
    usage = complete.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 8)
    assert usage.total_tokens == len(ids) + 8
    served.wait_idle()


def test_n_2_seeded_streams_both_choices_as_the_engine_does(served: Any, client: Any) -> None:
    ids = [5, 17, 42, 3, 88]
    params = {"n": 2, "temperature": 1.0, "seed": 11, "max_tokens": 6, "ignore_eos": True}
    expected = run(served, ids, **params)
    chunks, complete = generate(
        client, token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(**params)
    )
    for k in (0, 1):
        mine = [t for c in chunks if c.index == k for t in c.token_ids]
        assert mine == [t for o in expected if o.index == k for t in o.new_token_ids]
        assert len(mine) == 6
    assert [c.index for c in complete.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in complete.choices)
    assert complete.usage.completion_tokens == 12 and complete.usage.prompt_tokens == 5


def test_logprobs_come_per_token_with_the_top_alternatives(client: Any) -> None:
    sampling = pb.SamplingParams(logprobs=3, **GREEDY)
    chunks, _ = generate(client, text="Hello world", sampling=sampling)
    entries = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in entries] == [t for c in chunks for t in c.token_ids]
    assert len(entries) == 8
    for lp in entries:
        assert len(lp.top_logprobs) == 3
        tops = [t.logprob for t in lp.top_logprobs]
        assert tops == sorted(tops, reverse=True) and tops[0] <= 0
        # greedy: the sampled token is the most likely one
        assert lp.top_logprobs[0].token_id == lp.token_id and lp.logprob == pytest.approx(tops[0])
        assert lp.token_bytes and lp.token_bytes.decode("utf-8", "replace") == lp.token


def test_stop_token_ids_and_stop_strings(served: Any, client: Any) -> None:
    ids = [5, 17, 42, 3, 88, 9]
    free = run(served, ids, temperature=0.0, max_tokens=16, ignore_eos=True)
    tokens = [t for o in free for t in o.new_token_ids]
    text = "".join(o.text_delta for o in free)

    stop_id = tokens[3]
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    sampling.stop_token_ids.append(stop_id)
    chunks, complete = generate(client, token_ids=pb.TokenIds(ids=ids), sampling=sampling)
    got = [t for c in chunks for t in c.token_ids]
    assert got == tokens[: tokens.index(stop_id) + 1]
    (choice,) = complete.choices
    assert (choice.finish_reason, choice.stop_token_id) == ("stop", stop_id)

    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop])
    chunks, complete = generate(client, token_ids=pb.TokenIds(ids=ids), sampling=sampling)
    assert "".join(c.text for c in chunks) == text[: text.index(stop)]
    (choice,) = complete.choices
    assert (choice.finish_reason, choice.stop_string) == ("stop", stop)


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "named"),
    [
        ({"text": "hi", "sampling": pb.SamplingParams(temperature=-1)}, "sampling.temperature", "temperature"),
        ({"text": "hi", "sampling": pb.SamplingParams(max_tokens=0)}, "sampling.max_tokens", "max_tokens"),
        ({"text": "hi", "sampling": pb.SamplingParams(n=0)}, "sampling.n", "'n'"),
        ({"text": "hi", "sampling": pb.SamplingParams(logprobs=21)}, "sampling.logprobs", "logprobs"),
        ({"text": "hi", "sampling": pb.SamplingParams(top_p=0)}, "sampling.top_p", "top_p"),
        ({"text": "hi", "sampling": pb.SamplingParams(logit_bias={9999: 1.0})}, "sampling.logit_bias", "logit_bias"),
        ({"text": "hi", "sampling": pb.SamplingParams(max_tokens=5000)}, "sampling.max_tokens", "context limit"),
        ({"token_ids": pb.TokenIds(ids=[5, 9999])}, "token_ids", "token_ids"),
        ({"token_ids": pb.TokenIds()}, "token_ids", "token_ids"),
        ({"chat": pb.ChatMessages()}, "chat.messages", "chat.messages"),
        ({"chat": chat_pb([("", "hi")])}, "chat.messages[0].role", "role"),
        ({}, "input", "input"),
    ],
)  # fmt: skip
def test_bad_fields_are_invalid_argument_naming_the_field(
    client: Any, fields: dict[str, Any], field: str, named: str
) -> None:
    err = refusal(lambda: client.Generate(pb.GenerateRequest(**fields), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert named in err.details()
    assert trailing(err)["rustinfer-error-field"] == field


def test_unary_calls_name_their_bad_fields(client: Any) -> None:
    err = refusal(lambda: client.Tokenize(pb.TokenizeRequest()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'input'" in err.details()
    err = refusal(lambda: client.Detokenize(pb.DetokenizeRequest(token_ids=[1, 100000])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'token_ids'" in err.details()
    err = refusal(lambda: client.Abort(pb.AbortRequest()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'request_id'" in err.details()


def test_an_unknown_model_is_not_found(client: Any) -> None:
    calls = [
        lambda: client.Generate(pb.GenerateRequest(model="gpt-9", text="hi"), timeout=30),
        lambda: client.Tokenize(pb.TokenizeRequest(model="gpt-9", text="hi")),
        lambda: client.Detokenize(pb.DetokenizeRequest(model="gpt-9", token_ids=[5])),
        lambda: client.GetModelInfo(pb.GetModelInfoRequest(model="gpt-9")),
    ]
    for call in calls:
        err = refusal(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "'gpt-9'" in err.details() and MODEL_NAME in err.details()
        assert trailing(err)["rustinfer-error-field"] == "model"


def test_a_full_queue_is_resource_exhausted(start_state: Any) -> None:
    # One sequence runs at a time and two may wait: a long n=2 request keeps one running and one
    # waiting, so two more sequences overflow the waiting room.
    config = EngineConfig(max_num_seqs=1, max_waiting=2, kv_cache_bytes=16 << 20)
    s = start_state(config)
    try:
        channel, client = stub(s.serve())
        sampling = pb.SamplingParams(n=2, temperature=0.0, max_tokens=2000, ignore_eos=True)
        first = client.Generate(pb.GenerateRequest(text="hi", sampling=sampling), timeout=60)
        assert next(first).HasField("chunk")
        err = refusal(
            lambda: client.Generate(pb.GenerateRequest(text="hi", sampling=sampling), timeout=30)
        )
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert (
            "overloaded" in err.details() and trailing(err)["rustinfer-error-code"] == "overloaded"
        )
        first.cancel()
        s.wait_idle()
        channel.close()
    finally:
        s.close()


def test_loading_and_shutting_down_are_unavailable(start_state: Any) -> None:
    gate = threading.Event()
    s = start_state(EngineConfig(kv_cache_bytes=4 << 20), gate, wait=False)
    try:
        channel, client = stub(s.serve())
        for call in (
            lambda: client.GetModelInfo(pb.GetModelInfoRequest()),
            lambda: client.Generate(pb.GenerateRequest(text="hi"), timeout=30),
        ):
            err = refusal(call)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.details()
            assert trailing(err)["rustinfer-error-code"] == "model_loading"
        gate.set()
        assert s.state.ready.wait(30)
        assert client.GetModelInfo(pb.GetModelInfoRequest()).model == MODEL_NAME
        running = client.Generate(pb.GenerateRequest(text="hi", sampling=LONG), timeout=30)
        assert next(running).HasField("chunk")
        s.loop.run(s.state.stop())
        # The stream in flight ends with the engine's shutdown; new calls are refused.
        with pytest.raises(grpc.RpcError) as info:
            list(running)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert trailing(info.value)["rustinfer-error-code"] == "shutting_down"
        err = refusal(lambda: client.Generate(pb.GenerateRequest(text="hi"), timeout=30))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()
        channel.close()
    finally:
        gate.set()
        s.close()


# -- API keys ---------------------------------------------------------------------------------------


def _health_and_reflection(server: grpc.aio.Server) -> None:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = [pb.DESCRIPTOR.services_by_name["Inference"].full_name, health.SERVICE_NAME]
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)


def test_api_keys(served: Any) -> None:
    keys = ["k-one", "k-two"]
    port = served.serve(interceptors=[ApiKeyInterceptor(keys)], extra=_health_and_reflection)
    channel, client = stub(port)
    request = pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(**GREEDY))
    for metadata in [(), (("authorization", "Bearer nope"),), (("authorization", "k-one"),)]:
        for call in (
            lambda md=metadata: client.GetModelInfo(pb.GetModelInfoRequest(), metadata=md),
            lambda md=metadata: client.Generate(request, metadata=md, timeout=30),
        ):
            err = refusal(call)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, err.details())
            assert "API key" in err.details()
    for key in keys:
        metadata = (("authorization", f"Bearer {key}"),)
        assert client.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata).model == MODEL_NAME
        responses = list(client.Generate(request, metadata=metadata, timeout=30))
        assert responses[-1].complete.choices[0].finish_reason == "length"
    # Health and reflection stay open.
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "rustinfer.v1.Inference" in services
    channel.close()


# -- cancels, deadlines, aborts ---------------------------------------------------------------------


def _final_of(served: Any, rid: str) -> RequestOutput:
    deadline = time.monotonic() + 5
    while rid not in served.finals:
        assert time.monotonic() < deadline, f"{rid} never finished in the engine"
        time.sleep(0.01)
    (final,) = served.finals[rid]
    return final


def test_a_client_cancel_aborts_the_engine_request(served: Any, client: Any) -> None:
    call = client.Generate(pb.GenerateRequest(request_id="cancel-me", text="hi", sampling=LONG))
    assert next(call).HasField("chunk")
    assert served.engine.stats()["running"] == 1
    call.cancel()
    # Idle (no request, no KV block) within moments, long before its 3000 tokens (about 6 s of
    # work) would have run out: the engine aborted it.
    stats = served.wait_idle(timeout_s=2.0)
    assert stats["kv_cache_usage"] == 0
    final = _final_of(served, "cancel-me")
    assert final.finish_reason == "abort" and final.num_output_tokens < 1000


def test_a_deadline_aborts_the_engine_request(served: Any, client: Any) -> None:
    request = pb.GenerateRequest(request_id="deadline", text="hi", sampling=LONG)
    with pytest.raises(grpc.RpcError) as info:
        list(client.Generate(request, timeout=0.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    served.wait_idle(timeout_s=2.0)
    final = _final_of(served, "deadline")
    assert final.finish_reason == "abort" and final.num_output_tokens < 1000


def test_abort_by_request_id_ends_the_stream_with_abort(served: Any, client: Any) -> None:
    sampling = pb.SamplingParams(n=2, temperature=0.0, max_tokens=3000, ignore_eos=True)
    call = client.Generate(pb.GenerateRequest(request_id="abort-me", text="hi", sampling=sampling))
    first = next(call)
    assert first.request_id == "abort-me" and first.HasField("chunk")
    # While it lives, its id is taken.
    err = refusal(lambda: client.Generate(pb.GenerateRequest(request_id="abort-me", text="x")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing(err)["rustinfer-error-field"] == "request_id"

    assert client.Abort(pb.AbortRequest(request_id="abort-me")).aborted
    rest = list(call)
    assert rest[-1].HasField("complete") and all(r.HasField("chunk") for r in rest[:-1])
    choices = rest[-1].complete.choices
    assert [(c.index, c.finish_reason) for c in choices] == [(0, "abort"), (1, "abort")]
    assert all(c.completion_tokens < 1000 for c in choices)
    assert not client.Abort(pb.AbortRequest(request_id="abort-me")).aborted
    assert not client.Abort(pb.AbortRequest(request_id="never-was")).aborted
    served.wait_idle()


def test_64_concurrent_streams_finish_beside_a_bad_request(served: Any, client: Any) -> None:
    def good(i: int) -> pb.GenerateComplete:
        _, complete = generate(
            client, text=f"Hello {i} world", sampling=pb.SamplingParams(**GREEDY)
        )
        return complete

    def bad() -> grpc.RpcError:
        request = pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(min_p=2.0))
        return refusal(lambda: client.Generate(request, timeout=30))

    with ThreadPoolExecutor(max_workers=65) as pool:
        futures = [pool.submit(good, i) for i in range(32)]
        bad_future = pool.submit(bad)
        futures += [pool.submit(good, i) for i in range(32, 64)]
        completes = [f.result(timeout=60) for f in futures]
        err = bad_future.result(timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_p" in err.details()
    for complete in completes:
        (choice,) = complete.choices
        assert (choice.finish_reason, choice.completion_tokens) == ("length", 8)
    served.wait_idle()
