"""Tests for the HTTP API over real HTTP on 127.0.0.1, against a whole DevCluster.

Each test starts its own DevCluster (SQLite store, job scheduler, DNS, HTTP
and an agent) in the test's event loop. The KV, catalog and health tests
use the real py-consul client. py-consul is synchronous, so its calls run
in worker threads through asyncio.to_thread while the loop serves them.
The jobs tests run examples/hello_web.py as real task processes.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import consul
import psutil
import pytest
import yarl
from devcluster import start_on_free_ports

from corral.api.kv import MAX_VALUE_SIZE
from corral.dev import DevCluster, DevConfig

HOST = "127.0.0.1"
NODE = "api-test"
DATACENTER = "dc1"
AGENT_MEMORY_MB = 1024
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
GREETING_KEY = "config/hello-web/greeting"
GREETING = "Hello from the API tests"
WAIT_TIMEOUT = 15.0


def live_group_members(pgid: int) -> list[psutil.Process]:
    """Return the live processes of process group `pgid`. Zombies do not count."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def task_process_groups(cluster: DevCluster) -> set[int]:
    """Return the process group of every task that has started a process.

    The agent starts each task as the leader of its own process group, so
    the group id is the task's PID.
    """
    return {task.pid for task in cluster.state.tasks() if task.pid is not None}


async def wait_for(check: Callable[[], Awaitable[Any]], description: str, timeout: float = WAIT_TIMEOUT) -> Any:
    """Poll `check` until it returns a true value, and return that value."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {description}")
        await asyncio.sleep(0.05)


def hello_web_job(
    name: str = "hello-web",
    count: int = 2,
    check_path: str = "/healthz",
    memory: int = 64,
    with_service: bool = True,
) -> dict[str, Any]:
    """Return the JSON form of a job that runs examples/hello_web.py."""
    job: dict[str, Any] = {
        "name": name,
        "type": "service",
        "count": count,
        "task": {
            # The interpreter running the tests, so that the job does not depend on PATH.
            "command": sys.executable,
            "args": ["hello_web.py"],
            "workdir": str(EXAMPLES_DIR),
            "ports": ["http"],
            "resources": {"cpus": 0.1, "memory": memory},
            "env": {"GREETING": {"key": GREETING_KEY}},
        },
    }
    if with_service:
        job["service"] = {
            "name": name,
            "port": "http",
            "tags": ["v1"],
            "check": {"http": check_path, "interval": "200ms", "timeout": "1s"},
        }
    return job


class Api:
    """A started DevCluster with a raw HTTP session and a py-consul client on it."""

    def __init__(self, cluster: DevCluster, session: aiohttp.ClientSession):
        self.cluster = cluster
        self.session = session
        self.port = cluster.config.http_port
        self.base = f"http://{HOST}:{self.port}"
        self.consul = consul.Consul(host=HOST, port=self.port)
        # Never route 127.0.0.1 through a proxy named in the environment.
        self.consul.http.session.trust_env = False

    def url(self, path: str) -> yarl.URL:
        """Return the URL of `path` exactly as written, without normalizing '..' or '//'."""
        return yarl.URL(self.base + path, encoded=True)

    async def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a synchronous py-consul call in a worker thread."""
        return await asyncio.to_thread(function, *args, **kwargs)

    async def get_json(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.url(path)) as response:
            return response.status, await response.json()

    async def put_job(self, job: dict[str, Any]) -> tuple[int, Any]:
        async with self.session.put(self.url("/v1/jobs"), json=job) as response:
            return response.status, await response.json()

    async def put_kv(self, key: str, value: bytes) -> tuple[int, str]:
        async with self.session.put(self.url(f"/v1/kv/{key}"), data=value) as response:
            return response.status, await response.text()

    async def kv_keys(self) -> list[str]:
        """Return every stored KV key."""
        _, keys = await self.call(self.consul.kv.get, "", keys=True)
        return keys

    async def all_tasks_ended(self) -> bool:
        _, tasks = await self.get_json("/v1/tasks")
        return all(task["State"] in ("KILLED", "FINISHED", "FAILED", "ERROR", "LOST") for task in tasks)

    async def run_job(self, job: dict[str, Any]) -> None:
        """Store the greeting, submit `job` and wait until every instance passes its check."""
        await self.call(self.consul.kv.put, GREETING_KEY, GREETING)
        status, body = await self.put_job(job)
        assert status == 200, body

        async def all_passing() -> bool:
            _, entries = await self.call(self.consul.health.service, job["name"], passing=True)
            return len(entries) == job["count"]

        await wait_for(all_passing, f"{job['count']} passing instances of {job['name']}")


