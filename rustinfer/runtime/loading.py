"""Checkpoint + device + dtype -> a model on its device with its tokenizer."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from rustinfer.config import ModelConfig, QuantizationConfig, parse_quantization
from rustinfer.default_model import DEFAULT_MODEL_NAME, default_model_path
from rustinfer.device import Device, resolve_device
from rustinfer.errors import DefaultModelMissingError, ModelLoadError, UnsupportedArchitectureError
from rustinfer.loaders import ModelSource, dummy_weights, load_model_source, parse_dtype
from rustinfer.loaders.quantize import quantize_weights
from rustinfer.models.base import Model
from rustinfer.models.op_table import OpTable
from rustinfer.ops.quant import quantized_op_table
from rustinfer.plugins import get_registries
from rustinfer.registry import OP_OVERRIDE_ENV, Registries, RegistryError, parse_op_overrides
from rustinfer.tokenizer import Tokenizer

if TYPE_CHECKING:
    from rustinfer.distributed.parallel import TensorParallel
    from rustinfer.distributed.workers import TensorParallelGroup

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
    quantization: str = "none"  # how matmul weights are held: none, gguf, int8-g32, int4-g64...
    batch_invariant: bool = False  # ops pinned to their batch-invariant implementations
    # The worker processes that hold the other ranks' shards (tensor parallelism), on the driver.
    parallel: TensorParallelGroup | None = None

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


def with_quantized_ops(
    ops: OpTable, regs: Registries, device_type: str, dtype: torch.dtype
) -> OpTable:
    """``ops`` plus the device's quantized ops, its ``linear`` taking quantized weights too (a
    device without them fails here, with the registry's list of what is registered)."""
    quantized = OpTable.resolve(
        regs.ops, device_type, dtype, ("quantized_linear", "prepare_quantized_weight")
    )
    fns = {name: getattr(ops, name) for name in ops.chosen}
    fns = quantized_op_table(fns, quantized.quantized_linear)
    fns["prepare_quantized_weight"] = quantized.prepare_quantized_weight
    chosen = {**ops.chosen, **quantized.chosen}
    # Optional: without quantized_logits a quantized LM head is held in the model dtype, without
    # decode_layers the layers run op by op. Each must come from the implementation that prepares
    # the weights (they read their layout).
    preparer = regs.ops.lookup("quantized_linear", device_type, dtype).name
    for name in ("quantized_logits", "decode_layers"):
        try:
            impl = regs.ops.lookup(name, device_type, dtype)
        except RegistryError:
            continue
        if impl.name == preparer:
            fns[name] = impl.load()
            chosen[name] = impl.describe()
    return OpTable(fns, chosen)


def with_decode_layers(
    ops: OpTable, regs: Registries, device_type: str, dtype: torch.dtype
) -> OpTable:
    """``ops`` plus the device's optional ``decode_layers`` for a model of dense weights, if it
    has one (it declines, per model, weights in a layout it does not read)."""
    try:
        impl = regs.ops.lookup("decode_layers", device_type, dtype)
    except RegistryError:
        return ops
    return ops.with_op("decode_layers", impl.load(), impl.describe())


# auto on a GPU dequantizes a GGUF whose dense weights take at most this share of the free
# memory (the rest is for the KV cache and activations).
_DENSE_FRACTION_OF_FREE = 0.5


def _dense_weight_bytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) for shape in shapes.values()) * itemsize


def _serves_quantized(regs: Registries, device_type: str, dtype: torch.dtype) -> bool:
    try:
        regs.ops.lookup("quantized_linear", device_type, dtype)
    except RegistryError:
        return False
    return True


class ModelOptions(Protocol):
    """What names a model to load: the CLI's parsed model flags, the server's settings."""

    model: str | None
    device: str
    dtype: str
    load_format: str
    quantization: str
    batch_invariant: bool


