"""Weights, TaggedAddresses and EnableTagOverride of catalog services.

Consul keeps these three fields in its catalog and returns them from the
catalog and health endpoints, and its DNS server answers SRV queries with
an instance's Passing or Warning weight. One `corral dev` subprocess
serves the HTTP tests (py-consul and raw HTTP) and the DNS tests
(dnspython over UDP and TCP). Each test registers nodes named after
itself, so tests do not see each other's entries. The registry tests at
the end run a State on a real SQLite store in the test's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import consul
import dns.message
import dns.query
import dns.rdatatype
import orjson
import pytest
from devcluster import DevProcess, free_port, wait_until

from corral.agent.connection import LocalConnection
from corral.agent.http_connection import HttpConnection
from corral.agent.registry import LocalRegistry, LocalService, RegistryConfig, serf_health_check
from corral.server import Server, ServerConfig
from corral.state import State
from corral.state.records import AgentInfo, Node, Service, node_key, service_key
from corral.store import SQLiteStore

ADDRESS = "10.0.0.1"
DEV_NODE = "test-node"
DEFAULT_WEIGHTS = {"Passing": 1, "Warning": 1}
TAGGED = {
    "lan": {"Address": "10.0.0.5", "Port": 8080},
    "wan": {"Address": "198.18.0.5", "Port": 80},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalog-fields")
    dev = DevProcess(folder / "data", folder / "corral-dev.log")
    dev.start()
    yield dev
    assert dev.stop() == 0


@pytest.fixture
def client(cluster):
    host, port = cluster.http_addr.split(":")
    consul_client = consul.Consul(host=host, port=int(port))
    # Never route 127.0.0.1 through a proxy named in the environment.
    consul_client.http.session.trust_env = False
    yield consul_client
    consul_client.http.close()


def call(cluster: DevProcess, method: str, path: str, body: Any = None) -> tuple[int, str, dict[str, str]]:
    """Send one raw HTTP request; return the status, the body text and the headers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{cluster.http_addr}{path}", data=data, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=15) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def get_json(cluster: DevProcess, path: str) -> Any:
    status, text, _ = call(cluster, "GET", path)
    assert status == 200, text
    return json.loads(text)


def register_raw(cluster: DevProcess, node: str, service: dict, **fields: Any) -> None:
    body = {"Node": node, "Address": ADDRESS, "Service": service, **fields}
    status, text, _ = call(cluster, "PUT", "/v1/catalog/register", body)
    assert (status, text) == (200, "true")


def full_service(name: str) -> dict:
    return {
        "Service": name,
        "ID": f"{name}-1",
        "Port": 8080,
        "Tags": ["v1"],
        "Weights": {"Passing": 5, "Warning": 2},
        "TaggedAddresses": TAGGED,
        "EnableTagOverride": True,
    }


def dns_srv(cluster: DevProcess, name: str, over_tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, dns.rdatatype.SRV)
    if over_tcp:
        return dns.query.tcp(query, "127.0.0.1", port=cluster.dns_port, timeout=5)
    return dns.query.udp(query, "127.0.0.1", port=cluster.dns_port, timeout=5)


def srv_weights(response: dns.message.Message) -> dict[int, int]:
    """Return the SRV weight of each port in the response's answer section."""
    return {
        record.port: record.weight
        for rrset in response.answer
        if rrset.rdtype == dns.rdatatype.SRV
        for record in rrset
    }


# Registration through /v1/catalog/register


def test_catalog_service_shows_fields(client):
    assert client.catalog.register("cs-node", ADDRESS, service=full_service("cs-web")) is True

    _, entries = client.catalog.service("cs-web")

    assert len(entries) == 1
    entry = entries[0]
    assert entry["ServiceWeights"] == {"Passing": 5, "Warning": 2}
    assert entry["ServiceTaggedAddresses"] == TAGGED
    assert entry["ServiceEnableTagOverride"] is True