@pytest.fixture
async def start_api(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    """Start DevClusters on free ports, stop each at teardown and check that no task process is left."""
    started: list[Api] = []

    async def start(**overrides: Any) -> Api:
        settings: dict[str, Any] = {"memory": AGENT_MEMORY_MB, "cpus": 4.0}
        settings.update(overrides)
        def make_cluster(http_port: int, dns_port: int) -> DevCluster:
            return DevCluster(DevConfig(
                data_dir=tmp_path / f"cluster-{len(started)}",
                http_host=HOST,
                http_port=http_port,
                dns_host=HOST,
                dns_port=dns_port,
                node=NODE,
                datacenter=DATACENTER,
                **settings,
            ))

        cluster = await start_on_free_ports(make_cluster)
        session = aiohttp.ClientSession()
        api = Api(cluster, session)
        started.append(api)
        return api

    yield start

    leaked = []
    for api in started:
        groups = task_process_groups(api.cluster)
        await api.cluster.stop()
        await api.session.close()
        api.consul.http.session.close()
        leaked += [group for group in groups if live_group_members(group)]
    assert leaked == [], f"task process groups outlived their cluster: {leaked}"


@pytest.fixture
async def api(start_api: Callable[..., Awaitable[Api]]) -> Api:
    return await start_api()


@pytest.fixture
async def hello_web(api: Api) -> Api:
    """A cluster running two passing instances of the hello-web job."""
    await api.run_job(hello_web_job())
    return api


# KV through py-consul


async def test_kv_put_get_delete(api: Api):
    kv = api.consul.kv

    assert await api.call(kv.put, "app/name", "corral") is True
    _, entry = await api.call(kv.get, "app/name")
    assert entry["Key"] == "app/name"
    assert entry["Value"] == b"corral"

    assert await api.call(kv.delete, "app/name") is True
    _, entry = await api.call(kv.get, "app/name")
    assert entry is None


async def test_kv_get_missing_key(api: Api):
    index, entry = await api.call(api.consul.kv.get, "no/such/key")

    assert entry is None
    assert int(index) >= 1


async def test_kv_put_overwrites(api: Api):
    kv = api.consul.kv
    await api.call(kv.put, "app/color", "red")
    _, first = await api.call(kv.get, "app/color")

    await api.call(kv.put, "app/color", "blue")
    _, second = await api.call(kv.get, "app/color")

    assert second["Value"] == b"blue"
    assert second["CreateIndex"] == first["CreateIndex"]
    assert second["ModifyIndex"] > first["ModifyIndex"]


async def test_kv_binary_value(api: Api):
    value = bytes(range(256))
    await api.call(api.consul.kv.put, "blob", value)

    _, entry = await api.call(api.consul.kv.get, "blob")

    assert entry["Value"] == value


async def test_kv_special_characters(api: Api):
    keys = ["with space", "ünï/cødé", "a%2Fb", "q?x=1", "hash#frag", "plus+sign", "tab\tkey", "emoji😀"]
    for key in keys:
        assert await api.call(api.consul.kv.put, key, key)

    for key in keys:
        _, entry = await api.call(api.consul.kv.get, key)
        assert entry["Key"] == key
        assert entry["Value"] == key.encode()
    assert await api.kv_keys() == sorted(keys)


async def test_kv_other_datacenter(api: Api):
    with pytest.raises(consul.ConsulException, match="No path to datacenter"):
        await api.call(api.consul.kv.put, "key", "x", dc="elsewhere")
    with pytest.raises(consul.ConsulException, match="No path to datacenter"):
        await api.call(api.consul.kv.get, "key", dc="elsewhere")

    assert await api.kv_keys() == []


async def test_kv_recurse_raw_prefix(api: Api):
    kv = api.consul.kv
    for key in ("foo", "foo-test/x", "foo/bar", "fop", "bar/foo"):
        await api.call(kv.put, key, key)

    _, entries = await api.call(kv.get, "foo", recurse=True)

    assert [entry["Key"] for entry in entries] == ["foo", "foo-test/x", "foo/bar"]
    assert [entry["Value"] for entry in entries] == [b"foo", b"foo-test/x", b"foo/bar"]


async def test_kv_recurse_missing_prefix(api: Api):
    await api.call(api.consul.kv.put, "present/a", "1")

    _, entries = await api.call(api.consul.kv.get, "absent/", recurse=True)

    assert entries is None


async def test_kv_delete_recurse(api: Api):
    kv = api.consul.kv
    for key in ("dir/a", "dir/b/c", "dirt"):
        await api.call(kv.put, key, "x")

    assert await api.call(kv.delete, "dir/", recurse=True) is True

    assert await api.kv_keys() == ["dirt"]


async def test_kv_keys_separator(api: Api):
    kv = api.consul.kv
    for key in ("a/b/c", "a/b/d", "a/e", "a/f/g", "ab"):
        await api.call(kv.put, key, "x")

    _, cut = await api.call(kv.get, "a/", keys=True, separator="/")
    _, every = await api.call(kv.get, "a/", keys=True)

    assert cut == ["a/b/", "a/e", "a/f/"]
    assert every == ["a/b/c", "a/b/d", "a/e", "a/f/g"]


async def test_kv_keys_empty(api: Api):
    _, root = await api.call(api.consul.kv.get, "", keys=True)
    _, prefix = await api.call(api.consul.kv.get, "nothing/", keys=True)

    assert root == []
    assert prefix is None


async def test_kv_flags(api: Api):
    await api.call(api.consul.kv.put, "flagged", "x", flags=42)
    await api.call(api.consul.kv.put, "largest", "x", flags=2**64 - 1)

    _, flagged = await api.call(api.consul.kv.get, "flagged")
    _, largest = await api.call(api.consul.kv.get, "largest")

    assert flagged["Flags"] == 42
    assert largest["Flags"] == 2**64 - 1


async def test_kv_cas(api: Api):
    kv = api.consul.kv

    assert await api.call(kv.put, "lock", "first", cas=0) is True
    assert await api.call(kv.put, "lock", "second", cas=0) is False
    _, entry = await api.call(kv.get, "lock")
    assert entry["Value"] == b"first"

    stale_index = entry["ModifyIndex"] + 1000
    assert await api.call(kv.put, "lock", "third", cas=stale_index) is False
    assert await api.call(kv.put, "lock", "fourth", cas=entry["ModifyIndex"]) is True
    _, entry = await api.call(kv.get, "lock")
    assert entry["Value"] == b"fourth"


async def test_kv_delete_cas(api: Api):
    kv = api.consul.kv
    await api.call(kv.put, "lease", "x")
    _, entry = await api.call(kv.get, "lease")

    assert await api.call(kv.delete, "lease", cas=entry["ModifyIndex"] + 1000) is False
    _, entry_after_miss = await api.call(kv.get, "lease")
    assert entry_after_miss["Value"] == b"x"

    assert await api.call(kv.delete, "lease", cas=entry["ModifyIndex"]) is True
    _, deleted = await api.call(kv.get, "lease")
    assert deleted is None


async def test_kv_empty_value(api: Api):
    await api.call(api.consul.kv.put, "empty", "")
    await api.call(api.consul.kv.put, "folder/", None)

    _, empty = await api.call(api.consul.kv.get, "empty")
    _, folder = await api.call(api.consul.kv.get, "folder/")

    assert empty["Value"] is None
    assert folder["Value"] is None


async def test_kv_blocking_get_wakes(api: Api):
    kv = api.consul.kv
    await api.call(kv.put, "watched", "before")
    index, _ = await api.call(kv.get, "watched")

    started = time.monotonic()
    waiter = asyncio.create_task(api.call(kv.get, "watched", index=index, wait="10s"))
    await asyncio.sleep(0.3)
    assert not waiter.done()
    await api.call(kv.put, "watched", "after")
    new_index, entry = await waiter

    assert entry["Value"] == b"after"
    assert int(new_index) > int(index)
    assert time.monotonic() - started < 5.0


async def test_kv_blocking_get_ignores_siblings(api: Api):
    kv = api.consul.kv
    await api.call(kv.put, "watched", "x")
    index, _ = await api.call(kv.get, "watched")

    waiter = asyncio.create_task(api.call(kv.get, "watched", index=index, wait="1s"))
    await asyncio.sleep(0.2)
    await api.call(kv.put, "watched-sibling", "y")
    new_index, entry = await waiter

    assert new_index == index
    assert entry["Value"] == b"x"


async def test_kv_blocking_get_times_out(api: Api):
    await api.call(api.consul.kv.put, "quiet", "x")
    index, _ = await api.call(api.consul.kv.get, "quiet")

    started = time.monotonic()
    new_index, entry = await api.call(api.consul.kv.get, "quiet", index=index, wait="1s")
    elapsed = time.monotonic() - started

    assert new_index == index
    assert entry["Value"] == b"x"
    assert elapsed >= 0.9
    # The wait gets up to wait/16 of jitter, and the rest is slack for a slow machine.
    assert elapsed < 3.0


async def test_kv_blocking_get_wakes_on_delete(api: Api):
    kv = api.consul.kv
    await api.call(kv.put, "doomed", "x")
    index, _ = await api.call(kv.get, "doomed")

    waiter = asyncio.create_task(api.call(kv.get, "doomed", index=index, wait="10s"))
    await asyncio.sleep(0.2)
    await api.call(kv.delete, "doomed")
    new_index, entry = await waiter

    assert entry is None
    assert int(new_index) > int(index)


async def test_kv_index_after_delete(api: Api):
    kv = api.consul.kv
    await api.call(kv.put, "tree/a", "1")
    await api.call(kv.put, "tree/b", "2")
    before, _ = await api.call(kv.get, "tree/", recurse=True)

    # tree/b has the highest ModifyIndex in the prefix, so only its tombstone keeps the index from going back.
    await api.call(kv.delete, "tree/b")
    after, entries = await api.call(kv.get, "tree/", recurse=True)
    _, missing = await api.call(kv.get, "tree/b")

    assert [entry["Key"] for entry in entries] == ["tree/a"]
    assert int(after) > int(before)
    assert missing is None


async def test_index_header_never_zero(api: Api):
    paths = [
        "/v1/kv/missing",
        "/v1/kv/?recurse",
        "/v1/kv/?keys",
        "/v1/catalog/services",
        "/v1/catalog/service/missing",
        "/v1/catalog/nodes",
        "/v1/health/service/missing",
        "/v1/health/state/any",
        "/v1/jobs",
        "/v1/tasks",
    ]
    for path in paths:
        async with api.session.get(api.url(path)) as response:
            index = response.headers.get("X-Consul-Index", "")
        assert index.isdigit(), f"{path}: X-Consul-Index is {index!r}"
        assert int(index) >= 1, f"{path}: X-Consul-Index is {index}"


async def test_kv_raw(api: Api):
    await api.call(api.consul.kv.put, "page", "<script>alert(1)</script>")

    async with api.session.get(api.url("/v1/kv/page?raw")) as response:
        body = await response.read()
        headers = response.headers

    assert body == b"<script>alert(1)</script>"
    assert headers["Content-Type"].startswith("text/plain")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Security-Policy"] == "sandbox"


async def test_kv_json_base64(api: Api):
    await api.call(api.consul.kv.put, "plain", "value")

    status, entries = await api.get_json("/v1/kv/plain")

    assert status == 200
    assert entries[0]["Value"] == base64.b64encode(b"value").decode()
    assert set(entries[0]) >= {"CreateIndex", "ModifyIndex", "LockIndex", "Key", "Flags", "Value"}


# Bad KV input


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/kv//leading", "must not start with '/'"),
        ("/v1/kv/%2Fleading", "must not start with '/'"),
        ("/v1/kv/a/../b", "'..' are not allowed"),
        ("/v1/kv/a/%2E%2E/b", "'..' are not allowed"),
        ("/v1/kv/..", "'..' are not allowed"),
        ("/v1/kv/a//b", "empty segments"),
        ("/v1/kv/a%2F%2Fb", "empty segments"),
        ("/v1/kv/", "Missing key name"),
    ],
    ids=["slash", "encoded-slash", "dotdot", "encoded-dotdot", "only-dotdot", "empty", "encoded-empty", "no-key"],
)
async def test_kv_bad_key(api: Api, path: str, expected: str):
    await api.call(api.consul.kv.put, "b", "kept")

    async with api.session.put(api.url(path), data=b"x") as response:
        status = response.status
        message = await response.text()

    _, entry = await api.call(api.consul.kv.get, "b")

    assert status == 400
    assert expected in message
    assert await api.kv_keys() == ["b"]
    assert entry["Value"] == b"kept"


