"""The peer for ``rustinfer bench latency``: HF transformers on the same checkpoint, same shapes.

Loads the GGUF (dequantized) or HF dir with transformers, then times one greedy request the same way
rustinfer does: prefill = prompt forward + first token; decode = each later token, EOS ignored; the
median of ``--iters`` runs. Prints one JSON line with the same keys as ``rustinfer bench latency``.

    python bench/hf_latency.py --dtype float32 --threads 2 --input-len 32 --output-len 128
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import torch


def load(model: str | None, dtype: torch.dtype):
    import transformers

    from rustinfer.default_model import default_model_path

    path = Path(model) if model else default_model_path()
    kwargs = {"dtype": dtype}
    if path.suffix == ".gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, **kwargs
        ).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def _cache_kw(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); pass whichever it takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def one_request(model, prompt: list[int], output_len: int) -> tuple[float, float]:
    start = time.perf_counter()
    out = model(torch.tensor([prompt]), use_cache=True)
    token = out.logits[0, -1].argmax()
    prefill_ms = (time.perf_counter() - start) * 1000
    past = out.past_key_values
    start = time.perf_counter()
    for _ in range(output_len - 1):
        out = model(token.view(1, 1), **{_cache_kw(model): past}, use_cache=True)
        past = out.past_key_values
        token = out.logits[0, -1].argmax()
    decode_ms = (time.perf_counter() - start) * 1000 / max(1, output_len - 1)
    return prefill_ms, decode_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-ids", default=None, help="JSON file of the prompt's token ids")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    model = load(args.model, dtype)
    load_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(args.seed)
    # Ordinary tokens only: ids past the first few hundred are plain BPE merges in these vocabularies.
    prompt = torch.randint(256, model.config.vocab_size, (args.input_len,), generator=gen).tolist()
    if args.prompt_ids:  # the very same ids as the engine it is compared with
        prompt = [int(t) for t in json.loads(Path(args.prompt_ids).read_text())]
    for _ in range(args.warmup):
        one_request(model, prompt, args.output_len)
    runs = [one_request(model, prompt, args.output_len) for _ in range(args.iters)]
    prefill_ms = statistics.median(r[0] for r in runs)
    decode_ms = statistics.median(r[1] for r in runs)
    import transformers

    print(
        json.dumps(
            {
                "peer": f"transformers {transformers.__version__}",
                "load_s": round(load_s, 4),
                "prompt_tokens": len(prompt),
                "prefill_ms": round(prefill_ms, 3),
                "prefill_tok_s": round(len(prompt) / prefill_ms * 1000, 2),
                "decode_ms_per_token": round(decode_ms, 4),
                "decode_tok_s": round(1000 / decode_ms, 2) if decode_ms else 0.0,
                "output_tokens": args.output_len,
                "device": "cpu",
                "dtype": args.dtype,
                "threads": args.threads,
            }
        )
    )


if __name__ == "__main__":
    main()
