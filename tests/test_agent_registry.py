"""Tests for the agent's local registry and its probes, on a real State over SQLite.

The registry talks to the State through LocalConnection, as it does in
`corral dev`; checks probe real servers and processes on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psutil
import pytest
from aiohttp import web
from grpc_health.v1 import health, health_pb2_grpc

from corral.agent.checks import OUTPUT_MAX_SIZE, CheckResult, StatusThresholds, TTLTimer, grpc_check, script_check
from corral.agent.connection import LocalConnection
from corral.agent.registry import (
    CheckDefinition,
    CheckKind,
    CheckRequest,
    ConfigSource,
    LocalRegistry,
    LocalService,
    RegistryConfig,
    RegistryError,
    serf_health_check,
)
from corral.state import State
from corral.state.records import Check, Node, Service
from corral.store import SQLiteStore
from corral.types import CheckStatus
from devcluster import free_port

NODE = "node-a"
OTHER_NODE = "node-b"
HOST = "127.0.0.1"


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[State]:
    store = SQLiteStore(tmp_path / "corral.db")
    await store.open()
    state = State(store)
    await state.start()
    yield state
    await state.stop()
    await store.close()


async def make_registry(state: State, **settings) -> LocalRegistry:
    node = Node(NODE, HOST, "dc1")
    await state.register_node(node, [serf_health_check(NODE)])
    registry = LocalRegistry(LocalConnection(state), node, RegistryConfig(**settings))
    await registry.start()
    return registry


@pytest.fixture
async def registry(state: State) -> AsyncIterator[LocalRegistry]:
    registry = await make_registry(state)
    yield registry
    await registry.stop()


def ttl_check(check_id: str = "", status: CheckStatus | None = None, **fields) -> CheckRequest:
    return CheckRequest(CheckDefinition(CheckKind.TTL, ttl=30.0, **fields), id=check_id, status=status)


def catalog_service_ids(state: State, node: str = NODE) -> list[str]:
    return sorted(service.id for service in state.services(node))


def catalog_check_ids(state: State, node: str = NODE) -> list[str]:
    return sorted(check.id for check in state.checks(node))


# Anti-entropy


async def test_sync_writes_service_and_check(state: State, registry: LocalRegistry):
    await registry.add_service(LocalService("web-1", "web", HOST, 80, tags=["v1"]), [ttl_check()])

    await registry.sync()

    service = state.service(NODE, "web-1")
    # The agent adds lan_ipv4 and wan_ipv4 for an IP address, as Consul's agent does.
    tagged = {"lan_ipv4": {"Address": HOST, "Port": 80}, "wan_ipv4": {"Address": HOST, "Port": 80}}
    assert service == Service(NODE, "web-1", "web", HOST, 80, tags=["v1"], tagged_addresses=tagged)
    assert catalog_check_ids(state) == ["serfHealth", "service:web-1"]


async def test_sync_unchanged_moves_no_index(state: State, registry: LocalRegistry):
    await registry.add_service(LocalService("web-1", "web", HOST, 80), [ttl_check()])
    await registry.sync()
    index = state.health_index()

    await registry.sync()

    assert state.health_index() == index


async def test_sync_removes_unknown_service(state: State, registry: LocalRegistry):
    orphan = Service(NODE, "orphan", "orphan", HOST, 81)
    await state.register_service(orphan, [Check(NODE, "orphan-check", "c", CheckStatus.PASSING, service_id="orphan")])
    await state.register_node(Node(NODE, HOST, "dc1"), [Check(NODE, "stray", "stray", CheckStatus.PASSING)])

    await registry.sync()

    assert catalog_service_ids(state) == []
    assert catalog_check_ids(state) == ["serfHealth"]


async def test_sync_leaves_other_nodes(state: State, registry: LocalRegistry):
    await state.register_node(Node(OTHER_NODE, "10.0.0.2", "dc1"))
    await state.register_service(Service(OTHER_NODE, "external", "external", "10.0.0.2", 5432))

    await registry.sync()

    assert catalog_service_ids(state, OTHER_NODE) == ["external"]


async def test_sync_restores_deregistered_node(state: State, registry: LocalRegistry):
    await registry.add_service(LocalService("web-1", "web", HOST, 80))
    await registry.sync()
    await state.deregister_node(NODE)

    await registry.sync()

    assert state.node(NODE) == Node(NODE, HOST, "dc1")
    assert catalog_service_ids(state) == ["web-1"]
    assert catalog_check_ids(state) == ["serfHealth"]


async def test_sync_logs_one_line(state: State, registry: LocalRegistry, caplog):
    await registry.add_service(LocalService("web-1", "web", HOST, 80), [ttl_check()])

    with caplog.at_level(logging.INFO, logger="corral.agent.registry"):
        await registry.sync()

    lines = [record.getMessage() for record in caplog.records if "agent sync" in record.getMessage()]
    assert lines == [
        f"agent sync changed the catalog node={NODE} services_written=1 services_removed=0 "
        "checks_written=1 checks_removed=0"
    ]


async def test_periodic_sync_removes_orphan(state: State):
    registry = await make_registry(state, sync_interval=0.1)
    try:
        await state.register_service(Service(NODE, "orphan", "orphan", HOST, 81))
        deadline = time.monotonic() + 5
        while catalog_service_ids(state):
            assert time.monotonic() < deadline, "the periodic sync did not remove the orphan"
            await asyncio.sleep(0.05)
    finally:
        await registry.stop()


async def test_tag_override_keeps_catalog_tags(state: State, registry: LocalRegistry):
    await registry.add_service(LocalService("web-1", "web", HOST, 80, tags=["v1"], enable_tag_override=True))
    await registry.add_service(LocalService("db-1", "db", HOST, 81, tags=["v1"]))
    await registry.sync()
    await state.register_service(Service(NODE, "web-1", "web", HOST, 80, tags=["canary"]))
    await state.register_service(Service(NODE, "db-1", "db", HOST, 81, tags=["canary"]))

    await registry.sync()

    assert registry.service("web-1").tags == ["canary"]
    assert state.service(NODE, "web-1").tags == ["canary"]
    assert state.service(NODE, "db-1").tags == ["v1"]


# Registration rules


async def test_service_check_ids_numbered(registry: LocalRegistry):
    await registry.add_service(LocalService("web-1", "web"), [ttl_check(), ttl_check()])

    assert sorted(registry.checks) == ["service:web-1:1", "service:web-1:2"]
    assert registry.checks["service:web-1:1"].name == "Service 'web' check"


async def test_local_script_check_rejected(registry: LocalRegistry):
    script = CheckRequest(CheckDefinition(CheckKind.SCRIPT, interval=1.0, args=["true"]))
    service = LocalService("web-1", "web", source=ConfigSource.LOCAL)

    with pytest.raises(RegistryError, match="Scripts are disabled on this agent") as caught:
        await registry.add_service(service, [script])

    assert caught.value.status == 403
    assert registry.services == {}


async def test_remote_interval_raised_to_minimum(registry: LocalRegistry):
    fast = CheckRequest(CheckDefinition(CheckKind.TCP, interval=0.01, tcp=f"{HOST}:{free_port()}"), id="tcp")

    await registry.add_check(fast, ConfigSource.REMOTE)

    assert registry.checks["tcp"].definition.interval == 1.0


async def test_deregister_after_raised_to_minimum(registry: LocalRegistry):
    await registry.add_service(LocalService("web-1", "web"), [ttl_check(deregister_critical_after=5.0)])

    assert registry.checks["service:web-1"].definition.deregister_critical_after == 60.0


async def test_reap_removes_critical_service(state: State):
    registry = await make_registry(state, min_deregister_after=0.1, reap_interval=3600)
    try:
        await registry.add_service(LocalService("web-1", "web"), [ttl_check(deregister_critical_after=0.1)])
        await registry.add_service(LocalService("db-1", "db"), [ttl_check()])
        await registry.reap()
        kept_at_first = sorted(registry.services)
        await asyncio.sleep(0.2)

        await registry.reap()
        await registry.sync()
    finally:
        await registry.stop()

    assert kept_at_first == ["db-1", "web-1"]
    assert sorted(registry.services) == ["db-1"]
    assert catalog_service_ids(state) == ["db-1"]


async def test_ttl_update_resets_critical_since(registry: LocalRegistry):
    await registry.add_service(LocalService("web-1", "web"), [ttl_check()])
    check = registry.checks["service:web-1"]
    assert check.critical_since is not None

    await registry.update_ttl("service:web-1", CheckStatus.PASSING, "ok")

    assert check.critical_since is None


# Probes and timers


def test_thresholds_first_result_applies():
    thresholds = StatusThresholds(success_before_passing=3, failures_before_critical=3)

    result = thresholds.apply(CheckResult(CheckStatus.PASSING, "up"))

    assert result == CheckResult(CheckStatus.PASSING, "up")


def test_thresholds_wait_for_failures():
    thresholds = StatusThresholds(failures_before_critical=3)
    thresholds.apply(CheckResult(CheckStatus.PASSING, "up"))
    down = CheckResult(CheckStatus.CRITICAL, "down")

    results = [thresholds.apply(down) for _ in range(3)]

    assert results == [None, None, down]


def test_thresholds_warning_before_critical():
    thresholds = StatusThresholds(failures_before_warning=1, failures_before_critical=2)
    thresholds.apply(CheckResult(CheckStatus.PASSING, "up"))
    down = CheckResult(CheckStatus.CRITICAL, "down")

    first = thresholds.apply(down)
    second = thresholds.apply(down)

    assert first == CheckResult(CheckStatus.WARNING, "down")
    assert second == down


def test_thresholds_wait_for_successes():
    thresholds = StatusThresholds(success_before_passing=2)
    thresholds.apply(CheckResult(CheckStatus.CRITICAL, "down"))
    up = CheckResult(CheckStatus.PASSING, "up")

    results = [thresholds.apply(up) for _ in range(2)]

    assert results == [None, up]


async def test_ttl_timer_expires_and_resets():
    expired: list[float] = []
    started = time.monotonic()

    async def on_expire(check_id: str) -> None:
        expired.append(time.monotonic() - started)

    timer = TTLTimer("cron", 0.2, on_expire)
    timer.start()
    await asyncio.sleep(0.1)
    timer.reset()
    await asyncio.sleep(0.15)
    before_expiry = list(expired)
    await asyncio.sleep(0.2)
    await timer.stop()

    assert before_expiry == []
    assert len(expired) == 1
    assert expired[0] >= 0.3


async def test_script_output_capped():
    args = [sys.executable, "-c", "import sys; sys.stdout.write('y' * 10000)"]

    result = await script_check(args, timeout=10)

    assert result.status is CheckStatus.PASSING
    assert result.output == "y" * OUTPUT_MAX_SIZE + f"... (output truncated: {OUTPUT_MAX_SIZE} of 10000 bytes captured)"


async def test_script_timeout_kills_group(tmp_path: Path):
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); print('started', flush=True); time.sleep(60)"
    )

    result = await script_check([sys.executable, "-c", code], timeout=1.0)

    assert result.status is CheckStatus.CRITICAL
    assert result.output == "Timed out (1s) running check\n\nstarted\n"
    child = int(pid_file.read_text())
    await asyncio.sleep(0.1)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


async def test_script_missing_command():
    result = await script_check(["/nonexistent/check-command"], timeout=5)

    assert result.status is CheckStatus.CRITICAL
    assert "failed to start" in result.output


async def test_grpc_unknown_service_critical():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    try:
        result = await grpc_check(f"{HOST}:{port}/nothing.Here", timeout=5)
    finally:
        await server.stop(None)

    assert result.status is CheckStatus.CRITICAL
    assert result.output == f"gRPC check {HOST}:{port}/nothing.Here: failed: NOT_FOUND"


async def test_grpc_closed_port_critical():
    port = free_port()

    result = await grpc_check(f"{HOST}:{port}", timeout=5)

    assert result.status is CheckStatus.CRITICAL
    assert result.output.startswith(f"gRPC check {HOST}:{port}: failed: UNAVAILABLE")



# Saving and loading across restarts


async def test_restart_restores_remote_registrations(state: State, tmp_path: Path):
    path = tmp_path / "registry.json"
    node = Node(NODE, HOST, "dc1")
    first = LocalRegistry(LocalConnection(state), node, persist_path=path)
    await first.start()
    await first.add_service(LocalService("web-1", "web", HOST, 80, tags=["v1"]), [ttl_check()])
    await first.add_service(LocalService("task-1", "task", HOST, 81, source=ConfigSource.LOCAL))
    await first.update_ttl("service:web-1", CheckStatus.PASSING, "fine")
    await first.set_node_maintenance(True, "moving racks")
    await first.stop()

    second = LocalRegistry(LocalConnection(state), node, persist_path=path)
    await second.start()
    await second.stop()

    assert sorted(second.services) == ["web-1"]
    assert second.services["web-1"].tags == ["v1"]
    assert second.checks["service:web-1"].status is CheckStatus.PASSING
    assert second.checks["service:web-1"].output == "fine"
    assert second.checks["_node_maintenance"].notes == "moving racks"


async def test_restart_expired_ttl_is_critical(state: State, tmp_path: Path):
    path = tmp_path / "registry.json"
    node = Node(NODE, HOST, "dc1")
    first = LocalRegistry(LocalConnection(state), node, persist_path=path)
    await first.start()
    await first.add_service(
        LocalService("web-1", "web"), [CheckRequest(CheckDefinition(CheckKind.TTL, ttl=0.1))]
    )
    await first.update_ttl("service:web-1", CheckStatus.PASSING, "fine")
    await first.stop()
    await asyncio.sleep(0.2)

    second = LocalRegistry(LocalConnection(state), node, persist_path=path)
    await second.start()
    await second.stop()

    assert second.checks["service:web-1"].status is CheckStatus.CRITICAL


async def test_invalid_saved_file_ignored(state: State, tmp_path: Path, caplog):
    path = tmp_path / "registry.json"
    path.write_text("{broken")
    registry = LocalRegistry(LocalConnection(state), Node(NODE, HOST, "dc1"), persist_path=path)

    with caplog.at_level(logging.ERROR, logger="corral.agent.registry"):
        await registry.start()
        await registry.stop()

    assert registry.services == {}
    assert any("registry file is invalid" in record.getMessage() for record in caplog.records)


async def test_output_change_synced_after_interval(state: State):
    counter = 0

    async def count(request: web.Request) -> web.Response:
        nonlocal counter
        counter += 1
        return web.Response(text=str(counter))

    app = web.Application()
    app.router.add_get("/", count)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0).start()
    url = f"http://{HOST}:{runner.addresses[0][1]}/"
    registry = await make_registry(state, check_update_interval=0.5)
    try:
        probe = CheckRequest(CheckDefinition(CheckKind.HTTP, interval=0.05, http=url), id="count")
        await registry.add_check(probe, ConfigSource.LOCAL)
        await asyncio.sleep(0.3)
        local_soon = registry.checks["count"].output
        catalog_soon = state.checks(NODE)
        await asyncio.sleep(0.6)
        catalog_later = state.checks(NODE)
    finally:
        await registry.stop()
        await runner.cleanup()

    outputs_soon = [check.output for check in catalog_soon if check.id == "count"]
    outputs_later = [check.output for check in catalog_later if check.id == "count"]
    assert outputs_soon == [f"HTTP GET {url}: 200 OK Output: 1"]
    assert local_soon != outputs_soon[0]
    assert outputs_later != outputs_soon
