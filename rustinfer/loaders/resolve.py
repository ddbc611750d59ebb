"""``load_model_source``: from what the user named (dir, .gguf, config.json, None) to a source."""

from __future__ import annotations

import os
from pathlib import Path

from rustinfer.default_model import default_model_path
from rustinfer.errors import ModelLoadError
from rustinfer.loaders.gguf_file import load_gguf
from rustinfer.loaders.safetensors_dir import load_hf_config, load_hf_dir
from rustinfer.loaders.source import FORMATS, ModelSource
from rustinfer.tokenizer import Tokenizer

__all__ = ["load_model_source"]


def _from_config_file(config_path: Path) -> ModelSource:
    config = load_hf_config(config_path)
    folder = config_path.parent
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_hf_dir(folder, config)
        config = config.replace(eos_token_ids=tokenizer.eos_token_ids)
    return ModelSource(path=config_path, format="dummy", config=config, tokenizer=tokenizer)


def _load_file(path: Path, load_format: str) -> ModelSource:
    if path.suffix == ".gguf":
        if load_format not in ("auto", "gguf", "dummy"):
            raise ModelLoadError(
                f"{path} is a GGUF file, but load_format={load_format!r} was asked"
            )
        return load_gguf(path, with_weights=load_format != "dummy")
    if path.suffix == ".json":
        if load_format != "dummy":
            raise ModelLoadError(
                f"{path} is a config file without weights: pass its directory to load weights, "
                "or load_format='dummy' for random weights at its shapes"
            )
        return _from_config_file(path)
    raise ModelLoadError(
        f"don't know how to load {path}: pass a HF model directory, a .gguf file, or a config.json "
        "with load_format='dummy'"
    )


def _load_dir(folder: Path, load_format: str) -> ModelSource:
    has_config = (folder / "config.json").is_file()
    ggufs = sorted(folder.glob("*.gguf"))
    wants_gguf = load_format == "gguf" or (
        load_format in ("auto", "dummy") and not has_config and ggufs
    )
    if wants_gguf:
        if len(ggufs) != 1:
            found = ", ".join(p.name for p in ggufs) or "none"
            raise ModelLoadError(
                f"{folder} must hold exactly one .gguf file to load it as GGUF (found: {found}); "
                "pass the .gguf file itself"
            )
        return load_gguf(ggufs[0], with_weights=load_format != "dummy")
    if not has_config:
        raise ModelLoadError(
            f"no config.json in {folder}: a HF model directory needs config.json plus "
            "model.safetensors (or a sharded index), or pass a .gguf file"
        )
    return load_hf_dir(folder, with_weights=load_format != "dummy")


def load_model_source(
    model: str | os.PathLike[str] | None, load_format: str = "auto"
) -> ModelSource:
    """Locate and open a model; weights are read later, by :meth:`ModelSource.weights`.

    ``model``: a HF directory (config.json + safetensors), a ``.gguf`` file (or a directory with
    exactly one and no config.json), a config.json for ``load_format="dummy"``, or ``None`` for the
    embedded default model. ``load_format``: "auto", "safetensors", "gguf" or "dummy".
    """
    if load_format not in FORMATS:
        raise ModelLoadError(
            f"unknown load_format {load_format!r}; choose one of: {', '.join(FORMATS)}"
        )
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {path} does not exist; pass a HF model directory, a .gguf file, or "
            "nothing for the default model"
        )
    return _load_file(path, load_format) if path.is_file() else _load_dir(path, load_format)
