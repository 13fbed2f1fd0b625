"""Edge cases of the Consul-compatible API where corral differed from Consul or broke.

Most tests drive one real `corral dev` process, shared by the module, over
HTTP on 127.0.0.1 with urllib, aiohttp and py-consul. Each test uses its
own keys, nodes and services, so the tests do not see each other's data.
The rest run a real State on SQLite in the test's event loop. The DNS tests
add a real DNSServer queried by dnspython, and one of them stores a port
that the HTTP API rejects. The session tests there need a large keyspace,
or a session that ended while no SessionManager ran.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import consul
import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from corral.dns.config import parse_recursor
from corral.dns.server import DNSConfig, DNSServer
from corral.state import State, records
from corral.state.records import KVEntry, Node, Service
from corral.state.sessions import SessionManager, parse_session_request
from corral.store import Delete, Put, SQLiteStore
from devcluster import DevProcess

HOST = "127.0.0.1"
DEV_NODE = "test-node"


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevProcess]:
    folder = tmp_path_factory.mktemp("consul-edges")
    process = DevProcess(folder / "data", folder / "corral.log")
    process.start()
    yield process
    assert process.stop() == 0, process.log()


class HttpResponse:
    """One HTTP response: status, headers and body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def call(dev: DevProcess, method: str, path: str, body: bytes | str | dict | list | None = None) -> HttpResponse:
    """Send one request to the dev process and return its response, error statuses included."""
    data: bytes | None
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = body
    request = urllib.request.Request(f"http://{dev.http_addr}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return HttpResponse(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        with error:
            return HttpResponse(error.code, dict(error.headers), error.read())


def kv_keys(dev: DevProcess, prefix: str = "") -> list[str]:
    reply = call(dev, "GET", f"/v1/kv/{prefix}?keys")
    if reply.status == 404:
        return []
    assert reply.status == 200, reply.text
    return reply.json()


def session_ids(dev: DevProcess) -> set[str]:
    reply = call(dev, "GET", "/v1/session/list")
    assert reply.status == 200, reply.text
    return {session["ID"] for session in reply.json()}


def create_session(dev: DevProcess, body: dict[str, Any] | None = None) -> str:
    reply = call(dev, "PUT", "/v1/session/create", body or {"LockDelay": "0s"})
    assert reply.status == 200, reply.text
    return reply.json()["ID"]


# Sessions


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/session/list?dc=other"),
        ("GET", f"/v1/session/node/{DEV_NODE}?dc=other"),
        ("GET", "/v1/session/info/{id}?dc=other"),
        ("PUT", "/v1/session/renew/{id}?dc=other"),
        ("PUT", "/v1/session/destroy/{id}?dc=other"),
        ("PUT", "/v1/session/create?dc=other"),
    ],
)
def test_session_other_datacenter(dev: DevProcess, method: str, path: str):
    session_id = create_session(dev)
    before = session_ids(dev)
    body = {"LockDelay": "0s"} if path.startswith("/v1/session/create") else None

    reply = call(dev, method, path.format(id=session_id), body)

    assert reply.status == 500, reply.text
    assert "No path to datacenter" in reply.text
    assert "'other'" in reply.text
    assert session_ids(dev) == before
    call(dev, "PUT", f"/v1/session/destroy/{session_id}")


def test_session_null_checks_drop_default(dev: DevProcess):
    # An external node has no serfHealth check, so only a session without checks can be made on it.
    registered = call(dev, "PUT", "/v1/catalog/register", {"Node": "edges-external", "Address": "10.20.0.1"})
    assert registered.status == 200, registered.text

    # Consul drops its default serfHealth check whenever the body names Checks, even as null.
    reply = call(dev, "PUT", "/v1/session/create", {"Node": "edges-external", "Checks": None})

    assert reply.status == 200, reply.text
    info = call(dev, "GET", f"/v1/session/info/{reply.json()['ID']}").json()
    assert info[0]["Checks"] == []
    assert info[0]["Node"] == "edges-external"
    call(dev, "PUT", f"/v1/session/destroy/{reply.json()['ID']}")


