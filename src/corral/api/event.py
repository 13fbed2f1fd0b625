"""Consul's user events: `PUT /v1/event/fire/NAME` and `GET /v1/event/list`.

NOTE: Consul spreads user events by gossip and each agent keeps the last
256 it received in memory, so they are never durable. corral keeps them
in the memory of the server that received the fire request: they are
lost when it restarts and are not shared with other servers.

As on a Consul agent, an event enters the list only if it passes its own
filters against the local node. The node filter is matched against the
node name, and the service and tag filters against the services
registered on that node. The fire request returns the event either way.

The index of /v1/event/list is opaque, as Consul documents: it is derived
from the ID of the newest listed event, and a blocking list returns as
soon as that differs from the index it was given.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import itertools
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from corral.api.catalog import SERVER_INFO_KEY
from corral.api.common import blocking_params, check_datacenter, json_response, state_of, text_error

log = logging.getLogger(__name__)

# How many events the list keeps, as a Consul agent does.
MAX_EVENTS = 256
# Serf's default UserEventSizeLimit, in bytes: the event name plus the encoded event.
USER_EVENT_SIZE_LIMIT = 512
# The user event protocol version Consul writes.
USER_EVENT_VERSION = 1


@dataclass(frozen=True, slots=True)
class UserEvent:
    id: str
    name: str
    payload: bytes | None
    node_filter: str = ""
    service_filter: str = ""
    tag_filter: str = ""
    version: int = USER_EVENT_VERSION
    ltime: int = 0

    def to_api(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            # Go encodes a []byte as base64, and a nil one as null.
            "Payload": base64.b64encode(self.payload).decode() if self.payload is not None else None,
            "NodeFilter": self.node_filter,
            "ServiceFilter": self.service_filter,
            "TagFilter": self.tag_filter,
            "Version": self.version,
            "LTime": self.ltime,
        }

    def encoded_size(self) -> int:
        """Estimate the size of Consul's MessagePack encoding of this event, in bytes.

        NOTE: this is an estimate from MessagePack's header sizes for the fields
        Consul encodes (ID, n, p, nf, sf, tf, v). It may differ from Consul's
        encoder by a few bytes.
        """
        size = 1 + _string_size("ID") + _string_size(self.id)
        size += _string_size("n") + _string_size(self.name)
        if self.payload:
            size += _string_size("p") + _binary_size(len(self.payload))
        for key, value in (("nf", self.node_filter), ("sf", self.service_filter), ("tf", self.tag_filter)):
            if value:
                size += _string_size(key) + _string_size(value)
        return size + _string_size("v") + 1


def _string_size(text: str) -> int:
    length = len(text.encode())
    if length < 32:
        return 1 + length
    if length < 2**8:
        return 2 + length
    if length < 2**16:
        return 3 + length
    return 5 + length


def _binary_size(length: int) -> int:
    if length < 2**8:
        return 2 + length
    if length < 2**16:
        return 3 + length
    return 5 + length


def event_index(events: list[UserEvent]) -> int:
    """Return the index for a list of events: Consul folds the newest event's UUID into 64 bits."""
    if not events:
        return 1
    digits = events[-1].id.replace("-", "")
    return max(int(digits[:16], 16) ^ int(digits[16:], 16), 1)


