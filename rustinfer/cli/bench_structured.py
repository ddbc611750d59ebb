"""``rustinfer bench structured``: what a JSON-schema constraint costs decoding, and its compile time.

For each ``--batch`` size, the same requests run twice on one engine, one after the other: free
text, then under a JSON schema whose string must run past ``--output-len`` tokens (so both runs
make exactly that many tokens). Reported per batch: decode tok/s of each run (the engine's own
decode timings), and the constraint's cost in percent. Then the schema's compile time on a fresh
compiler (reading the tokenizer once, then the schema itself) and a first mask.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from rustinfer.cli.common import add_model_options, apply_threads

__all__ = ["add_structured_parser"]

# A long free-text field inside an object: the grammar is live on every token (string
# characters, escapes), and minLength keeps the string open past any --output-len used here.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "story": {"type": "string", "minLength": 4000},
    },
    "required": ["title", "story"],
    "additionalProperties": False,
}
# The same object with the story's length unbounded: llguidance's lexer keeps one state for "inside
# a string" instead of one per position under a length bound, so its masks are mostly cached (a
# bounded string's cost 5-20x more per step, bench/structured_timeline.py's floor). Generation may close the string early here; the
# rate then counts the tokens each request made.
PLAIN_SCHEMA = {
    **SCHEMA,
    "properties": {"title": SCHEMA["properties"]["title"], "story": {"type": "string"}},
}
SCHEMAS = {"bounded": SCHEMA, "plain": PLAIN_SCHEMA}
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON."}]


def add_structured_parser(bench_sub: Any) -> None:
    p = bench_sub.add_parser(
        "structured", help="decode speed with and without a JSON-schema constraint"
    )
    add_model_options(p)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="requests at once")
    p.add_argument("--output-len", type=int, default=64, help="tokens per request")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per setting (median)")
    p.add_argument("--json", action="store_true", help="print one JSON line with the result last")
    p.add_argument(
        "--schema",
        choices=sorted(SCHEMAS),
        default="bounded",
        help="bounded: the story string has minLength 4000 (every token a fresh lexer state, "
        "the grammar's costliest case); plain: no length bound",
    )
    p.add_argument(
        "--seeded",
        action="store_true",
        help="give each request a seed (a seeded row draws its noise with its own launch; API "
        "traffic mostly comes unseeded)",
    )
    p.set_defaults(func=run_structured_bench)


def bench_params(batch: int, output_len: int, structured: Any, seeded: bool = False) -> list[Any]:
    """The benchmark's requests: temperature 0.8, ``output_len`` tokens with EOS ignored, under
    ``structured`` (None: free text); ``seeded``: request i has seed i."""
    from rustinfer.engine.sampling_params import SamplingParams

    return [
        SamplingParams(
            temperature=0.8,
            seed=i if seeded else None,
            max_tokens=output_len,
            ignore_eos=True,
            structured=structured,
        )
        for i in range(batch)
    ]


def _decode_tok_s(
    llm: Any, batch: int, output_len: int, structured: Any, seeded: bool = False
) -> tuple[float, int]:
    """Decode tokens per second of ``batch`` requests run together: tokens after the first of
    each, over the longest decode among them (the engine's own timings); and the tokens made
    (fewer than ``batch * output_len`` when a grammar ended some requests early: the batch then
    shrank during the run)."""
    results = llm.chat([PROMPT] * batch, bench_params(batch, output_len, structured, seeded))
    made = [len(r.outputs[0].token_ids) for r in results]
    if structured is None and any(n != output_len for n in made):
        raise RuntimeError("a free request stopped early: the two runs would not be comparable")
    decode_s = max(r.timings.decode_s or 0.0 for r in results)
    return sum(n - 1 for n in made) / decode_s, sum(made)


def run_structured_bench(args: argparse.Namespace) -> int:
    from rustinfer.cli.bench import emit, machine_fields
    from rustinfer.engine.structured import GrammarCompiler, StructuredOutput, banned_tokens
    from rustinfer.llm import LLM

    apply_threads(args.threads)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
              quantization=args.quantization, batch_invariant=args.batch_invariant,
              tensor_parallel_size=args.tensor_parallel_size, max_num_seqs=max(args.batch),
              enable_prefix_caching=False)  # fmt: skip
    so = StructuredOutput.json_schema(SCHEMAS[args.schema])
    result: dict[str, Any] = {
        "output_len": args.output_len,
        "schema": args.schema,
        "seeded": args.seeded,
        **machine_fields(llm.loaded),
    }
    llm.chat([PROMPT], [_warm_params(so)])  # compile and first-use costs, untimed
    for batch in args.batch:
        free, constrained, made = [], [], []
        for _ in range(args.repeat):
            free.append(_decode_tok_s(llm, batch, args.output_len, None, args.seeded)[0])
            rate, tokens = _decode_tok_s(llm, batch, args.output_len, so, args.seeded)
            constrained.append(rate)
            made.append(tokens / (batch * args.output_len))
        f, c = statistics.median(free), statistics.median(constrained)
        result[f"b{batch}_free_tok_s"] = round(f, 2)
        result[f"b{batch}_json_schema_tok_s"] = round(c, 2)
        result[f"b{batch}_cost_percent"] = round((1 - c / f) * 100, 1)
        # Below 1 when a grammar ended requests early (possible with --schema plain).
        result[f"b{batch}_json_share_of_tokens"] = round(min(made), 3)
    engine = llm.engine
    start = time.perf_counter()
    compiler = GrammarCompiler(engine.tokenizer, engine.vocab_size, engine.eos_token_ids)
    _ = compiler.ll_tokenizer
    result["tokenizer_read_ms"] = round((time.perf_counter() - start) * 1000, 2)
    start = time.perf_counter()
    matcher = compiler.matcher(so)
    result["schema_compile_ms"] = round((time.perf_counter() - start) * 1000, 3)
    start = time.perf_counter()
    banned_tokens([matcher], engine.vocab_size, engine.device)
    result["first_mask_ms"] = round((time.perf_counter() - start) * 1000, 3)
    return emit(result, args.json)


def _warm_params(so: Any) -> Any:
    from rustinfer.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, structured=so)