def test_session_absent_checks_keep_default(dev: DevProcess):
    session_id = create_session(dev, {"Name": "edges-default-checks"})

    info = call(dev, "GET", f"/v1/session/info/{session_id}").json()

    assert info[0]["Checks"] == ["serfHealth"]
    call(dev, "PUT", f"/v1/session/destroy/{session_id}")


async def test_session_create_during_check_churn(dev: DevProcess):
    # Heartbeat checks often change their output on every update. Creating a session that
    # names such a check must not fail because the output changed during the write.
    base = f"http://{dev.http_addr}"

    def heartbeat(output: str) -> dict[str, Any]:
        check = {"CheckID": "heartbeat", "Name": "heartbeat", "Status": "passing", "Output": output}
        return {"Node": "edges-busy", "Address": "10.20.0.9", "Check": check}

    async with aiohttp.ClientSession() as client:
        async with client.put(f"{base}/v1/catalog/register", json=heartbeat("0")) as response:
            assert response.status == 200
        stop = asyncio.Event()

        async def churn() -> int:
            writes = 0
            while not stop.is_set() and writes < 500:
                writes += 1
                async with client.put(f"{base}/v1/catalog/register", json=heartbeat(str(writes))) as response:
                    assert response.status == 200
            return writes

        async def create() -> tuple[int, str]:
            body = {"Node": "edges-busy", "Checks": ["heartbeat"], "LockDelay": "0s"}
            async with client.put(f"{base}/v1/session/create", json=body) as response:
                return response.status, await response.text()

        churners = [asyncio.create_task(churn()) for _ in range(4)]
        try:
            results = []
            for _ in range(8):
                results += await asyncio.wait_for(asyncio.gather(*(create() for _ in range(10))), 30)
        finally:
            stop.set()
            writes = sum(await asyncio.gather(*churners))

        failed = [text for status, text in results if status != 200]
        assert failed == []
        assert writes > 0
        for _, text in results:
            async with client.put(f"{base}/v1/session/destroy/{json.loads(text)['ID']}") as response:
                assert response.status == 200


def test_session_critical_check_refused(dev: DevProcess):
    check = {"CheckID": "down", "Name": "down", "Status": "critical"}
    body = {"Node": "edges-down", "Address": "10.20.0.8", "Check": check}
    registered = call(dev, "PUT", "/v1/catalog/register", body)
    assert registered.status == 200, registered.text
    before = session_ids(dev)

    reply = call(dev, "PUT", "/v1/session/create", {"Node": "edges-down", "Checks": ["down"]})

    assert reply.status == 500
    assert reply.text == "Check 'down' is in critical state"
    assert session_ids(dev) == before


def test_session_node_case_insensitive(dev: DevProcess):
    registered = call(dev, "PUT", "/v1/catalog/register", {"Node": "Edges-Mixed", "Address": "10.20.0.7"})
    assert registered.status == 200, registered.text

    reply = call(dev, "PUT", "/v1/session/create", {"Node": "edges-mixed", "Checks": []})

    assert reply.status == 200, reply.text
    session_id = reply.json()["ID"]
    info = call(dev, "GET", f"/v1/session/info/{session_id}").json()
    assert info[0]["Node"] == "Edges-Mixed"
    listed = call(dev, "GET", "/v1/session/node/EDGES-MIXED").json()
    assert [session["ID"] for session in listed] == [session_id]

    # Deregistering the node ends its sessions, whatever spelling created them.
    assert call(dev, "PUT", "/v1/catalog/deregister", {"Node": "Edges-Mixed"}).status == 200
    assert call(dev, "GET", f"/v1/session/info/{session_id}").json() == []


@pytest.mark.parametrize("flag", ["acquire", "release"])
def test_lock_empty_session(dev: DevProcess, flag: str):
    key = f"edges/lock-empty-{flag}"
    assert call(dev, "PUT", f"/v1/kv/{key}", "before").status == 200

    reply = call(dev, "PUT", f"/v1/kv/{key}?{flag}=", "after")

    # Consul's lock and unlock both fail with this text before looking at the key.
    assert reply.status == 500, reply.text
    assert reply.text == "missing session"
    assert call(dev, "GET", f"/v1/kv/{key}?raw").body == b"before"