def test_health_service_shows_fields(client):
    assert client.catalog.register("hs-node", ADDRESS, service=full_service("hs-web")) is True

    _, entries = client.health.service("hs-web")

    assert len(entries) == 1
    service = entries[0]["Service"]
    assert service["Weights"] == {"Passing": 5, "Warning": 2}
    assert service["TaggedAddresses"] == TAGGED
    assert service["EnableTagOverride"] is True


def test_catalog_node_shows_fields(client):
    assert client.catalog.register("cn-node", ADDRESS, service=full_service("cn-web")) is True

    _, node = client.catalog.node("cn-node")

    service = node["Services"]["cn-web-1"]
    assert service["Weights"] == {"Passing": 5, "Warning": 2}
    assert service["TaggedAddresses"] == TAGGED
    assert service["EnableTagOverride"] is True


def test_node_services_shows_fields(cluster):
    register_raw(cluster, "ns-node", full_service("ns-web"))

    body = get_json(cluster, "/v1/catalog/node-services/ns-node")

    assert len(body["Services"]) == 1
    service = body["Services"][0]
    assert service["Weights"] == {"Passing": 5, "Warning": 2}
    assert service["TaggedAddresses"] == TAGGED
    assert service["EnableTagOverride"] is True


def test_defaults_without_fields(cluster, client):
    register_raw(cluster, "def-node", {"Service": "def-web", "Port": 80})

    _, entries = client.catalog.service("def-web")
    _, health = client.health.service("def-web")
    node_services = get_json(cluster, "/v1/catalog/node-services/def-node")["Services"]

    entry = entries[0]
    assert entry["ServiceWeights"] == DEFAULT_WEIGHTS
    assert entry["ServiceEnableTagOverride"] is False
    # Consul leaves empty tagged addresses out of its responses.
    assert "ServiceTaggedAddresses" not in entry
    service = health[0]["Service"]
    assert service["Weights"] == DEFAULT_WEIGHTS
    assert service["EnableTagOverride"] is False
    assert "TaggedAddresses" not in service
    assert "TaggedAddresses" not in node_services[0]


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        pytest.param({}, DEFAULT_WEIGHTS, id="empty"),
        pytest.param(None, DEFAULT_WEIGHTS, id="null"),
        pytest.param({"Passing": 3}, {"Passing": 3, "Warning": 0}, id="warning-left-out"),
        pytest.param({"passing": 4, "warning": 0}, {"Passing": 4, "Warning": 0}, id="lowercase-keys"),
        pytest.param({"Passing": 65535, "Warning": 65535}, {"Passing": 65535, "Warning": 65535}, id="maximum"),
    ],
)
def test_weights_decoded_as_consul(cluster, client, weights, expected):
    register_raw(cluster, "wd-node", {"Service": "wd-web", "Weights": weights})

    _, entries = client.catalog.service("wd-web")

    assert entries[0]["ServiceWeights"] == expected


def test_lowercase_tagged_address_keys(cluster, client):
    addresses = {"lan_ipv4": {"address": "10.0.0.8", "port": 81}}
    register_raw(cluster, "lk-node", {"Service": "lk-web", "taggedaddresses": addresses})

    _, entries = client.catalog.service("lk-web")

    assert entries[0]["ServiceTaggedAddresses"] == {"lan_ipv4": {"Address": "10.0.0.8", "Port": 81}}


