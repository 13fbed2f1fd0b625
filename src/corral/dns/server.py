"""Consul-compatible DNS server for the service catalog, over UDP and TCP on asyncio.

Names are matched case-insensitively under every configured domain (``consul`` and
``corral`` by default), and each may carry a datacenter label before the domain:

- ``NAME.service[.DC].DOMAIN`` and ``TAG.NAME.service[.DC].DOMAIN``
- ``_NAME._TAG[.service][.DC].DOMAIN`` (RFC 2782), where ``_tcp`` and ``_udp`` match any tag
- ``NODE.node[.DC].DOMAIN``
- ``HEXIP.addr[.DC].DOMAIN``, the IP as 8 (IPv4) or 32 (IPv6) hex digits

dnslib parses and packs the wire format. ``DNSServer.resolve`` contains the lookup
logic and does no I/O, so it can be tested, or cached, without sockets.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from dnslib import (
    AAAA,
    CLASS,
    CNAME,
    EDNS0,
    QTYPE,
    RCODE,
    RR,
    SOA,
    SRV,
    A,
    DNSError,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

log = logging.getLogger(__name__)

UDP_PAYLOAD_SIZE = 512
"""Max UDP response size for a client that sends no EDNS0 OPT record (RFC 1035)."""

MAX_MESSAGE_SIZE = 65535
"""Max DNS message size, the limit of the 16-bit length prefix over TCP."""

SOA_REFRESH = 3600
SOA_RETRY = 600
SOA_EXPIRE = 86400
SOA_MINIMUM = 0

# Attempts at binding TCP on the port the kernel picked for UDP, when port 0 is requested.
_PORT_ATTEMPTS = 5

# At most one "dns query failed" traceback per this many seconds; the rest are counted.
_FAILURE_LOG_INTERVAL = 10.0

# Header bits (RFC 1035 section 4.1.1).
_FLAG_QR = 0x8000
_FLAG_AA = 0x0400
_FLAG_TC = 0x0200
_FLAG_RD = 0x0100
_OPCODE_SHIFT = 11
_OPCODE_MASK = 0xF

# BADVERS (16) does not fit the 4-bit header RCODE, so its upper bits go in the OPT record.
_EXT_RCODE_BADVERS = 16 >> 4

# Wire size of an OPT record with no options: root name, type, class, TTL, RDLENGTH.
_OPT_RECORD_SIZE = 11
_HEADER_SIZE = 12

_SERVICE = b"service"
_NODE = b"node"
_ADDR = b"addr"
_APEX = b""
_LOOKUP_KINDS = frozenset({_SERVICE, _NODE, _ADDR})
_RFC2782_ANY_TAG = frozenset({b"tcp", b"udp"})

_A = QTYPE.A
_AAAA = QTYPE.AAAA
_ANY = QTYPE.ANY
_SRV = QTYPE.SRV
_SOA = QTYPE.SOA
_OPT = QTYPE.OPT
_IN = CLASS.IN


@dataclass(frozen=True, slots=True)
class DNSInstance:
    """One service instance as DNS returns it."""

    node: str
    node_address: str
    address: str  # "" means the node's address
    port: int
    tags: tuple[str, ...]


class DNSCatalog(Protocol):
    """Catalog view that the DNS server reads; the state layer implements it."""

    datacenter: str

    def service_instances(self, name: str, tag: str | None) -> list[DNSInstance]:
        """Return the instances of service ``name`` that DNS may return, filtered by ``tag``.

        The catalog leaves out critical instances and matches name and tag case-insensitively.
        """
        ...

    def node_address(self, name: str) -> str | None:
        """Return the IP of node ``name``, or None if the catalog has no such node."""
        ...


def udp_payload_size(request: DNSRecord) -> int:
    """Return the max UDP response size for ``request``, from its EDNS0 OPT record or 512."""
    opt = _find_opt(request)
    if opt is None:
        return UDP_PAYLOAD_SIZE
    return _clamp_payload_size(opt.rclass)


def _clamp_payload_size(size: int) -> int:
    return min(max(size, UDP_PAYLOAD_SIZE), MAX_MESSAGE_SIZE)


def _find_opt(request: DNSRecord) -> RR | None:
    for record in request.ar:
        if record.rtype == _OPT:
            return record
    return None


def _ip_bytes(address: str) -> bytes | None:
    """Return the packed form of an IPv4 or IPv6 literal, or None for anything else."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        return socket.inet_pton(family, address)
    except (OSError, ValueError):
        return None


