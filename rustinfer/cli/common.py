"""Options shared by the commands that load a model."""

from __future__ import annotations

import argparse

import torch


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="HF model dir, .gguf file, or config.json (with --load-format dummy); "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype (auto: the checkpoint's on GPU, float32 for quantized files on CPU)",
    )
    p.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "safetensors", "gguf", "dummy"],
        help="dummy: random weights at the config's shapes (benchmarks)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