@pytest.mark.parametrize(
    ("service", "message"),
    [
        pytest.param({"Weights": {"Passing": 0, "Warning": 1}},
                     "Passing must be greater than 0: Service.Weights.Passing is 0", id="passing-zero"),
        pytest.param({"Weights": {"Passing": 1, "Warning": -1}},
                     "Warning must be greater or equal than 0: Service.Weights.Warning is -1",
                     id="warning-negative"),
        pytest.param({"Weights": {"Passing": 70000, "Warning": 1}},
                     "DNS Weight must be between 0 and 65535: Service.Weights.Passing is 70000",
                     id="passing-too-large"),
        pytest.param({"Weights": "heavy"},
                     "Service.Weights: expected a JSON object, got 'heavy'", id="weights-string"),
        pytest.param({"Weights": {"Passing": "5"}},
                     "Service.Weights.Passing: expected an integer, got '5'", id="passing-string"),
        pytest.param({"TaggedAddresses": ["10.0.0.1"]},
                     "Service.TaggedAddresses: expected an object", id="tagged-list"),
        pytest.param({"TaggedAddresses": {"lan": "10.0.0.1"}},
                     "Service.TaggedAddresses.lan: expected a JSON object, got '10.0.0.1'", id="tagged-string"),
        pytest.param({"TaggedAddresses": {"lan": {"Address": "10.0.0.1", "Port": 70000}}},
                     "Invalid Service.TaggedAddresses.lan.Port 70000", id="tagged-port"),
        pytest.param({"TaggedAddresses": {"lan": {"Address": 10}}},
                     "Service.TaggedAddresses.lan.Address: expected a string, got 10", id="tagged-address-number"),
        pytest.param({"TaggedAddresses": {"lan_ipv4": {"Address": "::1"}}},
                     "Invalid Service.TaggedAddresses.lan_ipv4.Address '::1': expected an IPv4 address",
                     id="tagged-ipv4"),
        pytest.param({"TaggedAddresses": {"wan_ipv6": {"Address": "example.com"}}},
                     "expected an IPv6 address", id="tagged-ipv6"),
        pytest.param({"EnableTagOverride": "yes"},
                     "Service.EnableTagOverride: expected true or false, got 'yes'", id="override-string"),
    ],
)
def test_register_rejects_bad_fields(cluster, service, message):
    node = "bad-field-node"
    body = {"Node": node, "Address": ADDRESS, "Service": {"Service": "bad-field-web", **service}}

    status, text, _ = call(cluster, "PUT", "/v1/catalog/register", body)

    assert status == 400
    assert message in text
    # Nothing of a rejected registration is written, not even its node.
    assert call(cluster, "GET", f"/v1/catalog/node/{node}")[1] == "null"


def test_weight_change_wakes_watcher(cluster):
    register_raw(cluster, "ww-node", {"Service": "ww-web", "Weights": {"Passing": 2, "Warning": 1}})
    _, _, headers = call(cluster, "GET", "/v1/health/service/ww-web")
    index = int(headers["X-Consul-Index"])

    # The same registration again writes nothing, so a watcher keeps waiting.
    register_raw(cluster, "ww-node", {"Service": "ww-web", "Weights": {"Passing": 2, "Warning": 1}})
    started = time.monotonic()
    _, _, headers = call(cluster, "GET", f"/v1/health/service/ww-web?index={index}&wait=1s")
    assert time.monotonic() - started >= 0.9
    assert int(headers["X-Consul-Index"]) == index

    register_raw(cluster, "ww-node", {"Service": "ww-web", "Weights": {"Passing": 9, "Warning": 1}})
    status, text, headers = call(cluster, "GET", f"/v1/health/service/ww-web?index={index}&wait=5s")
    assert status == 200
    assert int(headers["X-Consul-Index"]) > index
    assert json.loads(text)[0]["Service"]["Weights"] == {"Passing": 9, "Warning": 1}


# Anti-entropy from the dev agent


def catalog_entry(client: consul.Consul, name: str, service_id: str) -> dict | None:
    _, entries = client.catalog.service(name)
    for entry in entries:
        if entry["ServiceID"] == service_id:
            return entry
    return None


