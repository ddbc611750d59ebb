"""The native service's ``SamplingParams`` message as engine parameters, its structured-output
constraint included (``sampling.structured``), checked by the same rules as REST's."""

from __future__ import annotations

import json
from typing import Any

from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.engine.structured import StructuredOutput
from rustinfer.errors import InvalidRequestError
from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2 as pb
from rustinfer.server.requests_common import build_sampling_params

__all__ = ["sampling_params_of"]

# SamplingParams fields the message carries as proto3 `optional` scalars (n and max_tokens, whose
# unset values differ from the engine's defaults, are read apart).
_OPTIONAL_SCALARS = (
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "ignore_eos",
    "logprobs",
    "skip_special_tokens",
    "include_stop_str_in_output",
)


def sampling_params_of(msg: pb.SamplingParams) -> SamplingParams:
    """Engine parameters from the wire: unset fields take the engine's defaults, except an unset
    ``max_tokens``, which (as in REST) means up to the context limit."""
    fields: dict[str, Any] = {
        name: getattr(msg, name) if msg.HasField(name) else None for name in _OPTIONAL_SCALARS
    }
    fields["stop"] = list(msg.stop) or None
    fields["stop_token_ids"] = list(msg.stop_token_ids) or None
    fields["logit_bias"] = dict(msg.logit_bias) or None
    fields["structured"] = _structured_of(msg)
    n = msg.n if msg.HasField("n") else 1
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else None
    return build_sampling_params(n, max_tokens, fields)


def _structured_of(msg: pb.SamplingParams) -> StructuredOutput | None:
    if not msg.HasField("structured"):
        return None
    so = msg.structured
    kind = so.WhichOneof("kind")
    field = f"sampling.structured.{kind}"
    if kind == "json_schema":
        try:
            schema = json.loads(so.json_schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(field, f"not JSON: {exc}") from exc
        return StructuredOutput.json_schema(schema, field)
    if kind == "json_object":
        return StructuredOutput("json_object", "", field)
    if kind == "regex":
        return StructuredOutput("regex", so.regex, field)
    if kind == "choice":
        return StructuredOutput.choice(list(so.choice.choices), field)
    if kind == "grammar":
        return StructuredOutput("grammar", so.grammar, field)
    raise InvalidRequestError("sampling.structured", "set one of its kinds")
