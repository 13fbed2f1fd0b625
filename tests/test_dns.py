"""Tests for corral.dns.server: a real DNSServer on 127.0.0.1 queried with dnspython."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from corral.dns.cache import SHUFFLED_VARIANTS, AnswerCache, variants_wanted
from corral.dns.config import parse_recursor, parse_service_ttl
from corral.dns.server import DNSConfig, DNSInstance, DNSServer
from corral.state import State
from corral.state.records import Check, Service
from corral.state.records import Node as StateNode
from corral.store import SQLiteStore
from corral.types import CheckStatus

HOST = "127.0.0.1"
QUERY_TIMEOUT = 2.0


@dataclass
class Node:
    name: str
    address: str
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Catalog:
    """A DNSCatalog over plain dicts, matching names and tags case-insensitively.

    Tests that change it call `changed()`, as the state layer does after each write.
    """

    services: dict[str, list[DNSInstance]] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    datacenter: str = "dc1"
    service_reads: int = 0
    watchers: list = field(default_factory=list)

    def service_instances(self, name: str, tag: str | None) -> list[DNSInstance]:
        self.service_reads += 1
        instances = self.services.get(name.lower(), [])
        if tag is None:
            return list(instances)
        expected = tag.lower()
        return [item for item in instances if expected in (t.lower() for t in item.tags)]

    def dns_node(self, name: str) -> Node | None:
        return self.nodes.get(name.lower())

    def watch_catalog(self, callback):
        self.watchers.append(callback)
        return lambda: self.watchers.remove(callback)

    def changed(self) -> None:
        for callback in list(self.watchers):
            callback()


def instance(node: str, node_address: str, port: int, *tags: str, address: str = "") -> DNSInstance:
    return DNSInstance(node, node_address, address, port, tuple(tags))


def sample_catalog() -> Catalog:
    catalog = Catalog()
    catalog.nodes = {
        "node1": Node("node1", "10.0.0.1", {"rack": "r1", "rfc1035-note": "plain value"}),
        "node2": Node("node2", "10.0.0.2"),
        "node3": Node("node3", "10.0.0.3"),
        "edge": Node("edge", "edge.example.com"),
    }
    catalog.services["web"] = [
        instance("node1", "10.0.0.1", 8080, "v1"),
        instance("node2", "10.0.0.2", 8081, "v2"),
    ]
    catalog.services["db"] = [
        instance("node1", "10.0.0.1", 5432, "primary"),
        instance("node2", "10.0.0.2", 5433, "replica"),
        instance("node3", "10.0.0.3", 5434, "Replica"),
    ]
    # Two instances on one node share one SRV target.
    catalog.services["cache"] = [
        instance("node1", "10.0.0.1", 6379),
        instance("node1", "10.0.0.1", 6380),
    ]
    # An instance with its own address, apart from its node's.
    catalog.services["api"] = [instance("node1", "10.0.0.1", 9000, address="10.0.1.5")]
    catalog.services["ext"] = [instance("node1", "10.0.0.1", 443, address="db.example.com")]
    catalog.services["many"] = [
        instance(f"node-{index}", f"10.1.{index // 256}.{index % 256}", 20000 + index)
        for index in range(200)
    ]
    return catalog


async def start_server(catalog: Catalog, **options) -> DNSServer:
    server = DNSServer(catalog, HOST, 0, DNSConfig(**options))
    await server.start()
    return server


@pytest.fixture
async def server() -> AsyncIterator[DNSServer]:
    dns_server = await start_server(sample_catalog())
    yield dns_server
    await dns_server.stop()


@pytest.fixture
async def flagging_server() -> AsyncIterator[DNSServer]:
    dns_server = await start_server(sample_catalog(), enable_truncate=True)
    yield dns_server
    await dns_server.stop()


async def udp(server: DNSServer, name: str, rdtype: str = "A", **query_options) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **query_options)
    return await dns.asyncquery.udp(query, HOST, port=server.address[1], timeout=QUERY_TIMEOUT)


async def tcp(server: DNSServer, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return await dns.asyncquery.tcp(query, HOST, port=server.address[1], timeout=QUERY_TIMEOUT)


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr) -> None:
        self.datagrams.put_nowait(data)


async def raw_udp(server: DNSServer, payload: bytes, timeout: float = QUERY_TIMEOUT) -> bytes | None:
    """Send one datagram and return the reply's bytes, or None if none came within `timeout`."""
    loop = asyncio.get_running_loop()
    transport, receiver = await loop.create_datagram_endpoint(_Receiver, remote_addr=server.address)
    try:
        transport.sendto(payload)
        try:
            return await asyncio.wait_for(receiver.datagrams.get(), timeout)
        except TimeoutError:
            return None
    finally:
        transport.close()


def rrsets(section: list[dns.rrset.RRset], rdtype: int) -> list[dns.rrset.RRset]:
    return [rrset for rrset in section if rrset.rdtype == rdtype]


def addresses(response: dns.message.Message) -> set[str]:
    return {rdata.address for rrset in rrsets(response.answer, dns.rdatatype.A) for rdata in rrset}


def srv_records(response: dns.message.Message) -> list:
    return [rdata for rrset in rrsets(response.answer, dns.rdatatype.SRV) for rdata in rrset]


def additional_a(response: dns.message.Message) -> dict[dns.name.Name, set[str]]:
    """Map each owner name in the additional section to the A addresses it carries."""
    found: dict[dns.name.Name, set[str]] = {}
    for rrset in rrsets(response.additional, dns.rdatatype.A):
        found.setdefault(rrset.name, set()).update(rdata.address for rdata in rrset)
    return found


def name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


# Service lookups


async def test_service_a_records(server):
    response = await udp(server, "web.service.consul")

    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert addresses(response) == {"10.0.0.1", "10.0.0.2"}


async def test_service_a_owner_is_qname(server):
    response = await udp(server, "web.service.consul")

    assert [rrset.name for rrset in response.answer] == [name("web.service.consul")]


