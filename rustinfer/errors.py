"""Exceptions that rustinfer raises on purpose.

Every message says what went wrong *and* what to do about it, because these reach users of the CLI
and the servers verbatim.
"""

from __future__ import annotations

__all__ = [
    "ChatTemplateError",
    "DefaultModelMissingError",
    "InvalidRequestError",
    "ModelLoadError",
    "PluginLoadError",
    "RegistryError",
    "RustinferError",
    "UnsupportedArchitectureError",
]


class RustinferError(Exception):
    """Base class: catching it catches every deliberate rustinfer failure."""


class ModelLoadError(RustinferError):
    """A model could not be read: missing files, bad tensors, bad shapes, unsupported GGUF types."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint names an architecture no installed model plugin implements."""


class DefaultModelMissingError(ModelLoadError):
    """No model was named and the embedded default model's package is not installed."""


class ChatTemplateError(RustinferError):
    """A chat template failed to compile or render (including its own ``raise_exception`` calls)."""


class RegistryError(RustinferError):
    """A registry lookup missed, a registration clashed, or an op override cannot apply."""


class PluginLoadError(RustinferError):
    """An installed plugin failed to import or to run its registration hooks."""


class InvalidRequestError(RustinferError, ValueError):
    """A request cannot be served as given (empty prompt, too long for the context); ``field`` names
    the part to fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid request field {field!r}: {message}")
        self.field = field
