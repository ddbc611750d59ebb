"""API keys for the gRPC services: metadata ``authorization: Bearer KEY`` on every call.

The same rule as REST (``rustinfer.server.auth``): with no keys configured every call passes, and
keys are compared in constant time against every key, so timing reveals neither a key's prefix nor
which key matched. Health checking and reflection stay open, so load balancers and ``grpcurl
list`` work without a key (reflection describes the API; it serves no model output).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc

from rustinfer.server.auth import bearer_refusal

__all__ = ["OPEN_SERVICES", "ApiKeyInterceptor", "ApiKeys"]

# Services callable without a key: standard health checking and both reflection versions.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

# The trailing metadata key that carries an error's stable code (as the services' errors do).
ERROR_CODE_KEY = "rustinfer-error-code"


class ApiKeys:
    """The accepted keys, and why a call's metadata is refused (None: it is not)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def refusal(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        if not self._keys:
            return None
        header: str | bytes = ""
        for key, value in metadata or ():
            if key == "authorization":  # gRPC lower-cases metadata keys on the wire
                header = value
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        refusal = bearer_refusal(header, self._keys)
        if refusal == "missing":
            return "missing API key: send it as metadata 'authorization: Bearer YOUR_KEY'"
        return None if refusal is None else "incorrect API key provided"


async def deny(context: grpc.aio.ServicerContext, message: str) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        message,
        trailing_metadata=((ERROR_CODE_KEY, "invalid_api_key"),),
    )


_HANDLER_MAKERS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _denial(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends every call with UNAUTHENTICATED
    before reading its request."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await deny(context, message)

    make = _HANDLER_MAKERS[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without an accepted key to every service but ``open_services``; install it
    on the server (``grpc.aio.server(interceptors=[...])``) to cover all its services."""

    def __init__(self, keys: Iterable[str], open_services: Iterable[str] = OPEN_SERVICES) -> None:
        self._keys = ApiKeys(keys)
        self._open = frozenset(open_services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not self._keys.enabled:
            return handler  # None: no such method, which the server reports as UNIMPLEMENTED
        # method is "/package.Service/Method"
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        if service in self._open:
            return handler
        refusal = self._keys.refusal(handler_call_details.invocation_metadata)
        return handler if refusal is None else _denial(handler, refusal)