def test_lock_unknown_session_keeps_value(dev: DevProcess):
    key = "edges/lock-unknown"
    assert call(dev, "PUT", f"/v1/kv/{key}", "before").status == 200

    reply = call(dev, "PUT", f"/v1/kv/{key}?acquire=no-such-session", "after")

    assert reply.status == 500
    assert reply.text == 'invalid session "no-such-session"'
    assert call(dev, "GET", f"/v1/kv/{key}?raw").body == b"before"


# Query parameters


@pytest.mark.parametrize("query", ["cas=", "cas=%C2%B2", "cas=%D9%A1", "flags=", "flags=%D9%A1%D9%A2", "flags=%C2%B2"])
def test_kv_put_bad_number_keeps_value(dev: DevProcess, query: str):
    # Go's ParseUint takes ASCII digits only, and Consul fails a ?cas or ?flags that is
    # present but empty, so none of these may write.
    key = "edges/bad-number"
    assert call(dev, "PUT", f"/v1/kv/{key}", "before").status == 200

    reply = call(dev, "PUT", f"/v1/kv/{key}?{query}", "after")

    assert reply.status == 400, reply.text
    assert reply.text.startswith("Invalid ")
    assert call(dev, "GET", f"/v1/kv/{key}?raw").body == b"before"


@pytest.mark.parametrize("query", ["cas=", "cas=%C2%B2"])
def test_kv_delete_bad_cas_keeps_key(dev: DevProcess, query: str):
    key = "edges/bad-delete"
    assert call(dev, "PUT", f"/v1/kv/{key}", "kept").status == 200

    reply = call(dev, "DELETE", f"/v1/kv/{key}?{query}")

    assert reply.status == 400, reply.text
    assert call(dev, "GET", f"/v1/kv/{key}?raw").body == b"kept"


@pytest.mark.parametrize("query", ["index=%C2%B2", "index=%D9%A1"])
def test_blocking_non_ascii_index(dev: DevProcess, query: str):
    reply = call(dev, "GET", f"/v1/kv/edges/x?{query}")

    assert reply.status == 400, reply.text
    assert reply.text == "Invalid index"


def test_blocking_empty_index_ignored(dev: DevProcess):
    # Consul reads ?index only when it has a value, so an empty one is a plain read.
    assert call(dev, "PUT", "/v1/kv/edges/empty-index", "1").status == 200

    reply = call(dev, "GET", "/v1/kv/edges/empty-index?index=")

    assert reply.status == 200, reply.text


@pytest.mark.parametrize("text", ["127.0.0.1:\u00b2", "127.0.0.1:\u0661\u0662"])
def test_dns_recursor_non_ascii_port(text: str):
    with pytest.raises(ValueError, match="invalid recursor port"):
        parse_recursor(text)


# str.isdigit() accepts a superscript digit, which int() then rejects: the port must be ASCII.
def test_agent_check_non_ascii_port(dev: DevProcess):
    body = {"Name": "edges-tcp", "TCP": "localhost:\u00b2", "Interval": "10s"}

    reply = call(dev, "PUT", "/v1/agent/check/register", body)

    assert reply.status == 400, reply.text


# Blocking queries


def test_blocking_zero_wait_blocks(dev: DevProcess):
    key = "edges/zero-wait"
    assert call(dev, "PUT", f"/v1/kv/{key}", "1").status == 200
    index = int(call(dev, "GET", f"/v1/kv/{key}").headers["X-Consul-Index"])
    writer = threading.Timer(1.0, call, (dev, "PUT", f"/v1/kv/{key}", "2"))
    started = time.monotonic()
    writer.start()
    try:
        # Consul reads wait=0s as its default wait, so this waits for the write.
        reply = call(dev, "GET", f"/v1/kv/{key}?index={index}&wait=0s")
    finally:
        writer.join()
    elapsed = time.monotonic() - started

    assert reply.status == 200
    assert elapsed >= 0.8
    assert int(reply.headers["X-Consul-Index"]) > index
    assert reply.json()[0]["Value"] == "Mg=="


