"""Tests for corral.state: State and its View over a real SQLiteStore in a temporary directory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.dns.server import DNSInstance
from corral.jobspec import Job, parse_job
from corral.state import State
from corral.state import records
from corral.state.records import Check, Node, Service, Session
from corral.store import SQLiteStore
from corral.types import CheckStatus, SessionBehavior


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    sqlite_store = SQLiteStore(tmp_path / "state.db", lease_check_interval=0.05)
    await sqlite_store.open()
    yield sqlite_store
    await sqlite_store.close()


@pytest.fixture
async def state(store: SQLiteStore) -> AsyncIterator[State]:
    domain_state = State(store)
    await domain_state.start()
    yield domain_state
    await domain_state.stop()


def web_job(count: int = 2, command: str = "python3", args: tuple[str, ...] = ("-m", "http.server")) -> Job:
    return parse_job(
        {
            "name": "web",
            "count": count,
            "task": {"command": command, "args": list(args), "ports": ["http"]},
            "service": {"name": "web", "port": "http", "tags": ["v1"]},
        }
    )


def service_check(node: str, service_id: str, status: CheckStatus = CheckStatus.CRITICAL) -> Check:
    return Check(
        node=node,
        id=f"service:{service_id}",
        name=f"service {service_id} http",
        status=status,
        service_id=service_id,
        service_name="web",
        type="http",
        interval="10s",
    )


def web_service(node: str, service_id: str, port: int, tags: tuple[str, ...] = ("v1",)) -> Service:
    return Service(node=node, id=service_id, name="web", address="", port=port, tags=list(tags))


async def register_nodes(state: State, *names: str) -> None:
    for index, name in enumerate(names, start=1):
        await state.register_node(Node(name, f"10.0.0.{index}", "dc1"))


# Key/value


async def test_kv_put_get(state):
    stored = await state.kv_put("config/greeting", b"hello", flags=7)
    entry = state.kv_get("config/greeting")

    assert stored is True
    assert entry is not None
    assert entry.key == "config/greeting"
    assert entry.value == b"hello"
    assert entry.flags == 7


async def test_kv_get_missing(state):
    assert state.kv_get("missing") is None


async def test_kv_value_with_newlines(state):
    await state.kv_put("script", b"line one\nline two\n")

    assert state.kv_get("script").value == b"line one\nline two\n"


async def test_kv_overwrite_indexes(state):
    await state.kv_put("key", b"1")
    first = state.kv_get("key")
    await state.kv_put("key", b"2")
    second = state.kv_get("key")

    assert second.value == b"2"
    assert second.create_index == first.create_index
    assert second.modify_index > first.modify_index


async def test_kv_delete(state):
    await state.kv_put("key", b"1")
    deleted = await state.kv_delete("key")

    assert deleted is True
    assert state.kv_get("key") is None


async def test_kv_delete_recurse(state):
    for key in ("app/a", "app/b", "apples", "other/a"):
        await state.kv_put(key, b"v")
    await state.kv_delete("app/", recurse=True)

    assert [entry.key for entry in state.kv_list("")] == ["apples", "other/a"]


async def test_kv_list_prefix_sorted(state):
    for key in ("app/b", "app/a", "apples"):
        await state.kv_put(key, b"v")

    assert [entry.key for entry in state.kv_list("app/")] == ["app/a", "app/b"]


async def test_kv_cas_zero_creates(state):
    created = await state.kv_put("lock", b"mine", cas=0)

    assert created is True
    assert state.kv_get("lock").value == b"mine"


async def test_kv_cas_zero_existing_fails(state):
    await state.kv_put("lock", b"first")
    created = await state.kv_put("lock", b"second", cas=0)

    assert created is False
    assert state.kv_get("lock").value == b"first"


async def test_kv_cas_current_index(state):
    await state.kv_put("key", b"1")
    index = state.kv_get("key").modify_index
    stored = await state.kv_put("key", b"2", cas=index)

    assert stored is True
    assert state.kv_get("key").value == b"2"


async def test_kv_cas_stale_index(state):
    await state.kv_put("key", b"1")
    stale = state.kv_get("key").modify_index
    await state.kv_put("key", b"2")
    stored = await state.kv_put("key", b"3", cas=stale)

    assert stored is False
    assert state.kv_get("key").value == b"2"


async def test_kv_cas_missing_key_fails(state):
    stored = await state.kv_put("missing", b"v", cas=5)

    assert stored is False
    assert state.kv_get("missing") is None


async def test_kv_delete_cas(state):
    await state.kv_put("key", b"1")
    index = state.kv_get("key").modify_index
    stale = await state.kv_delete("key", cas=index - 1)
    present_after_stale = state.kv_get("key") is not None
    current = await state.kv_delete("key", cas=index)

    assert stale is False
    assert present_after_stale
    assert current is True
    assert state.kv_get("key") is None


async def test_kv_index_empty_store(state):
    assert state.kv_index("missing") >= 1
    assert state.kv_index("", recurse=True) >= 1
    assert state.index >= 1


async def test_kv_index_is_modify_index(state):
    await state.kv_put("a", b"1")
    await state.kv_put("b", b"1")

    assert state.kv_index("a") == state.kv_get("a").modify_index
    assert state.kv_index("", recurse=True) == state.kv_get("b").modify_index


async def test_kv_index_after_delete(state):
    await state.kv_put("app/a", b"1")
    await state.kv_put("app/b", b"1")
    before = state.kv_index("app/", recurse=True)
    await state.kv_delete("app/b")
    after = state.kv_index("app/", recurse=True)

    assert after > before
    assert after >= state.kv_get("app/a").modify_index


async def test_kv_index_deleted_key(state):
    await state.kv_put("key", b"1")
    before = state.kv_index("key")
    await state.kv_delete("key")

    assert state.kv_index("key") > before


async def test_kv_index_recreated_key(state):
    await state.kv_put("key", b"1")
    await state.kv_delete("key")
    deleted_index = state.kv_index("key")
    await state.kv_put("key", b"2")

    assert state.kv_index("key") > deleted_index


async def test_kv_index_ignores_other_prefix(state):
    await state.kv_put("app/a", b"1")
    before = state.kv_index("app/", recurse=True)
    await state.kv_put("other/a", b"1")
    await state.kv_delete("other/a")

    assert state.kv_index("app/", recurse=True) == before


# Blocking queries


async def test_wait_wakes_on_write(state):
    # Take revision 1 outside the prefix, because test_wait_wakes_on_first_write covers it.
    await state.kv_put("other/a", b"1")
    loop = asyncio.get_running_loop()
    index = state.kv_index("app/", recurse=True)
    started = loop.time()
    waiter = asyncio.create_task(state.wait_for_kv("app/", index, timeout=10))
    await asyncio.sleep(0.05)
    pending_before_write = not waiter.done()
    await state.kv_put("app/a", b"1")
    await asyncio.wait_for(waiter, 5)

    assert pending_before_write
    assert loop.time() - started < 5
    assert state.kv_index("app/", recurse=True) > index


async def test_wait_wakes_on_first_write(state):
    loop = asyncio.get_running_loop()
    index = state.kv_index("app/", recurse=True)
    started = loop.time()
    waiter = asyncio.create_task(state.wait_for_kv("app/", index, timeout=0.5))
    await asyncio.sleep(0.05)
    await state.kv_put("app/a", b"1")
    await asyncio.wait_for(waiter, 5)

    assert loop.time() - started < 0.4
    assert state.kv_index("app/", recurse=True) > index


async def test_wait_wakes_on_delete(state):
    await state.kv_put("app/a", b"1")
    index = state.kv_index("app/", recurse=True)
    waiter = asyncio.create_task(state.wait_for_kv("app/", index, timeout=10))
    await asyncio.sleep(0.05)
    pending_before_delete = not waiter.done()
    await state.kv_delete("app/a")
    await asyncio.wait_for(waiter, 5)

    assert pending_before_delete


async def test_wait_times_out(state):
    loop = asyncio.get_running_loop()
    index = state.kv_index("app/", recurse=True)
    waiter = asyncio.create_task(state.wait_for_kv("app/", index, timeout=0.3))
    started = loop.time()
    await asyncio.sleep(0.05)
    await state.kv_put("other/a", b"1")
    await asyncio.wait_for(waiter, 5)
    elapsed = loop.time() - started

    assert elapsed >= 0.25
    assert elapsed < 3


async def test_wait_stale_index_returns(state):
    await state.kv_put("app/a", b"1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await state.wait_for_kv("app/", 0, timeout=10)

    assert loop.time() - started < 1


async def test_wait_key_ignores_sibling(state):
    loop = asyncio.get_running_loop()
    await state.kv_put("a", b"1")
    await state.kv_put("ab", b"1")
    index = state.kv_index("a")
    started = loop.time()
    await state.wait_for_kv("a", index, timeout=0.3)

    assert loop.time() - started >= 0.25


# Jobs


async def test_submit_job_first_version(state):
    record = await state.submit_job(web_job())

    assert record.version == 1
    assert record.task_version == 1
    assert record.stopped is False
    assert state.job("web") == record


async def test_submit_same_spec_same_version(state):
    first = await state.submit_job(web_job())
    index = state.index
    second = await state.submit_job(web_job())

    assert second.version == first.version
    assert second.task_version == first.task_version
    assert state.index == index


async def test_submit_count_change_keeps_task_version(state):
    first = await state.submit_job(web_job(count=2))
    second = await state.submit_job(web_job(count=5))

    assert second.version == first.version + 1
    assert second.task_version == first.task_version
    assert state.job("web").spec["count"] == 5


async def test_submit_command_change_bumps_task_version(state):
    first = await state.submit_job(web_job(command="python3"))
    second = await state.submit_job(web_job(command="python3.11"))

    assert second.version == first.version + 1
    assert second.task_version == first.task_version + 1


async def test_submit_args_change_bumps_task_version(state):
    first = await state.submit_job(web_job(args=("-m", "http.server")))
    second = await state.submit_job(web_job(args=("-m", "http.server", "9000")))

    assert second.task_version == first.task_version + 1


async def test_stop_job_marks_stopped(state):
    await state.submit_job(web_job())
    stopped = await state.stop_job("web")

    assert stopped is not None
    assert stopped.stopped is True
    assert state.job("web").stopped is True


async def test_stop_missing_job(state):
    assert await state.stop_job("missing") is None


async def test_resubmit_stopped_job(state):
    first = await state.submit_job(web_job())
    await state.stop_job("web")
    again = await state.submit_job(web_job())

    assert again.stopped is False
    assert again.version == first.version + 1
    assert again.task_version == first.task_version


async def test_jobs_lists_records(state):
    await state.submit_job(web_job())
    other = parse_job({"name": "worker", "task": {"command": "sleep", "args": ["60"]}})
    await state.submit_job(other)

    assert [record.name for record in state.jobs()] == ["web", "worker"]


# Catalog


async def test_register_service_stored(state):
    await register_nodes(state, "node1")
    await state.register_service(web_service("node1", "web-1", 8080), [service_check("node1", "web-1")])

    assert state.service("node1", "web-1").port == 8080
    assert [check.id for check in state.checks("node1")] == ["service:web-1"]


async def test_reregister_keeps_check_status(state):
    await register_nodes(state, "node1")
    await state.register_service(web_service("node1", "web-1", 8080), [service_check("node1", "web-1")])
    await state.update_check("node1", "service:web-1", CheckStatus.PASSING, "HTTP GET: 200 OK")
    await state.register_service(web_service("node1", "web-1", 8080), [service_check("node1", "web-1")])
    check = state.checks("node1")[0]

    assert check.status is CheckStatus.PASSING
    assert check.output == "HTTP GET: 200 OK"


async def test_reregister_updates_service(state):
    await register_nodes(state, "node1")
    await state.register_service(web_service("node1", "web-1", 8080))
    await state.register_service(web_service("node1", "web-1", 9090, tags=("v2",)))
    service = state.service("node1", "web-1")

    assert service.port == 9090
    assert service.tags == ["v2"]
    assert len(state.services("node1")) == 1


async def test_new_check_keeps_given_status(state):
    await register_nodes(state, "node1")
    check = service_check("node1", "web-1", CheckStatus.WARNING)
    await state.register_service(web_service("node1", "web-1", 8080), [check])

    assert state.checks("node1")[0].status is CheckStatus.WARNING


async def test_update_check_unknown(state):
    updated = await state.update_check("node1", "missing", CheckStatus.PASSING, "")

    assert updated is False


async def test_deregister_removes_checks(state):
    await register_nodes(state, "node1")
    await state.register_service(web_service("node1", "web-1", 8080), [service_check("node1", "web-1")])
    await state.register_service(web_service("node1", "web-2", 8081), [service_check("node1", "web-2")])
    removed = await state.deregister_service("node1", "web-1")

    assert removed is True
    assert state.service("node1", "web-1") is None
    assert [check.id for check in state.checks("node1")] == ["service:web-2"]


async def test_deregister_keeps_node_checks(state):
    node_check = Check("node1", "serfHealth", "node health", CheckStatus.PASSING)
    await state.register_node(Node("node1", "10.0.0.1", "dc1"), [node_check])
    await state.register_service(web_service("node1", "web-1", 8080), [service_check("node1", "web-1")])
    await state.deregister_service("node1", "web-1")

    assert [check.id for check in state.checks("node1")] == ["serfHealth"]


async def test_deregister_other_node_untouched(state):
    await register_nodes(state, "node1", "node10")
    await state.register_service(web_service("node1", "web-1", 8080), [service_check("node1", "web-1")])
    await state.register_service(web_service("node10", "web-1", 8080), [service_check("node10", "web-1")])
    await state.deregister_service("node1", "web-1")

    assert state.service("node10", "web-1") is not None
    assert [check.node for check in state.checks()] == ["node10"]


async def test_deregister_missing_service(state):
    assert await state.deregister_service("node1", "missing") is False


async def test_instances_exclude_critical(state):
    await register_nodes(state, "node1", "node2")
    await state.register_service(web_service("node1", "web-1", 8080), [service_check("node1", "web-1")])
    await state.register_service(web_service("node2", "web-2", 8081), [service_check("node2", "web-2")])
    await state.update_check("node2", "service:web-2", CheckStatus.PASSING, "ok")
    instances = state.service_instances("web", None)

    assert instances == [DNSInstance("node2", "10.0.0.2", "", 8081, ("v1",))]


async def test_instances_include_warning(state):
    await register_nodes(state, "node1")
    check = service_check("node1", "web-1", CheckStatus.WARNING)
    await state.register_service(web_service("node1", "web-1", 8080), [check])

    assert [item.port for item in state.service_instances("web", None)] == [8080]


async def test_instances_exclude_critical_node(state):
    node_check = Check("node1", "serfHealth", "node health", CheckStatus.CRITICAL)
    await state.register_node(Node("node1", "10.0.0.1", "dc1"), [node_check])
    await state.register_service(web_service("node1", "web-1", 8080))

    assert state.service_instances("web", None) == []


async def test_instances_other_service_check_ignored(state):
    # A critical check of another service on the same node does not hide this one.
    await register_nodes(state, "node1")
    await state.register_service(web_service("node1", "web-1", 8080))
    await state.register_service(web_service("node1", "web-2", 8081), [service_check("node1", "web-2")])

    assert [item.port for item in state.service_instances("web", None)] == [8080]


async def test_instances_filter_by_tag(state):
    await register_nodes(state, "node1")
    await state.register_service(web_service("node1", "web-1", 8080, tags=("Primary",)))
    await state.register_service(web_service("node1", "web-2", 8081, tags=("replica",)))

    assert [item.port for item in state.service_instances("web", "primary")] == [8080]
    assert [item.port for item in state.service_instances("web", "REPLICA")] == [8081]
    assert state.service_instances("web", "canary") == []


async def test_instances_name_case_insensitive(state):
    await register_nodes(state, "node1")
    await state.register_service(web_service("node1", "web-1", 8080))

    assert [item.port for item in state.service_instances("WEB", None)] == [8080]


async def test_instances_skip_unknown_node(state):
    await state.register_service(web_service("ghost", "web-1", 8080))

    assert state.service_instances("web", None) == []


async def test_node_address_lookup(state):
    await register_nodes(state, "Node1")

    assert state.node_address("node1") == "10.0.0.1"
    assert state.node_address("missing") is None


async def test_concurrent_check_updates(state):
    await register_nodes(state, "node1")
    await state.register_service(web_service("node1", "web-1", 8080), [service_check("node1", "web-1")])
    results = await asyncio.gather(
        state.update_check("node1", "service:web-1", CheckStatus.WARNING, "slow"),
        state.update_check("node1", "service:web-1", CheckStatus.PASSING, "ok"),
    )
    check = state.checks("node1")[0]

    assert results == [True, True]
    assert check.status is CheckStatus.PASSING


# Persistence


async def test_state_survives_reopen(tmp_path):
    path = tmp_path / "state.db"
    first_store = SQLiteStore(path)
    await first_store.open()
    first = State(first_store)
    try:
        await first.start()
        await first.kv_put("config/greeting", b"hello", flags=3)
        job = await first.submit_job(web_job())
        await register_nodes(first, "node1")
        await first.register_service(web_service("node1", "web-1", 8080), [service_check("node1", "web-1")])
        await first.update_check("node1", "service:web-1", CheckStatus.PASSING, "ok")
        index = first.index
    finally:
        await first.stop()
        await first_store.close()

    second_store = SQLiteStore(path)
    await second_store.open()
    second = State(second_store)
    try:
        await second.start()
        entry = second.kv_get("config/greeting")
        reopened_job = second.job("web")
        instances = second.service_instances("web", None)
        reopened_index = second.index
        await second.kv_put("config/greeting", b"again")
        later_index = second.kv_index("config/greeting")
    finally:
        await second.stop()
        await second_store.close()

    assert entry.value == b"hello"
    assert entry.flags == 3
    assert reopened_job == job
    assert [item.port for item in instances] == [8080]
    assert reopened_index == index
    assert later_index > index


async def test_index_after_delete_survives_reopen(tmp_path):
    path = tmp_path / "state.db"
    first_store = SQLiteStore(path)
    await first_store.open()
    first = State(first_store)
    try:
        await first.start()
        await first.kv_put("app/a", b"1")
        await first.kv_put("app/b", b"1")
        await first.kv_delete("app/b")
        index = first.kv_index("app/", recurse=True)
    finally:
        await first.stop()
        await first_store.close()

    second_store = SQLiteStore(path)
    await second_store.open()
    second = State(second_store)
    try:
        await second.start()
        reopened_index = second.kv_index("app/", recurse=True)
    finally:
        await second.stop()
        await second_store.close()

    assert reopened_index >= index


async def _add_session(state: State, session_id: str) -> None:
    session = Session(session_id, "test", "node1", [], SessionBehavior.RELEASE, lock_delay=0.0)
    revision = await state.store.put(records.session_key(session_id), records.encode(session))
    await state.view.wait_for_revision(revision)


async def test_concurrent_plain_puts_all_apply(state):
    results = await asyncio.gather(*(state.kv_put("hot", f"v{i}".encode()) for i in range(50)))
    assert all(results)
    assert state.kv_get("hot").value.startswith(b"v")


async def test_plain_puts_keep_concurrent_acquire(state):
    await _add_session(state, "s1")
    await state.kv_put("contended", b"before")
    # The acquire commits first in the store's batch, after the plain writes have read
    # the unlocked entry, so each plain write must notice the lock and keep it.
    acquire = state.kv_lock("contended", b"locked", 0, "s1", acquire=True)
    writes = [state.kv_put("contended", f"v{i}".encode()) for i in range(30)]
    results = await asyncio.gather(acquire, *writes)
    assert results[0] is True
    assert state.kv_get("contended").session == "s1"


async def test_instances_follow_rename(state):
    await register_nodes(state, "node1")
    await state.register_service(web_service("node1", "web-1", 8080))
    renamed = web_service("node1", "web-1", 8080)
    renamed.name = "api"
    await state.register_service(renamed)
    assert state.service_instances_with_checks("web") == []
    assert [s.id for _, s, _ in state.service_instances_with_checks("API")] == ["web-1"]


async def test_instances_follow_deregister(state):
    await register_nodes(state, "node1", "node2")
    await state.register_service(web_service("node1", "web-1", 8080))
    await state.register_service(web_service("node2", "web-2", 8080))
    await state.deregister_service("node1", "web-1")
    assert [s.id for _, s, _ in state.service_instances_with_checks("web")] == ["web-2"]


async def test_instances_index_survives_reopen(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    first = State(store)
    await first.start()
    await register_nodes(first, "node1")
    await first.register_service(web_service("node1", "web-1", 8080))
    await first.stop()
    await store.close()
    reopened_store = SQLiteStore(tmp_path / "state.db")
    await reopened_store.open()
    reopened = State(reopened_store)
    await reopened.start()
    try:
        assert [s.id for _, s, _ in reopened.service_instances_with_checks("web")] == ["web-1"]
    finally:
        await reopened.stop()
        await reopened_store.close()
