"""API keys: ``Authorization: Bearer KEY`` on every API route when keys are configured.

Keys are compared in constant time (``hmac.compare_digest`` against every key, without stopping at
the first match), so response timing reveals neither a key's prefix nor which key matched.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from rustinfer.server.openai.errors import ApiError

__all__ = ["ApiKeyCheck", "bearer_refusal"]


def bearer_refusal(header: str, keys: list[bytes]) -> str | None:
    """Why an ``authorization`` value is refused: "missing" (no ``Bearer KEY``), "incorrect" (no
    key matches), or None (accepted). Every face (REST, gRPC) checks keys through this."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "missing"
    given = token.strip().encode()
    matched = False
    for key in keys:  # all of them, without stopping at a match: constant time
        matched |= hmac.compare_digest(given, key)
    return None if matched else "incorrect"


class ApiKeyCheck:
    """A FastAPI dependency; with no keys configured every request passes."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __call__(self, request: Request) -> None:
        if not self._keys:
            return
        refusal = bearer_refusal(request.headers.get("authorization", ""), self._keys)
        if refusal == "missing":
            raise ApiError(
                401,
                "missing API key: send it as 'Authorization: Bearer YOUR_KEY'",
                code="invalid_api_key",
            )
        if refusal is not None:
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")