def _name_labels(name: str) -> tuple[bytes, ...]:
    return tuple(name.rstrip(".").encode().split(b"."))


def _name_wire_size(labels: Iterable[bytes]) -> int:
    """Return the uncompressed wire size of a name: a length byte per label, then the root."""
    return sum(len(label) + 1 for label in labels) + 1


def _parse_name(rest: tuple[bytes, ...]) -> tuple[bytes, bytes | None, tuple[bytes, ...]] | None:
    """Split the labels before the domain into (kind, datacenter label or None, parts).

    Returns None when the labels match no supported form.
    """
    if not rest:
        return _APEX, None, ()
    if rest[-1] in _LOOKUP_KINDS:
        return rest[-1], None, rest[:-1]
    if len(rest) >= 2 and rest[-2] in _LOOKUP_KINDS:
        return rest[-2], rest[-1], rest[:-2]
    # RFC 2782 without the "service" label: _NAME._TAG[.DC]
    if len(rest) in (2, 3) and rest[0].startswith(b"_") and rest[1].startswith(b"_"):
        datacenter = rest[2] if len(rest) == 3 else None
        return _SERVICE, datacenter, rest[:2]
    return None


def _parse_service(parts: tuple[bytes, ...]) -> tuple[str, str | None] | None:
    """Return (service name, tag or None) from the labels before ``service``."""
    if len(parts) == 1:
        return _decode(parts[0]), None
    if len(parts) != 2:
        return None
    first, second = parts
    if first.startswith(b"_") and second.startswith(b"_"):
        tag = second[1:]
        return _decode(first[1:]), None if tag in _RFC2782_ANY_TAG else _decode(tag)
    return _decode(second), _decode(first)


def _decode(label: bytes) -> str:
    # A non-ASCII byte becomes U+FFFD, which matches no catalog name.
    return label.decode("ascii", "replace")


@dataclass(frozen=True, slots=True)
class _Domain:
    labels: tuple[bytes, ...]  # lowercase
    apex: DNSLabel
    mname: DNSLabel
    rname: DNSLabel


def _make_domain(name: str) -> _Domain:
    labels = _name_labels(name.strip(".").lower())
    if not all(labels):
        raise ValueError(f"invalid dns domain {name!r}: expected labels such as 'consul'")
    return _Domain(
        labels=labels,
        apex=DNSLabel(labels),
        mname=DNSLabel((b"ns", *labels)),
        rname=DNSLabel((b"hostmaster", *labels)),
    )


# Records for one service instance: its answers and the additional records they need.
# Truncation keeps or drops a group as a whole.
_Group = tuple[list[RR], list[RR]]