@pytest.mark.parametrize(
    "path",
    [
        "/v1/kv/edges/x?stale&consistent",
        "/v1/session/list?stale&consistent",
        "/v1/catalog/services?consistent&stale",
        "/v1/health/service/web?stale&consistent",
        "/v1/health/state/any?stale&consistent",
        "/v1/catalog/nodes?stale&consistent",
    ],
)
def test_blocking_stale_and_consistent(dev: DevProcess, path: str):
    reply = call(dev, "GET", path)

    assert reply.status == 400
    assert reply.text == "Cannot specify ?stale with ?consistent, conflicting semantics."


def test_event_list_ignores_consistency(dev: DevProcess):
    # Consul's event list reads only ?wait and ?index, not the consistency modes.
    reply = call(dev, "GET", "/v1/event/list?stale&consistent")

    assert reply.status == 200, reply.text


# Transactions


def kv_set(key: str, value: str = "eA==") -> dict[str, Any]:
    return {"KV": {"Verb": "set", "Key": key, "Value": value}}


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("/edges-lead", "must not start with '/'"),
        ("edges//double", "empty segments"),
        ("edges/../up", "'..'"),
        ("edges/nul\x00byte", "NUL"),
    ],
)
def test_txn_rejects_bad_key(dev: DevProcess, key: str, problem: str):
    # The same keys that /v1/kv rejects, since a key written here could not be read there.
    reply = call(dev, "PUT", "/v1/txn", [kv_set("edges/txn-good"), kv_set(key)])

    assert reply.status == 400, reply.text
    assert "operation 1" in reply.text
    assert problem in reply.text
    assert json.dumps(key)[1:-1] in reply.text or repr(key) in reply.text
    assert "edges/txn-good" not in kv_keys(dev, "edges/txn-good")


def test_txn_bad_key_kv_rejects_too(dev: DevProcess):
    reply = call(dev, "PUT", "/v1/kv/edges//double", "x")

    assert reply.status == 400


@pytest.mark.parametrize("verb", ["get", "get-tree", "check-not-exists", "delete", "delete-tree"])
def test_txn_bad_key_every_verb(dev: DevProcess, verb: str):
    reply = call(dev, "PUT", "/v1/txn", [{"KV": {"Verb": verb, "Key": "edges//x"}}])

    assert reply.status == 400, reply.text
    assert "empty segments" in reply.text


def test_txn_trailing_slash_key(dev: DevProcess):
    # A trailing '/' is allowed, as in /v1/kv: keys like "folder/" are common in Consul.
    reply = call(dev, "PUT", "/v1/txn", [kv_set("edges/folder/")])

    assert reply.status == 200, reply.text
    assert "edges/folder/" in kv_keys(dev, "edges/folder/")


def test_txn_delete_tree_root_allowed(dev: DevProcess):
    # Only delete-tree may name the empty prefix; it is checked without the key rules.
    reply = call(dev, "PUT", "/v1/txn", [{"KV": {"Verb": "get-tree", "Key": ""}}])

    assert reply.status == 400
    assert "missing Key" in reply.text


def test_txn_set_unchanged_keeps_index(dev: DevProcess):
    key = "edges/txn-unchanged"
    first = call(dev, "PUT", "/v1/txn", [{"KV": {"Verb": "set", "Key": key, "Value": "eA==", "Flags": 3}}])
    assert first.status == 200, first.text
    stored = first.json()["Results"][0]["KV"]

    again = call(dev, "PUT", "/v1/txn", [{"KV": {"Verb": "set", "Key": key, "Value": "eA==", "Flags": 3}}])

    # Consul skips a set that changes nothing, so no index moves and no watcher wakes.
    assert again.status == 200, again.text
    result = again.json()["Results"][0]["KV"]
    assert result["ModifyIndex"] == stored["ModifyIndex"]
    assert result["CreateIndex"] == stored["CreateIndex"]
    assert call(dev, "GET", f"/v1/kv/{key}").json()[0]["ModifyIndex"] == stored["ModifyIndex"]


