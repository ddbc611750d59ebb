"""Structured outputs through the official openai SDK against ``rustinfer serve``.

``response_format`` (json_object, json_schema) on chat completions, vLLM's ``guided_*`` fields
(through ``extra_body``) on both endpoints, streamed and not; outputs validated independently
(jsonschema, Python's re).
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest
from server_helpers import LiveServer

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population_millions": {"type": "number", "minimum": 0, "maximum": 40},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population_millions", "landmarks", "capital"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Tell me about Paris."}]


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def json_schema_format(schema: dict) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }


def test_chat_json_schema_validates_streamed_or_not(client: openai.OpenAI, model: str) -> None:
    kw = {"model": model, "messages": ASK, "max_tokens": 200, "temperature": 0,
          "response_format": json_schema_format(SCHEMA)}  # fmt: skip
    whole = client.chat.completions.create(**kw)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(**kw, stream=True)
        if chunk.choices
    )
    assert streamed == text


def test_json_object_parses(client: openai.OpenAI, model: str) -> None:
    ask = [{"role": "user", "content": 'Reply in JSON only, like {"name": "...", "city": "..."}.'}]
    r = client.chat.completions.create(
        model=model, messages=ask, max_tokens=120, temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_guided_regex_and_choice_on_both_endpoints(client: openai.OpenAI, model: str) -> None:
    regex = r"[0-9]{3}-[0-9]{4}"
    choices = ["positive", "negative", "neutral"]
    chat = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=20, temperature=1.0, seed=1, n=3,
        extra_body={"guided_regex": regex},
    )  # fmt: skip
    for c in chat.choices:
        assert re.fullmatch(regex, c.message.content), c.message.content
    completion = client.completions.create(
        model=model, prompt="The review 'I loved it' is", max_tokens=10, temperature=1.0, seed=2,
        n=3, extra_body={"guided_choice": choices},
    )  # fmt: skip
    for c in completion.choices:
        assert c.text in choices and c.finish_reason == "stop"


def test_many_schemas_at_once_all_validate(live_server: LiveServer, model: str) -> None:
    """Twenty concurrent requests, each with its own schema, batched together by the engine."""
    schemas = [
        {
            "type": "object",
            "properties": {
                "n": {"type": "integer", "minimum": i, "maximum": i + 10},
                "tag": {"enum": [f"t{i}", f"u{i}"]},
                "items": {"type": "array", "items": {"type": "integer"}, "maxItems": i % 4},
            },
            "required": ["n", "tag", "items"],
            "additionalProperties": False,
        }
        for i in range(20)
    ]

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0)
        async with client:
            calls = [
                client.chat.completions.create(
                    model=model,
                    messages=ASK,
                    max_tokens=100,
                    temperature=0.8,
                    seed=i,
                    response_format=json_schema_format(s),
                )  # fmt: skip
                for i, s in enumerate(schemas)
            ]
            return [r.choices[0].message.content for r in await asyncio.gather(*calls)]

    for schema, text in zip(schemas, asyncio.run(main()), strict=True):
        jsonschema.validate(json.loads(text), schema)


def test_a_schema_that_cannot_compile_is_a_400_naming_it(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model, messages=ASK, max_tokens=8,
            response_format=json_schema_format({"type": "object", "properties": {"a": {"type": "nope"}}}),
        )  # fmt: skip
    assert info.value.body["param"] == "response_format.json_schema.schema"
    assert "nope" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=model, prompt="x", max_tokens=4, extra_body={"guided_regex": "([a-z"}
        )
    assert info.value.body["param"] == "guided_regex"
