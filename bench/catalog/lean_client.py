"""Blocking health queries held open by a small asyncio protocol, for the catalog wake-up benchmark.

With aiohttp's client, each 46 KB health response cost the benchmark about
100 µs of CPU time, most of it outside the HTTP parser. Each body was
copied into fresh memory that the kernel had to zero, and cyclic garbage
collection ran over the client's objects. The client then used more CPU
than corral between the write and the last response, and so set the
figure. (Measured with perf and cProfile, aiohttp 3.14.5 on uvloop 0.23,
2 AMD EPYC cores.) This client sends one HTTP/1.1 GET per connection and
reads every response into one receive buffer that all connections share.
From the response it keeps only the status line, the headers and a count
of body bytes, so a response costs one recv() per read event and a little
Python.

The protocol records an error for a status other than 200, a missing or
invalid Content-Length, or a Transfer-Encoding or Content-Encoding. It
does the same for more bytes than the response announced, an
X-Consul-Index that did not move past the watched index, and a
connection that closed before the whole body arrived.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from watchers import SETUP_TIMEOUT, START_GROUP, WAKE_TIMEOUT, Watchers, cpu_seconds  # noqa: E402

# Bytes read from a socket at most per read event. All connections share one buffer of this size,
# which is safe because the event loop calls get_buffer() and buffer_updated() for one connection
# at a time, and buffer_updated() is done with the bytes before it returns.
RECEIVE_BUFFER = 256 * 1024
# A status line and headers larger than this are an error. corral's take about 250 bytes.
MAX_HEADER_BYTES = 16 * 1024
CONNECT_TIMEOUT = 30.0
HEADER_END = b"\r\n\r\n"


class ProtocolError(Exception):
    """A response that this client does not expect from corral."""


@dataclass
class ResponseHead:
    status: int
    headers: dict[str, str]
    # Bytes of the status line, the headers and the blank line after them.
    size: int


@dataclass
class LeanWatchers(Watchers):
    """Watcher state, plus the byte counts and the completion that the lean protocol keeps."""

    # Total bytes of each response that arrived complete, headers included.
    response_bytes: list[int] = field(default_factory=list)
    # Every byte read from the watcher connections, from the write until the wake-up ends.
    received_bytes: int = 0
    finished: int = 0
    all_finished: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(self) -> None:
        self.finished += 1
        if self.finished == self.count:
            self.all_finished.set()


def parse_head(block: bytes) -> ResponseHead:
    """Parse a status line and headers, given without the blank line that ends them."""
    lines = block.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] != b"HTTP/1.1" or not parts[1].isdigit():
        raise ProtocolError(f"invalid status line {lines[0][:100]!r}, expected HTTP/1.1 and a status code")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise ProtocolError(f"invalid header line {line[:100]!r}")
        key = name.decode("latin-1").lower()
        if key in headers:
            raise ProtocolError(f"header {key} appears twice")
        headers[key] = value.strip().decode("latin-1")
    return ResponseHead(int(parts[1]), headers, len(block) + len(HEADER_END))


def body_length(head: ResponseHead) -> int:
    """Return the body size that the head announces, rejecting framings this client does not read."""
    # NOTE: chunked and compressed bodies are rejected, not read. corral 0.1.0 sends each health
    # response with a Content-Length and no Content-Encoding, so a change there fails every watcher.
    for name in ("transfer-encoding", "content-encoding"):
        if name in head.headers:
            raise ProtocolError(f"unexpected {name}: {head.headers[name]!r}, expected a plain body with a Content-Length")
    text = head.headers.get("content-length")
    if text is None:
        raise ProtocolError(f"HTTP {head.status} response without a Content-Length")
    if not text.isdigit():
        raise ProtocolError(f"invalid Content-Length {text!r}, expected a number of bytes")
    return int(text)


class HealthWatch(asyncio.BufferedProtocol):
    """One connection that sends one blocking GET and reads its one response."""

    def __init__(self, request: bytes, index: int, state: LeanWatchers, buffer: bytearray) -> None:
        self.request = request
        self.index = index
        self.state = state
        self.buffer = buffer
        self.view = memoryview(buffer)
        self.transport: asyncio.Transport | None = None
        # Header bytes of a head split over several reads; empty while the head fits one read.
        self.partial_head = bytearray()
        self.head: ResponseHead | None = None
        self.body_left = 0
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)
        self.state.headers_sent += 1

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.state.wake_start is not None:
            self.state.received_bytes += nbytes
        if self.done:
            self.fail(f"{nbytes} bytes after the end of the response")
            return
        try:
            if self.head is None:
                self.read_head(nbytes)
            else:
                self.body_left -= nbytes
        except ProtocolError as exc:
            self.fail(str(exc))
            return
        if self.head is not None and self.body_left <= 0:
            self.complete(time.perf_counter())

    def read_head(self, nbytes: int) -> None:
        if not self.partial_head:
            # The usual case: the whole head is in this read, so it is parsed from the shared buffer.
            end = self.buffer.find(HEADER_END, 0, nbytes)
            if end >= 0:
                self.start_body(bytes(self.view[:end]), nbytes - end - len(HEADER_END))
                return
        self.partial_head += self.view[:nbytes]
        end = self.partial_head.find(HEADER_END)
        if end >= 0:
            self.start_body(bytes(self.partial_head[:end]), len(self.partial_head) - end - len(HEADER_END))
            self.partial_head.clear()
        elif len(self.partial_head) > MAX_HEADER_BYTES:
            raise ProtocolError(f"no end of headers in the first {len(self.partial_head)} bytes of the response")

    def start_body(self, block: bytes, body_read: int) -> None:
        self.head = parse_head(block)
        self.body_left = body_length(self.head) - body_read

    def complete(self, now: float) -> None:
        assert self.head is not None
        if self.body_left < 0:
            self.fail(f"{-self.body_left} bytes after the end of the response")
            return
        self.done = True
        state = self.state
        if state.wake_start is None:
            state.early += 1
            state.finish()
            return
        head = self.head
        size = head.size + int(head.headers["content-length"])
        new_index = head.headers.get("x-consul-index", "")
        if head.status != 200:
            state.errors.append(f"corral watcher: HTTP {head.status}")
        elif not new_index.isdigit():
            state.errors.append(f"corral watcher: invalid or missing X-Consul-Index {new_index!r}")
        elif int(new_index) <= self.index:
            state.errors.append("corral watcher: returned without a new index (the wait timed out)")
        else:
            state.answered.append(now - state.wake_start)
            state.response_bytes.append(size)
        state.finish()

    def fail(self, message: str) -> None:
        if self.done:
            # The watcher already counts as finished, so only the error is added.
            self.state.errors.append(f"corral watcher after its response: {message}")
        else:
            self.done = True
            self.state.errors.append(f"corral watcher: {message}")
            self.state.finish()
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        if not self.done:
            self.fail("connection closed before the whole response arrived")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self.fail(f"connection lost before the whole response arrived: {exc}")

    def close(self) -> None:
        if self.transport is not None:
            # Later callbacks of a closed connection are not failures of the watcher.
            self.done = True
            self.transport.close()


def build_request(host: str, path: str, index: int, wait: str) -> bytes:
    # HTTP/1.1 keeps the connection open after the response, as aiohttp's pool did.
    return (
        f"GET {path}?index={index}&wait={wait} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Accept: application/json\r\n"
        "Accept-Encoding: identity\r\n"
        "\r\n"
    ).encode("latin-1")


async def open_watcher(
    host: str, port: int, request: bytes, index: int, state: LeanWatchers, buffer: bytearray
) -> HealthWatch | None:
    loop = asyncio.get_running_loop()
    try:
        _, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: HealthWatch(request, index, state, buffer), host, port),
            CONNECT_TIMEOUT,
        )
    except (OSError, asyncio.TimeoutError) as exc:
        state.errors.append(f"corral watcher: connect to {host}:{port} failed: {type(exc).__name__}: {exc}")
        return None
    return protocol


async def measure(
    host: str,
    port: int,
    request: bytes,
    index: int,
    state: LeanWatchers,
    server: psutil.Process,
    wait_ready: Callable[[], Awaitable],
    write: Callable[[], Awaitable],
) -> dict:
    """Open every watcher, wait until corral is ready, then time the wake-up that write() causes.

    The steps and limits are those of bench/watchers.py's measure(): groups of START_GROUP
    connections, SETUP_TIMEOUT to open them, WAKE_TIMEOUT after the write.
    """
    buffer = bytearray(RECEIVE_BUFFER)
    watchers: list[HealthWatch] = []
    setup_start = time.perf_counter()
    deadline = time.monotonic() + SETUP_TIMEOUT
    try:
        for first in range(0, state.count, START_GROUP):
            group = min(START_GROUP, state.count - first)
            opened = await asyncio.gather(
                *(open_watcher(host, port, request, index, state, buffer) for _ in range(group))
            )
            watchers += [watcher for watcher in opened if watcher is not None]
            if state.errors:
                raise RuntimeError(f"{len(state.errors)} watchers failed to start: {state.errors[:3]}")
            if state.headers_sent < len(watchers):
                raise RuntimeError(
                    f"only {state.headers_sent} of {len(watchers)} connected watchers sent their request"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {SETUP_TIMEOUT:.0f}s: only {state.headers_sent} of {state.count} requests sent"
                )
        await wait_ready()
        setup_seconds = time.perf_counter() - setup_start
        if state.early:
            raise RuntimeError(f"{state.early} watchers received a response before the write")

        server_cpu_before = cpu_seconds(server)
        client_cpu_before = time.process_time()
        state.wake_start = time.perf_counter()
        await write()
        write_seconds = time.perf_counter() - state.wake_start
        try:
            await asyncio.wait_for(state.all_finished.wait(), WAKE_TIMEOUT)
        except asyncio.TimeoutError:
            pass
        server_cpu = cpu_seconds(server) - server_cpu_before
        client_cpu = time.process_time() - client_cpu_before
    finally:
        # NOTE: bytes that arrive after the wake-up ends are not checked, because the connections
        # close here, so extra bytes that follow the last watcher's response go unnoticed.
        for watcher in watchers:
            watcher.close()
    return summarize(state, setup_seconds, write_seconds, server_cpu, client_cpu)


def summarize(state: LeanWatchers, setup_seconds: float, write_seconds: float,
              server_cpu: float, client_cpu: float) -> dict:
    """Return the result in the shape of bench/watchers.py's, plus the bytes corral sent."""
    answered = sorted(state.answered)
    result = {
        "watchers": state.count,
        "answered": len(answered),
        "not_answered": state.count - len(answered),
        "errors": len(state.errors),
        "first_errors": state.errors[:5],
        "setup_s": round(setup_seconds, 3),
        "write_s": round(write_seconds, 4),
        "server_cpu_s": round(server_cpu, 3),
        "client_cpu_s": round(client_cpu, 3),
        "received_bytes": state.received_bytes,
    }
    if answered:
        result.update(
            first_s=round(answered[0], 4),
            p50_s=round(statistics.median(answered), 4),
            p99_s=round(answered[int(0.99 * (len(answered) - 1))], 4),
            last_s=round(answered[-1], 4),
            response_bytes_min=min(state.response_bytes),
            response_bytes_max=max(state.response_bytes),
        )
    return result