async def test_kv_bad_key_get(api: Api):
    async with api.session.get(api.url("/v1/kv/a/../b")) as get_response:
        get_status = get_response.status
    async with api.session.delete(api.url("/v1/kv/a//b")) as delete_response:
        delete_status = delete_response.status

    assert get_status == 400
    assert delete_status == 400


async def test_kv_value_at_limit(api: Api):
    value = os.urandom(MAX_VALUE_SIZE)

    status, body = await api.put_kv("big", value)
    _, entry = await api.call(api.consul.kv.get, "big")

    assert status == 200
    assert body == "true"
    assert len(entry["Value"]) == MAX_VALUE_SIZE
    assert entry["Value"] == value


async def test_kv_value_too_large(api: Api):
    await api.call(api.consul.kv.put, "big", "original")

    status, message = await api.put_kv("big", b"x" * (MAX_VALUE_SIZE + 1))
    _, entry = await api.call(api.consul.kv.get, "big")

    assert status == 413
    assert "too large" in message
    assert entry["Value"] == b"original"


async def test_kv_value_chunked(api: Api):
    """A body without Content-Length, sent in several chunks, is stored whole."""

    async def chunks() -> AsyncIterator[bytes]:
        for byte in b"abc":
            yield bytes([byte]) * 100_000
            await asyncio.sleep(0.01)

    async with api.session.put(api.url("/v1/kv/chunked"), data=chunks()) as response:
        status = response.status
    _, entry = await api.call(api.consul.kv.get, "chunked")

    assert status == 200
    assert entry["Value"] == b"a" * 100_000 + b"b" * 100_000 + b"c" * 100_000


