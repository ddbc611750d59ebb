"""rustinfer against its CPU peers in one run, on one GGUF file and one prompt.

Engines (each in its own process, one at a time: two torch processes on a 2-core box slow each
other down about tenfold):
  rustinfer gguf / float32 / bfloat16   ``rustinfer bench latency`` (quantized as shipped;
                                        dequantized to float32; dequantized to bfloat16)
  HF float32 / bfloat16                 ``bench/hf_latency.py`` (transformers dequantizes the GGUF)
  llama.cpp                             llama-cpp-python on the very same file (this script's
                                        ``--worker llama-cpp`` mode)

Each engine runs two phases on the same token ids: ``decode`` (a ``--prompt-len`` prompt, then
``--output-len`` greedy tokens, EOS ignored: decode tok/s) and ``prefill`` (a ``--prefill-len``
prompt: prefill tok/s, prompt forward plus the first token). Every process reports the median of
``--iters`` runs after ``--warmup``; ``--repeat`` rounds alternate the engines so the box's drift
over minutes lands on all of them alike. After each round two "floor" rows give the decode rate
that streaming a token's weights from memory alone would allow (``memory_floor``: the file's
bytes, and float32's), from a read rate measured then (``--no-floor`` skips them). One JSON line
per process goes to ``--out``; the table (medians over rounds, with min-max) is printed last.

llama-cpp-python is not a dependency of rustinfer: ``--install-llama-cpp`` installs it into a
throwaway ``pip --target`` folder (``--llama-cpp-dir``), from a wheel when one fits, else by
building its sdist (needs cmake and a C/C++ compiler; minutes on 2 cores). Without it, or if the
folder lacks it, the llama.cpp rows are skipped.

    python bench/cpu_peers.py --threads 2 --repeat 3 --install-llama-cpp
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
LLAMA_CPP_VERSION = "0.3.36"
CACHE_DIR = Path.home() / ".cache" / "rustinfer-bench"  # outside the repo, kept between runs
ENGINES = (
    "rustinfer-gguf",
    "rustinfer-float32",
    "rustinfer-bfloat16",
    "hf-float32",
    "hf-bfloat16",
    "llama.cpp",
)
# Rows the script adds per round: the decode rate streaming the weights alone would allow.
FLOORS = ("floor-gguf-bytes", "floor-float32-bytes")
# What each rustinfer row passes to ``rustinfer bench latency``.
_RUSTINFER_ARGS = {
    "rustinfer-gguf": ["--quantization", "gguf", "--dtype", "float32"],
    "rustinfer-float32": ["--quantization", "none", "--dtype", "float32"],
    "rustinfer-bfloat16": ["--quantization", "none", "--dtype", "bfloat16"],
}


# -- the prompt ----------------------------------------------------------------------------------


def make_prompt(model: Path, length: int, seed: int) -> list[int]:
    """``length`` ordinary (non-special) token ids of ``model``'s vocabulary, drawn with ``seed``:
    the same ids go to every engine."""
    import torch

    from rustinfer.loaders import load_model_source

    source = load_model_source(model, load_format="dummy")  # config and tokenizer, no weights
    vocab = source.config.vocab_size
    tok = source.tokenizer
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    while len(ids) < length:
        for i in torch.randint(0, vocab, (length,), generator=gen).tolist():
            if (tok is None or not tok.is_special(i)) and len(ids) < length:
                ids.append(i)
    return ids


# -- llama.cpp -----------------------------------------------------------------------------------


def llama_cpp_importable(target: Path) -> bool:
    probe = f"import sys; sys.path.insert(0, {str(target)!r}); import llama_cpp"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def install_llama_cpp(target: Path, version: str) -> None:
    """llama-cpp-python into ``target`` (``pip install --target``); its small runtime needs
    (numpy, jinja2, typing-extensions) come from this environment, diskcache is added."""
    missing = [
        tool
        for tool, names in (("cmake", ["cmake"]), ("a C compiler", ["cc", "gcc", "clang"]))
        if not any(shutil.which(n) for n in names)
    ]
    if not any(shutil.which(n) for n in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler")
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--prefer-binary"]
    cmd += ["--target", str(target), f"llama-cpp-python=={version}", "diskcache"]
    print(f"installing llama-cpp-python {version} into {target} (a source build takes minutes)")
    if missing:
        print(f"  note: {', '.join(missing)} not found; only a prebuilt wheel can install")
    subprocess.run(cmd, env=env, check=True)


def llama_cpp_worker(args: argparse.Namespace) -> None:
    """Time one engine the way ``rustinfer bench latency`` does: prefill = the prompt's forward
    plus the first greedy token; decode = each later token; the median of ``--iters`` runs."""
    import llama_cpp
    import numpy as np

    prompt = json.loads(Path(args.prompt_ids).read_text())
    start = time.perf_counter()
    if args.no_extra_bufts:
        # Llama() has no argument for it: the model parameters start from these defaults.
        import llama_cpp.llama as llama_module

        defaults = llama_module.llama_cpp.llama_model_default_params

        def without_extra_bufts():  # type: ignore[no-untyped-def]
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_module.llama_cpp.llama_model_default_params = without_extra_bufts
    llm = llama_cpp.Llama(
        model_path=str(args.model),
        n_ctx=len(prompt) + args.output_len + 16,
        n_batch=max(512, len(prompt)),  # the whole prompt in one batch, as the others do
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    load_s = time.perf_counter() - start

    n_vocab = llm.n_vocab()

    def next_token() -> int:
        # The last token's logits, read from the context: without logits_all, Llama.eval no longer
        # copies them into ``scores`` (sampling moved into llama.cpp's sampler).
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def one_run() -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = next_token()
        prefill_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        for _ in range(args.output_len - 1):
            llm.eval([token])
            token = next_token()
        decode_ms = (time.perf_counter() - start) * 1000 / max(1, args.output_len - 1)
        return prefill_ms, decode_ms

    for _ in range(args.warmup):
        one_run()
    runs = [one_run() for _ in range(args.iters)]
    prefill_ms = statistics.median(r[0] for r in runs)
    decode_ms = statistics.median(r[1] for r in runs)
    result = {
        "peer": f"llama-cpp-python {llama_cpp.__version__}",
        "load_s": round(load_s, 4),
        "prompt_tokens": len(prompt),
        "prefill_ms": round(prefill_ms, 3),
        "prefill_tok_s": round(len(prompt) / prefill_ms * 1000, 2),
        "decode_ms_per_token": round(decode_ms, 4),
        "decode_tok_s": round(1000 / decode_ms, 2),
        "output_tokens": args.output_len,
        "threads": args.threads,
        "extra_bufts": not args.no_extra_bufts,
    }
    print(json.dumps(result))


# -- one engine, one phase -----------------------------------------------------------------------


def engine_command(engine: str, args: argparse.Namespace, prompt_file: Path, output_len: int):
    """(argv, extra environment) of one measuring process."""
    common = ["--threads", str(args.threads), "--output-len", str(output_len)]
    common += ["--warmup", str(args.warmup), "--iters", str(args.iters)]
    common += ["--prompt-ids", str(prompt_file)]
    if engine in _RUSTINFER_ARGS:
        argv = [sys.executable, "-m", "rustinfer", "bench", "latency", "--device", "cpu"]
        argv += ["--model", str(args.model), *_RUSTINFER_ARGS[engine], *common, "--json"]
        return argv, {}
    if engine.startswith("hf-"):
        argv = [sys.executable, str(BENCH_DIR / "hf_latency.py"), "--model", str(args.model)]
        return [*argv, "--dtype", engine.removeprefix("hf-"), *common], {}
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "llama-cpp"]
    argv += ["--model", str(args.model), *common]
    path = os.pathsep.join(p for p in (str(args.llama_cpp_dir), os.environ.get("PYTHONPATH")) if p)
    return argv, {"PYTHONPATH": path}


def run_engine(argv: list[str], env: dict[str, str]) -> dict | None:
    """The last JSON line a measuring process prints, or None (its stderr is shown)."""
    if "llama-cpp" in argv and _LLAMA_CPP_PLAIN:
        argv = [*argv, "--no-extra-bufts"]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
    if (
        proc.returncode in (-signal.SIGSEGV, -signal.SIGILL)
        and "llama-cpp" in argv
        and "--no-extra-bufts" not in argv
    ):
        # llama.cpp's AMX matmul (an "extra buffer type") dies with a protection fault or an
        # illegal instruction on some AMX Xeons under KVM (the guest is not granted the tile
        # state): run it again on its plain CPU kernels, and say so in the record.
        name = signal.Signals(-proc.returncode).name
        print(f"  llama.cpp crashed ({name}) with its extra buffer types (AMX); running without")
        _LLAMA_CPP_PLAIN.append(True)  # and so for the rest of this run
        return run_engine(argv, env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    print(f"  failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")
    return None


# Set once llama.cpp has crashed with its extra buffer types in this run.
_LLAMA_CPP_PLAIN: list[bool] = []


# -- the memory floor ----------------------------------------------------------------------------


def memory_floor(model: Path, threads: int) -> list[dict]:
    """What streaming a token's weights from memory alone allows, measured here and now: the
    read rate of ``torch.sum`` over a buffer larger than the last-level cache (the median of 7),
    against the bytes a decode token reads: every matrix once (the embedding table once as the
    tied head; its row lookup is negligible), as the file holds them and as float32."""
    import torch

    from rustinfer.loaders.gguf_reader import GGUFFile

    tensors = [t for t in GGUFFile(model).tensors if len(t.dims) == 2]
    quantized_bytes = sum(t.data.nbytes for t in tensors)
    float32_bytes = sum(4 * t.n_elements for t in tensors)
    torch.set_num_threads(threads)
    buffer = torch.ones(max(float32_bytes, 1 << 30) // 4, dtype=torch.float32)
    buffer.sum()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - start)
    rate = buffer.numel() * 4 / statistics.median(times)  # bytes per second
    del buffer
    return [
        {"engine": name, "phase": "decode", "decode_tok_s": round(rate / size, 2),
         "read_gb_s": round(rate / 1e9, 2), "bytes_per_token": size}
        for name, size in (
            ("floor-gguf-bytes", quantized_bytes),
            ("floor-float32-bytes", float32_bytes),
        )
    ]  # fmt: skip


# -- the table -----------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.1f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{med:.1f}"


def table(records: list[dict], engines: list[str]) -> str:
    def values(engine: str, phase: str, key: str) -> list[float]:
        return [
            r[key] for r in records if r["engine"] == engine and r["phase"] == phase and key in r
        ]

    def median(engine: str, phase: str, key: str) -> float | None:
        v = values(engine, phase, key)
        return statistics.median(v) if v else None

    ref = median("llama.cpp", "decode", "decode_tok_s")
    hf32 = median("hf-float32", "decode", "decode_tok_s")
    lines = [
        "| engine | decode tok/s | vs llama.cpp | vs HF float32 | prefill tok/s | load s |",
        "|---|---|---|---|---|---|",
    ]
    for engine in engines:
        dec = median(engine, "decode", "decode_tok_s")
        if dec is None:
            continue
        vs_ref = f"{dec / ref:.2f}x" if ref else "-"
        vs_hf = f"{dec / hf32:.2f}x" if hf32 else "-"
        lines.append(
            f"| {engine} | {_spread(values(engine, 'decode', 'decode_tok_s'))} | {vs_ref} | "
            f"{vs_hf} | {_spread(values(engine, 'prefill', 'prefill_tok_s'))} | "
            f"{_spread(values(engine, 'decode', 'load_s'))} |"
        )
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a GGUF file (default: embedded)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt of the decode phase")
    ap.add_argument("--output-len", type=int, default=128, help="greedy tokens, EOS ignored")
    ap.add_argument("--prefill-len", type=int, default=512, help="prompt of the prefill phase")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs in each process")
    ap.add_argument("--iters", type=int, default=3, help="timed runs in each process (median)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over all engines")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt's token ids")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument(
        "--no-floor", action="store_true", help="skip the memory-floor rows (a read-rate probe)"
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON lines (default: a temp file)")
    ap.add_argument("--install-llama-cpp", action="store_true", help="install it if missing")
    ap.add_argument(
        "--llama-cpp-dir",
        type=Path,
        default=None,
        help=f"pip --target folder (default: {CACHE_DIR}/llama-cpp-python-VERSION)",
    )
    ap.add_argument("--llama-cpp-version", default=LLAMA_CPP_VERSION)
    ap.add_argument("--worker", choices=["llama-cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    ap.add_argument("--no-extra-bufts", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model is None:
        from rustinfer.default_model import default_model_path

        args.model = default_model_path()
    if args.llama_cpp_dir is None:
        args.llama_cpp_dir = CACHE_DIR / f"llama-cpp-python-{args.llama_cpp_version}"
    if args.worker == "llama-cpp":
        llama_cpp_worker(args)
        return
    engines = list(args.engines)
    if "llama.cpp" in engines and not llama_cpp_importable(args.llama_cpp_dir):
        if args.install_llama_cpp:
            install_llama_cpp(args.llama_cpp_dir, args.llama_cpp_version)
        else:
            print(f"llama.cpp skipped: llama_cpp not in {args.llama_cpp_dir} (--install-llama-cpp)")
            engines.remove("llama.cpp")
    workdir = Path(tempfile.mkdtemp(prefix="cpu_peers-"))
    out = args.out or workdir / "results.jsonl"
    phases = {
        "decode": (make_prompt(args.model, args.prompt_len, args.seed), args.output_len),
        # Two tokens: the first closes the prefill; every engine's decode loop needs one more.
        "prefill": (make_prompt(args.model, args.prefill_len, args.seed), 2),
    }
    prompt_files = {}
    for phase, (ids, _) in phases.items():
        prompt_files[phase] = workdir / f"{phase}_prompt.json"
        prompt_files[phase].write_text(json.dumps(ids))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    print(f"{cpu}, {args.threads} threads, {args.model.name}; JSON lines -> {out}")
    records: list[dict] = []
    with out.open("a") as sink:
        for rnd in range(args.repeat):
            for engine in engines:
                for phase, (_, output_len) in phases.items():
                    argv_, env = engine_command(engine, args, prompt_files[phase], output_len)
                    result = run_engine(argv_, env)
                    if result is None:
                        continue
                    record = {
                        "round": rnd,
                        "engine": engine,
                        "phase": phase,
                        "date": datetime.date.today().isoformat(),
                        "cpu": cpu,
                        **result,
                    }
                    records.append(record)
                    sink.write(json.dumps(record) + "\n")
                    sink.flush()
                    key = "decode_tok_s" if phase == "decode" else "prefill_tok_s"
                    print(f"  round {rnd} {engine:<20} {phase:<8} {key} {result.get(key)}")
            if not args.no_floor:
                for floor in memory_floor(args.model, args.threads):
                    record = {"round": rnd, "date": datetime.date.today().isoformat(), **floor}
                    records.append(record)
                    sink.write(json.dumps(record) + "\n")
                    print(f"  round {rnd} {floor['engine']:<20} decode   decode_tok_s "
                          f"{floor['decode_tok_s']} ({floor['read_gb_s']} GB/s)")  # fmt: skip
    print(table(records, [*engines, *FLOORS]))


if __name__ == "__main__":
    main()
