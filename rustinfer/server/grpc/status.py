"""Engine errors as gRPC status codes: one mapping for every gRPC service.

The REST face maps the same error types to HTTP statuses (``rustinfer.server.openai.errors``); a
client of either learns the same thing: what went wrong and which field to fix.
"""

from __future__ import annotations

import grpc

from rustinfer.errors import (
    NotFoundError,
    OverloadedError,
    RequestError,
    UnavailableError,
)

__all__ = ["status_of"]


def status_of(exc: RequestError) -> grpc.StatusCode:
    """The status a request refused with ``exc`` gets (INVALID_ARGUMENT for anything the caller
    must change in the request, whose message names the field)."""
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INVALID_ARGUMENT
