"""A model directory for ``--load-format dummy`` with a real tokenizer: a config's shapes, a GGUF's
tokenizer and chat template.

Benchmarks that need text (structured outputs: the grammar walks real tokens) run on the only
model shipped with weights, SmolLM2-135M, whose forward is short enough that any host work shows.
This writes ``config.json`` (the given config with the GGUF's vocabulary size and special
tokens), ``tokenizer.json`` and ``tokenizer_config.json`` (the chat template), so the same
benchmark runs at, say, Llama-3.2-1B's shapes with random weights:

    python bench/tokenized_dummy.py --config bench/configs/llama-3.2-1b/config.json \
        --gguf smollm2.gguf --out /tmp/llama-1b-smollm2-vocab
    rustinfer bench structured --model /tmp/llama-1b-smollm2-vocab/config.json --load-format dummy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rustinfer.loaders.gguf_file import load_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="config.json whose shapes to keep")
    ap.add_argument("--gguf", required=True, help="GGUF file whose tokenizer to use")
    ap.add_argument("--out", required=True, help="directory to write")
    args = ap.parse_args()
    tokenizer = load_gguf(Path(args.gguf), with_weights=False).tokenizer
    if tokenizer is None:
        raise SystemExit(f"{args.gguf} has no tokenizer")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(Path(args.config).read_text())
    config["vocab_size"] = tokenizer.hf_tokenizer.get_vocab_size(with_added_tokens=True)
    config["bos_token_id"] = tokenizer.bos_token_id
    config["eos_token_id"] = list(tokenizer.eos_token_ids)
    config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "tokenizer.json").write_text(tokenizer.hf_tokenizer.to_str())
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": tokenizer.chat_template,
                "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token,
                "add_bos_token": tokenizer.add_bos,
            }
        )
    )
    print(out / "config.json")


if __name__ == "__main__":
    main()