async def test_kv_value_chunked_too_large(api: Api):
    await api.call(api.consul.kv.put, "big", "original")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(6):
            yield b"x" * 100_000
            await asyncio.sleep(0.01)

    async with api.session.put(api.url("/v1/kv/big"), data=chunks()) as response:
        status = response.status
    _, entry = await api.call(api.consul.kv.get, "big")

    assert status == 413
    assert entry["Value"] == b"original"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("index=abc", "Invalid index"),
        ("index=-1", "Invalid index"),
        ("index=18446744073709551616", "Invalid index"),
        ("index=1&wait=soon", "Invalid wait time"),
        ("index=1&wait=-1s", "Invalid wait time"),
        ("index=1&wait=10", "Invalid wait time"),
    ],
)
async def test_kv_bad_blocking_params(api: Api, query: str, expected: str):
    await api.call(api.consul.kv.put, "key", "x")

    async with api.session.get(api.url(f"/v1/kv/key?{query}")) as response:
        status = response.status
        message = await response.text()

    assert status == 400
    assert message == expected


@pytest.mark.parametrize("query", ["flags=-1", "flags=abc", "cas=abc", "cas=-5"])
async def test_kv_bad_write_params(api: Api, query: str):
    await api.call(api.consul.kv.put, "key", "original")

    async with api.session.put(api.url(f"/v1/kv/key?{query}"), data=b"changed") as response:
        status = response.status
    _, entry = await api.call(api.consul.kv.get, "key")

    assert status == 400
    assert entry["Value"] == b"original"