async def test_service_a_deduplicates_addresses(server):
    response = await udp(server, "cache.service.consul")

    records = [rdata.address for rrset in response.answer for rdata in rrset]
    assert records == ["10.0.0.1"]


async def test_service_srv_records(server):
    response = await udp(server, "web.service.consul", "SRV")

    records = srv_records(response)
    assert response.rcode() == dns.rcode.NOERROR
    assert sorted(record.port for record in records) == [8080, 8081]
    assert {record.target for record in records} == {
        name("node1.node.dc1.consul"),
        name("node2.node.dc1.consul"),
    }


async def test_srv_weight_by_status():
    catalog = Catalog()
    catalog.services["weighted"] = [
        DNSInstance("node1", "10.0.0.1", "", 9001, (), CheckStatus.PASSING, (10, 2)),
        DNSInstance("node2", "10.0.0.2", "", 9002, (), CheckStatus.WARNING, (10, 2)),
        DNSInstance("node3", "10.0.0.3", "", 9003, (), CheckStatus.WARNING, (10, 0)),
        DNSInstance("node4", "10.0.0.4", "", 9004, ()),
    ]
    dns_server = await start_server(catalog)
    try:
        response = await udp(dns_server, "weighted.service.consul", "SRV")
    finally:
        await dns_server.stop()

    weights = {record.port: record.weight for record in srv_records(response)}
    assert weights[9001] == 10
    assert weights[9002] == 2
    assert weights[9003] == 0
    assert weights[9004] == 1


async def test_srv_additional_matches_targets(server):
    response = await udp(server, "db.service.consul", "SRV")

    targets = {record.target for record in srv_records(response)}
    assert set(additional_a(response)) == targets
    assert additional_a(response) == {
        name("node1.node.dc1.consul"): {"10.0.0.1"},
        name("node2.node.dc1.consul"): {"10.0.0.2"},
        name("node3.node.dc1.consul"): {"10.0.0.3"},
    }


async def test_srv_shared_target_one_additional(server):
    response = await udp(server, "cache.service.consul", "SRV")

    records = srv_records(response)
    additional_records = [rdata for rrset in response.additional for rdata in rrset]
    assert sorted(record.port for record in records) == [6379, 6380]
    assert {record.target for record in records} == {name("node1.node.dc1.consul")}
    assert len(additional_records) == 1


async def test_srv_service_address_target(server):
    response = await udp(server, "api.service.consul", "SRV")

    records = srv_records(response)
    target = name("0a000105.addr.dc1.consul")
    assert [record.target for record in records] == [target]
    assert additional_a(response) == {target: {"10.0.1.5"}}


async def test_service_a_own_address(server):
    response = await udp(server, "api.service.consul")

    assert addresses(response) == {"10.0.1.5"}


async def test_service_a_hostname_cname(server):
    response = await udp(server, "ext.service.consul")

    cnames = rrsets(response.answer, dns.rdatatype.CNAME)
    assert len(cnames) == 1
    assert [rdata.target for rdata in cnames[0]] == [name("db.example.com")]


async def test_srv_hostname_target_no_additional(server):
    response = await udp(server, "ext.service.consul", "SRV")

    assert [record.target for record in srv_records(response)] == [name("db.example.com")]
    assert additional_a(response) == {}


async def test_tag_filters_instances(server):
    response = await udp(server, "primary.db.service.consul", "SRV")

    assert [record.port for record in srv_records(response)] == [5432]


async def test_tag_matches_case_insensitively(server):
    response = await udp(server, "REPLICA.db.service.consul", "SRV")

    assert sorted(record.port for record in srv_records(response)) == [5433, 5434]


async def test_unknown_tag_nxdomain(server):
    response = await udp(server, "canary.db.service.consul", "SRV")

    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.answer == []


async def test_rfc2782_tcp_any_tag(server):
    response = await udp(server, "_db._tcp.service.consul", "SRV")

    assert sorted(record.port for record in srv_records(response)) == [5432, 5433, 5434]


async def test_rfc2782_udp_is_tag(server):
    # Only "_tcp" means any tag, as in Consul; "_udp" is a tag like any other.
    response = await udp(server, "_db._udp.service.consul", "SRV")

    assert response.rcode() == dns.rcode.NXDOMAIN


async def test_rfc2782_tag_label(server):
    response = await udp(server, "_db._primary.service.consul", "SRV")

    assert [record.port for record in srv_records(response)] == [5432]


async def test_rfc2782_without_service_label(server):
    response = await udp(server, "_web._tcp.consul", "SRV")

    assert sorted(record.port for record in srv_records(response)) == [8080, 8081]


async def test_rfc2782_additional_matches_targets(server):
    response = await udp(server, "_db._tcp.service.consul", "SRV")

    targets = {record.target for record in srv_records(response)}
    assert set(additional_a(response)) == targets


async def test_datacenter_label_matching(server):
    response = await udp(server, "web.service.dc1.consul")

    assert addresses(response) == {"10.0.0.1", "10.0.0.2"}


async def test_datacenter_label_other_nxdomain(server):
    response = await udp(server, "web.service.dc2.consul")

    assert response.rcode() == dns.rcode.NXDOMAIN


# Node and address lookups


async def test_node_a_record(server):
    response = await udp(server, "node2.node.consul")

    assert response.rcode() == dns.rcode.NOERROR
    assert addresses(response) == {"10.0.0.2"}
    assert [rrset.name for rrset in response.answer] == [name("node2.node.consul")]


async def test_unknown_node_nxdomain(server):
    response = await udp(server, "node9.node.consul")

    assert response.rcode() == dns.rcode.NXDOMAIN
    assert len(rrsets(response.authority, dns.rdatatype.SOA)) == 1


async def test_node_aaaa_nodata(server):
    response = await udp(server, "node1.node.consul", "AAAA")

    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert len(rrsets(response.authority, dns.rdatatype.SOA)) == 1


async def test_addr_ipv4_lookup(server):
    response = await udp(server, "7f000001.addr.dc1.consul")

    assert addresses(response) == {"127.0.0.1"}


