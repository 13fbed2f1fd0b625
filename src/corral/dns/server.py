"""Consul-compatible DNS server for the service catalog, over UDP and TCP on asyncio.

The resolver (``corral.dns.resolver``) builds responses from the catalog without I/O;
this module owns the sockets, the answer cache and the forwarding of other names to
recursors. dnslib parses and packs the wire format.

A request goes through three steps. The answer cache is looked up by the request's bytes
after its ID, which needs no parsing. On a miss the request is parsed; a name outside the
domains goes to the recursors when some are configured, and anything else is answered by
the resolver and cached. The catalog calls back on every change to nodes, services or
checks, and the callback clears the cache.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from dnslib import RCODE, DNSError, DNSRecord

from corral.dns.cache import AnswerCache, variants_wanted
from corral.dns.catalog import DNSCatalog, DNSInstance, DNSNode
from corral.dns.config import DNSConfig
from corral.dns.forward import Forwarder
from corral.dns.resolver import MAX_MESSAGE_SIZE, UDP_PAYLOAD_SIZE, Resolver, udp_payload_size

__all__ = [
    "DNSCatalog",
    "DNSConfig",
    "DNSInstance",
    "DNSNode",
    "DNSServer",
    "MAX_MESSAGE_SIZE",
    "UDP_PAYLOAD_SIZE",
]

log = logging.getLogger(__name__)

# Attempts at binding TCP on the port the kernel picked for UDP, when port 0 is requested.
_PORT_ATTEMPTS = 5

# At most one warning with a traceback per this many seconds; the rest are counted.
_FAILURE_LOG_INTERVAL = 10.0

# Forwarded requests waiting for a recursor at once; past this, new ones get SERVFAIL.
MAX_PENDING_FORWARDS = 256

_Pending = Coroutine[Any, Any, bytes | None]


class DNSServer:
    """Consul-compatible DNS server reading from a ``DNSCatalog``, on UDP and TCP.

    ``rng`` orders shuffled answers; pass a seeded one for a fixed order.
    """

    def __init__(
        self,
        catalog: DNSCatalog,
        host: str,
        port: int,
        config: DNSConfig | None = None,
        *,
        rng: random.Random | None = None,
        on_response: Callable[[bytes], None] | None = None,
    ) -> None:
        self.config = config or DNSConfig()
        # Called with every packed response sent, cached or not, for metrics.
        self.on_response: Callable[[bytes], None] = on_response or _ignore_response
        self._catalog = catalog
        self._resolver = Resolver(catalog, self.config, rng)
        self._forwarder = Forwarder(self.config.recursors, self.config.recursor_timeout)
        self._host = host
        self._port = port
        # Half of the budget for each transport.
        self.udp_cache = AnswerCache(self.config.cache_max_bytes // 2)
        self.tcp_cache = AnswerCache(self.config.cache_max_bytes // 2)
        self._stop_watching: Callable[[], None] | None = None
        self._bound_port: int | None = None
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._udp_protocol: _UDPProtocol | None = None
        self._tcp_server: asyncio.Server | None = None
        self._connections: set[_TCPProtocol] = set()
        self._forwards: set[asyncio.Task] = set()
        self._failure_log_times: dict[str, float] = {}
        self._suppressed_failures: dict[str, int] = {}

    @property
    def address(self) -> tuple[str, int]:
        """Host and port, the port being the bound one once started (useful with port 0)."""
        port = self._bound_port if self._bound_port is not None else self._port
        return self._host, port

    # Lifecycle

    async def start(self) -> None:
        """Bind UDP and TCP on the same host and port, raising OSError if either is in use."""
        if self._udp_transport is not None:
            raise RuntimeError("dns server is already started")
        loop = asyncio.get_running_loop()
        attempts = _PORT_ATTEMPTS if self._port == 0 else 1
        # TCP is bound first: with port 0 the kernel then picks a port free for
        # listening, which UDP almost always has free too. The other order fails
        # often on a busy machine, because a UDP-free port can still have TCP
        # connections in TIME_WAIT that stop a listener.
        for attempt in range(1, attempts + 1):
            tcp_server = await loop.create_server(
                lambda: _TCPProtocol(self, self.config.tcp_idle_timeout),
                host=self._host,
                port=self._port,
            )
            bound_host, bound_port = tcp_server.sockets[0].getsockname()[:2]
            try:
                udp_transport, udp_protocol = await loop.create_datagram_endpoint(
                    lambda: _UDPProtocol(self),
                    local_addr=(bound_host, bound_port),
                )
            except OSError as exc:
                tcp_server.close()
                await tcp_server.wait_closed()
                cause = exc.__cause__ if exc.errno is None and isinstance(exc.__cause__, OSError) else exc
                if cause.errno != errno.EADDRINUSE or attempt == attempts:
                    raise
                log.debug(
                    "dns udp port in use, retrying on a new port port=%d attempt=%d",
                    bound_port,
                    attempt,
                )
                continue
            break
        self._udp_transport = udp_transport
        self._udp_protocol = udp_protocol
        self._tcp_server = tcp_server
        self._bound_port = bound_port
        self._stop_watching = self._catalog.watch_catalog(self.clear_cache)
        config = self.config
        log.info(
            "dns server listening on udp and tcp %s:%d domains=%s node_ttl=%d service_ttl=%s "
            "only_passing=%s enable_truncate=%s recursors=%s",
            self._host,
            bound_port,
            ",".join(self._resolver.domain_names),
            config.node_ttl,
            ",".join(f"{name}={ttl}" for name, ttl in config.service_ttl.items()) or "-",
            config.only_passing,
            config.enable_truncate,
            ",".join(f"{host}:{port}" for host, port in config.recursors) or "-",
        )

    async def stop(self) -> None:
        """Close both sockets, every TCP connection and every forwarded request; a no-op if not started."""
        udp_transport, udp_protocol = self._udp_transport, self._udp_protocol
        tcp_server = self._tcp_server
        if udp_transport is None or udp_protocol is None or tcp_server is None:
            return
        self._udp_transport = self._udp_protocol = self._tcp_server = None
        if self._stop_watching is not None:
            self._stop_watching()
            self._stop_watching = None
        tcp_server.close()
        udp_transport.close()
        await tcp_server.wait_closed()
        # A connection accepted while closing can still register, so repeat until none is left.
        while self._connections:
            connections = list(self._connections)
            for connection in connections:
                connection.abort()
            await asyncio.gather(*(connection.closed for connection in connections))
        forwards = list(self._forwards)
        for task in forwards:
            task.cancel()
        await asyncio.gather(*forwards, return_exceptions=True)
        await udp_protocol.closed
        self.clear_cache()
        log.info("dns server stopped address=%s:%d", self._host, self._bound_port)

    def clear_cache(self) -> None:
        """Drop every cached answer; the catalog calls this after each change."""
        cleared = self.udp_cache.clear() + self.tcp_cache.clear()
        if cleared:
            log.debug("dns answer cache cleared entries=%d", cleared)

    # Per-message path

    def handle_message(self, data: bytes, peer: Any, over_tcp: bool) -> bytes | _Pending | None:
        """Return the packed response to one message, a coroutine that returns it, or None to drop it.

        A coroutine is returned for a request forwarded to the recursors.
        """
        cache = self.tcp_cache if over_tcp else self.udp_cache
        body = cache.lookup(data[2:])
        if body is not None:
            return data[:2] + body

        transport = "tcp" if over_tcp else "udp"
        try:
            request = DNSRecord.parse(data)
        except DNSError as exc:
            log.debug("dropped malformed dns message peer=%s transport=%s error=%s", peer, transport, exc)
            return None
        if request.header.qr:
            # Answering a response could start a loop between two servers.
            log.debug("dropped dns message with the response flag peer=%s transport=%s", peer, transport)
            return None
        if self._forwards_request(request):
            return self._forward(data, request, peer, over_tcp)

        max_size = MAX_MESSAGE_SIZE if over_tcp else udp_payload_size(request)
        try:
            answer = self._resolver.respond(request, max_size)
        except Exception:
            self._log_failure("lookup", "dns query failed, answering servfail", peer, request, exc_info=True)
            return self._error(request, RCODE.SERVFAIL, peer)
        cache.add(data[2:], answer.wire[2:], variants_wanted(answer.total_groups, answer.kept_groups))
        return answer.wire

    def _forwards_request(self, request: DNSRecord) -> bool:
        if not self.config.recursors or not request.questions:
            return False
        if request.header.opcode != 0:
            return False
        return not self._resolver.in_domain(request)

    def _forward(self, data: bytes, request: DNSRecord, peer: Any, over_tcp: bool) -> bytes | _Pending | None:
        if len(self._forwards) >= MAX_PENDING_FORWARDS:
            self._log_failure(
                "forward-limit",
                f"dns forwarding at its limit of {MAX_PENDING_FORWARDS} pending requests, answering servfail",
                peer,
                request,
            )
            return self._error(request, RCODE.SERVFAIL, peer)
        return self._forward_or_fail(data, request, peer, over_tcp)

    async def _forward_or_fail(self, data: bytes, request: DNSRecord, peer: Any, over_tcp: bool) -> bytes | None:
        response = await self._forwarder.forward(data, request, over_tcp)
        if response is not None:
            return response
        self._log_failure(
            "recursors",
            f"all {len(self.config.recursors)} dns recursors failed or timed out, answering servfail",
            peer,
            request,
        )
        return self._error(request, RCODE.SERVFAIL, peer)

    def spawn(self, pending: _Pending, deliver: Callable[[bytes], None]) -> None:
        """Run a forwarded request in a task and pass its response, if any, to ``deliver``."""
        task = asyncio.get_running_loop().create_task(pending)
        self._forwards.add(task)
        task.add_done_callback(functools.partial(self._finish_forward, deliver))

    def _finish_forward(self, deliver: Callable[[bytes], None], task: asyncio.Task) -> None:
        self._forwards.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("dns forwarding failed", exc_info=exc)
            return
        response = task.result()
        if response is not None:
            deliver(response)

    def _error(self, request: DNSRecord, rcode: int, peer: Any) -> bytes | None:
        try:
            return self._resolver.error(request, rcode)
        except Exception as exc:
            log.debug("dropped dns message that cannot be answered peer=%s error=%r", peer, exc)
            return None

    def _log_failure(
        self, kind: str, message: str, peer: Any, request: DNSRecord, exc_info: bool = False
    ) -> None:
        """Log a failure of ``kind`` at most once per interval, counting the ones left out."""
        now = time.monotonic()
        if now < self._failure_log_times.get(kind, 0.0):
            self._suppressed_failures[kind] = self._suppressed_failures.get(kind, 0) + 1
            return
        qname = request.questions[0].qname if request.questions else ""
        log.warning(
            "%s peer=%s qname=%s suppressed=%d",
            message,
            peer,
            qname,
            self._suppressed_failures.pop(kind, 0),
            exc_info=exc_info,
        )
        self._failure_log_times[kind] = now + _FAILURE_LOG_INTERVAL


def _ignore_response(response: bytes) -> None:
    pass


# Transports


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self._server = server
        self._lookup = server.udp_cache.lookup
        self._observe = server.on_response
        self._transport: asyncio.DatagramTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check, because in Python 3.11 the selector loop's datagram transport
        # does not subclass asyncio.DatagramTransport, although it implements sendto.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        transport = self._transport
        if transport is None:
            return
        # The cache hit path, kept inline: most queries end here.
        body = self._lookup(data[2:])
        if body is not None:
            response = data[:2] + body
            transport.sendto(response, addr)
            self._observe(response)
            return
        result = self._server.handle_message(data, addr, False)
        if result is None:
            return
        if isinstance(result, bytes):
            transport.sendto(result, addr)
            self._observe(result)
        else:
            self._server.spawn(result, functools.partial(self._send, addr))

    def _send(self, addr: Any, response: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(response, addr)
            self._observe(response)

    def error_received(self, exc: Exception) -> None:
        # Usually an ICMP error for an earlier response, such as port unreachable.
        log.debug("dns udp socket error error=%s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.closed.done():
            self.closed.set_result(None)


class _TCPProtocol(asyncio.Protocol):
    """One TCP connection: messages framed by a 2-byte length (RFC 1035 section 4.2.2).

    The response to a forwarded request can come after the responses to later requests
    on the same connection. RFC 7766 section 6.2.1.1 allows this, and clients match
    responses to requests by ID.
    """

    def __init__(self, server: DNSServer, idle_timeout: float) -> None:
        self._server = server
        self._idle_timeout = idle_timeout
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._peer: Any = None
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's TCP transport does not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._peer = transport.get_extra_info("peername")
        self._server._connections.add(self)
        self._last_activity = self._loop.time()
        self._idle_timer = self._loop.call_later(self._idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        # Rescheduling from the last activity costs one timer per timeout, not one per message.
        idle = self._loop.time() - self._last_activity
        if idle < self._idle_timeout:
            self._idle_timer = self._loop.call_later(self._idle_timeout - idle, self._check_idle)
            return
        log.debug("closed idle dns tcp connection peer=%s idle_seconds=%.1f", self._peer, idle)
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        self._last_activity = self._loop.time()
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= 2:
            end = offset + 2 + int.from_bytes(buffer[offset : offset + 2], "big")
            if len(buffer) < end:
                break
            result = self._server.handle_message(bytes(buffer[offset + 2 : end]), self._peer, True)
            offset = end
            if result is None:
                buffer.clear()
                transport.close()
                return
            if isinstance(result, bytes):
                self._write(result)
            else:
                self._server.spawn(result, self._write)
        if offset:
            del buffer[:offset]

    def _write(self, response: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(len(response).to_bytes(2, "big") + response)
            self._server.on_response(response)

    def pause_writing(self) -> None:
        # A client that sends queries without reading responses stops being read.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._transport = None
        if not self.closed.done():
            self.closed.set_result(None)
