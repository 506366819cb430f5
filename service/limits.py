"""Limits on what one client can take of the API: request bodies and live log streams.

A pure ASGI middleware (no per-request task, like `service.app.RequestLatency`): a body
announced larger than the limit is refused before it is read; a body that streams past
the limit without announcing its length stops being read at the limit. Either way the answer is
413 with a JSON ``detail``, never a 5xx.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = f"request bodies are limited to {self.max_bytes} bytes"
        announced = dict(scope["headers"]).get(b"content-length")
        if announced is not None:
            try:
                length = int(announced)
            except ValueError:
                await _refuse(send, 400, "Content-Length is not a number")
                return
            if length > self.max_bytes:
                await _refuse(send, 413, limit)
                return
        received = 0
        too_large = False

        async def counted_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Stop reading: to the app the client is gone, and whatever it
                    # answers to that is replaced by the 413 below.
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not too_large:
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large:
            await _refuse(send, 413, limit)


class StreamSlots:
    """Live log streams per owner, at most ``per_owner`` at once (in this process)."""

    def __init__(self, per_owner: int) -> None:
        self.per_owner = per_owner
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, owner: str) -> bool:
        """Open a stream for ``owner``; False when they already hold ``per_owner``."""
        with self._lock:
            if self._open[owner] >= self.per_owner:
                return False
            self._open[owner] += 1
            return True

    def give_back(self, owner: str) -> None:
        """Close one of ``owner``'s streams."""
        with self._lock:
            self._open[owner] -= 1
            if self._open[owner] <= 0:
                del self._open[owner]
