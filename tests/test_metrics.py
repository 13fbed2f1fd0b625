"""/v1/agent/metrics against a real `corral dev` subprocess, and the metrics registry's own parts."""

from __future__ import annotations

import threading
import urllib.request

import dns.message
import dns.query
import dns.rdatatype
import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from prometheus_client.parser import text_string_to_metric_families

from devcluster import DevProcess, wait_until

from corral.client import Check, Client, CorralError
from corral.metrics import Metrics, RateWindow, dns_question_labels


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metrics")
    dev = DevProcess(folder / "data", folder / "corral-dev.log")
    dev.start()
    yield dev
    assert dev.stop() == 0


@pytest.fixture
def client(cluster):
    return Client(cluster.http_addr, timeout=10)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Return every sample of a Prometheus exposition, keyed by name and label pairs."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def dns_query(cluster, name: str, rdtype) -> None:
    query = dns.message.make_query(name, rdtype)
    dns.query.udp(query, "127.0.0.1", port=cluster.dns_port, timeout=5)


def json_entries(data: dict, section: str, name: str) -> list[dict]:
    return [entry for entry in data[section] if entry["Name"] == name]


# The registry's parts, without a server


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rate_window_averages_last_minute():
    clock = FakeClock()
    window = RateWindow(60, clock)
    window.add(30)
    clock.now += 10
    window.add(30)
    assert window.rate() == pytest.approx(1.0)


def test_rate_window_forgets_old_seconds():
    clock = FakeClock()
    window = RateWindow(60, clock)
    window.add(60)
    clock.now += 60
    assert window.rate() == 0
    clock.now += 500
    window.add(6)
    assert window.rate() == pytest.approx(0.1)


def test_dns_labels_from_response_bytes():
    reply = DNSRecord.question("web.service.consul", "SRV").reply()
    reply.header.rcode = RCODE.NXDOMAIN
    assert dns_question_labels(reply.pack()) == ("SRV", "NXDOMAIN")


def test_dns_labels_bound_unknown_types():
    reply = DNSRecord.question("web.service.consul", "HINFO").reply()
    assert QTYPE.get(reply.q.qtype) == "HINFO"
    assert dns_question_labels(reply.pack()) == ("OTHER", "NOERROR")


def test_dns_labels_reject_short_message():
    assert dns_question_labels(b"\x00\x01") is None


def test_unknown_http_method_is_bounded():
    metrics = Metrics()
    metrics.observe_http("BREW", "/v1/kv/{key}", 405, 0.001)
    assert ("OTHER", "/v1/kv/{key}", "405") in metrics.http_requests


# The endpoint, on a real server


def test_json_has_consul_shape(client):
    data = client.metrics()
    for section in ("Timestamp", "Gauges", "Points", "Counters", "Samples"):
        assert section in data
    assert data["Timestamp"].endswith("+0000 UTC")
    counter = data["Counters"][0]
    for field in ("Name", "Count", "Sum", "Min", "Max", "Mean", "Stddev", "Labels"):
        assert field in counter


def test_prometheus_content_type(cluster):
    url = f"http://{cluster.http_addr}/v1/agent/metrics?format=prometheus"
    with urllib.request.urlopen(url, timeout=10) as answer:
        content_type = answer.headers["Content-Type"]
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"


def test_unknown_format_is_rejected(client):
    with pytest.raises(CorralError) as caught:
        client.request_json("GET", "/v1/agent/metrics", query={"format": "xml"})
    assert caught.value.status == 400
    assert "'xml'" in caught.value.text


def test_requests_labelled_by_route(client):
    client.kv_put("metrics/one/two", "x")
    client.kv_get("metrics/one/two")
    client.kv_get("metrics/missing")
    text = client.metrics(prometheus=True)
    assert value(text, "corral_http_requests_total", method="GET", route="/v1/kv/{key}", status="200") >= 1
    assert value(text, "corral_http_requests_total", method="GET", route="/v1/kv/{key}", status="404") >= 1
    assert "metrics/one/two" not in text


def test_unmatched_path_has_one_label(client):
    client.request("GET", "/no/such/path/12345")
    text = client.metrics(prometheus=True)
    assert value(text, "corral_http_requests_total", method="GET", route="unmatched", status="404") >= 1
    assert "12345" not in text


