"""The catalog and health HTTP API, through the real py-consul client against `corral dev`.

One `corral dev` subprocess serves the module. Each test registers its
own external nodes (named after the test), so the local agent's
anti-entropy never owns them and tests do not see each other's entries.
The per-service index tests at the end run a State on a real SQLite
store in the test's event loop.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import consul
import pytest
from devcluster import DevProcess, wait_until

from corral.state import State
from corral.state.catalog_index import CatalogIndex
from corral.state.records import Check, Node, Service
from corral.store import SQLiteStore
from corral.types import CheckStatus

ADDRESS = "10.0.0.1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalog")
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
    if body is None or isinstance(body, bytes):
        data = body
    else:
        data = json.dumps(body).encode()
    request = urllib.request.Request(f"http://{cluster.http_addr}{path}", data=data, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def register(client: consul.Consul, node: str, service: dict | None = None, check: dict | None = None, **kwargs):
    assert client.catalog.register(node, ADDRESS, service=service, check=check, **kwargs) is True


def register_with_meta(cluster: DevProcess, node: str, meta: dict[str, str], **fields: Any) -> None:
    """Register a node with NodeMeta, which py-consul sends only as ?node-meta, where Consul ignores it."""
    body = {"Node": node, "Address": ADDRESS, "NodeMeta": meta, **fields}
    status, text, _ = call(cluster, "PUT", "/v1/catalog/register", body)
    assert (status, text) == (200, "true")


def timed(function, *args, **kwargs) -> tuple[float, Any]:
    started = time.monotonic()
    result = function(*args, **kwargs)
    return time.monotonic() - started, result


# Registration


def test_register_service_listed(cluster, client):
    service = {"Service": "reg-redis", "ID": "reg-redis-1", "Tags": ["primary"], "Port": 6379,
               "Address": "10.0.0.9", "Meta": {"version": "7"}}
    register_with_meta(cluster, "reg-node", {"rack": "r1"}, Service=service)

    _, entries = client.catalog.service("reg-redis")
    entry = entries[0]
    assert len(entries) == 1
    assert entry["Node"] == "reg-node"
    assert entry["Address"] == ADDRESS
    assert entry["NodeMeta"] == {"rack": "r1"}
    assert entry["ServiceID"] == "reg-redis-1"
    assert entry["ServiceTags"] == ["primary"]
    assert entry["ServicePort"] == 6379
    assert entry["ServiceAddress"] == "10.0.0.9"
    assert entry["ServiceMeta"] == {"version": "7"}
    assert entry["ModifyIndex"] >= entry["CreateIndex"] >= 1


def test_register_id_defaults_to_name(client):
    register(client, "default-id-node", service={"Service": "default-id"})

    _, node = client.catalog.node("default-id-node")

    assert list(node["Services"]) == ["default-id"]


def test_register_check_defaults_critical(client):
    register(client, "crit-node", service={"Service": "crit-svc"},
             check={"Name": "crit check", "ServiceID": "crit-svc"})

    _, checks = client.health.checks("crit-svc")

    assert [check["CheckID"] for check in checks] == ["crit check"]
    assert checks[0]["Status"] == "critical"
    assert checks[0]["ServiceName"] == "crit-svc"


def test_register_checks_list(cluster, client):
    body = {"Node": "multi-node", "Address": ADDRESS,
            "Checks": [{"CheckID": "disk", "Status": "passing"}, {"CheckID": "mem", "Status": "warning"}]}
    status, text, _ = call(cluster, "PUT", "/v1/catalog/register", body)

    _, checks = client.health.node("multi-node")

    assert (status, text) == (200, "true")
    assert {check["CheckID"]: check["Status"] for check in checks} == {"disk": "passing", "mem": "warning"}


def test_register_check_definition(cluster, client):
    body = {"Node": "def-node", "Address": ADDRESS,
            "Check": {"CheckID": "web-http", "Status": "passing",
                      "Definition": {"HTTP": "http://10.0.0.1/", "Interval": "5s", "Timeout": 1_000_000_000}}}
    status, _, _ = call(cluster, "PUT", "/v1/catalog/register", body)

    _, checks = client.health.node("def-node")

    assert status == 200
    assert checks[0]["Type"] == "http"
    assert checks[0]["Interval"] == "5s"
    assert checks[0]["Timeout"] == "1s"


def test_register_skip_node_update(cluster, client):
    register_with_meta(cluster, "skip-node", {"zone": "a"})
    assert client.catalog.register("skip-node", "", service={"Service": "skip-svc"}, skip_node_update=True) is True

    _, node = client.catalog.node("skip-node")

    assert node["Node"]["Address"] == ADDRESS
    assert node["Node"]["Meta"] == {"zone": "a"}
    assert list(node["Services"]) == ["skip-svc"]


def test_register_same_twice_keeps_index(client):
    service = {"Service": "same-svc", "Port": 80}
    register(client, "same-node", service=service)
    _, first = client.catalog.service("same-svc")
    register(client, "same-node", service=service)
    _, second = client.catalog.service("same-svc")

    assert second[0]["ModifyIndex"] == first[0]["ModifyIndex"]


def test_register_updates_service(client):
    register(client, "update-node", service={"Service": "update-svc", "Port": 80})
    register(client, "update-node", service={"Service": "update-svc", "Port": 81})

    _, entries = client.catalog.service("update-svc")

    assert [entry["ServicePort"] for entry in entries] == [81]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({"Address": ADDRESS}, "Must provide node", id="no-node"),
        pytest.param({"Node": "no-address"}, "Must provide address if SkipNodeUpdate is not set", id="no-address"),
        pytest.param({"Node": "n", "Address": ADDRESS, "Service": {"ID": "only-id"}},
                     "Must provide service name with ID", id="service-id-only"),
        pytest.param({"Node": "n", "Address": ADDRESS, "Service": {"Port": 80}},
                     "Must provide service name", id="service-unnamed"),
        pytest.param({"Node": "n", "Address": ADDRESS, "Service": {"Service": "s", "Address": "0.0.0.0"}},
                     "Invalid service address", id="service-any-address"),
        pytest.param({"Node": "n", "Address": ADDRESS, "ID": "not-a-uuid"}, "Bad node ID", id="node-id"),
        pytest.param({"Node": "n", "Address": ADDRESS, "Check": {"CheckID": "c", "ServiceID": "ghost"}},
                     'failed inserting check: Missing service registration on node "n"', id="check-no-service"),
        pytest.param({"Node": "n", "Address": ADDRESS, "Check": {"CheckID": "c", "Node": "other"}},
                     'check node "other" does not match node "n"', id="check-other-node"),
        pytest.param({"Node": "n", "Address": ADDRESS, "Check": {"CheckID": "c", "Status": "fine"}},
                     "Invalid check status", id="check-status"),
        pytest.param({"Node": "n", "Address": ADDRESS, "Check": {"Status": "passing"}},
                     "Must provide a CheckID or a Name", id="check-unnamed"),
        pytest.param({"Node": "n", "Address": ADDRESS, "Service": {"Service": "s", "Meta": {"bad key": "v"}}},
                     "Invalid Service Meta for node n and serviceID s: Couldn't load metadata pair ('bad key', 'v'): "
                     "Key contains invalid characters", id="service-meta"),
        pytest.param({"Node": "n", "Address": ADDRESS, "Service": {"Service": "s", "Weights": {"Passing": 0}}},
                     "Passing must be greater than 0", id="weights"),
        pytest.param({"Node": "n", "Address": ADDRESS, "Service": {"Service": "s", "Port": "80"}},
                     "Request decode failed: Service.Port: expected an integer", id="port-type"),
        pytest.param({"Node": "a/b", "Address": ADDRESS}, "Invalid node name 'a/b'", id="node-slash"),
    ],
)
def test_register_rejected(cluster, body, expected):
    status, text, _ = call(cluster, "PUT", "/v1/catalog/register", body)

    assert status == 400
    assert text.startswith(expected), text


def test_register_bad_json(cluster):
    status, text, _ = call(cluster, "PUT", "/v1/catalog/register", b"{not json")

    assert status == 400
    assert text.startswith("Request decode failed")


def test_register_other_datacenter(cluster):
    status, text, _ = call(cluster, "PUT", "/v1/catalog/register",
                           {"Node": "n", "Address": ADDRESS, "Datacenter": "elsewhere"})

    assert status == 500
    assert "No path to datacenter" in text


def test_register_rejected_writes_nothing(cluster, client):
    body = {"Node": "half-node", "Address": ADDRESS, "Service": {"Service": "half-svc"},
            "Check": {"CheckID": "c", "ServiceID": "ghost"}}
    status, _, _ = call(cluster, "PUT", "/v1/catalog/register", body)

    _, node = client.catalog.node("half-node")

    assert status == 400
    assert node is None


# Deregistration


def test_deregister_service(client):
    register(client, "dereg-svc-node", service={"Service": "dereg-svc"},
             check={"CheckID": "svc-check", "ServiceID": "dereg-svc", "Status": "passing"})
    register(client, "dereg-svc-node", check={"CheckID": "node-check", "Status": "passing"})

    assert client.catalog.deregister("dereg-svc-node", service_id="dereg-svc") is True
    _, node = client.catalog.node("dereg-svc-node")
    _, checks = client.health.node("dereg-svc-node")

    assert node["Services"] == {}
    assert [check["CheckID"] for check in checks] == ["node-check"]


def test_deregister_check(client):
    register(client, "dereg-check-node", check={"CheckID": "one", "Status": "passing"})
    register(client, "dereg-check-node", check={"CheckID": "two", "Status": "passing"})

    assert client.catalog.deregister("dereg-check-node", check_id="one") is True
    _, checks = client.health.node("dereg-check-node")

    assert [check["CheckID"] for check in checks] == ["two"]


def test_deregister_node(client):
    register(client, "dereg-node", service={"Service": "dereg-node-svc"},
             check={"CheckID": "c", "ServiceID": "dereg-node-svc", "Status": "passing"})

    assert client.catalog.deregister("dereg-node") is True
    _, node = client.catalog.node("dereg-node")
    _, entries = client.catalog.service("dereg-node-svc")
    _, checks = client.health.node("dereg-node")
    _, nodes = client.catalog.nodes()

    assert node is None
    assert entries == []
    assert checks == []
    assert "dereg-node" not in [entry["Node"] for entry in nodes]


def test_deregister_node_ends_sessions(client):
    register(client, "lock-node")
    session_id = client.session.create(node="lock-node", checks=[], lock_delay=0)
    assert client.kv.put("catalog-tests/lock", "held", acquire=session_id) is True

    assert client.catalog.deregister("lock-node") is True
    _, info = client.session.info(session_id)

    def released():
        _, entry = client.kv.get("catalog-tests/lock")
        return entry is not None and entry.get("Session") is None

    assert info is None
    wait_until(released, 10, "the lock of the deregistered node's session to be released")


def test_deregister_unknown_node(client):
    assert client.catalog.deregister("never-registered") is True


def test_deregister_requires_node(cluster):
    status, text, _ = call(cluster, "PUT", "/v1/catalog/deregister", {"ServiceID": "x"})

    assert status == 400
    assert text == "Must provide node"


# Catalog reads


def test_datacenters(client):
    assert client.catalog.datacenters() == ["dc1"]


def test_nodes_node_meta(cluster, client):
    register_with_meta(cluster, "meta-a", {"env": "prod", "rack": "1"})
    register_with_meta(cluster, "meta-b", {"env": "prod", "rack": "2"})

    _, both = client.catalog.nodes(node_meta={"env": "prod"})
    _, one = client.catalog.nodes(node_meta={"env": "prod", "rack": "2"})

    assert [node["Node"] for node in both] == ["meta-a", "meta-b"]
    assert [node["Node"] for node in one] == ["meta-b"]


def test_nodes_near_accepted(client):
    _, nodes = client.catalog.nodes(near="_agent")

    assert nodes != []


def test_services_node_meta(cluster, client):
    register_with_meta(cluster, "svc-meta-a", {"team": "x"}, Service={"Service": "svc-meta-x", "Tags": ["t1"]})
    register_with_meta(cluster, "svc-meta-b", {"team": "y"}, Service={"Service": "svc-meta-y"})

    _, services = client.catalog.services(node_meta={"team": "x"})
    _, everything = client.catalog.services()

    assert services == {"svc-meta-x": ["t1"]}
    assert "svc-meta-y" in everything


def test_service_tags_all_match(cluster, client):
    register(client, "tags-a", service={"Service": "tags-svc", "Tags": ["v1", "blue"]})
    register(client, "tags-b", service={"Service": "tags-svc", "Tags": ["v1", "green"]})

    _, both = client.catalog.service("tags-svc", tag="v1")
    status, text, _ = call(cluster, "GET", "/v1/catalog/service/tags-svc?tag=v1&tag=BLUE")

    assert [entry["Node"] for entry in both] == ["tags-a", "tags-b"]
    assert status == 200
    assert [entry["Node"] for entry in json.loads(text)] == ["tags-a"]


def test_service_node_meta(cluster, client):
    register_with_meta(cluster, "svcnm-a", {"az": "1"}, Service={"Service": "svcnm"})
    register_with_meta(cluster, "svcnm-b", {"az": "2"}, Service={"Service": "svcnm"})

    _, entries = client.catalog.service("svcnm", node_meta={"az": "2"})

    assert [entry["Node"] for entry in entries] == ["svcnm-b"]


def test_service_case_insensitive(client):
    register(client, "case-node", service={"Service": "CaseSvc"})

    _, entries = client.catalog.service("casesvc")

    assert [entry["ServiceName"] for entry in entries] == ["CaseSvc"]


def test_node_case_insensitive(client):
    register(client, "Mixed-Node")

    _, node = client.catalog.node("mixed-node")

    assert node["Node"]["Node"] == "Mixed-Node"


def test_node_services_list(cluster, client):
    register(client, "ns-node", service={"Service": "ns-a"})
    register(client, "ns-node", service={"Service": "ns-b"})

    status, text, _ = call(cluster, "GET", "/v1/catalog/node-services/ns-node")
    missing_status, missing, _ = call(cluster, "GET", "/v1/catalog/node-services/ns-missing")

    assert status == 200
    assert [service["ID"] for service in json.loads(text)["Services"]] == ["ns-a", "ns-b"]
    assert missing_status == 200
    assert json.loads(missing) == {"Node": None, "Services": None}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/catalog/service/", "Missing service name"),
        ("/v1/health/service/", "Missing service name"),
        ("/v1/catalog/node/", "Missing node name"),
        ("/v1/health/node/", "Missing node name"),
        ("/v1/health/state/", "Missing check state"),
    ],
)
def test_missing_name(cluster, path, expected):
    status, text, _ = call(cluster, "GET", path)

    assert status == 400
    assert text == expected


def test_filter_rejected(cluster):
    status, text, _ = call(cluster, "GET", "/v1/catalog/nodes?filter=Node%20%3D%3D%20x")

    assert status == 400
    assert "filter" in text


# Health reads


def test_health_passing_excludes_warning(client):
    register(client, "hp-ok", service={"Service": "hp-svc"},
             check={"CheckID": "c", "ServiceID": "hp-svc", "Status": "passing"})
    register(client, "hp-warn", service={"Service": "hp-svc"},
             check={"CheckID": "c", "ServiceID": "hp-svc", "Status": "warning"})

    _, passing = client.health.service("hp-svc", passing=True)
    _, everything = client.health.service("hp-svc")

    assert [entry["Node"]["Node"] for entry in passing] == ["hp-ok"]
    assert len(everything) == 2


def test_health_passing_counts_node_checks(client):
    register(client, "hn-node", service={"Service": "hn-svc"},
             check={"CheckID": "svc", "ServiceID": "hn-svc", "Status": "passing"})
    register(client, "hn-node", check={"CheckID": "node-down", "Status": "critical"})

    _, passing = client.health.service("hn-svc", passing=True)
    _, everything = client.health.service("hn-svc")

    assert passing == []
    assert {check["CheckID"] for check in everything[0]["Checks"]} == {"svc", "node-down"}


def test_health_passing_invalid(cluster):
    status, text, _ = call(cluster, "GET", "/v1/health/service/anything?passing=maybe")

    assert status == 400
    assert text == "Invalid value for ?passing"


def test_health_passing_false(cluster, client):
    register(client, "hpf-node", service={"Service": "hpf-svc"},
             check={"CheckID": "c", "ServiceID": "hpf-svc", "Status": "critical"})

    status, text, _ = call(cluster, "GET", "/v1/health/service/hpf-svc?passing=false")

    assert status == 200
    assert len(json.loads(text)) == 1


def test_health_service_tag_and_meta(cluster, client):
    register_with_meta(cluster, "htm-a", {"k": "1"}, Service={"Service": "htm", "Tags": ["x"]})
    register_with_meta(cluster, "htm-b", {"k": "2"}, Service={"Service": "htm", "Tags": ["x"]})
    register_with_meta(cluster, "htm-c", {"k": "2"}, Service={"Service": "htm", "Tags": ["y"]})

    _, entries = client.health.service("htm", tag="x", node_meta={"k": "2"})

    assert [entry["Node"]["Node"] for entry in entries] == ["htm-b"]


def test_health_checks_of_service(client):
    register(client, "hc-node", service={"Service": "hc-svc", "Tags": ["t"]},
             check={"CheckID": "hc-check", "ServiceID": "hc-svc", "Status": "passing"})
    register(client, "hc-node", check={"CheckID": "hc-node-check", "Status": "passing"})

    _, checks = client.health.checks("hc-svc")

    assert [check["CheckID"] for check in checks] == ["hc-check"]
    assert checks[0]["ServiceTags"] == ["t"]


def test_health_state(client):
    register(client, "hs-node", check={"CheckID": "hs-warn", "Status": "warning"})
    register(client, "hs-node", check={"CheckID": "hs-pass", "Status": "passing"})

    _, warning = client.health.state("warning")
    _, passing = client.health.state("passing")
    _, every = client.health.state("any")

    assert "hs-warn" in [check["CheckID"] for check in warning]
    assert "hs-pass" not in [check["CheckID"] for check in warning]
    assert "hs-pass" in [check["CheckID"] for check in passing]
    assert {"hs-warn", "hs-pass"} <= {check["CheckID"] for check in every}


def test_health_state_node_meta(cluster, client):
    register_with_meta(cluster, "hsm-a", {"tier": "db"}, Check={"CheckID": "hsm", "Status": "critical"})
    register_with_meta(cluster, "hsm-b", {"tier": "web"}, Check={"CheckID": "hsm", "Status": "critical"})

    _, checks = client.health.state("critical", node_meta={"tier": "db"})

    assert [check["Node"] for check in checks] == ["hsm-a"]


@pytest.mark.parametrize("state", ["unknown", "maintenance", "PASSING"])
def test_health_state_invalid(cluster, state):
    status, _, _ = call(cluster, "GET", f"/v1/health/state/{state}")

    assert status == 400


@pytest.mark.parametrize(
    "path",
    [
        "/v1/catalog/service/idx-none",
        "/v1/catalog/node/idx-none",
        "/v1/catalog/node-services/idx-none",
        "/v1/health/service/idx-none",
        "/v1/health/checks/idx-none",
        "/v1/health/node/idx-none",
        "/v1/health/state/critical",
    ],
)
def test_index_never_zero(cluster, path):
    status, _, headers = call(cluster, "GET", path)

    assert status == 200
    assert int(headers["X-Consul-Index"]) >= 1


# Blocking queries with per-service and per-node indexes


def test_blocking_ignores_other_service(client):
    register(client, "quiet-web", service={"Service": "quiet-web"})
    catalog_index, _ = client.catalog.service("quiet-web")
    health_index, _ = client.health.service("quiet-web")

    with ThreadPoolExecutor(max_workers=2) as pool:
        catalog_wait = pool.submit(timed, client.catalog.service, "quiet-web", index=catalog_index, wait="2s")
        health_wait = pool.submit(timed, client.health.service, "quiet-web", index=health_index, wait="2s")
        time.sleep(0.3)
        register(client, "quiet-db", service={"Service": "quiet-db"})
        register(client, "quiet-db", check={"CheckID": "db-check", "Status": "passing"})
        catalog_elapsed, (catalog_after, _) = catalog_wait.result()
        health_elapsed, (health_after, _) = health_wait.result()

    assert catalog_elapsed >= 1.9
    assert health_elapsed >= 1.9
    assert catalog_after == catalog_index
    assert health_after == health_index


def test_blocking_wakes_on_instance(client):
    register(client, "wake-a", service={"Service": "wake-svc"})
    index, _ = client.catalog.service("wake-svc")

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiter = pool.submit(timed, client.catalog.service, "wake-svc", index=index, wait="10s")
        time.sleep(0.3)
        register(client, "wake-b", service={"Service": "wake-svc"})
        elapsed, (after, entries) = waiter.result()

    assert elapsed < 5
    assert int(after) > int(index)
    assert len(entries) == 2


def test_blocking_wakes_on_service_check(client):
    register(client, "wc-node", service={"Service": "wc-svc"},
             check={"CheckID": "wc", "ServiceID": "wc-svc", "Status": "passing"})
    index, _ = client.health.service("wc-svc")

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiter = pool.submit(timed, client.health.service, "wc-svc", index=index, wait="10s")
        time.sleep(0.3)
        register(client, "wc-node", check={"CheckID": "wc", "ServiceID": "wc-svc", "Status": "critical"})
        elapsed, (after, entries) = waiter.result()

    assert elapsed < 5
    assert int(after) > int(index)
    assert entries[0]["Checks"][0]["Status"] == "critical"


def test_blocking_wakes_on_node_check(client):
    register(client, "wn-node", service={"Service": "wn-svc"})
    index, _ = client.health.service("wn-svc")

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiter = pool.submit(timed, client.health.service, "wn-svc", index=index, wait="10s")
        time.sleep(0.3)
        register(client, "wn-node", check={"CheckID": "serfHealth", "Status": "critical"})
        elapsed, (after, _) = waiter.result()

    assert elapsed < 5
    assert int(after) > int(index)


def test_blocking_wakes_on_deregister(client):
    register(client, "wd-a", service={"Service": "wd-svc"})
    register(client, "wd-b", service={"Service": "wd-svc"})
    index, _ = client.catalog.service("wd-svc")

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiter = pool.submit(timed, client.catalog.service, "wd-svc", index=index, wait="10s")
        time.sleep(0.3)
        assert client.catalog.deregister("wd-b") is True
        elapsed, (after, entries) = waiter.result()

    assert elapsed < 5
    assert int(after) > int(index)
    assert [entry["Node"] for entry in entries] == ["wd-a"]


def test_blocking_wakes_on_last_instance_gone(client):
    register(client, "wl-node", service={"Service": "wl-svc"})
    index, _ = client.health.service("wl-svc")

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiter = pool.submit(timed, client.health.service, "wl-svc", index=index, wait="10s")
        time.sleep(0.3)
        assert client.catalog.deregister("wl-node", service_id="wl-svc") is True
        elapsed, (after, entries) = waiter.result()

    assert elapsed < 5
    assert int(after) > int(index)
    assert entries == []


def test_blocking_node_ignores_other_node(client):
    register(client, "bn-quiet")
    index, _ = client.catalog.node("bn-quiet")

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiter = pool.submit(timed, client.health.node, "bn-quiet", index=index, wait="1s")
        time.sleep(0.2)
        register(client, "bn-busy", check={"CheckID": "c", "Status": "passing"})
        elapsed, (after, _) = waiter.result()

    assert elapsed >= 0.9
    assert after == index


def test_blocking_node_wakes(client):
    register(client, "bnw-node")
    index, _ = client.health.node("bnw-node")

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiter = pool.submit(timed, client.health.node, "bnw-node", index=index, wait="10s")
        time.sleep(0.3)
        register(client, "bnw-node", check={"CheckID": "c", "Status": "passing"})
        elapsed, (after, checks) = waiter.result()

    assert elapsed < 5
    assert int(after) > int(index)
    assert [check["CheckID"] for check in checks] == ["c"]


# The index itself, on a State in the test's event loop


@pytest.fixture
async def indexed(tmp_path: Path):
    """A started State on a SQLite store, with a CatalogIndex following it."""
    store = SQLiteStore(tmp_path / "catalog.db")
    await store.open()
    state = State(store)
    await state.start()
    index = CatalogIndex(state.view)
    index.start()
    yield state, index
    index.stop()
    await state.stop()
    await store.close()


def _service(node: str, service_id: str, name: str) -> Service:
    return Service(node=node, id=service_id, name=name, address="", port=80)


async def test_index_moves_on_delete(indexed):
    state, index = indexed
    node = Node("n1", ADDRESS, "dc1")
    await state.register_catalog_entry(node, _service("n1", "web-1", "web"), [])
    registered = index.service_index("web")

    await state.deregister_service("n1", "web-1")

    assert index.service_index("web") > registered


async def test_index_other_service_still(indexed):
    state, index = indexed
    node = Node("n1", ADDRESS, "dc1")
    await state.register_catalog_entry(node, _service("n1", "web-1", "web"), [])
    before = index.service_index("web")

    await state.register_catalog_entry(node, _service("n1", "db-1", "db"), [])

    assert index.service_index("web") == before


async def test_index_rename_moves_both(indexed):
    state, index = indexed
    node = Node("n1", ADDRESS, "dc1")
    await state.register_catalog_entry(node, _service("n1", "svc-1", "old-name"), [])
    old_before = index.service_index("old-name")

    await state.register_catalog_entry(node, _service("n1", "svc-1", "new-name"), [])

    assert index.service_index("old-name") > old_before
    assert index.service_index("new-name") > old_before


async def test_index_node_check_moves_services(indexed):
    state, index = indexed
    node = Node("n1", ADDRESS, "dc1")
    await state.register_catalog_entry(node, _service("n1", "web-1", "web"), [])
    before = index.service_index("web")
    node_check = Check(node="n1", id="serfHealth", name="Serf", status=CheckStatus.PASSING)

    await state.register_catalog_entry(node, None, [node_check])

    assert index.service_index("web") > before
    assert index.node_index("n1") > before


async def test_index_never_backwards_after_restart(tmp_path: Path):
    store = SQLiteStore(tmp_path / "restart.db")
    await store.open()
    state = State(store)
    await state.start()
    index = CatalogIndex(state.view)
    index.start()
    node = Node("n1", ADDRESS, "dc1")
    await state.register_catalog_entry(node, _service("n1", "web-1", "web"), [])
    await state.register_catalog_entry(node, _service("n1", "web-2", "web"), [])
    await state.deregister_service("n1", "web-2")
    seen = index.service_index("web")
    index.stop()
    await state.stop()
    await store.close()

    store = SQLiteStore(tmp_path / "restart.db")
    await store.open()
    state = State(store)
    await state.start()
    index = CatalogIndex(state.view)
    index.start()
    after_restart = index.service_index("web")
    index.stop()
    await state.stop()
    await store.close()

    assert after_restart >= seen