def test_txn_set_changed_flags_writes(dev: DevProcess):
    key = "edges/txn-flags"
    first = call(dev, "PUT", "/v1/txn", [{"KV": {"Verb": "set", "Key": key, "Value": "eA==", "Flags": 3}}])
    stored = first.json()["Results"][0]["KV"]

    again = call(dev, "PUT", "/v1/txn", [{"KV": {"Verb": "set", "Key": key, "Value": "eA==", "Flags": 4}}])

    result = again.json()["Results"][0]["KV"]
    assert result["ModifyIndex"] > stored["ModifyIndex"]
    assert call(dev, "GET", f"/v1/kv/{key}").json()[0]["Flags"] == 4


def test_txn_set_clears_lock_index(dev: DevProcess):
    key = "edges/txn-lock-index"
    session_id = create_session(dev)
    assert call(dev, "PUT", f"/v1/kv/{key}?acquire={session_id}", "held").json() is True
    assert call(dev, "PUT", f"/v1/kv/{key}?release={session_id}", "held").json() is True

    reply = call(dev, "PUT", "/v1/txn", [kv_set(key)])

    # Consul's set takes LockIndex from the request, which has none, as a PUT to /v1/kv does.
    assert reply.status == 200, reply.text
    assert reply.json()["Results"][0]["KV"]["LockIndex"] == 0
    assert call(dev, "GET", f"/v1/kv/{key}").json()[0]["LockIndex"] == 0
    call(dev, "PUT", f"/v1/session/destroy/{session_id}")


def test_txn_set_keeps_lock_holder(dev: DevProcess):
    key = "edges/txn-holder"
    session_id = create_session(dev)
    assert call(dev, "PUT", f"/v1/kv/{key}?acquire={session_id}", "held").json() is True

    reply = call(dev, "PUT", "/v1/txn", [kv_set(key)])

    assert reply.status == 200, reply.text
    entry = call(dev, "GET", f"/v1/kv/{key}").json()[0]
    assert entry["Session"] == session_id
    assert entry["Value"] == "eA=="
    call(dev, "PUT", f"/v1/session/destroy/{session_id}")


# Catalog


def test_catalog_register_other_datacenter(dev: DevProcess):
    body = {"Node": "edges-dc-query", "Address": "10.20.0.4"}

    reply = call(dev, "PUT", "/v1/catalog/register?dc=other", body)

    # Consul takes the datacenter from ?dc when the body names none, and has no path to it.
    assert reply.status == 500, reply.text
    assert "No path to datacenter" in reply.text
    assert call(dev, "GET", "/v1/catalog/node/edges-dc-query").json() is None


def test_catalog_deregister_other_datacenter(dev: DevProcess):
    body = {"Node": "edges-dc-kept", "Address": "10.20.0.5"}
    assert call(dev, "PUT", "/v1/catalog/register", body).status == 200

    reply = call(dev, "PUT", "/v1/catalog/deregister?dc=other", {"Node": "edges-dc-kept"})

    assert reply.status == 500, reply.text
    assert "No path to datacenter" in reply.text
    assert call(dev, "GET", "/v1/catalog/node/edges-dc-kept").json()["Node"]["Node"] == "edges-dc-kept"


def test_catalog_register_body_datacenter_wins(dev: DevProcess):
    body = {"Datacenter": "dc1", "Node": "edges-dc-body", "Address": "10.20.0.6"}

    reply = call(dev, "PUT", "/v1/catalog/register?dc=other", body)

    assert reply.status == 200, reply.text
    assert call(dev, "GET", "/v1/catalog/node/edges-dc-body").json()["Node"]["Node"] == "edges-dc-body"


