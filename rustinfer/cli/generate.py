"""``rustinfer generate PROMPT``: stream a completion of one prompt."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rustinfer.cli.common import add_model_options, apply_threads
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.llm import LLM
from rustinfer.runtime.loading import load_model_from


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
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    loaded = load_model_from(args)
    ids = prompt_token_ids(loaded, args.prompt, args.raw)
    llm = LLM.for_single_request(loaded, len(ids) + args.max_tokens)
    out = sys.stdout
    text: list[str] = []
    token_ids: list[int] = []
    for output in llm.stream(ids, params):
        text.append(output.text_delta)
        token_ids.extend(output.new_token_ids)
        if output.text_delta and not args.json:
            out.write(output.text_delta)
            out.flush()
    final = output  # the last output carries finish_reason and the request's timings
    t = final.timings
    prefill_ms = (t.prefill_s or 0.0) * 1000
    decode_ms = (t.decode_s or 0.0) * 1000
    decode_tokens = len(token_ids) - 1  # the first token comes from the prefill
    tok_s = decode_tokens / decode_ms * 1000 if decode_tokens and decode_ms else 0.0
    n_prompt = len(ids)
    if args.json:
        record = {
            "text": "".join(text),
            "token_ids": token_ids,
            "prompt_tokens": n_prompt,
            "finish_reason": final.finish_reason,
            "timings": {
                "load_s": round(loaded.load_seconds, 4),
                "prefill_ms": round(prefill_ms, 3),
                "decode_ms": round(decode_ms, 3),
                "tokens_per_second": round(tok_s, 3),
            },
        }
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        return 0
    out.write("\n")
    out.flush()  # the text, then the timings on stderr, in that order on a terminal
    err = sys.stderr
    err.write(f"load: {loaded.load_seconds:.2f} s ({loaded.device}, {str(loaded.dtype)[6:]})\n")
    err.write(
        f"prefill: {n_prompt} tokens in {prefill_ms:.1f} ms "
        f"({n_prompt / max(prefill_ms, 1e-9) * 1000:.1f} tok/s)\n"
    )
    per_token = decode_ms / decode_tokens if decode_tokens else 0.0
    err.write(
        f"decode: {decode_tokens} tokens, {per_token:.2f} ms/token "
        f"({tok_s:.1f} tok/s); finish: {final.finish_reason}\n"
    )
    return 0
