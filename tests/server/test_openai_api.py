"""The REST API through the official ``openai`` SDK (sync and async) and raw HTTP for framing.

Every test talks to a real ``rustinfer serve`` process running the embedded SmolLM2 on the CPU.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_helpers import LiveServer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client: openai.OpenAI, live_server: LiveServer) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].owned_by == "rustinfer"
    assert client.models.retrieve("SmolLM2-135M-Instruct").id == "SmolLM2-135M-Instruct"


def test_chat_answers_with_real_usage(client: openai.OpenAI, model: str, live_server) -> None:
    r = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    with live_server.client() as c:
        counted = c.post("/tokenize", json={"messages": QUESTION}).json()["count"]
    assert r.usage.prompt_tokens == counted > 10
    assert r.usage.completion_tokens == len(c_ids(live_server, choice.message.content)) + 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    perf = r.usage.model_extra["performance"]
    assert perf["decode_iterations"] == r.usage.completion_tokens - 1
    assert perf["time_to_first_token_ms"] >= perf["prefill_ms"] > 0
    assert perf["decode_ms"] > 0 and perf["tokens_per_second"] > 0


def c_ids(server: LiveServer, text: str) -> list[int]:
    with server.client() as c:
        return c.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()[
            "tokens"
        ]


def test_chat_stream_matches_the_whole_answer(client: openai.OpenAI, model: str) -> None:
    whole = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=24
    )
    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) >= 3  # streamed token by token, not in one piece
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.usage.completion_tokens == whole.usage.completion_tokens


def test_length_finish_and_max_completion_tokens(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        temperature=0,
        max_completion_tokens=5,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_multi_turn_roles_and_text_parts(client: openai.OpenAI, model: str) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "My name is Ada."}]},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": "What is my name?"},
    ]
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16)
    assert "Ada" in r.choices[0].message.content


def test_stop_strings_cut_the_text(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=24, stop=[" Paris"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "The capital of France is"


def test_n_and_seed_give_reproducible_choices(client: openai.OpenAI, model: str) -> None:
    kw = dict(model=model, messages=QUESTION, temperature=1.0, max_tokens=8, n=3, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # each choice draws from its own generator
    assert 3 <= a.usage.completion_tokens <= 24


def test_chat_logprobs_carry_token_text_and_bytes(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    text = r.choices[0].message.content
    joined = b"".join(bytes(t.bytes) for t in content).decode()
    assert joined.startswith(text)  # the final EOS token's bytes follow the text
    for t in content:
        assert len(t.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
        assert t.logprob <= 0
        assert [x.logprob for x in t.top_logprobs] == sorted(
            (x.logprob for x in t.top_logprobs), reverse=True
        )


def test_completions_text_ids_echo_and_batches(client: openai.OpenAI, model: str, live_server):
    r = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    first = r.choices[0].text
    assert r.usage.completion_tokens == 6
    ids = c_ids(live_server, "The capital of France is")
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == first
    echo = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=6, temperature=0, echo=True
    )
    assert echo.choices[0].text == "The capital of France is" + first
    batch = client.completions.create(
        model=model,
        prompt=["The capital of France is", "1, 2, 3,"],
        max_tokens=6,
        temperature=0,
        n=2,
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == first
    assert batch.usage.prompt_tokens == len(ids) + len(c_ids(live_server, "1, 2, 3,"))


def test_completions_stream_and_logprobs(client: openai.OpenAI, model: str) -> None:
    whole = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=10, temperature=0, logprobs=2
    )
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chunks = list(
        client.completions.create(
            model=model,
            prompt="Once upon a time",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10


def test_async_client_stream_and_whole(live_server: LiveServer, model: str) -> None:
    async def main() -> tuple[str, str]:
        async with openai.AsyncOpenAI(
            base_url=live_server.url + "/v1", api_key="x", max_retries=0
        ) as aclient:
            whole = await aclient.chat.completions.create(
                model=model, messages=QUESTION, temperature=0, max_tokens=16
            )
            stream = await aclient.chat.completions.create(
                model=model, messages=QUESTION, temperature=0, max_tokens=16, stream=True
            )
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return whole.choices[0].message.content, "".join(parts)

    whole, streamed = asyncio.run(main())
    assert "Paris" in whole and streamed == whole


# -- errors ------------------------------------------------------------------------------------


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=QUESTION, max_tokens=4)
    err = info.value.body
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]


def test_too_long_is_400_before_any_work(client: openai.OpenAI, model: str, live_server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=10_000_000)
    assert info.value.body["code"] == "context_length_exceeded"
    assert live_server.engine_stats()["running"] == 0


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools.0.function.parameters",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
        ),  # fmt: skip
        ({"extra_body": {"guided_regex": "a+", "guided_choice": ["a"]}}, "guided_choice"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"logit_bias": {"99999999": 5}}, "logit_bias"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
    ],
)
def test_bad_fields_are_400_naming_the_field(client, model, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, **extra)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param, info.value.body


def test_images_are_refused(live_server: LiveServer) -> None:
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ]
    }
    with live_server.client() as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages.0.content.0"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"messages": []}', "messages"),
        (b'{"model": "x"}', "messages"),
        (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages.0.role"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', "max_tokens"),
    ],
)
def test_malformed_bodies_are_400_in_openai_shape(live_server: LiveServer, body, param) -> None:
    with live_server.client() as c:
        r = c.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_unknown_route_is_404_in_openai_shape(live_server: LiveServer) -> None:
    with live_server.client() as c:
        r = c.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# -- raw HTTP: SSE framing, tokenizer endpoints, health, metrics -----------------------------


def test_sse_framing_is_exact(live_server: LiveServer) -> None:
    body = {
        "messages": QUESTION,
        "temperature": 0,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with live_server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 5
    assert all(p["usage"] is None for p in payloads[:-1])
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"


def test_streamed_deltas_never_split_a_character(live_server: LiveServer) -> None:
    """Multi-byte characters span several tokens; no delta may carry half of one."""
    prompt = [
        {"role": "user", "content": "Reply with three emoji and the word 你好, nothing else."}
    ]
    body = {"messages": prompt, "temperature": 0, "max_tokens": 24, "stream": True}
    with live_server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        deltas = [
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in r.iter_lines()
            if line.startswith("data: {")
        ]
    text = "".join(deltas)
    assert any(ord(ch) > 0x7FF for ch in text), text  # the answer holds multi-byte characters
    assert "\ufffd" not in text
    assert len([d for d in deltas if d]) > 3


def test_tokenize_detokenize_round_trip(live_server: LiveServer) -> None:
    with live_server.client() as c:
        t = c.post("/tokenize", json={"prompt": "Hello wörld 你好"}).json()
        assert t["count"] == len(t["tokens"]) and t["max_model_len"] > 0
        back = c.post("/detokenize", json={"tokens": t["tokens"]}).json()
        assert back["prompt"] == "Hello wörld 你好"
        bad = c.post("/detokenize", json={"tokens": [-1]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_health_ready_and_system_metrics(live_server: LiveServer) -> None:
    with live_server.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").status_code == 200
        m = c.get("/v1/metrics").json()
    assert m["cpu"]["core_count"] >= 1 and 0 <= m["cpu"]["utilization_percent"] <= 100
    assert m["memory"]["total_mb"] >= m["memory"]["used_mb"] > 0
    assert m["memory"]["available_mb"] > 0
    assert m["gpu"] is None  # CPU server
    assert m["timestamp"] > 1.7e9
    assert m["engine"]["model"] == "SmolLM2-135M-Instruct"


def test_prometheus_series_follow_requests(client: openai.OpenAI, model, live_server) -> None:
    def scrape() -> dict[str, float]:
        with live_server.client() as c:
            text = c.get("/metrics").text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    label = '{api="rest",model_name="SmolLM2-135M-Instruct"}'
    engine_label = '{model_name="SmolLM2-135M-Instruct"}'
    before = scrape()
    r = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0)
    after = scrape()
    gen = f"rustinfer_generation_tokens_total{label}"
    assert after[gen] - before.get(gen, 0) == 5
    prompt = f"rustinfer_prompt_tokens_total{label}"
    assert after[prompt] - before.get(prompt, 0) == r.usage.prompt_tokens
    ok = (
        'rustinfer_request_success_total{api="rest",finished_reason="length",'
        'model_name="SmolLM2-135M-Instruct"}'
    )
    assert after[ok] - before.get(ok, 0) == 1
    for hist in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        key = f"rustinfer_{hist}_seconds_count{label}"
        assert after[key] - before.get(key, 0) == 1
    itl = f"rustinfer_inter_token_latency_seconds_count{label}"
    assert after[itl] - before.get(itl, 0) == 4
    assert after[f"rustinfer_num_requests_running{engine_label}"] == 0
    assert after[f"rustinfer_num_requests_waiting{engine_label}"] == 0
    assert after[f"rustinfer_kv_cache_usage_perc{engine_label}"] == 0


def test_cors_is_off_unless_asked(live_server: LiveServer) -> None:
    with httpx.Client() as c:
        r = c.options(
            live_server.url + "/v1/models",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
        )
    assert "access-control-allow-origin" not in r.headers


def test_an_oversized_body_is_413_and_the_server_goes_on(live_server: LiveServer) -> None:
    from rustinfer.server.body_limit import MAX_BODY_BYTES

    with live_server.client() as c:
        r = c.post(
            "/v1/completions",
            content=b"x" * (MAX_BODY_BYTES + 1),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert c.get("/health").status_code == 200
