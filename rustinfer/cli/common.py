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
    p.add_argument(
        "--quantization",
        default="auto",
        type=_quantization,
        metavar="{auto,none,gguf,int8,int4}[-gGROUP]",
        help="matmul weights: gguf keeps a GGUF file's Q8_0/Q4_0/Q4_1 tensors as shipped; none "
        "dequantizes them to --dtype; int8/int4 quantize a float checkpoint at load, group-wise "
        "(int4-g64: groups of 64; 32, 64 or 128, default 32); auto (default): gguf for GGUF "
        "files, none otherwise",
    )
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="a request's output does not depend on what else runs beside it (greedy tokens "
        "alone = in a batch); slower kernels, CUDA only",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="split the model's weights across N devices (N GPUs from --device on, or N CPU "
        "processes), one worker process per extra rank (default 1)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def _quantization(text: str) -> str:
    from rustinfer.config import parse_quantization

    try:
        return str(parse_quantization(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