async def test_addr_ipv6_lookup(server):
    hexip = ipaddress.IPv6Address("fd00::1").packed.hex()
    response = await udp(server, f"{hexip}.addr.consul", "AAAA")

    records = [rdata.address for rrset in rrsets(response.answer, dns.rdatatype.AAAA) for rdata in rrset]
    assert records == ["fd00::1"]


async def test_addr_invalid_hex_nxdomain(server):
    response = await udp(server, "zz000001.addr.consul")

    assert response.rcode() == dns.rcode.NXDOMAIN


# Names, domains and errors


async def test_names_case_insensitive(server):
    response = await udp(server, "WEB.Service.CONSUL", "SRV")

    assert response.rcode() == dns.rcode.NOERROR
    assert sorted(record.port for record in srv_records(response)) == [8080, 8081]


async def test_node_name_case_insensitive(server):
    response = await udp(server, "NODE1.NODE.Consul")

    assert addresses(response) == {"10.0.0.1"}


async def test_corral_domain_a(server):
    response = await udp(server, "web.service.corral")

    assert addresses(response) == {"10.0.0.1", "10.0.0.2"}


async def test_corral_domain_srv_targets(server):
    response = await udp(server, "web.service.corral", "SRV")

    targets = {record.target for record in srv_records(response)}
    assert targets == {name("node1.node.dc1.corral"), name("node2.node.dc1.corral")}
    assert set(additional_a(response)) == targets


async def test_unknown_service_nxdomain(server):
    response = await udp(server, "missing.service.consul")

    soa = rrsets(response.authority, dns.rdatatype.SOA)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.answer == []
    assert len(soa) == 1
    assert soa[0].name == name("consul")


async def test_unknown_service_corral_soa(server):
    response = await udp(server, "missing.service.corral")

    soa = rrsets(response.authority, dns.rdatatype.SOA)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert [rrset.name for rrset in soa] == [name("corral")]


async def test_unsupported_form_nxdomain(server):
    response = await udp(server, "a.b.c.web.service.consul")

    assert response.rcode() == dns.rcode.NXDOMAIN


async def test_service_txt_nodata(server):
    response = await udp(server, "web.service.consul", "TXT")

    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert len(rrsets(response.authority, dns.rdatatype.SOA)) == 1


async def test_apex_soa_answer(server):
    response = await udp(server, "consul", "SOA")

    soa = rrsets(response.answer, dns.rdatatype.SOA)
    assert response.rcode() == dns.rcode.NOERROR
    assert len(soa) == 1
    assert soa[0][0].mname == name("ns.consul")


async def test_outside_domain_refused(server):
    response = await udp(server, "example.com")

    assert response.rcode() == dns.rcode.REFUSED
    assert response.answer == []
    assert response.authority == []


async def test_domain_suffix_refused(server):
    # "notconsul" ends with the letters of "consul" but is not that domain.
    response = await udp(server, "web.service.notconsul")

    assert response.rcode() == dns.rcode.REFUSED


async def test_non_query_opcode_notimp(server):
    query = dns.message.make_query("web.service.consul", "A")
    query.set_opcode(dns.opcode.STATUS)
    response = await dns.asyncquery.udp(query, HOST, port=server.address[1], timeout=QUERY_TIMEOUT)

    assert response.rcode() == dns.rcode.NOTIMP
    assert response.opcode() == dns.opcode.STATUS


async def test_no_question_formerr(server):
    query = dns.message.make_query("web.service.consul", "A")
    wire = bytearray(query.to_wire(max_size=512))
    # Keep only the header, with QDCOUNT set to 0.
    header = bytes(wire[:4]) + b"\x00\x00" * 4
    reply = await raw_udp(server, header)

    assert reply is not None
    assert dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR


async def test_recursion_desired_echoed(server):
    with_rd = await udp(server, "web.service.consul")
    without_rd = await udp(server, "web.service.consul", flags=0)

    assert with_rd.flags & dns.flags.RD
    assert not without_rd.flags & dns.flags.RD
    assert not with_rd.flags & dns.flags.RA


# Message sizes and transports


async def test_udp_response_fits_512(server):
    query = dns.message.make_query("many.service.consul", "A", use_edns=False)
    reply = await raw_udp(server, query.to_wire())

    assert reply is not None
    response = dns.message.from_wire(reply)
    assert len(reply) <= 512
    assert len(addresses(response)) > 0
    assert len(addresses(response)) < 200


async def test_udp_srv_fits_512(server):
    query = dns.message.make_query("many.service.consul", "SRV", use_edns=False)
    reply = await raw_udp(server, query.to_wire())

    assert reply is not None
    response = dns.message.from_wire(reply)
    targets = {record.target for record in srv_records(response)}
    assert len(reply) <= 512
    assert len(targets) > 0
    assert set(additional_a(response)) == targets


async def test_udp_fits_512_without_tc(server):
    response = await udp(server, "many.service.consul", "SRV", use_edns=False)

    assert not response.flags & dns.flags.TC


async def test_udp_truncation_sets_tc(flagging_server):
    response = await udp(flagging_server, "many.service.consul", "SRV", use_edns=False)

    assert response.flags & dns.flags.TC
    assert len(srv_records(response)) > 0


async def test_udp_small_answer_no_tc(flagging_server):
    response = await udp(flagging_server, "web.service.consul", "SRV")

    assert not response.flags & dns.flags.TC


async def test_udp_truncation_varies_instances(server):
    seen: set[str] = set()
    for _ in range(10):
        response = await udp(server, "many.service.consul", use_edns=False)
        seen |= addresses(response)

    first = await udp(server, "many.service.consul", use_edns=False)
    assert len(seen) > len(addresses(first))


async def test_edns_payload_raises_limit(server):
    query = dns.message.make_query("many.service.consul", "A", use_edns=0, payload=4096)
    reply = await raw_udp(server, query.to_wire())

    assert reply is not None
    response = dns.message.from_wire(reply)
    assert len(reply) > 512
    assert len(reply) <= 4096
    assert len(addresses(response)) == 200