@pytest.mark.parametrize("port", [-1, 65536, 70000])
def test_catalog_register_port_range(dev: DevProcess, port: int):
    node = f"edges-port-{abs(port)}"
    body = {"Node": node, "Address": "10.20.0.2", "Service": {"Service": "edges-port", "Port": port}}

    reply = call(dev, "PUT", "/v1/catalog/register", body)

    assert reply.status == 400, reply.text
    assert str(port) in reply.text
    assert "0 to 65535" in reply.text
    assert call(dev, "GET", f"/v1/catalog/node/{node}").json() is None


def test_catalog_register_port_bounds(dev: DevProcess):
    for port in (0, 65535):
        service = {"Service": "edges-bound", "Port": port}
        body = {"Node": f"edges-bound-{port}", "Address": "10.20.0.3", "Service": service}
        reply = call(dev, "PUT", "/v1/catalog/register", body)
        assert reply.status == 200, reply.text

    ports = sorted(entry["ServicePort"] for entry in call(dev, "GET", "/v1/catalog/service/edges-bound").json())

    assert ports == [0, 65535]


# KV deletes and agent routes


# Consul's delete-cas of a key that does not exist returns true whatever the index.
def test_kv_delete_cas_missing_key(dev: DevProcess):
    reply = call(dev, "DELETE", "/v1/kv/edges/never-written?cas=5")

    assert reply.status == 200
    assert reply.json() is True


def test_kv_put_unchanged_keeps_index(dev: DevProcess):
    key = "edges/unchanged"
    assert call(dev, "PUT", f"/v1/kv/{key}?flags=7", "same").status == 200
    first = call(dev, "GET", f"/v1/kv/{key}").json()[0]["ModifyIndex"]

    assert call(dev, "PUT", f"/v1/kv/{key}?flags=7", "same").status == 200
    second = call(dev, "GET", f"/v1/kv/{key}").json()[0]["ModifyIndex"]

    assert second == first


# The GET route for one service also matches the paths of register and deregister, which
# Consul routes to PUT-only endpoints, so a GET there is 405, not 404.
@pytest.mark.parametrize("path", ["/v1/agent/service/register", "/v1/agent/service/deregister/x"])
def test_agent_service_wrong_method(dev: DevProcess, path: str):
    reply = call(dev, "GET", path)

    assert reply.status == 405


# py-consul, as a user would call it


def test_py_consul_session_other_datacenter(dev: DevProcess):
    host, port = dev.http_addr.split(":")
    client = consul.Consul(host=host, port=int(port))
    try:
        with pytest.raises(consul.ConsulException, match="No path to datacenter"):
            client.session.list(dc="other")
    finally:
        client.http.session.close()


# DNS


@pytest.fixture
async def catalog_state(tmp_path: Path) -> AsyncIterator[State]:
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    state = State(store)
    await state.start()
    yield state
    await state.stop()
    await store.close()


async def test_dns_srv_skips_bad_port(catalog_state: State):
    # A port outside 0-65535 stored before registration checked it must not break the
    # lookup of the service's other instances.
    await catalog_state.register_node(Node("edges-dns", "10.30.0.1", "dc1"))
    await catalog_state.register_service(Service(node="edges-dns", id="good", name="api", address="", port=8080))
    bad = Service(node="edges-dns", id="bad", name="api", address="10.30.0.9", port=70000)
    await catalog_state.register_service(bad)
    server = DNSServer(catalog_state, HOST, 0, DNSConfig())
    await server.start()
    try:
        query = dns.message.make_query("api.service.consul", dns.rdatatype.SRV)
        response = await dns.asyncquery.udp(query, HOST, port=server.address[1], timeout=2.0)
    finally:
        await server.stop()

    assert response.rcode() == dns.rcode.NOERROR
    ports = [record.port for rrset in response.answer for record in rrset]
    assert ports == [8080]


