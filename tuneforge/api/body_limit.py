"""A cap on request bodies, enforced before they are read whole: a body that says it is larger than the limit
(`Content-Length`) gets 413 at once, unread; one that does not say (chunked) gets 413 as soon as what arrived
passes the limit. The upload routes (`/uploads/...`, whose bodies are the files, streamed to storage with their own
size checks) are exempt.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException

from tuneforge.api.errors import error_body

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    """ASGI middleware: 413 for any request body over `max_bytes` outside `exempt` path prefixes."""

    def __init__(self, app: Any, *, max_bytes: int, exempt: tuple[str, ...] = ("/uploads/",)) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or str(scope.get("path", "")).startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message: Message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read: the app's handler for HTTP errors answers it.
                    raise HTTPException(413, detail=self._message(None))
            return message

        await self.app(scope, counted, send)

    def _message(self, size: int | None) -> str:
        what = f"{size:,} bytes" if size is not None else "more than that"
        return (f"request body too large: at most {self.max_bytes:,} bytes are accepted here, this one is {what} "
                "(files are uploaded through POST /v1/files and its upload URL, which take large bodies)")  # fmt: skip

    async def _refuse(self, send: Any, size: int) -> None:
        body = json.dumps(error_body(self._message(size), "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), (b"x-should-retry", b"false"),
        ]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