# Catalog, health, agent and status


async def test_catalog_services(hello_web: Api):
    _, services = await hello_web.call(hello_web.consul.catalog.services)

    assert services == {"hello-web": ["v1"]}


async def test_catalog_service_fields(hello_web: Api):
    _, entries = await hello_web.call(hello_web.consul.catalog.service, "hello-web")
    _, tasks = await hello_web.get_json("/v1/tasks")
    ports = {task["ID"]: task["Ports"]["http"] for task in tasks}

    assert len(entries) == 2
    for entry in entries:
        assert entry["ServiceName"] == "hello-web"
        assert entry["ServiceID"] in ports
        assert entry["ServicePort"] == ports[entry["ServiceID"]]
        assert entry["ServiceAddress"] == HOST
        assert entry["ServiceTags"] == ["v1"]
        assert entry["Node"] == NODE
        assert entry["Address"] == HOST
        assert entry["Datacenter"] == DATACENTER
        assert entry["ModifyIndex"] >= entry["CreateIndex"] >= 1


async def test_catalog_service_case_insensitive(hello_web: Api):
    _, catalog_entries = await hello_web.call(hello_web.consul.catalog.service, "HELLO-Web")
    _, health_entries = await hello_web.call(hello_web.consul.health.service, "Hello-WEB", passing=True)

    assert len(catalog_entries) == 2
    assert len(health_entries) == 2


