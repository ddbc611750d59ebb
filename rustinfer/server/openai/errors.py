"""Every failure as OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``.

The engine raises typed errors (``rustinfer.errors``); this module alone decides their HTTP status.
FastAPI's own failures (422 validation, bad JSON, unknown route) are rewritten into the same shape,
422 becoming 400 as OpenAI answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rustinfer.errors import (
    ChatTemplateError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    RequestError,
    RustinferError,
    UnavailableError,
)

__all__ = ["ApiError", "ClientDisconnected", "error_body", "error_for", "install_error_handlers"]

logger = logging.getLogger(__name__)

# How long a client told "overloaded" should wait before retrying, in seconds.
RETRY_AFTER_S = 1


@dataclass
class ApiError(Exception):
    """An HTTP error raised by the server itself (auth, unsupported field, unknown model)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its request has been aborted."""


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_for(exc: BaseException) -> ApiError:
    """Map any exception to the HTTP error it stands for (unexpected ones become a 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ClientDisconnected):
        # Nobody reads this answer; 499 ("client closed request") keeps access logs truthful.
        return ApiError(499, "the client closed the connection", "client_closed_request")
    if isinstance(exc, OverloadedError):
        return ApiError(429, str(exc), "rate_limit_error", exc.field, exc.code)
    if isinstance(exc, UnavailableError):
        return ApiError(503, str(exc), "service_unavailable", exc.field, exc.code)
    if isinstance(exc, NotFoundError):
        return ApiError(404, str(exc), "invalid_request_error", exc.field, "model_not_found")
    if isinstance(exc, InvalidRequestError | RequestError):
        return ApiError(400, str(exc), "invalid_request_error", exc.field, exc.code)
    if isinstance(exc, ChatTemplateError):
        return ApiError(400, str(exc), "invalid_request_error", "messages", "chat_template_error")
    logger.error("unexpected error while serving a request", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", "internal_error", None, None)


def error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 429 else None
    if err.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code), err.status, headers=headers
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request body is invalid", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    where = f"field {param!r}" if param else "the request body"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"invalid {where}: {first.get('msg')}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        type_ = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return error_response(ApiError(exc.status_code, str(exc.detail), type_, None, code))

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> JSONResponse:
        return error_response(error_for(exc))

    @app.exception_handler(RustinferError)
    async def _engine(_: Request, exc: RustinferError) -> JSONResponse:
        return error_response(error_for(exc))

    # A bug, not a bad request: Starlette logs its traceback; the client still gets the shape.
    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        return error_response(error_for(exc))
