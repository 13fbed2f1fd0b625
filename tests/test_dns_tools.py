"""Acceptance: the DNS interface of a real `corral dev` subprocess, queried with dnspython and dig.

The cluster runs the hello-web example, and more nodes and services are registered
through PUT /v1/catalog/register. It starts with DNS flags set (TTLs, only-passing and
a recursor), and the recursor is a small DNS server on 127.0.0.1 run by this module.
The dig tests are skipped when dig (Debian package dnsutils) is not installed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import urllib.request

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from devcluster import EXAMPLES, DevProcess, task_processes

HOST = "127.0.0.1"
TIMEOUT = 5.0
GREETING_KEY = "config/hello-web/greeting"
UPSTREAM_ADDRESS = "192.0.2.44"
BULK_INSTANCES = 40

DIG = shutil.which("dig")
needs_dig = pytest.mark.skipif(DIG is None, reason="dig is not installed (Debian package dnsutils)")


class Upstream:
    """A UDP and TCP DNS server on 127.0.0.1, in threads, answering every question with one A record."""

    def __init__(self) -> None:
        self.tcp = socket.create_server((HOST, 0))
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((HOST, self.port))
        self.queries: list[str] = []
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for sock in (self.udp, self.tcp):
            sock.settimeout(0.1)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.udp.close()
        self.tcp.close()

    def _answer(self, data: bytes) -> bytes:
        query = dns.message.from_wire(data)
        self.queries.append(query.question[0].name.to_text())
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", UPSTREAM_ADDRESS))
        return response.to_wire()

    def _serve_udp(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self.udp.recvfrom(4096)
            except TimeoutError:
                continue
            self.udp.sendto(self._answer(data), peer)

    def _serve_tcp(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self.tcp.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(TIMEOUT)
                length = int.from_bytes(connection.recv(2), "big")
                data = b""
                while len(data) < length:
                    data += connection.recv(length - len(data))
                response = self._answer(data)
                connection.sendall(len(response).to_bytes(2, "big") + response)


def register(dev: DevProcess, body: dict) -> None:
    request = urllib.request.Request(
        f"http://{dev.http_addr}/v1/catalog/register", data=json.dumps(body).encode(), method="PUT"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response) is True


def register_catalog(dev: DevProcess) -> None:
    # Each registration replaces the node record, meta included, as in Consul.
    meta_node = {"Node": "meta-node", "Address": "127.0.1.1", "NodeMeta": {"rack": "r7", "rfc1035-note": "plain"}}
    # A service whose address differs from its node's gets a .addr SRV target.
    register(dev, {
        **meta_node,
        "Service": {"ID": "ext-1", "Service": "ext", "Address": "127.0.2.9", "Port": 9000},
    })
    for index in range(BULK_INSTANCES):
        register(dev, {
            "Node": f"bulk-node-{index}", "Address": f"127.0.3.{index + 1}",
            "Service": {"ID": f"bulk-{index}", "Service": "bulk", "Port": 20000 + index},
        })
    for index, status in enumerate(("passing", "warning", "critical")):
        register(dev, {
            **meta_node,
            "Service": {"ID": f"graded-{status}", "Service": "graded", "Port": 7000 + index},
            "Check": {"CheckID": f"graded-{status}", "Name": "graded", "Status": status,
                      "ServiceID": f"graded-{status}"},
        })


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, upstream):
    folder = tmp_path_factory.mktemp("dns-tools")
    flags = [
        "--dns-service-ttl", "hello-web=5s",
        "--dns-node-ttl", "7s",
        "--dns-only-passing",
        "--dns-recursor", f"{HOST}:{upstream.port}",
        "--dns-recursor-timeout", "1s",
    ]
    dev = DevProcess(folder / "data", folder / "corral-dev.log", flags)
    dev.start()
    try:
        dev.cli("kv", "put", GREETING_KEY, "Hello from the DNS tests")
        result = dev.cli("job", "run", str(EXAMPLES / "hello-web.toml"))
        assert "2 of 2 instances running and passing" in result.stdout
        register_catalog(dev)
        yield dev
    finally:
        if dev.process is not None and dev.process.poll() is None:
            dev.stop()
        leftover = task_processes(dev.data_dir)
        for process in leftover:
            process.kill()
    assert not leftover, f"task processes left after corral dev stopped: {[p.pid for p in leftover]}"


def query_udp(dev: DevProcess, name: str, rdtype: str = "A", **options) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **options)
    return dns.query.udp(query, HOST, port=dev.dns_port, timeout=TIMEOUT)


def query_tcp(dev: DevProcess, name: str, rdtype: str = "A", **options) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **options)
    return dns.query.tcp(query, HOST, port=dev.dns_port, timeout=TIMEOUT)


def srv_records(response: dns.message.Message) -> list:
    return [rdata for rrset in response.answer if rrset.rdtype == dns.rdatatype.SRV for rdata in rrset]


def additional_names(response: dns.message.Message) -> set[dns.name.Name]:
    return {rrset.name for rrset in response.additional if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)}


def a_addresses(section: list[dns.rrset.RRset]) -> set[str]:
    return {rdata.address for rrset in section if rrset.rdtype == dns.rdatatype.A for rdata in rrset}


# dnspython over UDP and TCP


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_srv_two_instances(cluster, transport):
    query = query_udp if transport == "udp" else query_tcp
    response = query(cluster, "hello-web.service.consul", "SRV")
    records = srv_records(response)

    assert response.rcode() == dns.rcode.NOERROR
    assert len({record.port for record in records}) == 2
    assert additional_names(response) == {record.target for record in records}


def test_srv_with_edns(cluster):
    response = query_udp(cluster, "hello-web.service.consul", "SRV", use_edns=0, payload=1232)

    assert response.edns == 0
    assert len(srv_records(response)) == 2


def test_srv_target_is_node(cluster):
    response = query_udp(cluster, "hello-web.service.consul", "SRV")

    assert {record.target for record in srv_records(response)} == {dns.name.from_text("test-node.node.dc1.consul")}
    assert a_addresses(response.additional) == {"127.0.0.1"}


def test_a_records(cluster):
    response = query_udp(cluster, "hello-web.service.consul")

    assert a_addresses(response.answer) == {"127.0.0.1"}


def test_service_ttl_flag(cluster):
    response = query_udp(cluster, "hello-web.service.consul", "SRV")

    assert {rrset.ttl for rrset in response.answer} == {5}


def test_tag_lookup(cluster):
    response = query_udp(cluster, "v1.hello-web.service.consul", "SRV")

    assert len(srv_records(response)) == 2


def test_rfc2782_lookup(cluster):
    response = query_udp(cluster, "_hello-web._tcp.service.consul", "SRV")

    assert len(srv_records(response)) == 2


def test_corral_domain(cluster):
    response = query_tcp(cluster, "hello-web.service.dc1.corral", "SRV")

    assert {record.target for record in srv_records(response)} == {dns.name.from_text("test-node.node.dc1.corral")}


def test_other_datacenter_nxdomain(cluster):
    response = query_udp(cluster, "hello-web.service.dc2.consul", "SRV")

    assert response.rcode() == dns.rcode.NXDOMAIN
    assert [rrset.rdtype for rrset in response.authority] == [dns.rdatatype.SOA]


def test_node_lookup_ttl(cluster):
    response = query_udp(cluster, "test-node.node.consul")

    assert a_addresses(response.answer) == {"127.0.0.1"}
    assert {rrset.ttl for rrset in response.answer} == {7}


def test_node_meta_txt(cluster):
    response = query_tcp(cluster, "meta-node.node.consul", "TXT")
    texts = {b"".join(rdata.strings).decode() for rrset in response.answer for rdata in rrset}

    assert texts == {"rack=r7", "plain"}


def test_service_address_target(cluster):
    response = query_udp(cluster, "ext.service.consul", "SRV")
    target = dns.name.from_text("7f000209.addr.dc1.consul")

    assert [record.target for record in srv_records(response)] == [target]
    assert additional_names(response) == {target}
    assert a_addresses(response.additional) == {"127.0.2.9"}


def test_only_passing_flag(cluster):
    response = query_udp(cluster, "graded.service.consul", "SRV")

    assert [record.port for record in srv_records(response)] == [7000]


def test_udp_fits_512_not_empty(cluster):
    query = dns.message.make_query("bulk.service.consul", "SRV", use_edns=False)
    response = dns.query.udp(query, HOST, port=cluster.dns_port, timeout=TIMEOUT)
    records = srv_records(response)

    assert 0 < len(records) < BULK_INSTANCES
    assert additional_names(response) == {record.target for record in records}


def test_udp_answer_size(cluster):
    query = dns.message.make_query("bulk.service.consul", "SRV", use_edns=False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.sendto(query.to_wire(), (HOST, cluster.dns_port))
        reply = sock.recv(65535)

    assert len(reply) <= 512


def test_tcp_returns_all(cluster):
    response = query_tcp(cluster, "bulk.service.consul", "SRV")

    assert len(srv_records(response)) == BULK_INSTANCES


def test_recursor_udp(cluster, upstream):
    response = query_udp(cluster, "www.example.org")

    assert a_addresses(response.answer) == {UPSTREAM_ADDRESS}
    assert "www.example.org." in upstream.queries


def test_recursor_tcp(cluster, upstream):
    response = query_tcp(cluster, "tcp.example.org")

    assert a_addresses(response.answer) == {UPSTREAM_ADDRESS}
    assert "tcp.example.org." in upstream.queries


# dig


def dig(cluster: DevProcess, *args: str) -> list[list[str]]:
    """Run dig and return the answer and additional records, each split into fields."""
    assert DIG is not None
    result = subprocess.run(
        [DIG, f"@{HOST}", "-p", str(cluster.dns_port), "+time=3", "+tries=1", "+noall", "+answer",
         "+additional", "+comments", *args],
        capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 0, f"dig {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return [line.split() for line in result.stdout.splitlines() if line and not line.startswith(";")]


def dig_status(cluster: DevProcess, *args: str) -> str:
    assert DIG is not None
    result = subprocess.run(
        [DIG, f"@{HOST}", "-p", str(cluster.dns_port), "+time=3", "+tries=1", *args],
        capture_output=True, text=True, timeout=20,
    )
    for line in result.stdout.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    raise AssertionError(f"no status in dig output:\n{result.stdout}\n{result.stderr}")


@needs_dig
@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_dig_srv(cluster, transport):
    records = dig(cluster, transport, "hello-web.service.consul", "SRV")
    srv = [fields for fields in records if fields[3] == "SRV"]
    additional = [fields for fields in records if fields[3] == "A"]

    assert len(srv) == 2
    assert {fields[7] for fields in srv} == {fields[0] for fields in additional}


@needs_dig
def test_dig_noedns_srv(cluster):
    records = dig(cluster, "+noedns", "bulk.service.consul", "SRV")
    srv = [fields for fields in records if fields[3] == "SRV"]

    assert 0 < len(srv) < BULK_INSTANCES


@needs_dig
def test_dig_case_insensitive(cluster):
    records = dig(cluster, "HELLO-WEB.Service.CONSUL", "A")

    assert [fields[4] for fields in records if fields[3] == "A"] == ["127.0.0.1"]


@needs_dig
def test_dig_node_txt(cluster):
    records = dig(cluster, "meta-node.node.dc1.consul", "TXT")

    assert sorted(fields[4] for fields in records if fields[3] == "TXT") == ['"plain"', '"rack=r7"']


@needs_dig
def test_dig_nxdomain(cluster):
    assert dig_status(cluster, "missing.service.consul") == "NXDOMAIN"


@needs_dig
def test_dig_recursor(cluster):
    records = dig(cluster, "dig.example.net", "A")

    assert [fields[4] for fields in records if fields[3] == "A"] == [UPSTREAM_ADDRESS]