def test_agent_sync_sends_fields(client):
    assert client.agent.service.register(
        "ae-web",
        service_id="ae-web-1",
        address="127.0.0.1",
        port=9001,
        weights={"Passing": 7, "Warning": 3},
        enable_tag_override=True,
        tagged_addresses={"lan": {"Address": "10.0.0.7", "Port": 8081}},
    ) is True
    try:
        entry = wait_until(lambda: catalog_entry(client, "ae-web", "ae-web-1"), 10, "ae-web-1 in the catalog")

        assert entry["Node"] == DEV_NODE
        assert entry["ServiceWeights"] == {"Passing": 7, "Warning": 3}
        assert entry["ServiceEnableTagOverride"] is True
        # The agent adds lan_ipv4 and wan_ipv4 for an IP address, as Consul's agent does.
        assert entry["ServiceTaggedAddresses"] == {
            "lan": {"Address": "10.0.0.7", "Port": 8081},
            "lan_ipv4": {"Address": "127.0.0.1", "Port": 9001},
            "wan_ipv4": {"Address": "127.0.0.1", "Port": 9001},
        }
    finally:
        client.agent.service.deregister("ae-web-1")


def test_tag_override_survives_sync(cluster, client):
    node_address = get_json(cluster, f"/v1/catalog/node/{DEV_NODE}")["Node"]["Address"]
    for service_id, override in (("to-keep", True), ("to-reset", False)):
        assert client.agent.service.register(
            service_id, port=9100, tags=["agent"], weights={"Passing": 4, "Warning": 2},
            enable_tag_override=override,
        ) is True
    trigger = "to-trigger"
    try:
        for service_id in ("to-keep", "to-reset"):
            wait_until(lambda: catalog_entry(client, service_id, service_id), 10, f"{service_id} in the catalog")
            # An external client changes the tags in the catalog, and with them the other fields.
            register_raw(cluster, DEV_NODE, {"Service": service_id, "Port": 9100, "Tags": ["external"]},
                         Address=node_address, SkipNodeUpdate=True)
        assert catalog_entry(client, "to-keep", "to-keep")["ServiceTags"] == ["external"]

        # Any change on the agent makes it sync its node to the catalog.
        assert client.agent.service.register(trigger, port=9101) is True
        wait_until(lambda: catalog_entry(client, trigger, trigger), 10, "the sync after the trigger service")

        overriding = catalog_entry(client, "to-keep", "to-keep")
        assert overriding["ServiceTags"] == ["external"]
        assert overriding["ServiceEnableTagOverride"] is True
        assert overriding["ServiceWeights"] == {"Passing": 4, "Warning": 2}
        assert client.agent.services()["to-keep"]["Tags"] == ["external"]
        reset = catalog_entry(client, "to-reset", "to-reset")
        assert reset["ServiceTags"] == ["agent"]
        assert reset["ServiceWeights"] == {"Passing": 4, "Warning": 2}
        assert client.agent.services()["to-reset"]["Tags"] == ["agent"]
    finally:
        for service_id in ("to-keep", "to-reset", trigger):
            client.agent.service.deregister(service_id)


# DNS SRV weights


def register_weighted(cluster: DevProcess, node: str, port: int, weights: dict | None, status: str | None) -> None:
    service = {"Service": "weighted", "ID": f"weighted-{port}", "Port": port}
    if weights is not None:
        service["Weights"] = weights
    fields = {}
    if status is not None:
        fields["Check"] = {"CheckID": f"check-{port}", "Name": "probe", "Status": status,
                           "ServiceID": f"weighted-{port}"}
    register_raw(cluster, node, service, **fields)


@pytest.fixture(scope="module")
def weighted(cluster) -> DevProcess:
    register_weighted(cluster, "wt-a", 7001, {"Passing": 10, "Warning": 1}, "passing")
    register_weighted(cluster, "wt-b", 7002, {"Passing": 10, "Warning": 3}, "warning")
    register_weighted(cluster, "wt-c", 7003, None, None)
    register_weighted(cluster, "wt-d", 7004, {"Passing": 20, "Warning": 0}, "warning")
    register_weighted(cluster, "wt-e", 7005, {"Passing": 30, "Warning": 5}, "critical")
    return cluster