async def test_catalog_service_tag(hello_web: Api):
    catalog = hello_web.consul.catalog
    _, tagged = await hello_web.call(catalog.service, "hello-web", tag="v1")
    _, other = await hello_web.call(catalog.service, "hello-web", tag="v2")

    assert len(tagged) == 2
    assert other == []


async def test_catalog_service_unknown(hello_web: Api):
    _, entries = await hello_web.call(hello_web.consul.catalog.service, "no-such-service")

    assert entries == []


async def test_catalog_nodes(hello_web: Api):
    _, nodes = await hello_web.call(hello_web.consul.catalog.nodes)

    assert [node["Node"] for node in nodes] == [NODE]
    assert nodes[0]["Address"] == HOST


async def test_health_service_passing(hello_web: Api):
    _, entries = await hello_web.call(hello_web.consul.health.service, "hello-web", passing=True)
    _, tasks = await hello_web.get_json("/v1/tasks")
    ports = {task["ID"]: task["Ports"]["http"] for task in tasks}

    assert len(entries) == 2
    for entry in entries:
        service = entry["Service"]
        assert service["Service"] == "hello-web"
        assert service["Port"] == ports[service["ID"]]
        assert service["Tags"] == ["v1"]
        assert entry["Node"]["Node"] == NODE
        assert entry["Node"]["Address"] == HOST
        check_ids = {check["CheckID"] for check in entry["Checks"]}
        assert check_ids == {"serfHealth", f"service:{service['ID']}"}
        assert {check["Status"] for check in entry["Checks"]} == {"passing"}


async def test_health_service_filters_critical(hello_web: Api):
    # hello_web.py returns 404 for /missing, so this job's check stays critical.
    await hello_web.call(hello_web.consul.kv.put, GREETING_KEY, GREETING)
    status, _ = await hello_web.put_job(hello_web_job("broken-web", count=1, check_path="/missing"))
    assert status == 200
    health = hello_web.consul.health

    async def critical_entry() -> list[dict[str, Any]]:
        _, entries = await hello_web.call(health.service, "broken-web")
        return [
            entry
            for entry in entries
            for check in entry["Checks"]
            if check["CheckID"].startswith("service:") and "404" in check["Output"]
        ]

    entries = await wait_for(critical_entry, "a broken-web check that ran and failed")
    _, passing = await hello_web.call(health.service, "broken-web", passing=True)

    service_checks = [check for check in entries[0]["Checks"] if check["CheckID"].startswith("service:")]
    assert service_checks[0]["Status"] == "critical"
    assert passing == []


async def test_health_service_tag(hello_web: Api):
    health = hello_web.consul.health
    _, tagged = await hello_web.call(health.service, "hello-web", tag="v1")
    _, upper = await hello_web.call(health.service, "hello-web", tag="V1")
    _, other = await hello_web.call(health.service, "hello-web", tag="v2")

    assert len(tagged) == 2
    assert len(upper) == 2
    assert other == []


async def test_health_service_bad_passing(hello_web: Api):
    async with hello_web.session.get(hello_web.url("/v1/health/service/hello-web?passing=maybe")) as response:
        status = response.status

    assert status == 400


async def test_health_blocking_wakes_on_stop(hello_web: Api):
    health = hello_web.consul.health
    index, _ = await hello_web.call(health.service, "hello-web")

    waiter = asyncio.create_task(hello_web.call(health.service, "hello-web", index=index, wait="10s"))
    await asyncio.sleep(0.2)
    async with hello_web.session.delete(hello_web.url("/v1/jobs/hello-web")) as response:
        assert response.status == 200
    new_index, _ = await waiter
    await wait_for(hello_web.all_tasks_ended, "both hello-web tasks to end")

    assert int(new_index) > int(index)


async def test_agent_self(api: Api):
    info = await api.call(api.consul.agent.self)

    assert info["Config"]["Datacenter"] == DATACENTER
    assert info["Config"]["NodeName"] == NODE
    assert info["Member"]["Addr"] == HOST


async def test_status_leader(api: Api):
    leader = await api.call(api.consul.status.leader)
    peers = await api.call(api.consul.status.peers)

    assert leader == f"{HOST}:{api.port}"
    assert peers == [leader]


async def test_catalog_other_datacenter(api: Api):
    async with api.session.get(api.url("/v1/catalog/services?dc=elsewhere")) as response:
        status = response.status
        message = await response.text()

    assert status == 500
    assert "No path to datacenter" in message


