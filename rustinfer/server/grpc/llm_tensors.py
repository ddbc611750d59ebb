"""The LLM as tensors, the way Triton's vLLM backend names them, over KServe's protocol.

Inputs (one element each):
  ``text_input`` BYTES               the prompt, UTF-8 text (tokenized with the model's tokenizer)
  ``stream`` BOOL (or ``streaming``)  one response per generation step (ModelStreamInfer only)
  ``sampling_parameters`` BYTES      a JSON object: temperature, top_p, top_k, min_p, max_tokens,
                                     min_tokens, stop, stop_token_ids, seed, ignore_eos, n (1),
                                     presence/frequency/repetition_penalty, logit_bias,
                                     skip_special_tokens, include_stop_str_in_output; numbers may
                                     come as strings ("0.7"), as Triton's own examples send them
  ``exclude_input_in_output`` BOOL   false: the prompt leads the text; default false, or true
                                     when streaming (where false is refused, as Triton does)
  ``return_finish_reason``, ``return_num_input_tokens``, ``return_num_output_tokens`` BOOL
                                     false leaves that output out (every output comes by default)
Request parameters (``ModelInferRequest.parameters``) are taken as sampling parameters too, the
``sampling_parameters`` input winning where both name one; ``priority`` and ``timeout`` are
accepted and ignored, and ``triton_enable_empty_final_response`` asks for an empty last response.

Outputs, per response (``raw_output_contents``): ``text_output`` BYTES [1] (the new text since
the previous response), ``finish_reason`` BYTES [1] ("stop", "length", "abort", or "" until the
end), ``num_input_tokens`` UINT32 [1] (prompt tokens), ``num_output_tokens`` UINT32 [1] (tokens
in this response).

BYTES data comes either typed (``contents.bytes_contents``) or raw (``raw_input_contents``: per
element a 4-byte little-endian length, then the bytes); answers are always raw.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rustinfer.engine.sampling_params import SamplingParams, SamplingParamsError
from rustinfer.errors import InvalidRequestError
from rustinfer.server.grpc.generated.inference import grpc_service_pb2 as pb

__all__ = [
    "EMPTY_FINAL_PARAMETER",
    "FINAL_PARAMETER",
    "INPUTS",
    "OUTPUTS",
    "LLMRequest",
    "decode_bytes_tensor",
    "empty_final_response",
    "encode_bytes_tensor",
    "infer_response",
    "parse_request",
    "sampling_params_from",
]

# (name, datatype, shape) as ModelMetadata reports them; -1: a dimension of any size.
INPUTS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("text_input", "BYTES", (1,)),
    ("stream", "BOOL", (1,)),
    ("sampling_parameters", "BYTES", (1,)),
    ("exclude_input_in_output", "BOOL", (1,)),
    ("return_finish_reason", "BOOL", (1,)),
    ("return_num_input_tokens", "BOOL", (1,)),
    ("return_num_output_tokens", "BOOL", (1,)),
)
OUTPUTS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("text_output", "BYTES", (-1,)),
    ("finish_reason", "BYTES", (-1,)),
    ("num_input_tokens", "UINT32", (1,)),
    ("num_output_tokens", "UINT32", (-1,)),
)
_INPUT_TYPES = {name: dtype for name, dtype, _ in INPUTS} | {"streaming": "BOOL"}
_OUTPUT_NAMES = tuple(name for name, _, _ in OUTPUTS)
# return_<output> inputs that can leave an output out.
_RETURN_FLAGS = {f"return_{name}": name for name in _OUTPUT_NAMES[1:]}

# The protocol's own request parameters: hints we do not act on, and ones we cannot serve.
_IGNORED_PARAMETERS = frozenset({"priority", "timeout"})
_REFUSED_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end"})
EMPTY_FINAL_PARAMETER = "triton_enable_empty_final_response"
FINAL_PARAMETER = "triton_final_response"

# vLLM's defaults where they differ from no value at all: max_tokens 16 (also SamplingParams').
_DEFAULT_MAX_TOKENS = 16
_FLOAT_PARAMS = frozenset(
    {
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    }
)
_INT_PARAMS = frozenset({"max_tokens", "min_tokens", "top_k", "seed", "n"})
_BOOL_PARAMS = frozenset({"ignore_eos", "skip_special_tokens", "include_stop_str_in_output"})
_OTHER_PARAMS = frozenset({"stop", "stop_token_ids", "logit_bias"})
SAMPLING_KEYS = _FLOAT_PARAMS | _INT_PARAMS | _BOOL_PARAMS | _OTHER_PARAMS


@dataclass
class LLMRequest:
    """One inference request as the engine will run it."""

    prompt: str
    stream: bool
    prepend_prompt: bool  # the prompt leads the text of the first response
    params: SamplingParams
    outputs: tuple[str, ...]  # the outputs each response carries, in OUTPUTS order
    empty_final: bool  # end with an empty response that alone says "final"
    id: str = ""
    model_version: str = ""


# -- BYTES tensors ----------------------------------------------------------------------------------


def decode_bytes_tensor(raw: bytes, field_name: str) -> list[bytes]:
    """The elements of a raw BYTES tensor (each a 4-byte little-endian length, then the bytes)."""
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidRequestError(
                field_name,
                f"raw BYTES data is cut short: {len(raw) - pos} stray byte(s) at the end",
            )
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise InvalidRequestError(
                field_name,
                f"raw BYTES element of {size} bytes runs past the end of the data "
                f"({len(raw) - pos} left): each element is a 4-byte little-endian length, then "
                "that many bytes",
            )
        items.append(raw[pos : pos + size])
        pos += size
    return items


def encode_bytes_tensor(items: Iterable[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


# -- reading a request ----------------------------------------------------------------------------


def _elements(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[Any]:
    name = tensor.name
    expected = _INPUT_TYPES[name]
    if tensor.datatype != expected:
        raise InvalidRequestError(name, f"must be a {expected} tensor, got {tensor.datatype!r}")
    if expected == "BYTES":
        values: list[Any] = (
            decode_bytes_tensor(raw, name)
            if raw is not None
            else list(tensor.contents.bytes_contents)
        )
    else:  # BOOL: one byte per element on the raw wire
        if raw is not None:
            if any(b > 1 for b in raw):
                raise InvalidRequestError(name, "raw BOOL data must hold bytes 0 or 1")
            values = [b == 1 for b in raw]
        else:
            values = list(tensor.contents.bool_contents)
    if any(d < 0 for d in tensor.shape):
        raise InvalidRequestError(name, f"shape {list(tensor.shape)} has a negative dimension")
    count = math.prod(tensor.shape)
    if count != len(values):
        raise InvalidRequestError(
            name,
            f"shape {list(tensor.shape)} says {count} element(s), the data holds {len(values)}",
        )
    if len(values) != 1:
        raise InvalidRequestError(name, f"takes exactly one element, got {len(values)}")
    return values


def _inputs(request: pb.ModelInferRequest) -> dict[str, Any]:
    """Each input's single value, by name."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequestError(
            "raw_input_contents",
            f"holds {len(raw)} entries for {len(request.inputs)} inputs: give one per input, in "
            "the order of 'inputs' (or none, and each input's contents)",
        )
    values: dict[str, Any] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in _INPUT_TYPES:
            known = ", ".join(sorted(_INPUT_TYPES))
            raise InvalidRequestError(
                "inputs", f"this model has no input {tensor.name!r}; its inputs: {known}"
            )
        if tensor.name in values:
            raise InvalidRequestError("inputs", f"input {tensor.name!r} is given twice")
        values[tensor.name] = _elements(tensor, raw[i] if raw else None)[0]
    if "stream" in values and "streaming" in values:
        raise InvalidRequestError("streaming", "give 'stream' or its alias 'streaming', not both")
    return values


