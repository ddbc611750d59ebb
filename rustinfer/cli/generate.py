"""``rustinfer generate PROMPT``: stream a completion of one prompt."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rustinfer.cli.common import add_model_options, apply_threads
from rustinfer.detokenizer import IncrementalDetokenizer
from rustinfer.runtime.generator import SamplingConfig, SingleSequenceRunner
from rustinfer.runtime.loading import load_model


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate a completion for one prompt")
    p.add_argument("prompt", help="the user message (or raw text with --raw)")
    add_model_options(p)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--raw", action="store_true", help="no chat template: complete the text as is")
    p.add_argument("--json", action="store_true", help="print one JSON line with the result last")
    p.set_defaults(func=run)


def prompt_token_ids(loaded: Any, prompt: str, raw: bool) -> list[int]:
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer (a dummy config without tokenizer.json)")
    if raw:
        return tok.encode(prompt, add_special_tokens=True)
    return tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True
    )


def run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    cfg = SamplingConfig(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    loaded = load_model(args.model, args.device, args.dtype, args.load_format)
    ids = prompt_token_ids(loaded, args.prompt, args.raw)
    runner = SingleSequenceRunner(loaded)
    detok = IncrementalDetokenizer(loaded.tokenizer)
    out = sys.stdout
    for token, generation in runner.stream(ids, cfg):  # noqa: B007  the last one is kept
        delta = detok.add(token)
        if delta and not args.json:
            out.write(delta)
            out.flush()
    result = generation  # the stream's last item carries finish_reason and timings
    tail = detok.flush()
    t = result.timings
    n_prompt = len(ids)
    if args.json:
        record = {
            "text": detok.text,
            "token_ids": result.token_ids,
            "prompt_tokens": n_prompt,
            "finish_reason": result.finish_reason,
            "timings": {
                "load_s": round(loaded.load_seconds, 4),
                "prefill_ms": round(t.prefill_ms, 3),
                "decode_ms": round(t.decode_ms, 3),
                "tokens_per_second": round(t.decode_tokens_per_second, 3),
            },
        }
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        return 0
    out.write(tail + "\n")
    err = sys.stderr
    err.write(f"load: {loaded.load_seconds:.2f} s ({loaded.device}, {str(loaded.dtype)[6:]})\n")
    err.write(
        f"prefill: {n_prompt} tokens in {t.prefill_ms:.1f} ms "
        f"({n_prompt / max(t.prefill_ms, 1e-9) * 1000:.1f} tok/s)\n"
    )
    err.write(
        f"decode: {t.decode_tokens} tokens, {t.decode_ms_per_token:.2f} ms/token "
        f"({t.decode_tokens_per_second:.1f} tok/s); finish: {result.finish_reason}\n"
    )
    return 0
