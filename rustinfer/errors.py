"""Exceptions that rustinfer raises on purpose.

Every message says what went wrong *and* what to do about it, because these reach users of the CLI
and the servers verbatim.
"""

from __future__ import annotations

__all__ = [
    "ChatTemplateError",
    "ContextLengthExceededError",
    "DefaultModelMissingError",
    "DuplicateRequestError",
    "InvalidRequestError",
    "ModelLoadError",
    "NotFoundError",
    "NotReadyError",
    "OverloadedError",
    "PluginLoadError",
    "RegistryError",
    "RequestError",
    "RustinferError",
    "ShuttingDownError",
    "UnavailableError",
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


class RequestError(RustinferError):
    """One request was refused; everything else keeps being served.

    The servers map each subclass to a wire status (HTTP 4xx, a gRPC code) by its type, and put
    ``code`` (stable, machine-readable) and ``field`` (the part of the request to fix, or None) in
    the error body. Nothing here knows HTTP or gRPC.
    """

    code = "invalid_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidRequestError(RequestError, ValueError):
    """A request cannot be served as given (empty prompt, bad parameter); ``field`` names the part
    to fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid request field {field!r}: {message}", field)


class ContextLengthExceededError(InvalidRequestError):
    """The prompt plus the tokens asked for do not fit the context (model or KV cache)."""

    code = "context_length_exceeded"


class DuplicateRequestError(InvalidRequestError):
    """A request id is already in flight; the live request of that id is left untouched."""

    code = "duplicate_request_id"


class NotFoundError(RequestError):
    """The request names something this server does not have (a model)."""

    code = "not_found"


class OverloadedError(RequestError):
    """The waiting queue is full: the caller should retry later."""

    code = "overloaded"


class UnavailableError(RequestError):
    """The server cannot take requests right now (loading, shutting down): retry later."""

    code = "unavailable"


class ShuttingDownError(UnavailableError):
    """The engine is shutting down: requests in flight end with this, new ones are refused."""

    code = "shutting_down"


class NotReadyError(UnavailableError):
    """The model is still loading."""

    code = "model_loading"