async def test_edns_opt_echoed(server):
    response = await udp(server, "web.service.consul", use_edns=0, payload=1232)

    assert response.edns == 0
    assert response.payload == 1232


async def test_edns_payload_partial_fit(server):
    query = dns.message.make_query("many.service.consul", "SRV", use_edns=0, payload=1200)
    reply = await raw_udp(server, query.to_wire())

    assert reply is not None
    response = dns.message.from_wire(reply)
    count = len(srv_records(response))
    targets = {record.target for record in srv_records(response)}
    assert len(reply) <= 1200
    assert count > 0
    assert count < 200
    assert set(additional_a(response)) == targets


async def test_edns_small_payload_clamped(server):
    # The server raises an advertised payload below 512 bytes to 512.
    query = dns.message.make_query("many.service.consul", "A", use_edns=0, payload=100)
    reply = await raw_udp(server, query.to_wire())

    assert reply is not None
    assert len(reply) > 100
    assert len(reply) <= 512


async def test_edns_version_1_badvers(server):
    response = await udp(server, "web.service.consul", use_edns=1)

    assert response.rcode() == dns.rcode.BADVERS
    assert response.answer == []


async def test_no_edns_no_opt(server):
    response = await udp(server, "web.service.consul", use_edns=False)

    assert response.edns == -1


async def test_tcp_returns_all_a(server):
    response = await tcp(server, "many.service.consul")

    assert len(addresses(response)) == 200
    assert not response.flags & dns.flags.TC


async def test_tcp_returns_all_srv(server):
    response = await tcp(server, "many.service.consul", "SRV")

    targets = {record.target for record in srv_records(response)}
    assert len(srv_records(response)) == 200
    assert set(additional_a(response)) == targets


async def test_tcp_pipelined_queries(server):
    first = dns.message.make_query("web.service.consul", "A", id=1)
    second = dns.message.make_query("node1.node.consul", "A", id=2)
    reader, writer = await asyncio.open_connection(*server.address)
    try:
        payload = b""
        for query in (first, second):
            wire = query.to_wire()
            payload += len(wire).to_bytes(2, "big") + wire
        # Send both messages in one write, so that the server reads both from one buffer.
        writer.write(payload)
        replies = []
        for _ in range(2):
            length = int.from_bytes(await reader.readexactly(2), "big")
            replies.append(dns.message.from_wire(await reader.readexactly(length)))
    finally:
        writer.close()
        await writer.wait_closed()

    assert [reply.id for reply in replies] == [1, 2]
    assert addresses(replies[0]) == {"10.0.0.1", "10.0.0.2"}
    assert addresses(replies[1]) == {"10.0.0.1"}


async def test_udp_and_tcp_same_port(server):
    over_udp = await udp(server, "node1.node.consul")
    over_tcp = await tcp(server, "node1.node.consul")

    assert addresses(over_udp) == addresses(over_tcp)


async def test_oversized_instance_drops_additional():
    # The question name and the node name are about 150 and 200 bytes long. So one SRV
    # record and its additional A record exceed 512 bytes together, but the SRV alone fits.
    long_node = ".".join(["n" * 60] * 3)
    tag = "t" * 63
    service = "s" * 63
    catalog = sample_catalog()
    catalog.services[service] = [instance(long_node, "10.9.9.9", 7000, tag)]
    dns_server = await start_server(catalog, enable_truncate=True)
    try:
        query = dns.message.make_query(f"{tag}.{service}.service.dc1.consul", "SRV", use_edns=False)
        reply = await raw_udp(dns_server, query.to_wire())
    finally:
        await dns_server.stop()

    assert reply is not None
    response = dns.message.from_wire(reply)
    assert len(reply) <= 512
    assert [record.port for record in srv_records(response)] == [7000]
    assert response.additional == []
    assert response.flags & dns.flags.TC


# Robustness and lifecycle


async def test_malformed_udp_no_reply(server):
    reply = await raw_udp(server, b"\x12\x34\x01", timeout=0.3)

    assert reply is None