async def test_dns_srv_hostname_node_target(catalog_state: State):
    # An external node registered with a hostname: RFC 2782 forbids an SRV target that is
    # an alias, and the node's own DNS name is a CNAME to that hostname, so the hostname
    # itself is the target, as in Consul.
    await catalog_state.register_node(Node("edges-rds", "db.example.com", "dc1"))
    await catalog_state.register_service(Service(node="edges-rds", id="pg", name="pg", address="", port=5432))
    server = DNSServer(catalog_state, HOST, 0, DNSConfig())
    await server.start()
    try:
        query = dns.message.make_query("pg.service.consul", dns.rdatatype.SRV)
        response = await dns.asyncquery.udp(query, HOST, port=server.address[1], timeout=2.0)
    finally:
        await server.stop()

    assert response.rcode() == dns.rcode.NOERROR
    targets = [record.target.to_text() for rrset in response.answer for record in rrset]
    assert targets == ["db.example.com."]
    ports = [record.port for rrset in response.answer for record in rrset]
    assert ports == [5432]
    assert response.additional == []


# Sessions in a large keyspace


async def test_session_destroy_large_keyspace(catalog_state: State):
    # Ending a session must not decode every KV entry. With 40,000 keys that scan took over
    # 0.2 s of blocked event loop per destroy, so 20 destroys took several seconds.
    state = catalog_state
    for chunk in range(40):
        puts = [
            Put(records.kv_key(f"bulk/{chunk}/{i}"), KVEntry(f"bulk/{chunk}/{i}", b"x").encode())
            for i in range(1000)
        ]
        await state._commit([], puts)
    await state.register_node(Node("edges-big", "10.40.0.1", "dc1"))
    manager = SessionManager(state)
    await manager.start()
    try:
        sessions = []
        for number in range(20):
            request = parse_session_request({"Checks": [], "LockDelay": "0s"}, "edges-big")
            session = await manager.create(request)
            assert await state.kv_lock(f"bulk/0/{number}", b"held", 0, session.id, acquire=True)
            sessions.append(session)

        started = time.monotonic()
        for session in sessions:
            await manager.destroy(session.id)
        elapsed = time.monotonic() - started
    finally:
        await manager.stop()

    assert elapsed < 3.0
    for number in range(20):
        entry = state.kv_get(f"bulk/0/{number}")
        assert entry is not None
        assert entry.session == ""
        assert entry.lock_index == 1
    assert state.sessions() == []


async def test_session_expiry_releases_locks(catalog_state: State):
    # The index of lock holders also serves the path where the store deletes a session key.
    state = catalog_state
    await state.register_node(Node("edges-expiry", "10.40.0.2", "dc1"))
    manager = SessionManager(state)
    await manager.start()
    try:
        request = parse_session_request({"Checks": [], "LockDelay": "0s"}, "edges-expiry")
        session = await manager.create(request)
        assert await state.kv_lock("held/a", b"1", 0, session.id, acquire=True)
        assert await state.kv_lock("held/b", b"2", 0, session.id, acquire=True)

        # Deleting the session key directly is what a lease expiry does.
        await state._commit([], [Delete(records.session_key(session.id))])
        for _ in range(100):
            if not any(entry.session for entry in state.kv_list("held/")):
                break
            await asyncio.sleep(0.05)
    finally:
        await manager.stop()

    entries = state.kv_list("held/")
    assert [entry.session for entry in entries] == ["", ""]
    assert [entry.value for entry in entries] == [b"1", b"2"]


async def test_session_orphan_locks_released_at_start(catalog_state: State):
    # A session that ended while no manager ran leaves its locks held; the next start releases them.
    state = catalog_state
    await state.register_node(Node("edges-orphan", "10.40.0.3", "dc1"))
    first = SessionManager(state)
    await first.start()
    request = parse_session_request({"Checks": [], "LockDelay": "0s"}, "edges-orphan")
    session = await first.create(request)
    assert await state.kv_lock("orphan/a", b"1", 0, session.id, acquire=True)
    await first.stop()
    await state._commit([], [Delete(records.session_key(session.id))])
    assert state.kv_get("orphan/a").session == session.id

    second = SessionManager(state)
    await second.start()
    await second.stop()

    entry = state.kv_get("orphan/a")
    assert entry.session == ""
    assert entry.value == b"1"
    assert entry.lock_index == 1
