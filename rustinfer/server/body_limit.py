"""Refuse request bodies larger than any prompt could need, before reading them.

Without a limit a single client can make the server buffer gigabytes of JSON. A declared
``Content-Length`` over the limit gets a 413 at once; a body sent without one (chunked) is cut
off once it passes the limit, which the app then sees as a client that went away.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_BODY_BYTES", "BodyLimit"]

# A 128k-token context is well under 2 MB of text; JSON escaping and chat framing add a few times
# that. 32 MiB leaves room for any real request and none for abuse.
MAX_BODY_BYTES = 32 << 20


class BodyLimit:
    """Pure ASGI middleware (no buffering of its own)."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, limited, send)

    async def _too_large(self, send: Any) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": f"the request body is larger than {self.max_bytes} bytes",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "request_too_large",
                }
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
