"""A lean HTTP/1.1 path for plain reads and writes of one key, in front of aiohttp.

Every connection to the HTTP address starts on this path. It serves two
kinds of request itself, from State, with the status, headers and body that
the aiohttp handlers in kv.py give:

- GET /v1/kv/KEY with no query, `?stale` or `?consistent`;
- PUT /v1/kv/KEY with no query and a Content-Length body within the value
  size limit.

The first request of any other kind hands the connection to aiohttp, with
every byte not yet served, and aiohttp serves it from then on. Such requests
are those with another path, a query, a chunked body, `Expect`,
`Content-Encoding`, `Connection: close`, HTTP/1.0, a key with bytes other
than letters, digits and `-._~/`, or a malformed head. Errors therefore keep
the texts of the aiohttp handlers, which make them in one place.

The reason is speed. aiohttp's request and response objects, its task
per connection and the middlewares took about half of the event loop's
time for a PUT. With wrk writing 10,000 keys over 64 connections, the
event loop thread used about 100 microseconds of CPU per PUT before and 48
on this path, and the PUTs per second went from about 8,500 to 15,000.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from corral.api import kv
from corral.api.common import STATE_KEY, kv_key_problem
from corral.api.metrics import METRICS_KEY
from corral.store import StoreError

log = logging.getLogger(__name__)

ROUTE = "/v1/kv/{key}"
_PREFIX = b"/v1/kv/"
# Queries of reads that every consistency mode serves from the same in-memory view.
_GET_QUERIES = (b"", b"stale", b"consistent")
# The longest request head this path reads (aiohttp's limit for one line). Longer heads go to aiohttp.
_MAX_HEAD = 8190
# Request bytes buffered while a write is in progress, beyond which reading pauses.
_MAX_BUFFERED = 1 << 20
# Seconds after which an idle connection is closed, as aiohttp's RequestHandler does by default.
KEEPALIVE_TIMEOUT = 3630.0
_SWEEP_INTERVAL = 60.0
# Bytes a key may contain on this path. Anything else (percent escapes above all)
# goes to aiohttp, so that a path is decoded the one way aiohttp decodes it.
_KEY_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/")
_SERVER = SERVER_SOFTWARE.encode()
# Header lines that aiohttp's parser accepts: a token, a colon, and a value of visible
# characters, spaces, tabs and bytes above 127. Any other line (a bare CR or LF, a
# control character, a space before the colon, a folded line) goes to aiohttp, which rejects it.
_HEADER_LINES = re.compile(rb"(?:[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
# The number of header lines beyond which aiohttp rejects a request with 400 (RequestHandler's max_headers).
_MAX_HEADERS = 128
# Headers that aiohttp rejects when they come twice (lower case).
_SINGLETON_HEADERS = frozenset((b"content-location", b"content-range", b"content-type", b"etag", b"host",
                                b"max-forwards", b"server", b"user-agent"))


class _Handoff(Exception):
    """Raised while reading a request that this path does not serve."""


class _Clock:
    """The Date header's value, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


