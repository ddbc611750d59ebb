"""Structured outputs on the embedded SmolLM2: whatever the model would say, the output matches.

Each constraint (JSON schema, any JSON object, regex, choice, Lark and GBNF grammars) goes through
the engine in float32 on the CPU; outputs are checked with an independent validator (jsonschema,
Python's re), never with the grammar library that produced them.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.engine.structured import StructuredOutput
from rustinfer.errors import InvalidRequestError
from rustinfer.llm import LLM

PROMPT = [{"role": "user", "content": "Describe a made-up person, a city and some numbers."}]
PROMPT_JSON = [
    {"role": "user", "content": 'Reply in JSON only, like {"name": "...", "city": "..."}.'}
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_num_seqs=64)


def schema_variants() -> list[dict]:
    """50 schemas: nested objects, arrays, enums, bounded numbers, required fields, strings with
    lengths and patterns, booleans, nulls, unions."""
    leaves = [
        {"type": "integer", "minimum": -5, "maximum": 40},
        {"type": "number", "minimum": 0, "maximum": 1},
        {"type": "string", "maxLength": 12},
        {"type": "string", "pattern": "^[a-z]{2,6}$"},
        {"enum": ["red", "green", "blue"]},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4},
        {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 3}, {"type": "string", "maxLength": 5}]},
        {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 3},
    ]  # fmt: skip
    schemas = []
    for i in range(50):
        a, b, c = leaves[i % 10], leaves[(i * 3 + 1) % 10], leaves[(i * 7 + 2) % 10]
        inner = {
            "type": "object",
            "properties": {"p": a, "q": b},
            "required": ["p"] if i % 2 else ["p", "q"],
            "additionalProperties": False,
        }
        if i % 3 == 0:
            schema = {
                "type": "object",
                "properties": {"id": c, "item": inner},
                "required": ["id", "item"],
                "additionalProperties": False,
            }
        elif i % 3 == 1:
            schema = {"type": "array", "items": inner, "minItems": 1, "maxItems": 2}
        else:
            schema = {**inner, "properties": {**inner["properties"], "r": c}}
        schemas.append(schema)
    return schemas


def test_fifty_json_schemas_all_validate(llm: LLM) -> None:
    schemas = schema_variants()
    params = [
        SamplingParams(
            temperature=0.7,
            seed=i,
            max_tokens=256,
            structured=StructuredOutput.json_schema(schema),
        )
        for i, schema in enumerate(schemas)
    ]
    results = llm.chat([PROMPT] * len(schemas), params)
    for schema, result in zip(schemas, results, strict=True):
        out = result.outputs[0]
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)


def test_json_object_regex_and_choice(llm: LLM) -> None:
    cases = [
        (StructuredOutput("json_object"), lambda t: isinstance(json.loads(t), dict)),
        (StructuredOutput("regex", r"[A-Z][a-z]{1,12} \d{2,3}"), None),
        (StructuredOutput.choice(["yes", "no", "it depends (a lot)"]), None),
    ]
    for so, check in cases:
        # "Any JSON object" leaves a small model free to nest or ramble forever: ask it for one
        # and sample greedily, as an application using json_object would.
        temperature = 0.0 if so.kind == "json_object" else 1.0
        prompt = PROMPT_JSON if so.kind == "json_object" else PROMPT
        params = SamplingParams(temperature=temperature, seed=3, n=3, max_tokens=128, structured=so)
        (result,) = llm.chat([prompt], params)
        for out in result.outputs:
            assert out.finish_reason == "stop", out.text
            if so.kind == "regex":
                assert re.fullmatch(so.spec, out.text), out.text
            elif so.kind == "choice":
                assert out.text in json.loads(so.spec)
            else:
                assert check(out.text)


def test_lark_and_gbnf_grammars(llm: LLM) -> None:
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
    gbnf = 'root ::= "Answer: " ("A" | "B" | "C") "!"'
    for grammar, pattern in ((lark, r"The answer is [0-9]{1,3}\."), (gbnf, r"Answer: [ABC]!")):
        params = SamplingParams(
            temperature=0, max_tokens=32, structured=StructuredOutput("grammar", grammar)
        )
        (result,) = llm.chat([PROMPT], params)
        assert re.fullmatch(pattern, result.outputs[0].text), result.outputs[0].text


def test_a_bad_constraint_is_refused_naming_its_field(llm: LLM) -> None:
    bad = [
        StructuredOutput.json_schema({"type": "objectx"}, "response_format.json_schema.schema"),
        StructuredOutput("regex", "([a-z", "guided_regex"),
        StructuredOutput("grammar", "start: undefined_rule", "guided_grammar"),
    ]
    for so in bad:
        with pytest.raises(InvalidRequestError) as info:
            llm.generate("x", SamplingParams(max_tokens=4, structured=so))
        assert info.value.field == so.field
    with pytest.raises(InvalidRequestError):
        StructuredOutput.choice([], "guided_choice")


def test_a_step_in_flight_gives_the_same_constrained_output(llm: LLM) -> None:
    """With overlap the engine must read each constrained token back before the next mask."""
    so = StructuredOutput.json_schema(schema_variants()[4])
    params = SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=200, structured=so)
    outs = []
    for overlap in (False, True):
        llm.engine.overlap = overlap
        (result,) = llm.chat([PROMPT], params)
        outs.append([o.text for o in result.outputs])
    llm.engine.overlap = False
    assert outs[0] == outs[1]


def test_constrained_rows_ending_mid_batch_with_a_step_in_flight(llm: LLM) -> None:
    """With overlap, a step's constrained rows are read back between the next step's forward and
    its sampler. Rows whose grammar ends (a choice, a short regex), or that stop on a string,
    while others run on still have a row in the step already launched: it is thrown away, and
    everything else comes out as when stepping in sync."""
    requests = [
        SamplingParams(temperature=0, max_tokens=20, structured=StructuredOutput.choice(
            ["yes", "no"], "guided_choice")),
        SamplingParams(temperature=0.7, seed=3, max_tokens=60, structured=StructuredOutput(
            "regex", "[a-z]{2,6}( [a-z]{2,6}){0,3}", "guided_regex")),
        SamplingParams(temperature=0.9, seed=7, max_tokens=120,
                       structured=StructuredOutput.json_schema(schema_variants()[2])),
        SamplingParams(temperature=0.9, seed=9, max_tokens=80, stop=['",'],
                       structured=StructuredOutput.json_schema(schema_variants()[4])),
        SamplingParams(temperature=0.8, seed=11, max_tokens=40),  # unconstrained beside them
    ]  # fmt: skip
    outs = []
    for overlap in (False, True):
        llm.engine.overlap = overlap
        results = llm.chat([PROMPT] * len(requests), requests)
        outs.append([(r.outputs[0].text, r.outputs[0].finish_reason) for r in results])
    llm.engine.overlap = False
    assert outs[0] == outs[1]
    assert outs[0][0][0] in ("yes", "no")
    assert re.fullmatch("[a-z]{2,6}( [a-z]{2,6}){0,3}", outs[0][1][0])


_scalar = st.sampled_from(
    [
        {"type": "integer", "minimum": 0, "maximum": 100},
        {"type": "string", "maxLength": 8},
        {"type": "boolean"},
        {"enum": ["a", "b", "c"]},
        {"type": "number", "minimum": -1, "maximum": 1},
    ]
)
_schemas = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.builds(
            lambda items, n: {"type": "array", "items": items, "maxItems": n},
            inner,
            st.integers(1, 3),
        ),
        st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), inner, min_size=1, max_size=3).map(
            lambda props: {
                "type": "object",
                "properties": props,
                "required": sorted(props),
                "additionalProperties": False,
            }
        ),
    ),
    max_leaves=6,
)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(schema=_schemas, seed=st.integers(0, 1000))
def test_generated_schemas_never_give_invalid_output(llm: LLM, schema: dict, seed: int) -> None:
    so = StructuredOutput.json_schema(schema)
    (result,) = llm.chat(
        [PROMPT], SamplingParams(temperature=1.0, seed=seed, max_tokens=300, structured=so)
    )
    out = result.outputs[0]
    if out.finish_reason == "length":
        # A JSON number has no bound on its digits: at temperature 1 the model may draw
        # "1.0000..." until max_tokens. What the constraint guarantees then is that every token
        # so far stays on the grammar: a complete answer needs only more tokens.
        matcher = llm.engine.grammar_compiler().matcher(so)
        assert matcher.consume_tokens(out.token_ids), (out.text, matcher.get_error())
        assert not matcher.is_error() and len(out.token_ids) == 300, out.text
        return
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), schema)


def test_parallel_masks_equal_the_serial_ones(llm: LLM) -> None:
    """A batch's masks computed on llguidance's threads equal the one-by-one masks, row for row,
    with matchers at different points of different grammars and an unconstrained row."""
    import torch

    from rustinfer.engine.structured import banned_tokens

    core = llm.engine
    grammars = core.grammar_compiler()
    tok = core.tokenizer
    constraints = [
        StructuredOutput.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}),
        StructuredOutput("regex", r"[a-z]{3}-\d{2,4}"),
        StructuredOutput.choice(["yes", "no", "maybe later"]),
        StructuredOutput("json_object"),
    ]
    matchers = []
    for i, so in enumerate(constraints):
        m = grammars.matcher(so)
        # Walk each a little way in: a few tokens the grammar allows, different per row.
        prefix = ['{"a": 1', "abc-1", "may", "{"][i]
        for t in tok.encode(prefix, add_special_tokens=False)[: i + 1]:
            assert m.consume_token(t), (so, prefix)
        matchers.append(m)
    rows = [matchers[0], None, matchers[1], matchers[2], matchers[3]]
    cpu = torch.device("cpu")
    serial = banned_tokens(rows, core.vocab_size, cpu)
    parallel = banned_tokens(rows, core.vocab_size, cpu, grammars.executor)
    assert torch.equal(serial, parallel)
    assert not serial[1].any() and serial[0].any()  # the free row bans nothing
    assert len({tuple(r.nonzero().flatten().tolist()) for r in serial}) == len(rows)


def test_device_unpacking_of_the_bitmask_equals_the_host_one() -> None:
    # On a GPU the packed bitmask is unpacked by two kernels (word & bit value, == 0), on the CPU
    # by numpy: both must ban exactly the tokens whose bit is clear, bit 31 (int32's sign bit)
    # and a vocabulary that ends mid-word included.
    import numpy as np
    import torch

    from rustinfer.engine.structured import _unpack_banned

    rng = np.random.default_rng(0)
    words = rng.integers(-(2**31), 2**31, size=(3, 5), dtype=np.int64).astype(np.int32)
    words[0, 0] = -1  # every token allowed
    words[1, 1] = np.int32(-(2**31))  # only bit 31 set
    vocab = 5 * 32 - 7
    host = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab] == 0
    got = _unpack_banned(torch.from_numpy(words), vocab)
    assert got.shape == (3, vocab) and torch.equal(got, torch.from_numpy(host))
    assert not got[0, :32].any() and got[1, 32:63].all() and not got[1, 63]