def test_blocking_query_is_counted_while_held(cluster, client):
    client.kv_put("metrics/blocked", "x")
    index = client.kv_get("metrics/blocked").modify_index
    blocker = Client(cluster.http_addr, timeout=30)
    thread = threading.Thread(
        target=blocker.request, args=("GET", "/v1/kv/metrics/blocked"),
        kwargs={"query": {"index": str(index), "wait": "20s"}}, daemon=True,
    )
    thread.start()
    try:
        wait_until(lambda: value(client.metrics(prometheus=True), "corral_http_blocking_queries") >= 1, 10,
                   "the blocking query to be counted")
    finally:
        client.kv_put("metrics/blocked", "changed")
        thread.join(10)
    assert not thread.is_alive()
    wait_until(lambda: value(client.metrics(prometheus=True), "corral_http_blocking_queries") == 0, 10,
               "the blocking query to be released")


def test_dns_queries_by_type_and_rcode(cluster, client):
    dns_query(cluster, "test-node.node.consul", dns.rdatatype.A)
    dns_query(cluster, "no-such-service.service.consul", dns.rdatatype.SRV)
    text = client.metrics(prometheus=True)
    assert value(text, "corral_dns_queries_total", qtype="A", rcode="NOERROR") >= 1
    assert value(text, "corral_dns_queries_total", qtype="SRV", rcode="NXDOMAIN") >= 1


def test_cached_dns_answers_are_counted(cluster, client):
    before = value(client.metrics(prometheus=True), "corral_dns_queries_total", qtype="AAAA", rcode="NOERROR")
    for _ in range(3):
        dns_query(cluster, "test-node.node.consul", dns.rdatatype.AAAA)
    after = value(client.metrics(prometheus=True), "corral_dns_queries_total", qtype="AAAA", rcode="NOERROR")
    assert after - before == 3


def test_catalog_sizes_and_check_status(client):
    before = samples(client.metrics(prometheus=True))
    client.register_service("metrics-svc", service_id="metrics-svc-1", port=7101, check=Check.ttl("30s"))
    client.register_service("metrics-svc", service_id="metrics-svc-2", port=7102, check=Check.ttl("30s"))
    try:
        after = samples(client.metrics(prometheus=True))
        services = ("corral_catalog_services", frozenset())
        instances = ("corral_catalog_service_instances", frozenset())
        critical = ("corral_catalog_checks", frozenset({("status", "critical")}))
        assert after[services] - before[services] == 1
        assert after[instances] - before[instances] == 2
        assert after[critical] - before[critical] == 2
        assert after[("corral_catalog_nodes", frozenset())] == 1
    finally:
        client.deregister_service("metrics-svc-1")
        client.deregister_service("metrics-svc-2")


def test_check_results_by_status(client):
    client.register_service("metrics-ttl", port=7103, check=Check.ttl("30s"))
    try:
        before = value(client.metrics(prometheus=True), "corral_check_results_total", status="warning")
        client.update_check("service:metrics-ttl", "warning", "slow")
        client.update_check("service:metrics-ttl", "warning", "still slow")
        after = value(client.metrics(prometheus=True), "corral_check_results_total", status="warning")
        assert after - before == 2
    finally:
        client.deregister_service("metrics-ttl")


def test_discovery_rate_counts_dns_and_health(cluster, client):
    before = value(client.metrics(prometheus=True), "corral_discovery_lookups_per_second")
    for _ in range(6):
        client.healthy_instances("metrics-rate")
        dns_query(cluster, "metrics-rate.service.consul", dns.rdatatype.A)
    after = value(client.metrics(prometheus=True), "corral_discovery_lookups_per_second")
    # This module runs in seconds, so no lookup leaves the 60-second window between the two reads.
    assert after - before == pytest.approx(12 / 60, abs=1e-9)


def test_json_and_prometheus_agree(client):
    client.kv_put("metrics/agree", "x")
    data = client.metrics()
    nodes = json_entries(data, "Gauges", "corral.catalog.nodes")
    assert nodes[0]["Value"] == 1
    puts = [entry for entry in json_entries(data, "Counters", "corral.http.requests")
            if entry["Labels"] == {"method": "PUT", "route": "/v1/kv/{key}", "status": "200"}]
    assert puts[0]["Count"] >= 1
    durations = [entry for entry in json_entries(data, "Samples", "corral.http.request_duration")
                 if entry["Labels"] == {"method": "PUT", "route": "/v1/kv/{key}"}]
    assert durations[0]["Max"] >= durations[0]["Min"] > 0
