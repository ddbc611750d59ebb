"""Checkpoint + device + dtype -> a model on its device with its tokenizer."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rustinfer.config import ModelConfig
from rustinfer.default_model import DEFAULT_MODEL_NAME, default_model_path
from rustinfer.device import Device, resolve_device
from rustinfer.errors import DefaultModelMissingError, UnsupportedArchitectureError
from rustinfer.loaders import ModelSource, dummy_weights, load_model_source, parse_dtype
from rustinfer.models.base import Model
from rustinfer.models.op_table import OpTable
from rustinfer.plugins import get_registries
from rustinfer.registry import Registries
from rustinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Model
    tokenizer: Tokenizer | None
    config: ModelConfig
    device: Device
    dtype: torch.dtype
    source: ModelSource
    load_seconds: float

    @property
    def name(self) -> str:
        """A readable model name: the embedded model's own, else the file or folder name."""
        path = self.source.path
        if path is None:
            return self.config.architecture
        if path == _default_path_or_none():
            return DEFAULT_MODEL_NAME
        if path.name == "config.json":  # a dummy built from a config file
            return path.parent.name
        return path.stem if path.suffix == ".gguf" else path.name


def _default_path_or_none() -> Path | None:
    try:
        return default_model_path()
    except DefaultModelMissingError:
        return None


def model_class_for(config: ModelConfig, registries: Registries) -> type[Model]:
    if config.architecture not in registries.models:
        supported = ", ".join(registries.models.keys()) or "none (install rustinfer-models-llama3)"
        raise UnsupportedArchitectureError(
            f"architecture {config.architecture!r} is not supported by any installed model plugin; "
            f"supported: {supported}"
        )
    return registries.models.get(config.architecture)


def _checkpoint_dtype(config: ModelConfig, source: ModelSource) -> torch.dtype | None:
    if source.format == "gguf":
        return None  # quantized or mixed: the device decides
    return parse_dtype(config.torch_dtype) if config.torch_dtype else None


def load_model(
    model: str | os.PathLike[str] | None = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    load_format: str = "auto",
    seed: int = 0,
    registries: Registries | None = None,
) -> LoadedModel:
    """Load ``model`` (None: the embedded default) onto ``device`` in ``dtype``."""
    start = time.perf_counter()
    regs = registries or get_registries()
    dev = resolve_device(device, regs)
    source = load_model_source(model, load_format=load_format)
    config = source.config
    cls = model_class_for(config, regs)
    if dtype == "auto":
        torch_dtype = dev.auto_dtype(_checkpoint_dtype(config, source))
    else:
        torch_dtype = parse_dtype(dtype)
    ops = OpTable.resolve(regs.ops, dev.type, torch_dtype, cls.ops_used)
    logger.debug("ops for %s/%s: %s", dev.type, torch_dtype, ops.chosen)
    net = cls(config, ops, torch_dtype)
    if source.format == "dummy":
        # Drawn on a GPU when there is one: 8B random numbers take a minute on a CPU.
        where = dev.torch_device if dev.type == "cuda" else "cpu"
        shapes = cls.weight_shapes(config)
        net.load_weights(dummy_weights(shapes, torch_dtype, seed=seed, device=where))
    else:
        net.load_weights(source.weights(torch_dtype))
    weights_read = time.perf_counter()
    net = net.to(dev.torch_device).eval()
    dev.synchronize()
    elapsed = time.perf_counter() - start
    logger.info(
        "loaded %s (%s, %s) on %s in %.2f s (weights read and packed %.2f s, moved to the "
        "device %.2f s)",
        source.path or config.architecture,
        source.format,
        str(torch_dtype).removeprefix("torch."),
        dev,
        elapsed,
        weights_read - start,
        elapsed - (weights_read - start),
    )
    return LoadedModel(net, source.tokenizer, config, dev, torch_dtype, source, elapsed)
