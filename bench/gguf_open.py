"""Opening a GGUF file: rustinfer's reader against gguf's ``GGUFReader``, and a whole load.

    python bench/gguf_open.py [--model FILE.gguf] [--repeat 3]

Each reader opens the file (the embedded SmolLM2 GGUF by default) ``--repeat`` times in this
process (no cache: a fresh reader each time); then ``load_model`` on the CPU, its reader cache
cleared first. Prints the best time of each, in seconds, as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time


def best_of(repeat: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(min(times), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import gguf

    from rustinfer.default_model import default_model_path
    from rustinfer.loaders.gguf_meta import _open_cached
    from rustinfer.loaders.gguf_reader import GGUFFile
    from rustinfer.runtime.loading import load_model

    path = args.model or default_model_path()
    result = {
        "file": str(path),
        "rustinfer_reader_s": best_of(args.repeat, lambda: GGUFFile(path)),
        "gguf_reader_s": best_of(args.repeat, lambda: gguf.GGUFReader(path)),
    }
    load_model(path, device="cpu")  # imports, plugins and first-use costs, untimed

    def load() -> None:
        _open_cached.cache_clear()
        load_model(path, device="cpu")

    result["load_model_s"] = best_of(args.repeat, load)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
