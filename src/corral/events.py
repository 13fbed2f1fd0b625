"""The queue behind one subscriber's event stream, shared by the master and the agent.

The master keeps one for each subscribed framework (the v1 scheduler API's
stream) and the agent one for each subscribed custom executor (the v1
executor API's stream). The side that owns the subscription puts events in
with `send`; the HTTP handler takes them out with `next` and writes them as
RecordIO records. This module imports nothing from corral, so both sides can
use it without an import cycle.
"""

from __future__ import annotations

import asyncio
from typing import Any


class EventQueue:
    """The events of one subscription, in order, until `close` ends them."""

    def __init__(self) -> None:
        # NOTE: the queue is unbounded; a subscriber that stops reading its stream while
        # staying connected makes it grow until the connection drops.
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.closed = False

    def send(self, event: dict[str, Any]) -> None:
        """Queue `event`; does nothing once the stream is closed."""
        if not self.closed:
            self._queue.put_nowait(event)

    def close(self, error: str | None = None) -> None:
        """End the stream after the events queued, and after an ERROR event with `error` when given."""
        if self.closed:
            return
        if error:
            self._queue.put_nowait({"type": "ERROR", "error": {"message": error}})
        self._queue.put_nowait(None)
        self.closed = True

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """Return the next event, None once the stream ended; raise TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            return await self._queue.get()
