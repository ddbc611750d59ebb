"""Load a HF model directory: config.json, safetensors weights (single or sharded), tokenizer."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from rustinfer.config import ModelConfig, config_from_hf
from rustinfer.errors import ModelLoadError
from rustinfer.loaders.source import ModelSource, parse_dtype
from rustinfer.tokenizer import Tokenizer

__all__ = ["SafetensorsWeights", "load_hf_config", "load_hf_dir"]

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def load_hf_config(config_path: Path) -> ModelConfig:
    """Parse a ``config.json`` (and its sibling ``generation_config.json``) into a ModelConfig."""
    if not config_path.is_file():
        raise ModelLoadError(
            f"no config.json at {config_path}; a HF model directory needs one (for a GGUF model, "
            "pass the .gguf file itself)"
        )
    try:
        config = config_from_hf(_read_json(config_path))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{config_path}: {exc}") from exc
    if config.torch_dtype is not None and config.torch_dtype != "auto":
        try:
            parse_dtype(config.torch_dtype)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{config_path}: torch_dtype: {exc}") from exc
    gen_path = config_path.with_name("generation_config.json")
    if gen_path.is_file():
        # generation_config.json often lists more stop ids (Llama 3: <|eom_id|>, <|eot_id|>).
        gen_eos = _read_json(gen_path).get("eos_token_id")
        extra = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        merged = tuple(dict.fromkeys([*config.eos_token_ids, *(int(i) for i in extra)]))
        config = config.replace(eos_token_ids=merged)
    return config


def _weight_files(folder: Path) -> dict[Path, list[str] | None]:
    """Shard file -> tensor names it holds per the index (None: read the file's own header)."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_path} has no 'weight_map' of tensor name -> shard file")
        shards: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(folder / shard, []).append(name)
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise ModelLoadError(
                f"{index_path} names shard file(s) missing from {folder}: {', '.join(missing)}; "
                "the download is incomplete"
            )
        return dict(shards)
    single = folder / SINGLE_FILE
    if single.is_file():
        return {single: None}
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = f" (found {', '.join(others)}: convert them to safetensors)" if others else ""
    raise ModelLoadError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")


class SafetensorsWeights:
    """Tensors of one or more safetensors files, memory-mapped, converted only if dtype differs."""

    def __init__(self, files: dict[Path, list[str] | None]) -> None:
        self._files: dict[Path, list[str]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path, names in files.items():
            try:
                with safe_open(path, framework="pt") as handle:
                    stored = list(handle.keys())
                    absent = sorted(set(names or ()) - set(stored))
                    if absent:
                        raise ModelLoadError(
                            f"{path.name} lacks tensors its index assigns to it: {absent[:5]}"
                        )
                    wanted = stored if names is None else names
                    for name in wanted:
                        self._shapes[name] = tuple(handle.get_slice(name).get_shape())
            except ModelLoadError:
                raise
            except Exception as exc:  # safetensors raises SafetensorError / OSError on bad files
                raise ModelLoadError(f"cannot read safetensors file {path}: {exc}") from exc
            self._files[path] = wanted

    def tensor_names(self) -> list[str]:
        return list(self._shapes)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def iter_tensors(self, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in ``dtype`` (None: as stored)."""
        for path, names in self._files.items():
            # safe_open(framework="pt") maps the file; get_tensor returns a view of that mapping,
            # so a tensor already in ``dtype`` is handed on without a copy (and a consumer that
            # reads a slice of it reads only that slice's pages).
            with safe_open(path, framework="pt") as handle:
                for name in names:
                    tensor = handle.get_tensor(name)
                    yield name, tensor if dtype in (None, tensor.dtype) else tensor.to(dtype)


def load_hf_dir(folder: Path, *, with_weights: bool = True) -> ModelSource:
    """A ModelSource for a HF directory (``with_weights=False``: config + tokenizer, "dummy")."""
    config = load_hf_config(folder / "config.json")
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_hf_dir(folder, config)
        # One set of stop ids for everyone: the tokenizer's also counts tokenizer_config's EOS.
        config = config.replace(eos_token_ids=tokenizer.eos_token_ids)
        if config.bos_token_id is None:
            config = config.replace(bos_token_id=tokenizer.bos_token_id)
    else:
        logger.warning("%s has no tokenizer.json; only token ids can be used", folder)
    store = SafetensorsWeights(_weight_files(folder)) if with_weights else None
    return ModelSource(
        path=folder,
        format="safetensors" if with_weights else "dummy",
        config=config,
        tokenizer=tokenizer,
        store=store,
    )
