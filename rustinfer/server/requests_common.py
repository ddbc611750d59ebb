"""Request checks every face of the server shares (REST, gRPC): model name, choices, prompt ids,
chat messages, sampling parameters.

Each raises the engine's own typed errors (``rustinfer.errors``) naming the field to fix; the face
decides the wire status (HTTP 4xx, a gRPC code) and the field's spelling on its wire.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.engine.structured import StructuredOutput
from rustinfer.errors import InvalidRequestError, NotFoundError

__all__ = [
    "MAX_CHOICES",
    "build_sampling_params",
    "chat_message",
    "check_model",
    "check_token_ids",
    "structured_output",
]

# Upper bound on choices per request, so one request cannot queue the whole waiting room.
MAX_CHOICES = 128


def check_model(requested: str | None, served: str, field: str = "model", hint: str = "") -> None:
    """Refuse a request for a model other than the served one (None or "": the served one)."""
    if requested and requested != served:
        raise NotFoundError(
            f"the model {requested!r} does not exist here; this server serves {served!r}{hint}",
            field,
        )


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str) -> list[int]:
    """``ids`` as a list, refused when empty or outside the vocabulary."""
    if not ids:
        raise InvalidRequestError(field, "no token ids: give at least one")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            field, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})"
        )
    return list(ids)


def chat_message(role: str, content: str, name: str | None = None) -> dict[str, Any]:
    """One message as chat templates expect it."""
    # OpenAI's "developer" role is the newer name of "system" for the same instructions.
    message: dict[str, Any] = {"role": "system" if role == "developer" else role}
    message["content"] = content
    if name is not None:
        message["name"] = name
    return message


def build_sampling_params(
    n: int, max_tokens: int | None, fields: Mapping[str, Any], n_field: str = "n"
) -> SamplingParams:
    """Engine parameters from a request: ``max_tokens`` None means up to the context limit, and
    every other field left None (absent on the wire) takes the engine's default. SamplingParams
    validates and names the field of any bad value."""
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError(n_field, f"must be in [1, {MAX_CHOICES}], got {n}")
    values: dict[str, Any] = {"n": n, "max_tokens": max_tokens}
    values.update({k: v for k, v in fields.items() if v is not None})
    return SamplingParams(**values)


def structured_output(
    response_format: Mapping[str, Any] | None,
    guided_json: Any = None,
    guided_regex: str | None = None,
    guided_choice: Any = None,
    guided_grammar: str | None = None,
) -> StructuredOutput | None:
    """The one constraint a request asks for (OpenAI's ``response_format`` or one of vLLM's
    ``guided_*`` fields), or None for free text; two at once, or a malformed one, is refused
    naming the field."""
    given: list[StructuredOutput] = []
    if response_format is not None:
        kind = response_format.get("type", "text")
        if kind == "json_object":
            given.append(StructuredOutput("json_object"))
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping) or "schema" not in spec:
                raise InvalidRequestError(
                    "response_format.json_schema",
                    'give {"name": ..., "schema": {...}} (a JSON schema under "schema")',
                )
            given.append(
                StructuredOutput.json_schema(spec["schema"], "response_format.json_schema.schema")
            )
        elif kind != "text":
            raise InvalidRequestError(
                "response_format.type",
                f"must be 'text', 'json_object' or 'json_schema', got {kind!r}",
            )
    if guided_json is not None:
        if isinstance(guided_json, str):
            try:
                guided_json = json.loads(guided_json)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError("guided_json", f"not JSON: {exc}") from exc
        given.append(StructuredOutput.json_schema(guided_json, "guided_json"))
    if guided_regex is not None:
        given.append(StructuredOutput("regex", guided_regex, "guided_regex"))
    if guided_choice is not None:
        given.append(StructuredOutput.choice(guided_choice, "guided_choice"))
    if guided_grammar is not None:
        given.append(StructuredOutput("grammar", guided_grammar, "guided_grammar"))
    if len(given) > 1:
        raise InvalidRequestError(
            given[1].field, f"only one constraint per request: {given[0].field} is given too"
        )
    return given[0] if given else None