@pytest.mark.parametrize("over_tcp", [False, True], ids=["udp", "tcp"])
def test_srv_weight_follows_health(weighted, over_tcp):
    response = dns_srv(weighted, "weighted.service.consul", over_tcp)

    weights = srv_weights(response)
    assert weights[7001] == 10  # passing: its Passing weight
    assert weights[7002] == 3  # warning: its Warning weight
    assert weights[7003] == 1  # no Weights given: Consul's default
    assert weights[7004] == 0  # a Warning weight of 0 keeps the record, with weight 0
    assert 7005 not in weights  # critical instances are left out


def test_srv_weight_rfc2782_name(weighted):
    response = dns_srv(weighted, "_weighted._tcp.service.consul")

    assert srv_weights(response)[7002] == 3


def test_srv_weight_follows_changes(cluster):
    name = "weighted-change.service.consul"
    service = {"Service": "weighted-change", "ID": "wc", "Port": 7101, "Weights": {"Passing": 8, "Warning": 2}}
    check = {"CheckID": "wc-check", "Name": "probe", "Status": "warning", "ServiceID": "wc"}
    register_raw(cluster, "wc-node", service, Check=check)
    assert srv_weights(dns_srv(cluster, name)) == {7101: 2}

    # Every catalog change clears the cached DNS responses: a check status, then the weights.
    register_raw(cluster, "wc-node", service, Check={**check, "Status": "passing"})
    assert srv_weights(dns_srv(cluster, name)) == {7101: 8}

    register_raw(cluster, "wc-node", {**service, "Weights": {"Passing": 40, "Warning": 2}})
    assert srv_weights(dns_srv(cluster, name)) == {7101: 40}


# Records and the registry, on a State over SQLite


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[State]:
    store = SQLiteStore(tmp_path / "corral.db")
    await store.open()
    state = State(store)
    await state.start()
    yield state
    await state.stop()
    await store.close()


async def test_old_record_decodes_defaults(state: State):
    # A service as corral stored it before the record had these fields.
    old = {"node": "old-node", "id": "old-1", "name": "old", "address": "", "port": 80,
           "tags": ["v1"], "meta": {}, "task_id": ""}
    await state.store.put(service_key("old-node", "old-1"), orjson.dumps(old))
    await state.store.put(node_key("old-node"), orjson.dumps({"name": "old-node", "address": ADDRESS,
                                                              "datacenter": "dc1"}))
    deadline = time.monotonic() + 5
    while state.service("old-node", "old-1") is None:
        assert time.monotonic() < deadline, "the view did not see the old record"
        await asyncio.sleep(0.05)

    service = state.service("old-node", "old-1")

    assert service.weights == DEFAULT_WEIGHTS
    assert service.tagged_addresses == {}
    assert service.enable_tag_override is False
    assert [instance.weight for instance in state.service_instances("old", None)] == [1]


async def make_registry(state: State) -> LocalRegistry:
    node = Node("reg-node", "127.0.0.1", "dc1")
    await state.register_node(node, [serf_health_check(node.name)])
    registry = LocalRegistry(LocalConnection(state), node, RegistryConfig())
    await registry.start()
    return registry


async def test_local_reregister_wins_over_override(state: State):
    registry = await make_registry(state)
    try:
        await registry.add_service(LocalService("web-1", "web", tags=["v1"], enable_tag_override=True))
        await registry.sync()
        await state.register_service(Service("reg-node", "web-1", "web", "", 0, tags=["external"]))

        # A new local definition is pushed as it is, as Consul's partial sync pushes it.
        await registry.add_service(LocalService("web-1", "web", tags=["v2"], enable_tag_override=True))
        await registry.sync()

        assert state.service("reg-node", "web-1").tags == ["v2"]
        assert registry.service("web-1").tags == ["v2"]

        # Later syncs adopt tags changed in the catalog again.
        await state.register_service(Service("reg-node", "web-1", "web", "", 0, tags=["external"]))
        await registry.sync()

        assert registry.service("web-1").tags == ["external"]
        assert state.service("reg-node", "web-1").tags == ["external"]
        assert state.service("reg-node", "web-1").enable_tag_override is True
    finally:
        await registry.stop()