class EventBuffer:
    """The last MAX_EVENTS user events this server accepted, oldest first."""

    def __init__(self, size: int = MAX_EVENTS):
        self._events: collections.deque[UserEvent] = collections.deque(maxlen=size)
        self._clock = itertools.count(1)
        self._waiters: list[asyncio.Future] = []

    def next_ltime(self) -> int:
        """Return the next Lamport time; a single server needs no more than a counter."""
        return next(self._clock)

    def add(self, event: UserEvent) -> None:
        self._events.append(event)
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def events(self, name: str = "") -> list[UserEvent]:
        return [event for event in self._events if not name or event.name == name]

    async def wait_for_event(self, timeout: float) -> bool:
        """Wait for the next accepted event; return False after `timeout` seconds."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            return False
        finally:
            if future in self._waiters:
                self._waiters.remove(future)
        return True

    def close(self) -> None:
        for future in self._waiters:
            if not future.done():
                future.cancel()
        self._waiters.clear()


EVENTS_KEY = web.AppKey("events", EventBuffer)


def _compile(pattern: str, kind: str) -> re.Pattern | None:
    """Compile an event filter of `kind` (node, service or tag), or raise Consul's 500 for a bad one.

    NOTE: filters are Python regular expressions. Consul uses Go's RE2 syntax, which
    agrees for common patterns but not in every detail.
    """
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise text_error(500, f"Invalid {kind} filter: {exc}") from None


def _passes_local_filters(request: web.Request, event: UserEvent) -> bool:
    """Tell whether the event is for this node, as a Consul agent decides on receipt."""
    node_name = request.app[SERVER_INFO_KEY]["node"]
    node_pattern = _compile(event.node_filter, "node")
    if node_pattern is not None and not node_pattern.search(node_name):
        return False
    service_pattern = _compile(event.service_filter, "service")
    if service_pattern is None:
        return True
    tag_pattern = _compile(event.tag_filter, "tag")
    for service in state_of(request).services(node_name):
        if not service_pattern.search(service.name):
            continue
        if tag_pattern is None or any(tag_pattern.search(tag) for tag in service.tags):
            return True
    return False


async def fire_event(request: web.Request) -> web.Response:
    check_datacenter(request)
    name = request.match_info["name"]
    if name.startswith("_"):
        raise text_error(400, f"Invalid event name {name!r}: names starting with '_' are reserved for Consul")
    node_filter = request.query.get("node", "")
    service_filter = request.query.get("service", "")
    tag_filter = request.query.get("tag", "")
    if tag_filter and not service_filter:
        raise text_error(500, "Cannot provide tag filter without service filter")
    for pattern, kind in ((node_filter, "node"), (service_filter, "service"), (tag_filter, "tag")):
        _compile(pattern, kind)

    body = await request.read()
    buffer = request.app[EVENTS_KEY]
    event = UserEvent(
        id=str(uuid.uuid4()),
        name=name,
        payload=body or None,
        node_filter=node_filter,
        service_filter=service_filter,
        tag_filter=tag_filter,
        ltime=buffer.next_ltime(),
    )

    size = len(name.encode()) + event.encoded_size()
    if size > USER_EVENT_SIZE_LIMIT:
        raise text_error(
            500,
            f"user event exceeds configured limit of {USER_EVENT_SIZE_LIMIT} bytes before encoding "
            f"(this one is about {size} bytes); send a smaller payload",
        )
    if _passes_local_filters(request, event):
        buffer.add(event)
    log.info("event fired name=%s id=%s payload_bytes=%d", name, event.id, len(body))
    return json_response(event.to_api())


async def list_events(request: web.Request) -> web.Response:
    # NOTE: ?node, ?service and ?tag are accepted and ignored. Consul documents them for
    # this endpoint, but its handler (agent/event_endpoint.go) reads only ?name.
    requested_index, timeout = blocking_params(request)
    name = request.query.get("name", "")
    buffer = request.app[EVENTS_KEY]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    events = buffer.events(name)
    # The index is opaque and not ordered, so the wait lasts while it equals the one given.
    while requested_index and event_index(events) == requested_index:
        remaining = deadline - loop.time()
        if remaining <= 0 or not await buffer.wait_for_event(remaining):
            break
        events = buffer.events(name)
    return json_response([event.to_api() for event in events], index=event_index(events))


async def missing_event_name(request: web.Request) -> web.Response:
    raise text_error(400, "Missing name")


def add_routes(app: web.Application) -> None:
    """Add the event routes, with an event buffer that lives as long as the application."""
    buffer = EventBuffer()
    app[EVENTS_KEY] = buffer

    async def close_buffer(_: web.Application) -> None:
        buffer.close()

    app.on_cleanup.append(close_buffer)
    router = app.router
    router.add_put("/v1/event/fire/{name:.+}", fire_event)
    router.add_put("/v1/event/fire/", missing_event_name)
    router.add_get("/v1/event/list", list_events)