class DNSServer:
    """Consul-compatible DNS server reading from a ``DNSCatalog``, on UDP and TCP.

    ``ttl`` is the TTL in seconds of every record. With ``truncate_flag`` a UDP response
    that had records dropped to fit sets TC, and without it (Consul's default) the client
    gets the records that fit and no hint that more exist. A TCP connection with no
    request for ``tcp_idle_timeout`` seconds is closed.
    """

    def __init__(
        self,
        catalog: DNSCatalog,
        host: str,
        port: int,
        domains: Iterable[str] = ("consul", "corral"),
        ttl: int = 0,
        *,
        truncate_flag: bool = False,
        tcp_idle_timeout: float = 10.0,
    ) -> None:
        parsed_domains = [_make_domain(name) for name in domains]
        if not parsed_domains:
            raise ValueError("invalid dns domains: expected at least one domain")
        if ttl < 0:
            raise ValueError(f"invalid dns ttl {ttl}: expected seconds >= 0")
        if tcp_idle_timeout <= 0:
            raise ValueError(f"invalid tcp_idle_timeout {tcp_idle_timeout}: expected seconds > 0")
        self._catalog = catalog
        self._host = host
        self._port = port
        # Longest first, so that a domain such as "corral.example" wins over "example".
        self._domains = sorted(parsed_domains, key=lambda domain: len(domain.labels), reverse=True)
        self._ttl = ttl
        self._truncate_flag = truncate_flag
        self._tcp_idle_timeout = tcp_idle_timeout
        self._bound_port: int | None = None
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._udp_protocol: _UDPProtocol | None = None
        self._tcp_server: asyncio.Server | None = None
        self._connections: set[_TCPProtocol] = set()
        self._next_failure_log = 0.0
        self._suppressed_failures = 0

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
                lambda: _TCPProtocol(self._handle_message, self._connections, self._tcp_idle_timeout),
                host=self._host,
                port=self._port,
            )
            bound_host, bound_port = tcp_server.sockets[0].getsockname()[:2]
            try:
                udp_transport, udp_protocol = await loop.create_datagram_endpoint(
                    lambda: _UDPProtocol(self._handle_message),
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
        log.info(
            "dns server listening on udp and tcp %s:%d domains=%s ttl=%d",
            self._host,
            bound_port,
            ",".join(b".".join(domain.labels).decode() for domain in self._domains),
            self._ttl,
        )

    async def stop(self) -> None:
        """Close both sockets and every TCP connection; a no-op if not started."""
        udp_transport, udp_protocol = self._udp_transport, self._udp_protocol
        tcp_server = self._tcp_server
        if udp_transport is None or udp_protocol is None or tcp_server is None:
            return
        self._udp_transport = self._udp_protocol = self._tcp_server = None
        tcp_server.close()
        udp_transport.close()
        await tcp_server.wait_closed()
        # A connection accepted while closing can still register, so repeat until none is left.
        while self._connections:
            connections = list(self._connections)
            for connection in connections:
                connection.abort()
            await asyncio.gather(*(connection.closed for connection in connections))
        await udp_protocol.closed
        log.info("dns server stopped address=%s:%d", self._host, self._bound_port)

    # Per-message path

    def _handle_message(self, data: bytes, peer: Any, over_tcp: bool) -> bytes | None:
        """Return the packed response to one message, or None to drop it."""
        transport = "tcp" if over_tcp else "udp"
        try:
            request = DNSRecord.parse(data)
        except DNSError as exc:
            log.debug(
                "dropped malformed dns message peer=%s transport=%s error=%s", peer, transport, exc
            )
            return None
        if request.header.qr:
            # Answering a response could start a loop between two servers.
            log.debug("dropped dns message with the response flag peer=%s transport=%s", peer, transport)
            return None
        max_size = MAX_MESSAGE_SIZE if over_tcp else udp_payload_size(request)
        try:
            return self._respond(request, max_size)[1]
        except Exception:
            self._log_failure(peer, request)
        try:
            return self._pack_error(request, RCODE.SERVFAIL)
        except Exception as exc:
            log.debug("dropped dns message that cannot be answered peer=%s error=%r", peer, exc)
            return None

    def _log_failure(self, peer: Any, request: DNSRecord) -> None:
        """Log the exception being handled, at most once per interval, counting the rest."""
        now = time.monotonic()
        if now < self._next_failure_log:
            self._suppressed_failures += 1
            return
        qname = request.questions[0].qname if request.questions else ""
        log.exception(
            "dns query failed, answering servfail peer=%s qname=%s suppressed=%d",
            peer,
            qname,
            self._suppressed_failures,
        )
        self._next_failure_log = now + _FAILURE_LOG_INTERVAL
        self._suppressed_failures = 0

    def _pack_error(self, request: DNSRecord, rcode: int) -> bytes:
        reply = DNSRecord(self._header(request, rcode), request.questions[:1])
        opt = _find_opt(request)
        if opt is not None:
            reply.ar.append(EDNS0(udp_len=_clamp_payload_size(opt.rclass)))
        return reply.pack()

    # Lookup logic

    def resolve(self, request: DNSRecord, max_size: int) -> DNSRecord:
        """Build the response to ``request``, dropping whole instances to fit ``max_size`` bytes.

        ``max_size`` is the transport's limit: ``udp_payload_size(request)`` over UDP,
        ``MAX_MESSAGE_SIZE`` over TCP.
        """
        return self._respond(request, max_size)[0]

    def _respond(self, request: DNSRecord, max_size: int) -> tuple[DNSRecord, bytes]:
        """Return the response to ``request`` and its packed form."""
        request_opt = _find_opt(request)
        reply_opt = None
        if request_opt is not None:
            payload_size = _clamp_payload_size(request_opt.rclass)
            edns_version = (request_opt.ttl >> 16) & 0xFF
            if edns_version != 0:
                reply_opt = EDNS0(ext_rcode=_EXT_RCODE_BADVERS, udp_len=payload_size)
                return self._finish(request, RCODE.NOERROR, reply_opt)
            reply_opt = EDNS0(udp_len=payload_size)

        opcode = (request.header.bitmap >> _OPCODE_SHIFT) & _OPCODE_MASK
        if opcode != 0:
            return self._finish(request, RCODE.NOTIMP, reply_opt)
        if not request.questions:
            return self._finish(request, RCODE.FORMERR, reply_opt)

        question = request.questions[0]
        labels = tuple(label.lower() for label in question.qname.label)
        domain = self._match_domain(labels)
        if domain is None:
            return self._finish(request, RCODE.REFUSED, reply_opt)

        rest = labels[: len(labels) - len(domain.labels)]
        rcode, groups = self._lookup(rest, question, domain)
        if not groups:
            # NXDOMAIN, or a name with no records of the requested type (RFC 2308).
            return self._finish(request, rcode, reply_opt, authority=[self._soa_record(domain)])
        return self._fit(request, groups, reply_opt, max_size)

    def _match_domain(self, labels: tuple[bytes, ...]) -> _Domain | None:
        for domain in self._domains:
            size = len(domain.labels)
            if len(labels) >= size and labels[len(labels) - size :] == domain.labels:
                return domain
        return None

    def _lookup(
        self, rest: tuple[bytes, ...], question: DNSQuestion, domain: _Domain
    ) -> tuple[int, list[_Group]]:
        """Return the RCODE and record groups for the labels in front of ``domain``."""
        parsed = _parse_name(rest)
        if parsed is None:
            return RCODE.NXDOMAIN, []
        kind, datacenter, parts = parsed
        datacenter_label = self._catalog.datacenter.lower().encode()
        if datacenter is not None and datacenter != datacenter_label:
            return RCODE.NXDOMAIN, []

        qtype = question.qtype
        if kind == _SERVICE:
            return self._lookup_service(parts, question.qname, qtype, domain, datacenter_label)
        if kind == _NODE:
            return self._lookup_node(parts, question.qname, qtype)
        if kind == _ADDR:
            return self._lookup_addr(parts, question.qname, qtype)
        if qtype in (_SOA, _ANY):
            return RCODE.NOERROR, [([self._soa_record(domain)], [])]
        return RCODE.NOERROR, []

    def _lookup_service(
        self,
        parts: tuple[bytes, ...],
        qname: DNSLabel,
        qtype: int,
        domain: _Domain,
        datacenter_label: bytes,
    ) -> tuple[int, list[_Group]]:
        service = _parse_service(parts)
        if service is None:
            return RCODE.NXDOMAIN, []
        name, tag = service
        instances = self._catalog.service_instances(name, tag)
        if not instances:
            return RCODE.NXDOMAIN, []
        instances = random.sample(instances, len(instances))
        if qtype == _SRV:
            return RCODE.NOERROR, self._srv_groups(instances, qname, domain, datacenter_label)
        if qtype in (_A, _AAAA, _ANY):
            return RCODE.NOERROR, self._address_groups(instances, qname, qtype)
        return RCODE.NOERROR, []

    def _address_groups(
        self, instances: list[DNSInstance], qname: DNSLabel, qtype: int
    ) -> list[_Group]:
        groups: list[_Group] = []
        seen: set[str] = set()
        for instance in instances:
            address = instance.address or instance.node_address
            if address in seen:
                continue
            seen.add(address)
            packed = _ip_bytes(address)
            if packed is not None:
                record = self._ip_record(qname, packed, qtype)
            elif address:
                # A hostname in place of an IP, which Consul also returns as a CNAME.
                record = RR(qname, QTYPE.CNAME, _IN, self._ttl, CNAME(DNSLabel(_name_labels(address))))
            else:
                record = None
            if record is not None:
                groups.append(([record], []))
        return groups

    def _srv_groups(
        self,
        instances: list[DNSInstance],
        qname: DNSLabel,
        domain: _Domain,
        datacenter_label: bytes,
    ) -> list[_Group]:
        groups: list[_Group] = []
        seen_targets: set[tuple[bytes, ...]] = set()
        for instance in instances:
            target, target_address = self._srv_target(instance, domain, datacenter_label)
            srv = SRV(priority=1, weight=1, port=instance.port, target=DNSLabel(target))
            additional: list[RR] = []
            if target not in seen_targets:
                seen_targets.add(target)
                packed = _ip_bytes(target_address)
                if packed is not None:
                    additional.append(self._ip_record(DNSLabel(target), packed, _ANY))
            groups.append(([RR(qname, _SRV, _IN, self._ttl, srv)], additional))
        return groups

    def _srv_target(
        self, instance: DNSInstance, domain: _Domain, datacenter_label: bytes
    ) -> tuple[tuple[bytes, ...], str]:
        """Return the SRV target's labels and the address its additional record carries."""
        address = instance.address
        if not address or address == instance.node_address:
            target = (*_name_labels(instance.node), _NODE, datacenter_label, *domain.labels)
            return target, instance.node_address
        packed = _ip_bytes(address)
        if packed is None:
            # A hostname is its own target, and this server has no address for it.
            return _name_labels(address), ""
        return (packed.hex().encode(), _ADDR, datacenter_label, *domain.labels), address

    def _lookup_node(
        self, parts: tuple[bytes, ...], qname: DNSLabel, qtype: int
    ) -> tuple[int, list[_Group]]:
        if not parts:
            return RCODE.NXDOMAIN, []
        address = self._catalog.node_address(_decode(b".".join(parts)))
        if address is None:
            return RCODE.NXDOMAIN, []
        packed = _ip_bytes(address)
        record = self._ip_record(qname, packed, qtype) if packed is not None else None
        return RCODE.NOERROR, [([record], [])] if record is not None else []

    def _lookup_addr(
        self, parts: tuple[bytes, ...], qname: DNSLabel, qtype: int
    ) -> tuple[int, list[_Group]]:
        if len(parts) != 1 or len(parts[0]) not in (8, 32):
            return RCODE.NXDOMAIN, []
        try:
            packed = bytes.fromhex(parts[0].decode("ascii"))
        except ValueError:
            return RCODE.NXDOMAIN, []
        if len(packed) not in (4, 16):
            return RCODE.NXDOMAIN, []
        record = self._ip_record(qname, packed, qtype)
        return RCODE.NOERROR, [([record], [])] if record is not None else []

    def _ip_record(self, owner: DNSLabel, packed: bytes, qtype: int) -> RR | None:
        """Return an A or AAAA record for ``packed`` if ``qtype`` requests that type."""
        if len(packed) == 4:
            if qtype == _A or qtype == _ANY:
                return RR(owner, _A, _IN, self._ttl, A(tuple(packed)))
            return None
        if qtype == _AAAA or qtype == _ANY:
            return RR(owner, _AAAA, _IN, self._ttl, AAAA(tuple(packed)))
        return None

    def _soa_record(self, domain: _Domain) -> RR:
        times = (int(time.time()), SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, SOA_MINIMUM)
        return RR(domain.apex, _SOA, _IN, self._ttl, SOA(domain.mname, domain.rname, times))

    # Response assembly

    def _header(self, request: DNSRecord, rcode: int) -> DNSHeader:
        # The response copies the request's OPCODE and RD bit (RFC 1035 section 4.1.1).
        copied = request.header.bitmap & ((_OPCODE_MASK << _OPCODE_SHIFT) | _FLAG_RD)
        bitmap = _FLAG_QR | _FLAG_AA | copied | rcode
        return DNSHeader(id=request.header.id, bitmap=bitmap)

    def _finish(
        self,
        request: DNSRecord,
        rcode: int,
        opt: RR | None,
        authority: list[RR] | None = None,
    ) -> tuple[DNSRecord, bytes]:
        """Return a response with no answers, and its packed form."""
        reply = DNSRecord(self._header(request, rcode), request.questions[:1], auth=authority)
        if opt is not None:
            reply.ar.append(opt)
        return reply, reply.pack()

    def _fit(
        self,
        request: DNSRecord,
        groups: list[_Group],
        opt: RR | None,
        max_size: int,
    ) -> tuple[DNSRecord, bytes]:
        """Return the response holding the most leading groups that fit ``max_size`` bytes.

        Keeps at least one group. If even one group does not fit, returns no records with
        TC set, so that the client retries over TCP.
        """
        reply = DNSRecord(self._header(request, RCODE.NOERROR), request.questions[:1])
        count = len(groups)
        packed = self._pack_groups(reply, groups, count, opt)
        if len(packed) <= max_size:
            return reply, packed

        if self._truncate_flag:
            reply.header.tc = 1
        # Estimate how many groups fit from their mean packed size, then step to the
        # exact count. Later groups compress better than the first, so the mean is close.
        fixed_size = _HEADER_SIZE + _name_wire_size(request.questions[0].qname.label) + 4
        if opt is not None:
            fixed_size += _OPT_RECORD_SIZE
        group_size = max((len(packed) - fixed_size) / count, 1.0)
        kept = int((max_size - fixed_size) / group_size)
        kept = max(1, min(kept, count - 1))
        packed = self._pack_groups(reply, groups, kept, opt)
        while len(packed) > max_size and kept > 1:
            kept -= 1
            packed = self._pack_groups(reply, groups, kept, opt)
        while len(packed) <= max_size and kept < count - 1:
            larger = self._pack_groups(reply, groups, kept + 1, opt)
            if len(larger) > max_size:
                # Put the response back to the count that fits.
                packed = self._pack_groups(reply, groups, kept, opt)
                break
            kept += 1
            packed = larger
        if len(packed) <= max_size:
            return reply, packed

        # One group alone is too large, which takes names near the 255-byte limit.
        reply.ar = [opt] if opt is not None else []
        packed = reply.pack()
        if len(packed) <= max_size:
            return reply, packed
        reply.rr = []
        reply.header.tc = 1
        return reply, reply.pack()

    def _pack_groups(
        self, reply: DNSRecord, groups: list[_Group], count: int, opt: RR | None
    ) -> bytes:
        answers: list[RR] = []
        additional: list[RR] = []
        for group_answers, group_additional in groups[:count]:
            answers.extend(group_answers)
            additional.extend(group_additional)
        if opt is not None:
            additional.append(opt)
        reply.rr = answers
        reply.ar = additional
        return reply.pack()


# Transports


_MessageHandler = Callable[[bytes, Any, bool], bytes | None]


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, handle: _MessageHandler) -> None:
        self._handle = handle
        self._transport: asyncio.DatagramTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check, because in Python 3.11 the selector loop's datagram transport
        # does not subclass asyncio.DatagramTransport, although it implements sendto.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        response = self._handle(data, addr, False)
        if response is not None and self._transport is not None:
            self._transport.sendto(response, addr)

    def error_received(self, exc: Exception) -> None:
        # Usually an ICMP error for an earlier response, such as port unreachable.
        log.debug("dns udp socket error error=%s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _TCPProtocol(asyncio.Protocol):
    """One TCP connection: messages framed by a 2-byte length (RFC 1035 section 4.2.2)."""

    def __init__(
        self, handle: _MessageHandler, connections: set[_TCPProtocol], idle_timeout: float
    ) -> None:
        self._handle = handle
        self._connections = connections
        self._idle_timeout = idle_timeout
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._peer: Any = None
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._peer = transport.get_extra_info("peername")
        self._connections.add(self)
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
            response = self._handle(bytes(buffer[offset + 2 : end]), self._peer, True)
            offset = end
            if response is None:
                buffer.clear()
                transport.close()
                return
            transport.write(len(response).to_bytes(2, "big") + response)
        if offset:
            del buffer[:offset]

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
        self._connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._transport = None
        if not self.closed.done():
            self.closed.set_result(None)