async def test_sync_writes_weight_change(state: State):
    registry = await make_registry(state)
    try:
        await registry.add_service(LocalService("db-1", "db", weights={"Passing": 2, "Warning": 1}))
        await registry.sync()
        before = state.view.get(service_key("reg-node", "db-1")).mod_revision

        await registry.add_service(LocalService("db-1", "db", weights={"Passing": 6, "Warning": 1}))
        await registry.sync()

        assert state.service("reg-node", "db-1").weights == {"Passing": 6, "Warning": 1}
        assert state.view.get(service_key("reg-node", "db-1")).mod_revision > before
    finally:
        await registry.stop()


# The same sync over HTTP, as a `corral agent` process sends it to `corral server`


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    config = ServerConfig(data_dir=tmp_path / "server", http_port=free_port(), dns_port=free_port())
    instance = Server(config)
    await instance.start()
    yield instance
    await instance.stop()


async def test_http_sync_carries_fields(server: Server):
    connection = HttpConnection(f"127.0.0.1:{server.config.http_port}", "http-node", retry_min=0.05, retry_max=0.2)
    node = Node("http-node", "127.0.0.1", "dc1")
    info = AgentInfo(node.name, node.address, cpus=1.0, memory=256, disk=1000, port_ranges=[[21000, 21010]])
    await connection.register(info, node, [serf_health_check(node.name)])
    registry = LocalRegistry(connection, node, RegistryConfig())
    await registry.start()
    try:
        await registry.add_service(LocalService(
            "api-1", "api", "127.0.0.1", 9200, tags=["v1"], weights={"Passing": 12, "Warning": 4},
            tagged_addresses={"wan": {"Address": "198.18.0.9", "Port": 443}}, enable_tag_override=True,
        ))
        await registry.sync()

        stored = server.state.service("http-node", "api-1")
        assert stored.weights == {"Passing": 12, "Warning": 4}
        assert stored.tagged_addresses["wan"] == {"Address": "198.18.0.9", "Port": 443}
        assert stored.tagged_addresses["lan_ipv4"] == {"Address": "127.0.0.1", "Port": 9200}
        assert stored.enable_tag_override is True

        # The agent reads the catalog's tags back over HTTP for EnableTagOverride.
        await server.state.register_service(dataclasses.replace(stored, tags=["external"]))
        await registry.sync()

        assert registry.service("api-1").tags == ["external"]
        assert server.state.service("http-node", "api-1").tags == ["external"]
    finally:
        await registry.stop()
        await connection.close()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"weights": {"Passing": "high", "Warning": 1}}, "has weights", id="weights-string"),
        pytest.param({"weights": {"Passing": 1}}, "has weights", id="weights-missing-key"),
        pytest.param({"tagged_addresses": {"lan": "10.0.0.1"}}, "has tagged addresses", id="tagged-string"),
    ],
)
async def test_agent_sync_rejects_bad_fields(server: Server, fields: dict, message: str):
    service = {"node": "bad-node", "id": "bad-1", "name": "bad", "address": "", "port": 80, **fields}
    body = {
        "Node": {"name": "bad-node", "address": "127.0.0.1", "datacenter": "dc1"},
        "Services": [service],
        "Checks": [],
        "LivenessCheck": dataclasses.asdict(serf_health_check("bad-node")),
    }
    url = f"http://127.0.0.1:{server.config.http_port}/v1/agents/bad-node/catalog"
    request = urllib.request.Request(url, data=orjson.dumps(body), method="PUT")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    with pytest.raises(urllib.error.HTTPError) as caught:
        await asyncio.to_thread(opener.open, request, timeout=10)

    assert caught.value.code == 400
    assert message in caught.value.read().decode()
    assert server.state.service("bad-node", "bad-1") is None
