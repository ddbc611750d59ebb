"""``rustinfer bench latency``: prefill and per-token decode time of one request."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import torch

from rustinfer.cli.common import add_model_options, apply_threads
from rustinfer.runtime.generator import SamplingConfig, SingleSequenceRunner
from rustinfer.runtime.loading import LoadedModel, load_model


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
    lat.add_argument("--json", action="store_true", help="print one JSON line with the result last")
    lat.set_defaults(func=run_latency)


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


def run_latency(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    loaded = load_model(args.model, args.device, args.dtype, args.load_format)
    prompt = random_prompt(loaded, args.input_len, args.seed)
    runner = SingleSequenceRunner(loaded, max_model_len=args.input_len + args.output_len)
    cfg = SamplingConfig(max_tokens=args.output_len, ignore_eos=True)
    for _ in range(args.warmup):
        runner.generate(prompt, cfg)
    runs = [runner.generate(prompt, cfg).timings for _ in range(max(1, args.iters))]
    prefill_ms = statistics.median(t.prefill_ms for t in runs)
    decode_ms_tok = statistics.median(t.decode_ms_per_token for t in runs)
    result = {
        "load_s": round(loaded.load_seconds, 4),
        "prompt_tokens": args.input_len,
        "prefill_ms": round(prefill_ms, 3),
        "prefill_tok_s": round(args.input_len / prefill_ms * 1000, 2),
        "decode_ms_per_token": round(decode_ms_tok, 4),
        "decode_tok_s": round(1000 / decode_ms_tok, 2) if decode_ms_tok else 0.0,
        "output_tokens": args.output_len,
        "device": f"{loaded.device} ({loaded.device.name()})",
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    out = sys.stdout
    if not args.json:
        for key, value in result.items():
            out.write(f"{key:>20}: {value}\n")
    else:
        out.write(json.dumps(result) + "\n")
    return 0