# Jobs and tasks


async def test_jobs_list(hello_web: Api):
    status, jobs = await hello_web.get_json("/v1/jobs")

    assert status == 200
    assert [job["Name"] for job in jobs] == ["hello-web"]
    assert jobs[0]["Summary"] == {"Desired": 2, "Running": 2, "Passing": 2}


async def test_job_get(hello_web: Api):
    status, job = await hello_web.get_json("/v1/jobs/hello-web")

    assert status == 200
    assert job["Name"] == "hello-web"
    assert job["Version"] == 1
    assert job["Count"] == 2
    assert job["Stopped"] is False
    assert job["Unplaced"] == {}
    assert job["Spec"]["task"]["workdir"] == str(EXAMPLES_DIR)
    assert len(job["Tasks"]) == 2


async def test_job_get_unknown(api: Api):
    status, body = await api.get_json("/v1/jobs/no-such-job")

    assert status == 404
    assert "no-such-job" in body["error"]


async def test_job_resubmit_same(hello_web: Api):
    status, body = await hello_web.put_job(hello_web_job())

    assert status == 200
    assert body["Version"] == 1


async def test_tasks_fields(hello_web: Api):
    status, tasks = await hello_web.get_json("/v1/tasks")

    assert status == 200
    assert len(tasks) == 2
    assert sorted(task["Instance"] for task in tasks) == [0, 1]
    for task in tasks:
        assert task["ID"].startswith("hello-web.")
        assert task["Job"] == "hello-web"
        assert task["State"] == "RUNNING"
        assert task["Node"] == NODE
        assert task["Health"] == "passing"
        assert set(task["Ports"]) == {"http"}
        assert psutil.pid_exists(task["PID"])


async def test_task_serves_greeting(hello_web: Api):
    _, tasks = await hello_web.get_json("/v1/tasks?job=hello-web")

    for task in tasks:
        url = f"http://{HOST}:{task['Ports']['http']}/"
        async with hello_web.session.get(url) as response:
            body = await response.text()
        assert body == f"{GREETING}\n"


async def test_task_get(hello_web: Api):
    _, tasks = await hello_web.get_json("/v1/tasks")

    status, task = await hello_web.get_json(f"/v1/tasks/{tasks[0]['ID']}")
    missing_status, _ = await hello_web.get_json("/v1/tasks/no-such-task")

    assert status == 200
    assert task["ID"] == tasks[0]["ID"]
    assert missing_status == 404


async def test_job_delete(hello_web: Api):
    _, tasks = await hello_web.get_json("/v1/tasks")
    groups = [task["PID"] for task in tasks]

    async with hello_web.session.delete(hello_web.url("/v1/jobs/hello-web")) as response:
        status = response.status
        body = await response.json()

    async def all_killed() -> bool:
        _, current = await hello_web.get_json("/v1/tasks")
        return len(current) == 2 and all(task["State"] == "KILLED" for task in current)

    await wait_for(all_killed, "both hello-web tasks to end KILLED")
    _, services = await hello_web.call(hello_web.consul.catalog.services)
    _, entries = await hello_web.call(hello_web.consul.catalog.service, "hello-web")
    _, job = await hello_web.get_json("/v1/jobs/hello-web")

    assert status == 200
    assert body["Stopped"] is True
    assert "hello-web" not in services
    assert entries == []
    assert job["Stopped"] is True
    assert job["Summary"]["Running"] == 0
    for group in groups:
        assert live_group_members(group) == []


async def test_job_delete_unknown(api: Api):
    async with api.session.delete(api.url("/v1/jobs/no-such-job")) as response:
        status = response.status
        body = await response.json()

    assert status == 404
    assert "no-such-job" in body["error"]


