"""Build DNS responses from the catalog: name forms, records and size fitting, with no I/O.

Names are matched case-insensitively under every configured domain, and each may carry
a datacenter label before the domain:

- ``NAME.service[.DC].DOMAIN`` and ``TAG.NAME.service[.DC].DOMAIN`` (a tag may contain dots)
- ``_NAME._TAG[.service][.DC].DOMAIN`` (RFC 2782), where ``_tcp`` matches any tag; the
  ``service`` label may be left out only in SRV queries, as in Consul
- ``NODE.node[.DC].DOMAIN``: the address, and the node's meta as TXT records
- ``HEXIP.addr[.DC].DOMAIN``: the IP written as 8 (IPv4) or 32 (IPv6) hex digits

A datacenter label other than the catalog's answers NXDOMAIN: corral has one datacenter,
and Consul answers NXDOMAIN for a datacenter it has no route to. ``.addr`` names ignore
the datacenter label, as Consul does, because the name itself holds the address.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

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
    TXT,
    A,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

from corral.dns.catalog import DNSCatalog, DNSInstance, DNSNode
from corral.dns.config import DNSConfig
from corral.types import CheckStatus

log = logging.getLogger(__name__)

# The range of the port and weight fields of an SRV record (RFC 2782): 16 bits each.
_SRV_FIELD_MAX = 65535

UDP_PAYLOAD_SIZE = 512
"""Max UDP response size for a client that sends no EDNS0 OPT record (RFC 1035)."""

MAX_MESSAGE_SIZE = 65535
"""Max DNS message size, the limit of the 16-bit length prefix over TCP."""

# SOA timers, in seconds, as Consul's defaults. The SOA record's own TTL is the minimum.
SOA_REFRESH = 3600
SOA_RETRY = 600
SOA_EXPIRE = 86400
SOA_MINIMUM = 0

# Header bits (RFC 1035 section 4.1.1).
FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
OPCODE_SHIFT = 11
OPCODE_MASK = 0xF

# BADVERS (16) does not fit the 4-bit header RCODE, so its upper bits go in the OPT record.
_EXT_RCODE_BADVERS = 16 >> 4

# Wire size of an OPT record with no options: root name, type, class, TTL, RDLENGTH.
_OPT_RECORD_SIZE = 11
_HEADER_SIZE = 12

# A TXT character-string contains at most 255 bytes (RFC 1035 section 3.3).
_TXT_CHUNK = 255

_SERVICE = b"service"
_NODE = b"node"
_ADDR = b"addr"
_APEX = b""
_LOOKUP_KINDS = frozenset({_SERVICE, _NODE, _ADDR})
_RFC2782_ANY_TAG = b"tcp"

_A = QTYPE.A
_AAAA = QTYPE.AAAA
_ANY = QTYPE.ANY
_SRV = QTYPE.SRV
_SOA = QTYPE.SOA
_TXT = QTYPE.TXT
_CNAME = QTYPE.CNAME
_OPT = QTYPE.OPT
_IN = CLASS.IN


def udp_payload_size(request: DNSRecord) -> int:
    """Return the max UDP response size for ``request``, from its EDNS0 OPT record or 512."""
    opt = find_opt(request)
    if opt is None:
        return UDP_PAYLOAD_SIZE
    return clamp_payload_size(opt.rclass)


def clamp_payload_size(size: int) -> int:
    return min(max(size, UDP_PAYLOAD_SIZE), MAX_MESSAGE_SIZE)


def find_opt(request: DNSRecord) -> RR | None:
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


def _decode(label: bytes) -> str:
    # A non-ASCII byte becomes U+FFFD, which matches no catalog name.
    return label.decode("ascii", "replace")


def encode_rfc1464(key: str, value: str) -> str:
    """Return ``key=value`` as an RFC 1464 TXT string, with the key's special characters quoted.

    A backquote quotes the next character: backquotes and equals signs in the key, its
    leading and trailing spaces, and backquotes in the value.
    """
    key = key.replace("`", "``").replace("=", "`=")
    stripped = key.strip(" ")
    if stripped != key:
        leading = len(key) - len(key.lstrip(" "))
        trailing = len(key) - len(key.rstrip(" "))
        key = "` " * leading + stripped + "` " * trailing
    return key + "=" + value.replace("`", "``")


def _meta_texts(meta: Mapping[str, str]) -> list[str]:
    """Return one TXT string per meta entry; a key starting with ``rfc1035-`` gives its value alone."""
    texts = []
    for key, value in meta.items():
        if key.lower().startswith("rfc1035-"):
            texts.append(value)
        else:
            texts.append(encode_rfc1464(key, value))
    return texts


def _txt_rdata(text: str) -> TXT:
    data = text.encode()
    chunks = [data[start : start + _TXT_CHUNK] for start in range(0, len(data), _TXT_CHUNK)]
    return TXT(chunks or [b""])


class _Query(NamedTuple):
    kind: bytes
    datacenter: bytes | None
    parts: tuple[bytes, ...]


def _parse_name(rest: tuple[bytes, ...], qtype: int) -> _Query | None:
    """Split the labels before the domain into kind, datacenter label or None, and parts.

    Returns None when the labels match no supported form.
    """
    if not rest:
        return _Query(_APEX, None, ())
    if rest[-1] in _LOOKUP_KINDS:
        return _Query(rest[-1], None, rest[:-1])
    if len(rest) >= 2 and rest[-2] in _LOOKUP_KINDS:
        return _Query(rest[-2], rest[-1], rest[:-2])
    # RFC 2782 without the "service" label, _NAME._TAG[.DC], which Consul takes only for SRV.
    if qtype == _SRV and len(rest) in (2, 3) and rest[0].startswith(b"_") and rest[1].startswith(b"_"):
        datacenter = rest[2] if len(rest) == 3 else None
        return _Query(_SERVICE, datacenter, rest[:2])
    return None


def _parse_service(parts: tuple[bytes, ...]) -> tuple[str, str | None] | None:
    """Return (service name, tag or None) from the labels before ``service``."""
    if not parts:
        return None
    if len(parts) == 2 and parts[0].startswith(b"_") and parts[1].startswith(b"_"):
        tag = parts[1][1:]
        return _decode(parts[0][1:]), None if tag == _RFC2782_ANY_TAG else _decode(tag)
    if len(parts) == 1:
        return _decode(parts[0]), None
    # Every label before the name is one tag, dots included, as in Consul.
    return _decode(parts[-1]), _decode(b".".join(parts[:-1]))


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


# Records for one service instance or one node: its answers and the additional records
# they need. Truncation keeps or drops a group as a whole.
_Group = tuple[list[RR], list[RR]]


class Answer(NamedTuple):
    """A response with its wire form, and how many record groups it had and kept."""

    record: DNSRecord
    wire: bytes
    total_groups: int
    kept_groups: int


class Resolver:
    """Response builder for DNS requests, reading a ``DNSCatalog`` in memory only.

    ``rng`` orders the instances of each answer; pass a seeded one for a fixed order.
    """

    def __init__(self, catalog: DNSCatalog, config: DNSConfig, rng: random.Random | None = None):
        parsed = [_make_domain(name) for name in config.domains]
        self._catalog = catalog
        self._config = config
        self._rng = rng or random.Random()
        # Longest first, so that a domain such as "corral.example" wins over "example".
        self._domains = sorted(parsed, key=lambda domain: len(domain.labels), reverse=True)
        self._recursion_available = bool(config.recursors)
        # Instances already logged for a port or weight that no SRV record can carry.
        self._reported_unencodable: set[tuple[str, int, int]] = set()

    @property
    def domain_names(self) -> list[str]:
        return [b".".join(domain.labels).decode() for domain in self._domains]

    def in_domain(self, request: DNSRecord) -> bool:
        """Return whether the first question's name is under one of the domains."""
        labels = tuple(label.lower() for label in request.questions[0].qname.label)
        return self._match_domain(labels) is not None

    # Responses

    def respond(self, request: DNSRecord, max_size: int) -> Answer:
        """Build the response to ``request``, dropping whole instances to fit ``max_size`` bytes.

        ``max_size`` is the transport's limit: ``udp_payload_size(request)`` over UDP,
        ``MAX_MESSAGE_SIZE`` over TCP.
        """
        request_opt = find_opt(request)
        reply_opt = None
        if request_opt is not None:
            payload_size = clamp_payload_size(request_opt.rclass)
            edns_version = (request_opt.ttl >> 16) & 0xFF
            if edns_version != 0:
                reply_opt = EDNS0(ext_rcode=_EXT_RCODE_BADVERS, udp_len=payload_size)
                return self._finish(request, RCODE.NOERROR, reply_opt)
            reply_opt = EDNS0(udp_len=payload_size)

        opcode = (request.header.bitmap >> OPCODE_SHIFT) & OPCODE_MASK
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

    def error(self, request: DNSRecord, rcode: int) -> bytes:
        """Return the packed response to ``request`` with ``rcode`` and no records."""
        reply = DNSRecord(self._header(request, rcode), request.questions[:1])
        opt = find_opt(request)
        if opt is not None:
            reply.ar.append(EDNS0(udp_len=clamp_payload_size(opt.rclass)))
        return bytes(reply.pack())

    def _match_domain(self, labels: tuple[bytes, ...]) -> _Domain | None:
        for domain in self._domains:
            size = len(domain.labels)
            if len(labels) >= size and labels[len(labels) - size :] == domain.labels:
                return domain
        return None

    # Lookups

    def _lookup(
        self, rest: tuple[bytes, ...], question: DNSQuestion, domain: _Domain
    ) -> tuple[int, list[_Group]]:
        """Return the RCODE and record groups for the labels in front of ``domain``."""
        qtype = question.qtype
        query = _parse_name(rest, qtype)
        if query is None:
            return RCODE.NXDOMAIN, []
        datacenter_label = self._catalog.datacenter.lower().encode()
        if query.kind == _ADDR:
            return self._lookup_addr(query.parts, question.qname, qtype)
        if query.datacenter is not None and query.datacenter != datacenter_label:
            return RCODE.NXDOMAIN, []
        if query.kind == _SERVICE:
            return self._lookup_service(query.parts, question.qname, qtype, domain, datacenter_label)
        if query.kind == _NODE:
            return self._lookup_node(query.parts, question.qname, qtype)
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
        if self._config.only_passing:
            instances = [item for item in instances if item.status is CheckStatus.PASSING]
        if not instances:
            return RCODE.NXDOMAIN, []
        instances = self._rng.sample(instances, len(instances))
        ttl = self._config.ttl_for_service(name.lower())
        if qtype == _SRV:
            return RCODE.NOERROR, self._srv_groups(instances, qname, domain, datacenter_label, ttl)
        if qtype in (_A, _AAAA, _ANY):
            return RCODE.NOERROR, self._address_groups(instances, qname, qtype, ttl)
        return RCODE.NOERROR, []

    def _address_groups(
        self, instances: list[DNSInstance], qname: DNSLabel, qtype: int, ttl: int
    ) -> list[_Group]:
        groups: list[_Group] = []
        first_cname: _Group | None = None
        seen: set[str] = set()
        for instance in instances:
            address = instance.address or instance.node_address
            if address in seen:
                continue
            seen.add(address)
            packed = _ip_bytes(address)
            if packed is not None:
                record = self._ip_record(qname, packed, qtype, ttl)
                if record is not None:
                    groups.append(([record], []))
            elif address and first_cname is None:
                # A hostname in place of an IP. As in Consul, a CNAME is returned only
                # when no instance has an IP, and then only the first one.
                target = DNSLabel(_name_labels(address))
                first_cname = ([RR(qname, _CNAME, _IN, ttl, CNAME(target))], [])
        if not groups and first_cname is not None:
            groups.append(first_cname)
        return groups

    def _srv_groups(
        self,
        instances: list[DNSInstance],
        qname: DNSLabel,
        domain: _Domain,
        datacenter_label: bytes,
        ttl: int,
    ) -> list[_Group]:
        # NOTE: Consul also puts the node meta TXT records of each target in the additional
        # section (its enable_additional_node_meta_txt); corral returns address records only.
        groups: list[_Group] = []
        seen_instances: set[tuple[str, str, int]] = set()
        seen_targets: set[tuple[bytes, ...]] = set()
        for instance in instances:
            # Two registrations of one address and port on one node give one record, as in Consul.
            identity = (instance.node, instance.address, instance.port)
            if identity in seen_instances:
                continue
            seen_instances.add(identity)
            if not self._srv_encodable(instance):
                continue
            target, target_address = self._srv_target(instance, domain, datacenter_label)
            srv = SRV(priority=1, weight=instance.weight, port=instance.port, target=DNSLabel(target))
            additional: list[RR] = []
            if target not in seen_targets:
                seen_targets.add(target)
                packed = _ip_bytes(target_address)
                if packed is not None:
                    record = self._ip_record(DNSLabel(target), packed, _ANY, ttl)
                    if record is not None:
                        additional.append(record)
            groups.append(([RR(qname, _SRV, _IN, ttl, srv)], additional))
        return groups

    def _srv_encodable(self, instance: DNSInstance) -> bool:
        """Tell whether the instance's port and weight fit an SRV record; log each misfit once.

        The catalog API rejects such ports, but a record stored before it did, or written
        by other means, must cost only its own SRV record, not the whole response.
        """
        if 0 <= instance.port <= _SRV_FIELD_MAX and 0 <= instance.weight <= _SRV_FIELD_MAX:
            return True
        identity = (instance.node, instance.port, instance.weight)
        if identity not in self._reported_unencodable:
            self._reported_unencodable.add(identity)
            log.warning(
                "dns srv response leaves out an instance whose port or weight is outside 0-%d "
                "node=%s port=%d weight=%d; register it again with a valid port",
                _SRV_FIELD_MAX, instance.node, instance.port, instance.weight,
            )
        return False

    def _srv_target(
        self, instance: DNSInstance, domain: _Domain, datacenter_label: bytes
    ) -> tuple[tuple[bytes, ...], str]:
        """Return the SRV target's labels and the address its additional record carries."""
        address = instance.address
        if not address or address == instance.node_address:
            if instance.node_address and _ip_bytes(instance.node_address) is None:
                # A node registered with a hostname: a lookup of its node name returns a CNAME,
                # and RFC 2782 forbids an alias as an SRV target, so the hostname is the target.
                return _name_labels(instance.node_address), ""
            node_labels = _name_labels(instance.node)
            return (*node_labels, _NODE, datacenter_label, *domain.labels), instance.node_address
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
        node = self._catalog.dns_node(_decode(b".".join(parts)))
        if node is None:
            return RCODE.NXDOMAIN, []
        if qtype not in (_A, _AAAA, _ANY, _TXT):
            return RCODE.NOERROR, []
        ttl = self._config.node_ttl
        answers: list[RR] = []
        if qtype != _TXT:
            record = self._node_address_record(node, qname, qtype, ttl)
            if record is not None:
                answers.append(record)
        meta = [RR(qname, _TXT, _IN, ttl, _txt_rdata(text)) for text in _meta_texts(node.meta)]
        if qtype in (_TXT, _ANY):
            answers.extend(meta)
            meta = []
        if not answers:
            return RCODE.NOERROR, []
        # As in Consul, an address answer carries the node's meta in the additional section.
        return RCODE.NOERROR, [(answers, meta)]

    def _node_address_record(self, node: DNSNode, qname: DNSLabel, qtype: int, ttl: int) -> RR | None:
        packed = _ip_bytes(node.address)
        if packed is not None:
            return self._ip_record(qname, packed, qtype, ttl)
        if node.address:
            return RR(qname, _CNAME, _IN, ttl, CNAME(DNSLabel(_name_labels(node.address))))
        return None

    def _lookup_addr(
        self, parts: tuple[bytes, ...], qname: DNSLabel, qtype: int
    ) -> tuple[int, list[_Group]]:
        if len(parts) != 1 or len(parts[0]) not in (8, 32):
            return RCODE.NXDOMAIN, []
        try:
            packed = bytes.fromhex(parts[0].decode("ascii"))
        except ValueError:
            return RCODE.NXDOMAIN, []
        record = self._ip_record(qname, packed, qtype, self._config.node_ttl)
        return RCODE.NOERROR, [([record], [])] if record is not None else []

    def _ip_record(self, owner: DNSLabel, packed: bytes, qtype: int, ttl: int) -> RR | None:
        """Return an A or AAAA record for ``packed`` if ``qtype`` requests that type."""
        if len(packed) == 4:
            if qtype == _A or qtype == _ANY:
                return RR(owner, _A, _IN, ttl, A(tuple(packed)))
            return None
        if qtype == _AAAA or qtype == _ANY:
            return RR(owner, _AAAA, _IN, ttl, AAAA(tuple(packed)))
        return None

    def _soa_record(self, domain: _Domain) -> RR:
        # NOTE: the serial is the time the answer was built, and the answer cache keeps it
        # until the catalog changes, so the same serial can be served for a long time.
        times = (int(time.time()), SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, SOA_MINIMUM)
        return RR(domain.apex, _SOA, _IN, SOA_MINIMUM, SOA(domain.mname, domain.rname, times))

    # Response assembly

    def _header(self, request: DNSRecord, rcode: int) -> DNSHeader:
        # The response copies the request's OPCODE and RD bit (RFC 1035 section 4.1.1).
        copied = request.header.bitmap & ((OPCODE_MASK << OPCODE_SHIFT) | FLAG_RD)
        bitmap = FLAG_QR | FLAG_AA | copied | rcode
        if self._recursion_available:
            bitmap |= FLAG_RA
        return DNSHeader(id=request.header.id, bitmap=bitmap)

    def _finish(
        self,
        request: DNSRecord,
        rcode: int,
        opt: RR | None,
        authority: list[RR] | None = None,
    ) -> Answer:
        """Return a response with no answers."""
        reply = DNSRecord(self._header(request, rcode), request.questions[:1], auth=authority)
        if opt is not None:
            reply.ar.append(opt)
        return Answer(reply, bytes(reply.pack()), 0, 0)

    def _fit(
        self,
        request: DNSRecord,
        groups: list[_Group],
        opt: RR | None,
        max_size: int,
    ) -> Answer:
        """Return the response holding the most leading groups that fit ``max_size`` bytes.

        Keeps at least one group. If even one group does not fit, returns it without its
        additional records, or with no records and TC set, so that the client retries over TCP.
        """
        reply = DNSRecord(self._header(request, RCODE.NOERROR), request.questions[:1])
        count = len(groups)
        packed = self._pack_groups(reply, groups, count, opt)
        if len(packed) <= max_size:
            return Answer(reply, packed, count, count)

        if self._config.enable_truncate:
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
            return Answer(reply, packed, count, kept)

        # One group alone is too large, which takes names near the 255-byte limit.
        reply.ar = [opt] if opt is not None else []
        packed = bytes(reply.pack())
        if len(packed) <= max_size:
            return Answer(reply, packed, count, 1)
        reply.rr = []
        reply.header.tc = 1
        return Answer(reply, bytes(reply.pack()), count, 0)

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
        return bytes(reply.pack())