def _parameter_value(param: pb.InferParameter) -> Any:
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def parse_request(request: pb.ModelInferRequest, streaming_rpc: bool) -> LLMRequest:
    """Validate ``request`` (inputs, parameters, requested outputs) into what the engine runs.

    Raises ``InvalidRequestError`` (or ``SamplingParamsError``) naming the input, parameter or
    sampling key to fix.
    """
    values = _inputs(request)
    if "text_input" not in values:
        raise InvalidRequestError("text_input", "is required: the prompt, as a BYTES tensor")
    try:
        prompt = values["text_input"].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError("text_input", f"is not valid UTF-8 ({exc.reason})") from None
    stream = bool(values.get("stream", values.get("streaming", False)))
    if stream and not streaming_rpc:
        raise InvalidRequestError(
            "stream",
            "true needs ModelStreamInfer (tritonclient: start_stream, then async_stream_infer); "
            "ModelInfer answers once: send stream false or leave it out",
        )
    exclude = values.get("exclude_input_in_output", stream)
    if stream and not exclude:
        raise InvalidRequestError(
            "exclude_input_in_output", "false is not allowed when streaming: send true"
        )

    sampling: dict[str, Any] = {}
    empty_final = False
    for key, param in request.parameters.items():
        value = _parameter_value(param)
        if key == EMPTY_FINAL_PARAMETER:
            if not isinstance(value, bool):
                raise InvalidRequestError(key, "must be a bool parameter")
            empty_final = value
        elif key in _IGNORED_PARAMETERS:
            continue
        elif key in _REFUSED_PARAMETERS:
            raise InvalidRequestError(
                key, "sequence batching is not supported by this server: remove it"
            )
        elif key.startswith("triton_"):
            raise InvalidRequestError(key, "is not a parameter this server supports: remove it")
        else:
            sampling[key] = value
    if "sampling_parameters" in values:
        sampling.update(_sampling_json(values["sampling_parameters"]))

    outputs = _requested_outputs(request, values)
    return LLMRequest(
        prompt=prompt,
        stream=stream,
        prepend_prompt=not exclude,
        params=sampling_params_from(sampling),
        outputs=outputs,
        empty_final=empty_final and streaming_rpc,
        id=request.id,
        model_version=request.model_version,
    )


