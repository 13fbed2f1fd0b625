"""Tests for corral.dns.server: a real DNSServer on 127.0.0.1 queried with dnspython."""

from __future__ import annotations

import asyncio
import ipaddress
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

from corral.dns.server import DNSInstance, DNSServer

HOST = "127.0.0.1"
QUERY_TIMEOUT = 2.0


@dataclass
class Catalog:
    """A DNSCatalog over plain dicts, matching names and tags case-insensitively."""

    services: dict[str, list[DNSInstance]] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)
    datacenter: str = "dc1"

    def service_instances(self, name: str, tag: str | None) -> list[DNSInstance]:
        instances = self.services.get(name.lower(), [])
        if tag is None:
            return list(instances)
        expected = tag.lower()
        return [item for item in instances if expected in (t.lower() for t in item.tags)]

    def node_address(self, name: str) -> str | None:
        return self.nodes.get(name.lower())


def instance(node: str, node_address: str, port: int, *tags: str, address: str = "") -> DNSInstance:
    return DNSInstance(node, node_address, address, port, tuple(tags))


def sample_catalog() -> Catalog:
    catalog = Catalog()
    catalog.nodes = {"node1": "10.0.0.1", "node2": "10.0.0.2", "node3": "10.0.0.3"}
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
    server = DNSServer(catalog, HOST, 0, **options)
    await server.start()
    return server


@pytest.fixture
async def server() -> AsyncIterator[DNSServer]:
    dns_server = await start_server(sample_catalog())
    yield dns_server
    await dns_server.stop()


@pytest.fixture
async def flagging_server() -> AsyncIterator[DNSServer]:
    dns_server = await start_server(sample_catalog(), truncate_flag=True)
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


async def test_rfc2782_udp_any_tag(server):
    response = await udp(server, "_db._udp.service.consul", "SRV")

    assert sorted(record.port for record in srv_records(response)) == [5432, 5433, 5434]


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
    dns_server = await start_server(catalog, truncate_flag=True)
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
    [{"domains": ()}, {"domains": ("a..b",)}, {"ttl": -1}, {"tcp_idle_timeout": 0}],
)
def test_invalid_options_rejected(options):
    with pytest.raises(ValueError, match="invalid"):
        DNSServer(Catalog(), HOST, 0, **options)
