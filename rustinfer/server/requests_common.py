"""Request checks every face of the server shares (REST, gRPC): model name, choices, prompt ids,
chat messages, sampling parameters.

Each raises the engine's own typed errors (``rustinfer.errors``) naming the field to fix; the face
decides the wire status (HTTP 4xx, a gRPC code) and the field's spelling on its wire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.errors import InvalidRequestError, NotFoundError

__all__ = [
    "MAX_CHOICES",
    "build_sampling_params",
    "chat_message",
    "check_model",
    "check_token_ids",
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