def _sampling_json(raw: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError("sampling_parameters", f"is not a JSON object: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError(
            "sampling_parameters", f"must be a JSON object, got {type(parsed).__name__}"
        )
    return parsed


def _requested_outputs(request: pb.ModelInferRequest, values: Mapping[str, Any]) -> tuple[str, ...]:
    wanted = set(_OUTPUT_NAMES)
    if request.outputs:
        names = [o.name for o in request.outputs]
        unknown = [n for n in names if n not in wanted]
        if unknown:
            raise InvalidRequestError(
                "outputs",
                f"this model has no output {unknown[0]!r}; its outputs: {', '.join(_OUTPUT_NAMES)}",
            )
        wanted = set(names)
    for flag, output in _RETURN_FLAGS.items():
        if values.get(flag) is False:
            wanted.discard(output)
    return tuple(n for n in _OUTPUT_NAMES if n in wanted)


# -- sampling parameters ----------------------------------------------------------------------------


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise SamplingParamsError(key, f"must be an int, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise SamplingParamsError(key, f"must be an int, got {value!r}")


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise SamplingParamsError(key, f"must be a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise SamplingParamsError(key, f"must be a number, got {value!r}")


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    # Triton's examples send every parameter as a string; "false" must not read as true.
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise SamplingParamsError(key, f"must be a bool (true or false), got {value!r}")


def _as_list(key: str, value: Any) -> Sequence[Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise SamplingParamsError(key, f"must be a list, got {value!r}") from None
    if not isinstance(value, list):
        raise SamplingParamsError(key, f"must be a list, got {value!r}")
    return value


def sampling_params_from(values: Mapping[str, Any]) -> SamplingParams:
    """Engine parameters from vLLM-backend sampling keys (None values take the default; numbers
    and bools may be strings). Unknown keys are refused by name."""
    kwargs: dict[str, Any] = {"max_tokens": _DEFAULT_MAX_TOKENS}
    for key, value in values.items():
        if value is None:
            continue
        if key not in SAMPLING_KEYS:
            supported = ", ".join(sorted(SAMPLING_KEYS))
            raise SamplingParamsError(
                key, f"is not a sampling parameter this server supports (supported: {supported})"
            )
        if key in _FLOAT_PARAMS:
            kwargs[key] = _as_float(key, value)
        elif key in _INT_PARAMS:
            kwargs[key] = _as_int(key, value)
        elif key in _BOOL_PARAMS:
            kwargs[key] = _as_bool(key, value)
        elif key == "stop":
            kwargs[key] = value if isinstance(value, str) else list(_as_list(key, value))
        elif key == "stop_token_ids":
            kwargs[key] = [_as_int(key, t) for t in _as_list(key, value)]
        else:  # logit_bias
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise SamplingParamsError(key, "must be a JSON object") from None
            kwargs[key] = value
    if kwargs.get("n", 1) != 1:
        raise SamplingParamsError("n", f"must be 1 over this protocol, got {kwargs['n']}")
    return SamplingParams(**kwargs)


# -- writing a response -----------------------------------------------------------------------------


def infer_response(
    llm: LLMRequest,
    model_name: str,
    text: str,
    finish_reason: str | None,
    num_input_tokens: int,
    num_output_tokens: int,
    final: bool | None = None,
) -> pb.ModelInferResponse:
    """One response with the request's outputs; ``final`` (when not None) is set as the
    ``triton_final_response`` parameter."""
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=llm.model_version, id=llm.id
    )
    data = {
        "text_output": encode_bytes_tensor([text.encode("utf-8")]),
        "finish_reason": encode_bytes_tensor([(finish_reason or "").encode("utf-8")]),
        "num_input_tokens": struct.pack("<I", num_input_tokens),
        "num_output_tokens": struct.pack("<I", num_output_tokens),
    }
    for name, dtype, _ in OUTPUTS:
        if name in llm.outputs:
            response.outputs.add(name=name, datatype=dtype, shape=[1])
            response.raw_output_contents.append(data[name])
    if final is not None:
        response.parameters[FINAL_PARAMETER].bool_param = final
    return response


def empty_final_response(llm: LLMRequest, model_name: str) -> pb.ModelInferResponse:
    """The empty last response a client asks for with ``triton_enable_empty_final_response``."""
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=llm.model_version, id=llm.id
    )
    response.parameters[FINAL_PARAMETER].bool_param = True
    return response