async def test_malformed_udp_server_survives(server):
    for garbage in (b"", b"\x00", b"\xff" * 40, b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0"):
        await raw_udp(server, garbage, timeout=0.05)
    response = await udp(server, "web.service.consul")

    assert addresses(response) == {"10.0.0.1", "10.0.0.2"}


async def test_malformed_tcp_closes_connection(server):
    reader, writer = await asyncio.open_connection(*server.address)
    try:
        garbage = b"\xff" * 5
        writer.write(len(garbage).to_bytes(2, "big") + garbage)
        data = await asyncio.wait_for(reader.read(), QUERY_TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()
    response = await tcp(server, "web.service.consul")

    assert data == b""
    assert addresses(response) == {"10.0.0.1", "10.0.0.2"}


async def test_response_flag_dropped(server):
    query = dns.message.make_query("web.service.consul", "A")
    query.flags |= dns.flags.QR
    reply = await raw_udp(server, query.to_wire(), timeout=0.3)

    assert reply is None


async def test_catalog_error_servfail():
    class FailingCatalog(Catalog):
        def service_instances(self, name: str, tag: str | None) -> list[DNSInstance]:
            raise RuntimeError("catalog unavailable")

    dns_server = await start_server(FailingCatalog())
    try:
        failed = await udp(dns_server, "web.service.consul")
        node_response = await udp(dns_server, "node1.node.consul")
    finally:
        await dns_server.stop()

    assert failed.rcode() == dns.rcode.SERVFAIL
    assert node_response.rcode() == dns.rcode.NXDOMAIN


async def test_bound_port_reported(server):
    host, port = server.address

    assert host == HOST
    assert port != 0


async def test_start_twice_raises(server):
    with pytest.raises(RuntimeError, match="already started"):
        await server.start()


async def test_stop_twice_is_noop():
    dns_server = await start_server(sample_catalog())
    await dns_server.stop()
    await dns_server.stop()
    reply = await raw_udp(dns_server, dns.message.make_query("web.service.consul", "A").to_wire(), timeout=0.2)

    assert reply is None


async def test_stop_closes_tcp_connections():
    dns_server = await start_server(sample_catalog())
    reader, writer = await asyncio.open_connection(*dns_server.address)
    try:
        await dns_server.stop()
        data = await asyncio.wait_for(reader.read(), QUERY_TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()

    assert data == b""


async def test_idle_tcp_connection_closed():
    dns_server = await start_server(sample_catalog(), tcp_idle_timeout=0.2)
    reader, writer = await asyncio.open_connection(*dns_server.address)
    try:
        data = await asyncio.wait_for(reader.read(), QUERY_TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()
        await dns_server.stop()

    assert data == b""


@pytest.mark.parametrize(
    "options",
    [
        {"domains": ()},
        {"domains": ("a..b",)},
        {"node_ttl": -1},
        {"service_ttl": {"web": 2**31}},
        {"tcp_idle_timeout": 0},
        {"recursor_timeout": 0},
        {"cache_max_bytes": -1},
    ],
)
def test_invalid_options_rejected(options):
    with pytest.raises(ValueError, match="invalid"):
        DNSServer(Catalog(), HOST, 0, DNSConfig(**options))


# Consul's name forms in detail


async def test_dotted_tag_lookup():
    catalog = sample_catalog()
    catalog.services["web"].append(instance("node3", "10.0.0.3", 8082, "eu.west"))
    dns_server = await start_server(catalog)
    try:
        response = await udp(dns_server, "eu.west.web.service.consul", "SRV")
    finally:
        await dns_server.stop()

    assert [record.port for record in srv_records(response)] == [8082]


async def test_rfc2782_without_service_label_a_nxdomain(server):
    # Consul takes _NAME._TAG without "service" for SRV queries only.
    response = await udp(server, "_web._tcp.consul", "A")

    assert response.rcode() == dns.rcode.NXDOMAIN


async def test_rfc2782_without_service_label_dc(server):
    response = await udp(server, "_web._tcp.dc1.consul", "SRV")

    assert sorted(record.port for record in srv_records(response)) == [8080, 8081]


async def test_node_other_datacenter_nxdomain(server):
    response = await udp(server, "node1.node.dc2.consul")

    assert response.rcode() == dns.rcode.NXDOMAIN


async def test_srv_other_datacenter_nxdomain(server):
    response = await udp(server, "_web._tcp.service.dc2.consul", "SRV")

    assert response.rcode() == dns.rcode.NXDOMAIN


async def test_datacenter_label_case_insensitive(server):
    response = await udp(server, "web.service.DC1.consul")

    assert addresses(response) == {"10.0.0.1", "10.0.0.2"}


async def test_addr_ignores_datacenter(server):
    # The name contains the address, so Consul answers whatever datacenter label it has.
    response = await udp(server, "7f000001.addr.dc9.consul")

    assert addresses(response) == {"127.0.0.1"}


async def test_srv_duplicate_registration_once():
    catalog = sample_catalog()
    catalog.services["dup"] = [instance("node1", "10.0.0.1", 7000), instance("node1", "10.0.0.1", 7000)]
    dns_server = await start_server(catalog)
    try:
        response = await udp(dns_server, "dup.service.consul", "SRV")
    finally:
        await dns_server.stop()

    assert [record.port for record in srv_records(response)] == [7000]


async def test_service_cname_only_without_ips():
    catalog = sample_catalog()
    catalog.services["mixed"] = [
        instance("node1", "10.0.0.1", 443, address="a.example.com"),
        instance("node2", "10.0.0.2", 443),
    ]
    dns_server = await start_server(catalog)
    try:
        response = await udp(dns_server, "mixed.service.consul")
    finally:
        await dns_server.stop()

    assert addresses(response) == {"10.0.0.2"}
    assert rrsets(response.answer, dns.rdatatype.CNAME) == []


async def test_service_any_returns_addresses(server):
    response = await udp(server, "web.service.consul", "ANY")

    assert addresses(response) == {"10.0.0.1", "10.0.0.2"}


async def test_service_aaaa_nodata_soa(server):
    response = await udp(server, "web.service.consul", "AAAA")

    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert len(rrsets(response.authority, dns.rdatatype.SOA)) == 1


async def test_service_aaaa_records():
    catalog = sample_catalog()
    catalog.services["v6"] = [instance("node1", "10.0.0.1", 80, address="fd00::5")]
    dns_server = await start_server(catalog)
    try:
        response = await udp(dns_server, "v6.service.consul", "AAAA")
    finally:
        await dns_server.stop()

    records = [rdata.address for rrset in rrsets(response.answer, dns.rdatatype.AAAA) for rdata in rrset]
    assert records == ["fd00::5"]


# Node meta as TXT records


def txt_strings(section: list[dns.rrset.RRset]) -> set[str]:
    return {
        b"".join(rdata.strings).decode()
        for rrset in rrsets(section, dns.rdatatype.TXT)
        for rdata in rrset
    }


async def test_node_txt_meta(server):
    response = await udp(server, "node1.node.consul", "TXT")

    assert response.rcode() == dns.rcode.NOERROR
    assert txt_strings(response.answer) == {"rack=r1", "plain value"}
    assert addresses(response) == set()


async def test_node_a_meta_in_additional(server):
    response = await udp(server, "node1.node.consul", "A")

    assert addresses(response) == {"10.0.0.1"}
    assert txt_strings(response.additional) == {"rack=r1", "plain value"}


async def test_node_any_address_and_meta(server):
    response = await udp(server, "node1.node.consul", "ANY")

    assert addresses(response) == {"10.0.0.1"}
    assert txt_strings(response.answer) == {"rack=r1", "plain value"}


async def test_node_txt_without_meta_nodata(server):
    response = await udp(server, "node2.node.consul", "TXT")

    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert len(rrsets(response.authority, dns.rdatatype.SOA)) == 1


async def test_node_txt_rfc1464_quoting():
    catalog = sample_catalog()
    catalog.nodes["node1"].meta = {" a=b`": "x`y", "long": "v" * 300}
    dns_server = await start_server(catalog)
    try:
        response = await udp(dns_server, "node1.node.consul", "TXT", use_edns=0, payload=1232)
    finally:
        await dns_server.stop()

    assert txt_strings(response.answer) == {"` a`=b``=x``y", "long=" + "v" * 300}


async def test_node_hostname_cname(server):
    response = await udp(server, "edge.node.consul")

    cnames = rrsets(response.answer, dns.rdatatype.CNAME)
    assert [rdata.target for rrset in cnames for rdata in rrset] == [name("edge.example.com")]


# TTLs and health filtering


def answer_ttls(response: dns.message.Message) -> set[int]:
    return {rrset.ttl for rrset in response.answer}


async def test_ttls_default_zero(server):
    service = await udp(server, "web.service.consul")
    node = await udp(server, "node1.node.consul")

    assert answer_ttls(service) == {0}
    assert answer_ttls(node) == {0}


async def test_node_ttl_applied():
    dns_server = await start_server(sample_catalog(), node_ttl=30)
    try:
        node = await udp(dns_server, "node1.node.consul")
        addr = await udp(dns_server, "7f000001.addr.consul")
        service = await udp(dns_server, "web.service.consul")
    finally:
        await dns_server.stop()

    assert answer_ttls(node) == {30}
    assert answer_ttls(addr) == {30}
    assert answer_ttls(service) == {0}


async def test_service_ttl_exact_prefix_wildcard():
    ttls = {"*": 5, "d*": 7, "db": 11}
    dns_server = await start_server(sample_catalog(), service_ttl=ttls)
    try:
        db = await udp(dns_server, "db.service.consul", "SRV")
        web = await udp(dns_server, "web.service.consul")
    finally:
        await dns_server.stop()

    assert answer_ttls(db) == {11}
    assert {rrset.ttl for rrset in db.additional} == {11}
    assert answer_ttls(web) == {5}


def test_service_ttl_longest_prefix():
    config = DNSConfig(service_ttl={"web*": 3, "web-api*": 9, "Cache": 4})

    assert config.ttl_for_service("web-api-v2") == 9
    assert config.ttl_for_service("web-ui") == 3
    assert config.ttl_for_service("cache") == 4
    assert config.ttl_for_service("db") == 0


async def test_soa_ttl_is_minimum():
    dns_server = await start_server(sample_catalog(), node_ttl=30, service_ttl={"*": 30})
    try:
        response = await udp(dns_server, "missing.service.consul")
    finally:
        await dns_server.stop()

    assert [rrset.ttl for rrset in response.authority] == [0]


def health_catalog() -> Catalog:
    catalog = sample_catalog()
    catalog.services["api"] = [
        instance("node1", "10.0.0.1", 9001),
        DNSInstance("node2", "10.0.0.2", "", 9002, (), CheckStatus.WARNING),
    ]
    return catalog


async def test_warning_instance_kept():
    dns_server = await start_server(health_catalog())
    try:
        response = await udp(dns_server, "api.service.consul", "SRV")
    finally:
        await dns_server.stop()

    assert sorted(record.port for record in srv_records(response)) == [9001, 9002]


async def test_only_passing_drops_warning():
    dns_server = await start_server(health_catalog(), only_passing=True)
    try:
        response = await udp(dns_server, "api.service.consul", "SRV")
    finally:
        await dns_server.stop()

    assert [record.port for record in srv_records(response)] == [9001]


async def test_only_passing_all_warning_nxdomain():
    catalog = health_catalog()
    catalog.services["api"] = catalog.services["api"][1:]
    dns_server = await start_server(catalog, only_passing=True)
    try:
        response = await udp(dns_server, "api.service.consul", "SRV")
    finally:
        await dns_server.stop()

    assert response.rcode() == dns.rcode.NXDOMAIN


# Answer cache


def srv_ports(response: dns.message.Message) -> list[int]:
    return [record.port for record in srv_records(response)]


async def test_cache_skips_catalog_read(server):
    catalog = server._catalog
    for _ in range(SHUFFLED_VARIANTS):
        await udp(server, "web.service.consul", "SRV")
    reads = catalog.service_reads
    for _ in range(20):
        await udp(server, "web.service.consul", "SRV")

    assert catalog.service_reads == reads


async def test_cache_answers_carry_query_id(server):
    for _ in range(SHUFFLED_VARIANTS):
        await udp(server, "web.service.consul")
    query = dns.message.make_query("web.service.consul", "A", id=4321)
    response = await dns.asyncquery.udp(query, HOST, port=server.address[1], timeout=QUERY_TIMEOUT)

    assert response.id == 4321
    assert addresses(response) == {"10.0.0.1", "10.0.0.2"}


async def test_cache_keeps_shuffling():
    catalog = sample_catalog()
    catalog.services["ten"] = [instance(f"node-{index}", f"10.2.0.{index}", 7000 + index) for index in range(10)]
    dns_server = await start_server(catalog)
    try:
        orders = set()
        for _ in range(3 * SHUFFLED_VARIANTS):
            response = await udp(dns_server, "ten.service.consul", "SRV", use_edns=0, payload=1232)
            orders.add(tuple(srv_ports(response)))
    finally:
        await dns_server.stop()

    assert len(orders) > 1
    assert all(sorted(order) == list(range(7000, 7010)) for order in orders)


async def test_cache_cleared_on_change(server):
    catalog = server._catalog
    for _ in range(SHUFFLED_VARIANTS + 1):
        await udp(server, "web.service.consul", "SRV")
    catalog.services["web"].append(instance("node3", "10.0.0.3", 8082))
    catalog.changed()
    response = await udp(server, "web.service.consul", "SRV")

    assert sorted(srv_ports(response)) == [8080, 8081, 8082]


async def test_cache_nxdomain_cleared_on_change(server):
    first = await udp(server, "new.service.consul")
    server._catalog.services["new"] = [instance("node1", "10.0.0.1", 80)]
    server._catalog.changed()
    second = await udp(server, "new.service.consul")

    assert first.rcode() == dns.rcode.NXDOMAIN
    assert addresses(second) == {"10.0.0.1"}


async def test_cache_separates_transports(server):
    for _ in range(2 * SHUFFLED_VARIANTS):
        await udp(server, "many.service.consul", use_edns=False)
    response = await tcp(server, "many.service.consul")

    assert len(addresses(response)) == 200


async def test_cache_separates_payload_sizes(server):
    for _ in range(2 * SHUFFLED_VARIANTS):
        await udp(server, "many.service.consul", use_edns=False)
    response = await udp(server, "many.service.consul", use_edns=0, payload=4096)

    assert len(addresses(response)) == 200


async def test_cache_rd_flag_echoed(server):
    for _ in range(SHUFFLED_VARIANTS):
        await udp(server, "web.service.consul")
    without_rd = await udp(server, "web.service.consul", flags=0)

    assert not without_rd.flags & dns.flags.RD


async def test_cache_stops_watching_on_stop():
    catalog = sample_catalog()
    dns_server = await start_server(catalog)
    watchers = len(catalog.watchers)
    await dns_server.stop()

    assert watchers == 1
    assert catalog.watchers == []


async def test_catalog_error_not_cached():
    class FlakyCatalog(Catalog):
        failures = 1

        def service_instances(self, name: str, tag: str | None) -> list[DNSInstance]:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("catalog unavailable")
            return super().service_instances(name, tag)

    catalog = FlakyCatalog()
    catalog.services = sample_catalog().services
    dns_server = await start_server(catalog)
    try:
        failed = await udp(dns_server, "web.service.consul")
        recovered = await udp(dns_server, "web.service.consul")
    finally:
        await dns_server.stop()

    assert failed.rcode() == dns.rcode.SERVFAIL
    assert addresses(recovered) == {"10.0.0.1", "10.0.0.2"}


def test_answer_cache_rotates_variants():
    cache = AnswerCache(max_bytes=10_000)
    cache.add(b"key", b"one", 2)
    filling = cache.lookup(b"key")
    cache.add(b"key", b"two", 2)

    assert filling is None
    assert [cache.lookup(b"key") for _ in range(4)] == [b"one", b"two", b"one", b"two"]


def test_answer_cache_evicts_oldest():
    cache = AnswerCache(max_bytes=100)
    cache.add(b"old", b"x" * 40, 1)
    cache.add(b"mid", b"y" * 40, 1)
    cache.add(b"new", b"z" * 40, 1)

    assert cache.lookup(b"old") is None
    assert cache.lookup(b"new") == b"z" * 40
    assert cache.size <= 100


def test_answer_cache_skips_oversized():
    cache = AnswerCache(max_bytes=10)
    cache.add(b"key", b"x" * 20, 1)

    assert len(cache) == 0


@pytest.mark.parametrize(
    ("total", "kept", "expected"),
    [(0, 0, 1), (1, 1, 1), (10, 10, SHUFFLED_VARIANTS), (200, 8, 50), (5000, 8, 64), (20, 8, 8)],
)
def test_variants_wanted(total, kept, expected):
    assert variants_wanted(total, kept) == expected


# Forwarding to recursors


class Upstream:
    """A DNS server on 127.0.0.1, UDP and TCP, that answers every question with one A record.

    `mode` is "answer", "servfail" (answers SERVFAIL) or "silent" (never answers).
    """

    def __init__(self, address: str = "192.0.2.10", mode: str = "answer") -> None:
        self.address = address
        self.mode = mode
        self.queries: list[dns.message.Message] = []
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def reply(self, data: bytes) -> bytes | None:
        query = dns.message.from_wire(data)
        self.queries.append(query)
        if self.mode == "silent":
            return None
        response = dns.message.make_response(query)
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        else:
            response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", self.address))
        return response.to_wire()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = self

        class UDPProtocol(asyncio.DatagramProtocol):
            def connection_made(self, transport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr) -> None:
                response = upstream.reply(data)
                if response is not None:
                    self.transport.sendto(response, addr)

        async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.add(writer)
            try:
                length = int.from_bytes(await reader.readexactly(2), "big")
                response = upstream.reply(await reader.readexactly(length))
                if response is not None:
                    writer.write(len(response).to_bytes(2, "big") + response)
                    await writer.drain()
                else:
                    await reader.read()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                self._writers.discard(writer)
                writer.close()

        self._tcp = await asyncio.start_server(serve_tcp, HOST, 0)
        self.port = self._tcp.sockets[0].getsockname()[1]
        self._udp, _ = await loop.create_datagram_endpoint(UDPProtocol, local_addr=(HOST, self.port))

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._writers):
                writer.close()
            await self._tcp.wait_closed()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


def closed_udp_port() -> int:
    """Return a UDP port on 127.0.0.1 with nothing bound to it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


async def forwarding_server(*ports: int, timeout: float = 1.0) -> DNSServer:
    recursors = tuple((HOST, port) for port in ports)
    return await start_server(sample_catalog(), recursors=recursors, recursor_timeout=timeout)


async def test_forward_udp_relays_answer(upstream):
    dns_server = await forwarding_server(upstream.port)
    try:
        response = await udp(dns_server, "www.example.com")
    finally:
        await dns_server.stop()

    assert response.rcode() == dns.rcode.NOERROR
    assert addresses(response) == {"192.0.2.10"}
    assert len(upstream.queries) == 1


async def test_forward_tcp_relays_answer(upstream):
    dns_server = await forwarding_server(upstream.port)
    try:
        response = await tcp(dns_server, "www.example.com")
    finally:
        await dns_server.stop()

    assert addresses(response) == {"192.0.2.10"}


async def test_forward_uses_fresh_id(upstream):
    dns_server = await forwarding_server(upstream.port)
    try:
        responses = []
        for _ in range(3):
            query = dns.message.make_query("www.example.com", "A", id=7)
            port = dns_server.address[1]
            responses.append(await dns.asyncquery.udp(query, HOST, port=port, timeout=QUERY_TIMEOUT))
    finally:
        await dns_server.stop()

    assert [response.id for response in responses] == [7, 7, 7]
    # Three random IDs all equal to 7 would happen once in 2**48 runs.
    assert {query.id for query in upstream.queries} != {7}


async def test_forward_skips_dead_recursor(upstream):
    dns_server = await forwarding_server(closed_udp_port(), upstream.port)
    try:
        response = await udp(dns_server, "www.example.com")
    finally:
        await dns_server.stop()

    assert addresses(response) == {"192.0.2.10"}


async def test_forward_skips_servfail_recursor(upstream):
    failing = Upstream(mode="servfail")
    await failing.start()
    dns_server = await forwarding_server(failing.port, upstream.port)
    try:
        response = await udp(dns_server, "www.example.com")
    finally:
        await dns_server.stop()
        await failing.stop()

    assert addresses(response) == {"192.0.2.10"}
    assert len(failing.queries) == 1


async def test_forward_all_failed_servfail():
    silent = Upstream(mode="silent")
    await silent.start()
    dns_server = await forwarding_server(silent.port, closed_udp_port(), timeout=0.2)
    try:
        started = asyncio.get_running_loop().time()
        response = await udp(dns_server, "www.example.com")
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await dns_server.stop()
        await silent.stop()

    assert response.rcode() == dns.rcode.SERVFAIL
    assert response.flags & dns.flags.RA
    assert elapsed < 1.5


async def test_forward_not_cached(upstream):
    dns_server = await forwarding_server(upstream.port)
    try:
        for _ in range(3):
            await udp(dns_server, "www.example.com")
    finally:
        await dns_server.stop()

    assert len(upstream.queries) == 3


async def test_domain_names_not_forwarded(upstream):
    dns_server = await forwarding_server(upstream.port)
    try:
        response = await udp(dns_server, "web.service.consul")
    finally:
        await dns_server.stop()

    assert addresses(response) == {"10.0.0.1", "10.0.0.2"}
    assert response.flags & dns.flags.RA
    assert upstream.queries == []


async def test_stop_cancels_pending_forward():
    silent = Upstream(mode="silent")
    await silent.start()
    dns_server = await forwarding_server(silent.port, timeout=30)
    try:
        query = dns.message.make_query("www.example.com", "A")
        await raw_udp(dns_server, query.to_wire(), timeout=0.2)
        pending = len(dns_server._forwards)
        await asyncio.wait_for(dns_server.stop(), 2)
    finally:
        await silent.stop()

    assert pending == 1
    assert dns_server._forwards == set()


# Flag parsers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("::1", ("::1", 53)),
    ],
)
def test_parse_recursor(text, expected):
    assert parse_recursor(text) == expected


@pytest.mark.parametrize("text", ["dns.example.com", "127.0.0.1:0", "127.0.0.1:x", "[::1", ""])
def test_parse_recursor_invalid(text):
    with pytest.raises(ValueError, match="invalid recursor"):
        parse_recursor(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10s", ("*", 10)), ("web=1m", ("web", 60)), ("api-*=1.5s", ("api-*", 1))],
)
def test_parse_service_ttl(text, expected):
    assert parse_service_ttl(text) == expected


@pytest.mark.parametrize("text", ["=10s", "web=", "web=-1s", "web=ten"])
def test_parse_service_ttl_invalid(text):
    with pytest.raises(ValueError, match="invalid"):
        parse_service_ttl(text)


# The state layer's DNSCatalog implementation


@pytest.fixture
async def state(tmp_path) -> AsyncIterator[State]:
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    domain_state = State(store)
    await domain_state.start()
    yield domain_state
    await domain_state.stop()
    await store.close()


def web_check(service_id: str, status: CheckStatus) -> Check:
    return Check(
        node="node1",
        id=f"service:{service_id}",
        name="web check",
        status=status,
        service_id=service_id,
        service_name="web",
        type="http",
        interval="10s",
    )


async def register_web(state: State, service_id: str, port: int, status: CheckStatus) -> None:
    service = Service(node="node1", id=service_id, name="web", address="", port=port)
    await state.register_service(service, [web_check(service_id, status)])


async def test_state_instance_status(state):
    await state.register_node(StateNode("node1", "10.0.0.1", "dc1"))
    await register_web(state, "web-1", 8080, CheckStatus.PASSING)
    await register_web(state, "web-2", 8081, CheckStatus.WARNING)
    await register_web(state, "web-3", 8082, CheckStatus.MAINTENANCE)
    statuses = {item.port: item.status for item in state.service_instances("web", None)}

    assert statuses == {8080: CheckStatus.PASSING, 8081: CheckStatus.WARNING}


async def test_state_dns_node_case_insensitive(state):
    await state.register_node(StateNode("Node1", "10.0.0.1", "dc1", meta={"rack": "r1"}))
    node = state.dns_node("node1")

    assert node is not None
    assert node.address == "10.0.0.1"
    assert dict(node.meta) == {"rack": "r1"}


async def test_state_watch_catalog_writes(state):
    calls = []
    stop = state.watch_catalog(lambda: calls.append(1))
    await state.register_node(StateNode("node1", "10.0.0.1", "dc1"))
    await state.kv_put("config/x", b"1")
    after_writes = len(calls)
    stop()
    await state.register_node(StateNode("node2", "10.0.0.2", "dc1"))

    assert after_writes == 1
    assert len(calls) == 1


async def test_state_change_clears_server_cache(state):
    await state.register_node(StateNode("node1", "10.0.0.1", "dc1"))
    await register_web(state, "web-1", 8080, CheckStatus.PASSING)
    dns_server = DNSServer(state, HOST, 0)
    await dns_server.start()
    try:
        for _ in range(SHUFFLED_VARIANTS):
            await udp(dns_server, "web.service.consul", "SRV")
        await state.update_check("node1", "service:web-1", CheckStatus.CRITICAL, "down")
        response = await udp(dns_server, "web.service.consul", "SRV")
    finally:
        await dns_server.stop()

    assert response.rcode() == dns.rcode.NXDOMAIN
