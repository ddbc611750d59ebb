"""``rustinfer bench latency`` (one request), ``throughput`` (many, batched), ``serve`` (the
server under concurrent streaming clients, beside the offline engine) and ``structured`` (what a
JSON-schema constraint costs decoding)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import torch

from rustinfer.cli.common import add_model_options, apply_threads
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.llm import LLM
from rustinfer.runtime.loading import LoadedModel, load_model_from


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    lat = bench_sub.add_parser("latency", help="single-request prefill and decode latency")
    add_model_options(lat)
    lat.add_argument("--input-len", type=int, default=32, help="prompt tokens")
    lat.add_argument("--output-len", type=int, default=128, help="generated tokens (EOS ignored)")
    lat.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    lat.add_argument("--iters", type=int, default=3, help="timed runs; the median is reported")
    lat.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    lat.add_argument(
        "--prompt-ids",
        default=None,
        help="a JSON file with the prompt's token ids (instead of --input-len random ones), so "
        "peers can be timed on the very same prompt",
    )
    lat.add_argument("--json", action="store_true", help="print one JSON line with the result last")
    lat.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs: every decode step eager"
    )
    lat.set_defaults(func=run_latency)

    thr = bench_sub.add_parser("throughput", help="offline throughput of many requests at once")
    add_model_options(thr)
    thr.add_argument("--num-prompts", type=int, default=16, help="requests submitted at once")
    thr.add_argument("--input-len", type=int, default=32, help="prompt tokens of each request")
    thr.add_argument("--output-len", type=int, default=64, help="generated tokens (EOS ignored)")
    thr.add_argument(
        "--max-num-seqs", type=int, default=16, help="requests the engine runs concurrently"
    )
    thr.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step")
    thr.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    thr.add_argument("--json", action="store_true", help="print one JSON line with the result last")
    thr.set_defaults(func=run_throughput)

    from rustinfer.cli.bench_serve import add_serve_parser
    from rustinfer.cli.bench_structured import add_structured_parser

    add_serve_parser(bench_sub)
    add_structured_parser(bench_sub)


def random_prompt(loaded: LoadedModel, length: int, seed: int) -> list[int]:
    """Token ids drawn from the ordinary (non-special) vocabulary."""
    if length < 1:
        raise ValueError(f"--input-len must be >= 1, got {length}")
    gen = torch.Generator().manual_seed(seed)
    vocab = loaded.config.vocab_size
    tok = loaded.tokenizer
    specials = {i for i in range(vocab) if tok is not None and tok.is_special(i)} if tok else set()
    ids: list[int] = []
    while len(ids) < length:
        for i in torch.randint(0, vocab, (length,), generator=gen).tolist():
            if i not in specials and len(ids) < length:
                ids.append(i)
    return ids


def machine_fields(loaded: LoadedModel) -> dict[str, str | int]:
    size = loaded.parallel.size if loaded.parallel is not None else 1
    return {
        "device": f"{loaded.device} ({loaded.device.name()})",
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "tensor_parallel_size": size,
    }


def emit(result: dict[str, object], as_json: bool) -> int:
    """One aligned line per field, or (``--json``) one JSON line last."""
    out = sys.stdout
    if as_json:
        out.write(json.dumps(result) + "\n")
    else:
        for key, value in result.items():
            out.write(f"{key:>20}: {value}\n")
    return 0


def run_latency(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    loaded = load_model_from(args)
    if args.prompt_ids:
        with open(args.prompt_ids, encoding="utf-8") as f:
            prompt = [int(t) for t in json.load(f)]
    else:
        prompt = random_prompt(loaded, args.input_len, args.seed)
    llm = LLM.for_single_request(loaded, len(prompt) + args.output_len, args.enforce_eager)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    def one_run() -> tuple[float, float]:
        """(prefill ms, decode ms per token) of one request, from the engine's own timings."""
        final = list(llm.stream(prompt, params))[-1].timings
        decode_ms = (final.decode_s or 0.0) * 1000
        return (final.prefill_s or 0.0) * 1000, decode_ms / max(1, args.output_len - 1)

    for _ in range(args.warmup):
        one_run()
    runs = [one_run() for _ in range(max(1, args.iters))]
    prefill_ms = statistics.median(r[0] for r in runs)
    decode_ms_tok = statistics.median(r[1] for r in runs)
    result = {
        "load_s": round(loaded.load_seconds, 4),
        "prompt_tokens": len(prompt),
        "prefill_ms": round(prefill_ms, 3),
        "prefill_tok_s": round(len(prompt) / prefill_ms * 1000, 2),
        "decode_ms_per_token": round(decode_ms_tok, 4),
        "decode_tok_s": round(1000 / decode_ms_tok, 2) if decode_ms_tok else 0.0,
        "output_tokens": args.output_len,
        "cuda_graphs": llm.engine.runner.graphs is not None,
        **machine_fields(loaded),
    }
    return emit(result, args.json)


def timed_offline_run(engine: Any, prompts: list[list[int]], output_len: int) -> tuple[int, float]:
    """Submit every prompt at once to ``engine`` (an EngineCore) and step it dry, after an untimed
    short request (one-time costs: allocator, kernels); returns (tokens generated, seconds)."""
    import time

    engine.add_request("warmup", prompts[0], SamplingParams(temperature=0, max_tokens=2))
    while engine.has_unfinished():
        engine.step()
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    generated = 0
    while engine.has_unfinished():
        generated += sum(len(o.new_token_ids) for o in engine.step())
    engine.loaded.device.synchronize()
    return generated, time.perf_counter() - start


def run_throughput(args: argparse.Namespace) -> int:
    from rustinfer.engine.core import EngineConfig, EngineCore

    apply_threads(args.threads)
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    loaded = load_model_from(args)
    engine = EngineCore(
        loaded,
        EngineConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            # Distinct random prompts share no prefix; caching would only add hashing work.
            enable_prefix_caching=False,
        ),
    )
    # Distinct prompts (another seed each), so no request is a copy of another.
    prompts = [
        random_prompt(loaded, args.input_len, args.seed + i) for i in range(args.num_prompts)
    ]
    generated, elapsed = timed_offline_run(engine, prompts, args.output_len)
    result = {
        "num_prompts": args.num_prompts,
        "max_num_seqs": args.max_num_seqs,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "output_tokens": generated,
        "elapsed_s": round(elapsed, 3),
        "output_tok_s": round(generated / elapsed, 2),
        "total_tok_s": round((generated + args.num_prompts * args.input_len) / elapsed, 2),
        "requests_per_s": round(args.num_prompts / elapsed, 3),
        **machine_fields(loaded),
    }
    return emit(result, args.json)