def load_model_from(options: ModelOptions) -> LoadedModel:
    """:func:`load_model` of the model ``options`` name; with a ``tensor_parallel_size`` above
    one, rank 0's shard with the workers that hold the others."""
    from rustinfer.distributed.workers import (
        load_tensor_parallel,
        spec_from_options,
        torchrun_rank,
    )

    size = getattr(options, "tensor_parallel_size", 1) or 1
    if size < 1:
        raise ModelLoadError(f"--tensor-parallel-size must be >= 1, got {size}")
    launched = torchrun_rank()  # rank 0 of a torchrun launch (the others never get here)
    if launched is not None:
        world = launched[1]
        if size not in (1, world):
            raise ModelLoadError(
                f"--tensor-parallel-size {size} differs from torchrun's {world} processes; "
                "give the same number (or leave the flag out under torchrun)"
            )
        return load_tensor_parallel(spec_from_options(options), world, init_method="env://")
    if size > 1:
        return load_tensor_parallel(spec_from_options(options), size)
    return load_model(
        options.model,
        options.device,
        options.dtype,
        options.load_format,
        quantization=options.quantization,
        batch_invariant=options.batch_invariant,
    )


def load_model(
    model: str | os.PathLike[str] | None = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    load_format: str = "auto",
    seed: int = 0,
    registries: Registries | None = None,
    quantization: str | QuantizationConfig | None = "auto",
    batch_invariant: bool = False,
    tp: TensorParallel | None = None,
) -> LoadedModel:
    """Load ``model`` (None: the embedded default) onto ``device`` in ``dtype``; ``quantization``
    (see :class:`QuantizationConfig`): auto keeps a GGUF file's quantized matrices quantized;
    ``batch_invariant``: ops whose results for a sequence do not depend on the batch it runs in
    (slower; see :func:`batch_invariant_overrides`); ``tp``: load only this rank's shard of a
    tensor-parallel group (dense weights; see :mod:`rustinfer.distributed`)."""
    start = time.perf_counter()
    regs = registries or get_registries()
    dev = resolve_device(device, regs)
    source = load_model_source(model, load_format=load_format)
    try:
        quant = parse_quantization(quantization).for_format(source.format)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    config = source.config
    cls = model_class_for(config, regs)
    if dtype == "auto":
        torch_dtype = dev.auto_dtype(_checkpoint_dtype(config, source))
    else:
        torch_dtype = parse_dtype(dtype)
    overrides = (
        batch_invariant_overrides(regs, cls.ops_used, dev.type, torch_dtype)
        if batch_invariant
        else None
    )
    ops = OpTable.resolve(regs.ops, dev.type, torch_dtype, cls.ops_used, overrides)
    if (
        quant.is_quantized
        and str(quantization) == "auto"
        and not _serves_quantized(regs, dev.type, torch_dtype)
    ):
        # auto asks for what runs fastest here; explicit gguf/int8/int4 fail below instead.
        logger.info(
            "no quantized matmul for %s/%s: dequantizing the GGUF's tensors", dev.type, torch_dtype
        )
        quant = QuantizationConfig("none")
    elif quant.is_quantized and str(quantization) == "auto" and dev.type == "cuda":
        dense = _dense_weight_bytes(cls.weight_shapes(config), torch_dtype)
        free, _ = torch.cuda.mem_get_info(dev.torch_device)
        if dense <= _DENSE_FRACTION_OF_FREE * free:
            # On a GPU the quantized kernels win only at one row (BENCHMARKS.md, "H200,
            # quantized weights"); batches and prefill run several times faster on cuBLAS. So
            # auto dequantizes a model that fits comfortably and keeps quantized one that would
            # not, where memory, not speed, decides.
            logger.info(
                "auto: the GGUF's tensors dequantized to %s take %.1f GiB of %.1f GiB free on "
                "%s: dequantizing (faster batches; --quantization gguf keeps them quantized)",
                torch_dtype,
                dense / 2**30,
                free / 2**30,
                dev.torch_device,
            )
            quant = QuantizationConfig("none")
    if quant.is_quantized and batch_invariant:
        if str(quantization) != "auto":
            raise ModelLoadError(
                f"--batch-invariant needs dense weights, but --quantization {quantization} keeps "
                "them quantized and the quantized matmuls are not batch-invariant; use "
                "--quantization none (or auto)"
            )
        quant = QuantizationConfig("none")
    sharded = tp is not None and tp.size > 1
    if sharded and quant.is_quantized:
        if str(quantization) != "auto":
            raise ModelLoadError(
                f"tensor parallelism shards dense weights, but --quantization {quantization} keeps "
                "them quantized; use --quantization none (or auto)"
            )
        quant = QuantizationConfig("none")
    if sharded and not cls.supports_tensor_parallel:
        raise ModelLoadError(
            f"{config.architecture} ({cls.__name__}) does not support tensor parallelism; use "
            "--tensor-parallel-size 1"
        )
    if quant.is_quantized:
        ops = with_quantized_ops(ops, regs, dev.type, torch_dtype)
    elif not batch_invariant:
        ops = with_decode_layers(ops, regs, dev.type, torch_dtype)
    logger.debug("ops for %s/%s: %s", dev.type, torch_dtype, ops.chosen)
    net = cls(config, ops, torch_dtype, tp=tp) if sharded else cls(config, ops, torch_dtype)
    if source.format == "dummy":
        # Drawn on a GPU when there is one: 8B random numbers take a minute on a CPU.
        where = dev.torch_device if dev.type == "cuda" else "cpu"
        shapes = cls.weight_shapes(config)
        drawn = dummy_weights(shapes, torch_dtype, seed=seed, device=where)
        if quant.is_quantized:  # random weights at real shapes, quantized: benchmarks
            drawn = quantize_weights(drawn, quant, torch_dtype)
        net.load_weights(drawn)
    else:
        # A shard converts only its slice of each tensor (copying it into its parameter).
        # A head held quantized is asked for only where the ops can multiply by it.
        head = "quantized_logits" in ops.chosen
        net.load_weights(source.weights(torch_dtype, quant, as_stored=sharded, quantized_head=head))
    weights_read = time.perf_counter()
    net = net.to(dev.torch_device).eval()
    dev.synchronize()
    elapsed = time.perf_counter() - start
    logger.info(
        "loaded %s (%s, %s, quantization %s) on %s in %.2f s (weights read and packed %.2f s, moved to the "
        "device %.2f s)",
        source.path or config.architecture,
        source.format,
        str(torch_dtype).removeprefix("torch."),
        quant,
        dev,
        elapsed,
        weights_read - start,
        elapsed - (weights_read - start),
    )
    return LoadedModel(
        net,
        source.tokenizer,
        config,
        dev,
        torch_dtype,
        source,
        elapsed,
        str(quant),
        batch_invariant,
    )


def batch_invariant_overrides(
    regs: Registries, ops: Iterable[str], device_type: str, dtype: torch.dtype
) -> dict[str, str]:
    """Op pins for ``--batch-invariant``: every op with a ``batch_invariant`` implementation for
    this device and dtype, over ``RUSTINFER_OP_IMPL``'s pins for the others.

    Batch invariance is what makes a request's greedy tokens the same alone or beside others
    (the default ops pick kernels, reduction orders and attention splits by batch size, so bf16
    results can differ in the last bit and greedy decoding can then diverge). Raises when no
    installed plugin offers such kernels here: asking for the guarantee and not getting it
    must not pass silently.
    """
    pins = regs.ops.batch_invariant_overrides(ops, device_type, dtype)
    if not pins:
        raise ModelLoadError(
            f"--batch-invariant: no installed plugin has batch-invariant kernels for "
            f"{device_type} {str(dtype).removeprefix('torch.')} (rustinfer-ops-cuda has them "
            "for CUDA); drop the flag or use another device"
        )
    logger.info("batch-invariant ops: %s", ", ".join(sorted(pins)))
    return {**parse_op_overrides(os.environ.get(OP_OVERRIDE_ENV)), **pins}