class FastKVServer:
    """Accepts the HTTP connections of an application and serves them as the module describes."""

    def __init__(self, app: web.Application, aiohttp_protocol: Callable[[], asyncio.Protocol]):
        self.state = app[STATE_KEY]
        self.metrics = app[METRICS_KEY]
        self.body_cache = app[kv.BODY_CACHE_KEY]
        self.max_value_size = app.get(kv.MAX_VALUE_SIZE_KEY, kv.MAX_VALUE_SIZE)
        self.aiohttp_protocol = aiohttp_protocol
        self.clock = _Clock()
        self.connections: set[_FastKVProtocol] = set()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int, backlog: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _FastKVProtocol(self), host, port, reuse_address=True, backlog=backlog
        )
        self._sweeper = loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def close(self) -> None:
        """Stop listening and close this path's connections once their request in progress has its response.

        Connections handed to aiohttp are closed by the aiohttp runner.
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            self._server.close()
            self._server = None
        for connection in list(self.connections):
            connection.close_when_idle()

    def _sweep(self) -> None:
        deadline = time.monotonic() - KEEPALIVE_TIMEOUT
        for connection in list(self.connections):
            if connection.idle_since is not None and connection.idle_since < deadline:
                connection.close_when_idle()
        self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_INTERVAL, self._sweep)


class _FastKVProtocol(asyncio.Protocol):
    def __init__(self, server: FastKVServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.closing = False
        self.reading_paused = False
        self.writing_paused = False
        self.put_task: asyncio.Task | None = None
        self.idle_since: float | None = time.monotonic()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.idle_since = None
        if self.busy or self.writing_paused:
            if len(self.buffer) > _MAX_BUFFERED and not self.reading_paused and self.transport is not None:
                self.reading_paused = True
                self.transport.pause_reading()
            return
        self._serve()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if not self.busy:
            self._serve()

    def close_when_idle(self) -> None:
        self.closing = True
        if not self.busy and self.transport is not None:
            self.transport.close()

    # Requests

    def _serve(self) -> None:
        """Serve the complete requests in the buffer, in order, until one must wait for a commit."""
        while (self.buffer and not self.busy and not self.writing_paused and not self.closing
               and self.transport is not None):
            handoff = False
            try:
                request = self._next_request()
            except _Handoff:
                handoff = True
            if handoff:
                # Outside the except clause, so that errors aiohttp logs do not show _Handoff as their context.
                self._hand_off()
                return
            if request is None:
                break
            method, key, value = request
            if method == b"GET":
                self._get(key)
            else:
                self.busy = True
                # Held here, because the event loop keeps only a weak reference to a task.
                self.put_task = asyncio.get_running_loop().create_task(self._put(key, value))
        if not self.busy and self.transport is not None:
            if self.closing:
                # The server is stopping, so requests that came after the one just served are dropped.
                self.transport.close()
                return
            if self.reading_paused and not self.writing_paused:
                self.reading_paused = False
                self.transport.resume_reading()
            if not self.buffer:
                self.idle_since = time.monotonic()

    def _next_request(self) -> tuple[bytes, str, bytes] | None:
        """Take the first request off the buffer: (method, key, body), None while it is incomplete.

        Raise _Handoff, leaving the buffer as it is, for a request this path does not serve.
        NOTE: aiohttp parses all bytes of one read before it responds, so a malformed request
        behind valid ones in the same read gets only a 400. This path serves the valid ones first.
        """
        buffer = self.buffer
        head_end = buffer.find(b"\r\n\r\n", 0, _MAX_HEAD + 4)
        if head_end < 0:
            _check_partial_head(buffer)
            return None
        line_end = buffer.find(b"\r\n")
        if _HEADER_LINES.fullmatch(buffer, line_end + 2, head_end + 2) is None:
            raise _Handoff
        lines = bytes(buffer[:head_end]).split(b"\r\n")
        method, path = _request_line(lines[0])
        content_length = self._content_length(lines)
        if content_length is None or (method == b"GET" and content_length) or content_length > self.server.max_value_size:
            raise _Handoff
        key = _plain_key(path[len(_PREFIX):])
        end = head_end + 4 + content_length
        if len(buffer) < end:
            return None
        value = bytes(buffer[head_end + 4:end])
        del buffer[:end]
        return method, key, value

    @staticmethod
    def _content_length(lines: list[bytes]) -> int | None:
        """Return the Content-Length of a head's header lines (0 when absent), or None when aiohttp must read it.

        The lines are known to match _HEADER_LINES.
        """
        if len(lines) > _MAX_HEADERS + 1:
            return None
        length = None
        singletons: set[bytes] = set()
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.lower()
            if name in _SINGLETON_HEADERS:
                if name in singletons:
                    return None
                singletons.add(name)
            elif name == b"content-length":
                value = value.strip(b" \t")
                if length is not None or not value.isdigit():
                    return None
                length = int(value)
            elif name in (b"transfer-encoding", b"expect", b"upgrade", b"content-encoding"):
                return None
            elif name == b"connection" and value.strip(b" \t").lower() != b"keep-alive":
                return None
        if b"host" not in singletons:
            return None
        return length or 0

    def _hand_off(self) -> None:
        """Give the connection and its unanswered bytes to aiohttp."""
        transport = self.transport
        assert transport is not None
        self.server.connections.discard(self)
        self.transport = None
        protocol = self.server.aiohttp_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.writing_paused:
            # The transport reports only changes of its write state, so aiohttp's protocol is paused here.
            protocol.pause_writing()
        if self.reading_paused:
            transport.resume_reading()
        data = bytes(self.buffer)
        self.buffer.clear()
        if data:
            protocol.data_received(data)

    def _get(self, key: str) -> None:
        started = time.perf_counter()
        server = self.server
        state = server.state
        body = kv.cached_body(server.body_cache, state, key)
        index = max(state.kv_index(key), 1)
        if body is None:
            status = 404
            head = (b"HTTP/1.1 404 Not Found\r\nX-Consul-Index: %d\r\nX-Consul-KnownLeader: true\r\n"
                    b"X-Consul-LastContact: 0\r\nContent-Length: 0\r\nDate: %s\r\nServer: %s\r\n\r\n"
                    % (index, server.clock.date(), _SERVER))
            self._write(head)
        else:
            status = 200
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: %d\r\n"
                    b"X-Consul-KnownLeader: true\r\nX-Consul-LastContact: 0\r\nContent-Length: %d\r\n"
                    b"Date: %s\r\nServer: %s\r\n\r\n" % (index, len(body), server.clock.date(), _SERVER))
            self._write(head + body)
        server.metrics.observe_http("GET", ROUTE, status, time.perf_counter() - started)

    async def _put(self, key: str, value: bytes) -> None:
        started = time.perf_counter()
        server = self.server
        try:
            stored = await server.state.kv_put(key, value)
        except StoreError as exc:
            log.error("request failed method=PUT path=/v1/kv/%s: store error: %s", key, exc)
            status, response = 500, self._text_response(500, b"Internal Server Error", f"store error: {exc}")
        except Exception:
            log.exception("request failed unexpectedly method=PUT path=/v1/kv/%s", key)
            status, response = 500, self._text_response(500, b"Internal Server Error",
                                                        "internal error; see the server log")
        else:
            body = b"true" if stored else b"false"
            status = 200
            response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                        b"Date: %s\r\nServer: %s\r\n\r\n%s" % (len(body), server.clock.date(), _SERVER, body))
        server.metrics.observe_http("PUT", ROUTE, status, time.perf_counter() - started)
        self.busy = False
        if self.transport is None:
            return
        self._write(response)
        self._serve()

    def _text_response(self, status: int, reason: bytes, text: str) -> bytes:
        body = text.encode()
        return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
                b"Date: %s\r\nServer: %s\r\n\r\n%s" % (status, reason, len(body), self.server.clock.date(),
                                                       _SERVER, body))

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def _request_line(line: bytes) -> tuple[bytes, bytes]:
    """Return the method and the path of a request line, or raise _Handoff unless this path serves it."""
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        raise _Handoff
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"PUT") or not target.startswith(_PREFIX):
        raise _Handoff
    path, _, query = target.partition(b"?")
    if method == b"GET":
        if query not in _GET_QUERIES:
            raise _Handoff
    elif b"?" in target:
        raise _Handoff
    return method, path


def _check_partial_head(buffer: bytearray) -> None:
    """Raise _Handoff when the start of a head already shows that this path will not serve it.

    aiohttp rejects a malformed line with 400 as soon as it arrives, so the lean path
    must not wait for the rest of a head that aiohttp has already rejected.
    """
    if len(buffer) > _MAX_HEAD:
        raise _Handoff
    line_end = buffer.find(b"\r\n")
    if line_end < 0:
        start = bytes(buffer[:len(_PREFIX) + 4])
        if not (b"GET " + _PREFIX).startswith(start) and not (b"PUT " + _PREFIX).startswith(start):
            raise _Handoff
        tail = line_end = 0
    else:
        _request_line(bytes(buffer[:line_end]))
        tail = buffer.rfind(b"\r\n") + 2
        if _HEADER_LINES.fullmatch(buffer, line_end + 2, tail) is None:
            raise _Handoff
    # A bare LF, or a CR that is not the last byte received, is malformed wherever it is.
    if buffer.find(b"\n", tail) >= 0 or buffer.find(b"\r", tail, len(buffer) - 1) >= 0:
        raise _Handoff


def _plain_key(raw: bytes) -> str:
    """Return the key of a request path after /v1/kv/, or raise _Handoff unless it is plain and valid."""
    if not raw or not _KEY_BYTES.issuperset(raw):
        raise _Handoff
    key = raw.decode("ascii")
    if kv_key_problem(key) is not None or "." in key.split("/"):
        raise _Handoff
    return key