def _with(job: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    change(job)
    return job


BAD_JOBS = {
    "unknown-field": (lambda job: job.update(colour="red"), "colour"),
    "negative-count": (lambda job: job.update(count=-1), "count"),
    "string-count": (lambda job: job.update(count="3"), "count"),
    "missing-command": (lambda job: job["task"].pop("command"), "task.command"),
    "relative-workdir": (lambda job: job["task"].update(workdir="examples"), "task.workdir"),
    "memory-over-total": (
        lambda job: job["task"]["resources"].update(memory=AGENT_MEMORY_MB + 1),
        "task.resources.memory",
    ),
    "unknown-port": (lambda job: job["service"].update(port="grpc"), "service.port"),
}


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
async def test_job_bad_spec(api: Api, case: str):
    change, field = BAD_JOBS[case]
    status, _ = await api.put_job(hello_web_job(count=0))
    assert status == 200
    _, before = await api.get_json("/v1/jobs/hello-web")

    status, body = await api.put_job(_with(hello_web_job(count=1), change))
    _, after = await api.get_json("/v1/jobs/hello-web")

    assert status == 400
    assert field in [problem["field"] for problem in body["problems"]]
    assert field in body["error"]
    assert after["Version"] == before["Version"]
    assert after["Spec"] == before["Spec"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"name": "hello-web",', "malformed JSON"),
        (b"", "empty body"),
        (b"[1, 2]", "expected a table"),
    ],
    ids=["truncated", "empty", "array"],
)
async def test_job_bad_body(api: Api, raw: bytes, expected: str):
    status, _ = await api.put_job(hello_web_job(count=0))
    assert status == 200
    _, before = await api.get_json("/v1/jobs/hello-web")

    async with api.session.put(api.url("/v1/jobs"), data=raw) as response:
        status = response.status
        body = await response.json()
    _, after = await api.get_json("/v1/jobs/hello-web")

    assert status == 400
    assert expected in body["error"]
    assert after["Version"] == before["Version"]
    assert after["Spec"] == before["Spec"]


async def test_job_unplaced_memory(start_api: Callable[..., Awaitable[Api]]):
    api = await start_api(memory=200)
    job = hello_web_job("filler", count=3, memory=100, with_service=False)
    job["task"].pop("env")
    status, _ = await api.put_job(job)
    assert status == 200

    async def two_running() -> dict[str, Any] | None:
        _, current = await api.get_json("/v1/jobs/filler")
        return current if current["Summary"]["Running"] == 2 and current["Unplaced"] else None

    job_status = await wait_for(two_running, "two running instances of filler and one unplaced")
    _, tasks = await api.get_json("/v1/tasks?job=filler")

    assert list(job_status["Unplaced"]) == ["2"]
    assert "memory" in job_status["Unplaced"]["2"]
    assert "0 MB free of 100 MB" in job_status["Unplaced"]["2"]
    assert len(tasks) == 2


async def test_cluster_stop_kills_tasks(hello_web: Api):
    groups = task_process_groups(hello_web.cluster)
    assert len(groups) == 2

    await hello_web.cluster.stop()

    for group in groups:
        assert live_group_members(group) == []
    assert {task.state.value for task in hello_web.cluster.state.tasks()} == {"KILLED"}


# JobScheduler._run and View.wait_for_change once waited with asyncio.wait_for. On
# Python 3.11, wait_for returns the inner result and drops the CancelledError when
# the awaited future finished in the same loop iteration as the cancel, so the loop
# ran on and stop() waited forever. They now use asyncio.timeout, which keeps it.


async def _stops_within(stop: Awaitable[None], loop_task: asyncio.Task | None, timeout: float) -> bool:
    """Run `stop` and return whether it finished within `timeout` seconds.

    A loop task that survived its cancel is cancelled again until it ends,
    so that the cluster can still be stopped at teardown.
    """
    stopping = asyncio.ensure_future(stop)
    done, _ = await asyncio.wait({stopping}, timeout=timeout)
    while loop_task is not None and not loop_task.done():
        loop_task.cancel()
        await asyncio.sleep(0.01)
    await stopping
    return bool(done)


async def test_scheduler_stop_after_wakeup(api: Api):
    scheduler = api.cluster.scheduler
    await asyncio.sleep(0.05)
    loop_task = scheduler._task

    # A write under jobs/, tasks/ or agents/ sets this event. The stop() below then
    # arrives after Event.wait() has returned but before wait_for has seen it.
    scheduler._wakeup.set()
    await asyncio.sleep(0)

    assert await _stops_within(scheduler.stop(), loop_task, timeout=1.0)


async def test_agent_stop_after_wakeup(api: Api):
    agent = api.cluster.agent
    view = api.cluster.state.view
    await asyncio.sleep(0.05)
    loop_task = agent._loop_task

    # Resolve the agent's waiter, as View.apply does for a write under tasks/.
    for _, future in view._waiters:
        if not future.done():
            future.set_result(None)

    assert await _stops_within(agent.stop(), loop_task, timeout=1.0)
