"""Structured outputs on the GPU: masks from pinned buffers, a step in flight, CUDA-graph decode.

The engine reads a constrained step's previous token back between its forward and its sampler and
uploads the masks from a ring of pinned buffers; a mask applied to the wrong step or row, or a
buffer rewritten before its upload ran, shows as output that does not parse or validate. The
same requests through the engine with the step in flight and stepping in sync give the same text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from smollm2_helpers import gguf_path

from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.engine.structured import StructuredOutput
from rustinfer.llm import LLM

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

PROMPT = [{"role": "user", "content": "Describe a made-up person and their city, as JSON."}]
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"enum": ["Paris", "Lima", "Oslo"]},
        },
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
            "ok": {"type": "boolean"},
        },
        "required": ["tags", "ok"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    path = gguf_path()
    if not Path(path).is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {path}")
    # Batch-invariant kernels: with a step in flight a finished row computes one more step, so
    # the batch differs from stepping in sync for a step, and bf16 matmuls may round differently
    # at another batch size; in this mode a row's result does not depend on its batch.
    return LLM(
        path,
        device="cuda",
        dtype="bfloat16",
        quantization="none",
        batch_invariant=True,
        max_num_seqs=32,
    )


def test_constrained_batch_on_the_gpu_validates_and_matches_stepping_in_sync(llm: LLM) -> None:
    assert llm.engine.overlap and llm.engine.runner.graphs is not None
    params = [
        SamplingParams(
            temperature=0.9,
            seed=i,
            max_tokens=96,
            structured=StructuredOutput.json_schema(SCHEMAS[i % 2]),
        )
        for i in range(24)
    ] + [SamplingParams(temperature=0.8, seed=99, max_tokens=40)]  # free text beside them
    runs = []
    for overlap in (True, False):
        llm.engine.overlap = overlap
        results = llm.chat([PROMPT] * len(params), params)
        runs.append([r.outputs[0].text for r in results])
    llm.engine.overlap = True
    assert runs[0] == runs[1]
    for i, text in enumerate(runs[0][:-1]):
        assert conforms(json.loads(text), SCHEMAS[i % 2]), text


def conforms(value: object, schema: dict) -> bool:
    """The subset of JSON Schema that SCHEMAS use, checked by hand (the GPU machine's image has
    no jsonschema; the CPU lane validates with it)."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "object":
        props = schema["properties"]
        return (
            isinstance(value, dict)
            and set(schema["required"]) <= set(value) <= set(props)
            and all(conforms(v, props[k]) for k, v in value.items())
        )
    if kind == "array":
        return (
            isinstance(value, list)
            and len(value) <= schema.get("maxItems", len(value))
            and all(conforms(v, schema["items"]) for v in value)
        )
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and schema.get("minimum", value) <= value <= schema.get("maximum", value)
        )
    if kind == "boolean":
        return isinstance(value, bool)
    raise ValueError(f"no check for {schema}")
