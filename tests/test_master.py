"""Tests for corral.master.master: the offer cycle and framework calls over a real SQLite state, no HTTP.

Agents and task state changes are written to the state as the agent API
writes them; the Master reads them through the state's view. Time that the
master measures (offer timeouts, refuse filters, failover, resends) comes
from a clock the tests move.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.master.agents import AgentMonitor
from corral.master.allocator import Quota
from corral.master.master import JOBS_FRAMEWORK_ID, CallError, Master, MasterConfig, Subscription, store_task_id
from corral.master.protocol import ProtocolError
from corral.metrics import Metrics
from corral.state import State
from corral.state.records import AgentInfo, Node, Task
from corral.store import SQLiteStore
from corral.types import DesiredState, TaskState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[State]:
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    domain_state = State(store)
    await domain_state.start()
    yield domain_state
    await domain_state.stop()
    await store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _config(**overrides) -> MasterConfig:
    settings = {"allocation_interval": 0.05, "offer_timeout": 30.0, "status_retry_interval": 10.0}
    settings.update(overrides)
    return MasterConfig(**settings)


@pytest.fixture
async def master(state, clock) -> AsyncIterator[Master]:
    instance = Master(state, _config(), clock=clock)
    await instance.start()
    yield instance
    await instance.stop()


async def register_agent(state: State, node: str = "n1", cpus: float = 2.0, memory: int = 1024,
                         ports: tuple[int, int] = (31000, 31009), rack: str = "r1") -> None:
    await state.register_agent(AgentInfo(node, "127.0.0.1", cpus=cpus, memory=memory, disk=5000,
                                         port_ranges=[list(ports)]))
    await state.register_node(Node(node, "127.0.0.1", "dc1", meta={"rack": rack}))


def framework_info(name: str = "test", **fields) -> dict:
    return {"name": name, "user": "tester", "role": "web", **fields}


async def next_event(subscription: Subscription, kind: str, timeout: float = 5.0) -> dict:
    """Return the next event of type `kind`, skipping others."""
    async with asyncio.timeout(timeout):
        while True:
            event = await subscription.next(timeout)
            assert event is not None, f"stream ended while waiting for {kind}"
            if event["type"] == kind:
                return event


async def no_event(subscription: Subscription, kind: str, seconds: float = 0.3) -> None:
    try:
        event = await next_event(subscription, kind, seconds)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected {kind} event: {event}")


def scalar(offer: dict, name: str) -> float:
    return next(item["scalar"]["value"] for item in offer["resources"] if item["name"] == name)


def task_info(task_id: str, offer: dict, cpus: float = 0.5, mem: float = 128, ports=None, **fields) -> dict:
    resources = [
        {"name": "cpus", "type": "SCALAR", "scalar": {"value": cpus}},
        {"name": "mem", "type": "SCALAR", "scalar": {"value": mem}},
    ]
    if ports:
        resources.append({"name": "ports", "type": "RANGES",
                          "ranges": {"range": [{"begin": p, "end": p} for p in ports]}})
    info = {
        "name": task_id,
        "task_id": {"value": task_id},
        "agent_id": offer["agent_id"],
        "resources": resources,
        "command": {"shell": True, "value": "sleep 30"},
    }
    info.update(fields)
    return info


def accept_call(offer: dict, *infos: dict, refuse_seconds: float | None = None) -> dict:
    call = {
        "offer_ids": [offer["id"]],
        "operations": [{"type": "LAUNCH", "launch": {"task_infos": list(infos)}}],
    }
    if refuse_seconds is not None:
        call["filters"] = {"refuse_seconds": refuse_seconds}
    return call


async def subscribe_with_offer(master: Master, **fields) -> tuple[Subscription, dict]:
    subscription = await master.subscribe(framework_info(**fields))
    await next_event(subscription, "SUBSCRIBED")
    offers = await next_event(subscription, "OFFERS")
    return subscription, offers["offers"]["offers"][0]


async def set_task_state(state: State, task_id: str, new_state: TaskState, message: str = "") -> None:
    def change(task: Task) -> None:
        task.state = new_state
        task.message = message

    await state.update_task(task_id, change)


async def wait_for(condition, timeout: float = 5.0):
    async with asyncio.timeout(timeout):
        while not (value := condition()):
            await asyncio.sleep(0.02)
        return value


# Subscribing and offers


async def test_subscribe_sends_subscribed(master):
    subscription = await master.subscribe(framework_info())
    event = await next_event(subscription, "SUBSCRIBED")
    assert event["subscribed"]["framework_id"]["value"] == subscription.framework_id
    assert event["subscribed"]["heartbeat_interval_seconds"] == 15.0


async def test_subscribe_persists_framework(master, state):
    subscription = await master.subscribe(framework_info(failover_timeout=60))
    record = state.framework(subscription.framework_id)
    assert record is not None
    assert record.role == "web"
    assert record.failover_timeout == 60


async def test_subscribe_rejects_missing_name(master):
    with pytest.raises(ProtocolError, match="framework_info.name"):
        await master.subscribe({"user": "x"})


async def test_subscribe_two_roles_error_event(master):
    # Mesos refuses a FrameworkInfo it cannot take with an ERROR event that ends the stream.
    subscription = await master.subscribe({"name": "x", "roles": ["a", "b"], "capabilities": [{"type": "MULTI_ROLE"}]})
    event = await subscription.next(1)
    assert event["type"] == "ERROR"
    assert "one role" in event["error"]["message"]
    assert await subscription.next(1) is None
    assert master.frameworks == {}


async def test_subscribe_one_of_roles(master):
    subscription = await master.subscribe({"name": "x", "roles": ["batch"], "capabilities": [{"type": "MULTI_ROLE"}]})
    event = await subscription.next(1)
    assert event["type"] == "SUBSCRIBED"
    assert master.frameworks[subscription.framework_id].record.role == "batch"


async def test_offer_holds_agent_resources(master, state):
    await register_agent(state)
    _, offer = await subscribe_with_offer(master)
    assert offer["agent_id"] == {"value": "n1"}
    # Mesos sends the agent's hostname, and corral's node name stands for it.
    assert offer["hostname"] == "n1"
    assert scalar(offer, "cpus") == 2.0
    assert scalar(offer, "mem") == 1024
    ports = next(item for item in offer["resources"] if item["name"] == "ports")
    assert ports["ranges"]["range"] == [{"begin": 31000, "end": 31009}]
    assert offer["attributes"] == [{"name": "rack", "type": "TEXT", "text": {"value": "r1"}}]


async def test_offer_leaves_out_job_tasks(master, state):
    await register_agent(state)
    job_task = Task(id="web.0.a", job="web", instance=0, node="n1", spec_version=1, desired=DesiredState.RUN,
                    state=TaskState.RUNNING, cpus=0.5, memory=256, ports={"http": 31000})
    await state.put_tasks([job_task])
    _, offer = await subscribe_with_offer(master)
    assert scalar(offer, "cpus") == 1.5
    assert scalar(offer, "mem") == 768
    ports = next(item for item in offer["resources"] if item["name"] == "ports")
    assert ports["ranges"]["range"] == [{"begin": 31001, "end": 31009}]


async def test_new_agent_offered_at_once(master, state):
    subscription = await master.subscribe(framework_info())
    await next_event(subscription, "SUBSCRIBED")
    await register_agent(state, "n2")
    offers = await next_event(subscription, "OFFERS")
    assert offers["offers"]["offers"][0]["agent_id"] == {"value": "n2"}


# ACCEPT


async def test_accept_writes_task(master, state):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    await master.accept(subscription.framework_id, accept_call(offer, task_info("t1", offer, ports=[31003])))
    task = state.task(store_task_id(subscription.framework_id, "t1"))
    assert task is not None
    assert task.framework_id == subscription.framework_id
    assert task.framework_task_id == "t1"
    assert task.node == "n1"
    assert task.state is TaskState.STAGING
    assert task.ports == {"port0": 31003}
    assert task.spec["task"]["command"] == "/bin/sh"
    assert task.spec["task"]["args"] == ["-c", "sleep 30"]
    assert task.spec["task"]["env"]["PORT0"] == "31003"


async def test_accept_counts_used(master, state):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    await master.accept(subscription.framework_id, accept_call(offer, task_info("t1", offer, cpus=1)))
    used = master.allocator.used_resources(subscription.framework_id)
    assert used.cpus == 1.0
    assert used.mem == 128


async def test_accept_returns_rest_to_others(master, state):
    await register_agent(state)
    first, offer = await subscribe_with_offer(master)
    second = await master.subscribe(framework_info("other"))
    await master.accept(first.framework_id, accept_call(offer, task_info("t1", offer, cpus=1.5)))
    offers = await next_event(second, "OFFERS")
    assert scalar(offers["offers"]["offers"][0], "cpus") == 0.5


async def test_accept_too_large_task_error(master, state):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    await master.accept(subscription.framework_id, accept_call(offer, task_info("big", offer, cpus=8)))
    update = await next_event(subscription, "UPDATE")
    status = update["update"]["status"]
    assert status["task_id"] == {"value": "big"}
    assert status["state"] == "TASK_ERROR"
    assert status["reason"] == "REASON_TASK_INVALID"
    assert "uuid" not in status
    assert state.task(store_task_id(subscription.framework_id, "big")) is None


async def test_accept_without_command_error(master, state):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    info = task_info("t1", offer)
    del info["command"]
    await master.accept(subscription.framework_id, accept_call(offer, info))
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_ERROR"
    assert "command" in status["message"]


async def test_accept_duplicate_id_error(master, state):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    call = accept_call(offer, task_info("same", offer), task_info("same", offer))
    await master.accept(subscription.framework_id, call)
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_ERROR"
    assert "duplicate" in status["message"]
    assert state.task(store_task_id(subscription.framework_id, "same")) is not None


async def test_accept_wrong_agent_error(master, state):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    info = task_info("t1", offer, agent_id={"value": "elsewhere"})
    await master.accept(subscription.framework_id, accept_call(offer, info))
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_ERROR"


async def test_accept_port_outside_offer_error(master, state):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    await master.accept(subscription.framework_id, accept_call(offer, task_info("t1", offer, ports=[40000])))
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_ERROR"


async def test_accept_unknown_offer_lost(master, state):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    stale = {**offer, "id": {"value": "no-such-offer"}}
    await master.accept(subscription.framework_id, accept_call(stale, task_info("t1", offer)))
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_LOST"
    assert status["reason"] == "REASON_INVALID_OFFERS"


async def test_accept_unknown_offer_dropped_partition_aware(master, state):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master, capabilities=[{"type": "PARTITION_AWARE"}])
    stale = {**offer, "id": {"value": "no-such-offer"}}
    await master.accept(subscription.framework_id, accept_call(stale, task_info("t1", offer)))
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_DROPPED"


# DECLINE, filters and the offer timeout


async def test_decline_filters_agent(master, state, clock):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    master.decline(subscription.framework_id, {"offer_ids": [offer["id"]], "filters": {"refuse_seconds": 5}})
    await no_event(subscription, "OFFERS")
    clock.now += 6
    offers = await next_event(subscription, "OFFERS")
    assert offers["offers"]["offers"][0]["agent_id"] == {"value": "n1"}


async def test_decline_default_filter(master, state, clock):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    master.decline(subscription.framework_id, {"offer_ids": [offer["id"]]})
    clock.now += 4
    await no_event(subscription, "OFFERS")
    clock.now += 2
    await next_event(subscription, "OFFERS")


async def test_offer_timeout_rescinds(master, state, clock):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    clock.now += 31
    event = await next_event(subscription, "RESCIND")
    assert event["rescind"]["offer_id"] == offer["id"]


async def test_suppress_stops_offers(master, state, clock):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    master.suppress(subscription.framework_id, {})
    master.decline(subscription.framework_id, {"offer_ids": [offer["id"]], "filters": {"refuse_seconds": 0}})
    await no_event(subscription, "OFFERS")
    master.revive(subscription.framework_id, {})
    await next_event(subscription, "OFFERS")


# Status updates


async def launch(master: Master, state: State, task_id: str = "t1", **subscribe_fields) -> tuple[Subscription, str]:
    subscription, offer = await subscribe_with_offer(master, **subscribe_fields)
    await master.accept(subscription.framework_id, accept_call(offer, task_info(task_id, offer)))
    return subscription, store_task_id(subscription.framework_id, task_id)


async def test_update_on_state_change(master, state):
    await register_agent(state)
    subscription, store_id = await launch(master, state)
    await set_task_state(state, store_id, TaskState.RUNNING, "running as pid 1")
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_RUNNING"
    assert status["task_id"] == {"value": "t1"}
    assert status["agent_id"] == {"value": "n1"}
    assert status["source"] == "SOURCE_EXECUTOR"
    assert status["message"] == "running as pid 1"
    assert status["uuid"]
    task = state.task(store_id)
    assert task.status["uuid"] == status["uuid"]
    assert task.status_acknowledged is False


async def test_update_resent_until_acknowledged(master, state, clock):
    await register_agent(state)
    subscription, store_id = await launch(master, state)
    await set_task_state(state, store_id, TaskState.RUNNING)
    first = (await next_event(subscription, "UPDATE"))["update"]["status"]
    clock.now += 11
    resent = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert resent["uuid"] == first["uuid"]
    await master.acknowledge(subscription.framework_id,
                             {"agent_id": {"value": "n1"}, "task_id": {"value": "t1"}, "uuid": first["uuid"]})
    assert state.task(store_id).status_acknowledged is True
    clock.now += 11
    await no_event(subscription, "UPDATE")


async def test_acknowledge_wrong_uuid_ignored(master, state):
    await register_agent(state)
    subscription, store_id = await launch(master, state)
    await set_task_state(state, store_id, TaskState.RUNNING)
    await next_event(subscription, "UPDATE")
    await master.acknowledge(subscription.framework_id, {"task_id": {"value": "t1"}, "uuid": "AAAA"})
    assert state.task(store_id).status_acknowledged is False


async def test_failed_task_reason(master, state):
    await register_agent(state)
    subscription, store_id = await launch(master, state)
    await set_task_state(state, store_id, TaskState.FAILED, "exited with code 3")
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_FAILED"
    assert status["reason"] == "REASON_COMMAND_EXECUTOR_FAILED"
    assert not master.allocator.used_resources(subscription.framework_id)


# KILL and RECONCILE


async def test_kill_sets_desired_stop(master, state):
    await register_agent(state)
    subscription, store_id = await launch(master, state)
    await master.kill(subscription.framework_id, {"task_id": {"value": "t1"}, "agent_id": {"value": "n1"}})
    assert state.task(store_id).desired is DesiredState.STOP


async def test_kill_unknown_task_lost(master, state):
    subscription = await master.subscribe(framework_info())
    await master.kill(subscription.framework_id, {"task_id": {"value": "ghost"}})
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_LOST"
    assert status["task_id"] == {"value": "ghost"}


async def test_reconcile_explicit(master, state):
    await register_agent(state)
    subscription, store_id = await launch(master, state)
    await set_task_state(state, store_id, TaskState.RUNNING)
    await next_event(subscription, "UPDATE")
    master.reconcile(subscription.framework_id, {"tasks": [{"task_id": {"value": "t1"}},
                                                           {"task_id": {"value": "ghost"}}]})
    known = (await next_event(subscription, "UPDATE"))["update"]["status"]
    unknown = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert known["state"] == "TASK_RUNNING"
    assert known["reason"] == "REASON_RECONCILIATION"
    assert "uuid" not in known
    assert unknown["state"] == "TASK_LOST"


async def test_reconcile_unknown_partition_aware(master, state):
    subscription = await master.subscribe(framework_info(capabilities=[{"type": "PARTITION_AWARE"}]))
    master.reconcile(subscription.framework_id, {"tasks": [{"task_id": {"value": "ghost"}}]})
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_UNKNOWN"


async def test_reconcile_implicit(master, state):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    call = accept_call(offer, task_info("a", offer), task_info("b", offer))
    await master.accept(subscription.framework_id, call)
    master.reconcile(subscription.framework_id, {"tasks": []})
    first = (await next_event(subscription, "UPDATE"))["update"]["status"]
    second = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert {first["task_id"]["value"], second["task_id"]["value"]} == {"a", "b"}
    assert first["state"] == "TASK_STAGING"


# Failover, teardown, restarts


async def test_resubscribe_replaces_stream(master):
    first = await master.subscribe(framework_info(failover_timeout=60))
    info = framework_info(failover_timeout=60, id={"value": first.framework_id})
    second = await master.subscribe(info)
    error = await next_event(first, "ERROR")
    assert "failed over" in error["error"]["message"]
    assert await first.next(1) is None
    assert second.framework_id == first.framework_id
    assert master.frameworks[first.framework_id].subscription is second


async def test_failover_timeout_removes_framework(master, state, clock):
    await register_agent(state)
    subscription, store_id = await launch(master, state, failover_timeout=20)
    master.disconnected(subscription)
    assert master.frameworks[subscription.framework_id].connected is False
    clock.now += 10
    await asyncio.sleep(0.2)
    assert subscription.framework_id in master.frameworks
    clock.now += 11
    await wait_for(lambda: subscription.framework_id not in master.frameworks)
    assert state.framework(subscription.framework_id) is None
    assert state.task(store_id).desired is DesiredState.STOP


async def test_resubscribe_within_failover(master, state, clock):
    await register_agent(state)
    subscription, store_id = await launch(master, state, failover_timeout=20)
    master.disconnected(subscription)
    clock.now += 10
    info = framework_info(failover_timeout=20, id={"value": subscription.framework_id})
    again = await master.subscribe(info)
    clock.now += 30
    await asyncio.sleep(0.2)
    assert subscription.framework_id in master.frameworks
    assert state.task(store_id).desired is DesiredState.RUN
    assert again.framework_id == subscription.framework_id


async def test_calls_need_stream_id(master):
    subscription = await master.subscribe(framework_info())
    with pytest.raises(CallError) as missing:
        master.framework_for_call(subscription.framework_id, None)
    assert missing.value.status == 400
    with pytest.raises(CallError) as wrong:
        master.framework_for_call(subscription.framework_id, "other")
    assert wrong.value.status == 400
    assert master.framework_for_call(subscription.framework_id, subscription.stream_id)


async def test_calls_unknown_framework(master):
    with pytest.raises(CallError) as unknown:
        master.framework_for_call("nope", "x")
    assert unknown.value.status == 400
    assert unknown.value.message == "Framework cannot be found"


async def test_calls_disconnected_framework(master):
    subscription = await master.subscribe(framework_info(failover_timeout=60))
    master.disconnected(subscription)
    with pytest.raises(CallError) as forbidden:
        master.framework_for_call(subscription.framework_id, subscription.stream_id)
    assert forbidden.value.status == 403


async def test_teardown_kills_tasks(master, state):
    await register_agent(state)
    subscription, store_id = await launch(master, state)
    await master.teardown(subscription.framework_id)
    assert await subscription.next(1) is not None
    assert state.task(store_id).desired is DesiredState.STOP
    assert subscription.framework_id not in master.frameworks
    with pytest.raises(CallError):
        await master.subscribe(framework_info(id={"value": subscription.framework_id}))


async def test_teardown_keeps_resources_held(master, state):
    await register_agent(state)
    subscription, store_id = await launch(master, state)
    await master.teardown(subscription.framework_id)
    assert master.allocator.used_resources(JOBS_FRAMEWORK_ID).cpus == 0.5
    await set_task_state(state, store_id, TaskState.KILLED)
    await wait_for(lambda: master.allocator.used_resources(JOBS_FRAMEWORK_ID).cpus == 0)


async def test_restart_keeps_framework(state, clock):
    first = Master(state, _config(), clock=clock)
    await first.start()
    await register_agent(state)
    try:
        subscription, store_id = await launch(first, state, failover_timeout=60)
        await set_task_state(state, store_id, TaskState.RUNNING)
        await next_event(subscription, "UPDATE")
    finally:
        await first.stop()
    second = Master(state, _config(), clock=clock)
    await second.start()
    try:
        framework = second.frameworks[subscription.framework_id]
        assert framework.connected is False
        assert second.allocator.used_resources(subscription.framework_id).cpus == 0.5
        info = framework_info(failover_timeout=60, id={"value": subscription.framework_id})
        again = await second.subscribe(info)
        await next_event(again, "SUBSCRIBED")
        pending = (await next_event(again, "UPDATE"))["update"]["status"]
        assert pending["state"] == "TASK_RUNNING"
    finally:
        await second.stop()


# Agent failure and removal


async def test_agent_failure_unreachable(state, clock):
    monitor = AgentMonitor(state, timeout=5)
    instance = Master(state, _config(), monitor=monitor, clock=clock)
    await instance.start()
    try:
        await register_agent(state)
        monitor.registered("n1")
        subscription, store_id = await launch(instance, state, capabilities=[{"type": "PARTITION_AWARE"}])
        await set_task_state(state, store_id, TaskState.RUNNING)
        await next_event(subscription, "UPDATE")
        await monitor.fail("n1", 6.0)
        failure = await next_event(subscription, "FAILURE")
        assert failure["failure"]["agent_id"] == {"value": "n1"}
        status = (await next_event(subscription, "UPDATE"))["update"]["status"]
        assert status["state"] == "TASK_UNREACHABLE"
        assert status["source"] == "SOURCE_MASTER"
        await wait_for(lambda: state.task(store_id).state is TaskState.UNREACHABLE)
    finally:
        await instance.stop()


async def test_agent_failure_lost(state, clock):
    monitor = AgentMonitor(state, timeout=5)
    instance = Master(state, _config(), monitor=monitor, clock=clock)
    await instance.start()
    try:
        await register_agent(state)
        monitor.registered("n1")
        subscription, store_id = await launch(instance, state)
        await monitor.fail("n1", 6.0)
        status = (await next_event(subscription, "UPDATE"))["update"]["status"]
        assert status["state"] == "TASK_LOST"
        assert state.task(store_id).desired is DesiredState.STOP
    finally:
        await instance.stop()


PARTITION_AWARE = [{"type": "PARTITION_AWARE"}]


async def test_agent_failure_keeps_unreachable_task_running(state, clock):
    monitor = AgentMonitor(state, timeout=5)
    instance = Master(state, _config(), monitor=monitor, clock=clock)
    await instance.start()
    try:
        await register_agent(state)
        monitor.registered("n1")
        subscription, store_id = await launch(instance, state, capabilities=PARTITION_AWARE)
        await set_task_state(state, store_id, TaskState.RUNNING)
        await next_event(subscription, "UPDATE")
        await monitor.fail("n1", 6.0)
        assert (await next_event(subscription, "UPDATE"))["update"]["status"]["state"] == "TASK_UNREACHABLE"
        task = state.task(store_id)
        assert task.state is TaskState.UNREACHABLE
        assert task.desired is DesiredState.RUN
        assert not task.ended
        assert task.holds_resources
        assert instance.allocator.used_resources(subscription.framework_id).cpus == 0

        # The agent registers again: the task is RUNNING, and its resources count as used again.
        await register_agent(state)
        monitor.registered("n1")
        status = (await next_event(subscription, "UPDATE"))["update"]["status"]
        assert status["state"] == "TASK_RUNNING"
        assert status["uuid"]
        assert state.task(store_id).state is TaskState.RUNNING
        assert state.task(store_id).desired is DesiredState.RUN
        assert instance.allocator.used_resources(subscription.framework_id).cpus == pytest.approx(0.5)
    finally:
        await instance.stop()


async def test_kill_unreachable_task_stops_it_on_return(state, clock):
    monitor = AgentMonitor(state, timeout=5)
    instance = Master(state, _config(), monitor=monitor, clock=clock)
    await instance.start()
    try:
        await register_agent(state)
        monitor.registered("n1")
        subscription, store_id = await launch(instance, state, capabilities=PARTITION_AWARE)
        await set_task_state(state, store_id, TaskState.RUNNING)
        await next_event(subscription, "UPDATE")
        await monitor.fail("n1", 6.0)
        await next_event(subscription, "UPDATE")
        await instance.kill(subscription.framework_id, {"task_id": {"value": "t1"}})
        answer = (await next_event(subscription, "UPDATE"))["update"]["status"]
        assert answer["state"] == "TASK_UNREACHABLE"
        assert answer["reason"] == "REASON_RECONCILIATION"
        assert "uuid" not in answer
        assert state.task(store_id).desired is DesiredState.STOP

        # On return the task stays UNREACHABLE until its agent kills it and reports KILLED.
        await register_agent(state)
        monitor.registered("n1")
        await no_event(subscription, "UPDATE")
        assert state.task(store_id).state is TaskState.UNREACHABLE
        await set_task_state(state, store_id, TaskState.KILLED)
        assert (await next_event(subscription, "UPDATE"))["update"]["status"]["state"] == "TASK_KILLED"
    finally:
        await instance.stop()


async def test_agent_failure_stops_staging_unreachable_task(state, clock):
    monitor = AgentMonitor(state, timeout=5)
    instance = Master(state, _config(), monitor=monitor, clock=clock)
    await instance.start()
    try:
        await register_agent(state)
        monitor.registered("n1")
        subscription, store_id = await launch(instance, state, capabilities=PARTITION_AWARE)
        await monitor.fail("n1", 6.0)
        assert (await next_event(subscription, "UPDATE"))["update"]["status"]["state"] == "TASK_UNREACHABLE"
        assert state.task(store_id).desired is DesiredState.STOP
    finally:
        await instance.stop()


async def test_teardown_stops_unreachable_tasks(state, clock):
    monitor = AgentMonitor(state, timeout=5)
    instance = Master(state, _config(), monitor=monitor, clock=clock)
    await instance.start()
    try:
        await register_agent(state)
        monitor.registered("n1")
        subscription, store_id = await launch(instance, state, capabilities=PARTITION_AWARE)
        await set_task_state(state, store_id, TaskState.RUNNING)
        await monitor.fail("n1", 6.0)
        await wait_for(lambda: state.task(store_id).state is TaskState.UNREACHABLE)
        await instance.remove_framework(subscription.framework_id)
        assert state.task(store_id).desired is DesiredState.STOP
        await register_agent(state)
        await asyncio.sleep(0.2)
        assert state.task(store_id).state is TaskState.UNREACHABLE
    finally:
        await instance.stop()


async def test_agent_removed_gone(master, state):
    await register_agent(state)
    subscription, store_id = await launch(master, state, capabilities=[{"type": "PARTITION_AWARE"}])
    await state.deregister_agent("n1")
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_GONE"
    task = state.task(store_id)
    assert task.state is TaskState.GONE
    assert task.desired is DesiredState.STOP


# Operator views


async def test_frameworks_view(master, state):
    await register_agent(state)
    subscription, _ = await launch(master, state)
    view = master.frameworks_view()
    assert len(view) == 1
    entry = view[0]
    assert entry["ID"] == subscription.framework_id
    assert entry["Role"] == "web"
    assert entry["Connected"] is True
    assert entry["Tasks"] == 1
    assert entry["Used"] == {"cpus": 0.5, "mem": 128.0, "disk": 0.0, "ports": 0}
    assert set(entry) >= {"Active", "Suppressed", "Offered", "DominantShare", "RegisteredAt", "FailoverTimeout"}


async def test_roles_view(state, clock):
    instance = Master(state, _config(role_weights={"web": 2.0}), clock=clock)
    await instance.start()
    try:
        subscription = await instance.subscribe(framework_info())
        roles = {role["Role"]: role for role in instance.roles_view()}
        assert roles["web"]["Weight"] == 2.0
        assert roles["web"]["Frameworks"] == [subscription.framework_id]
        assert set(roles["web"]) == {"Role", "Weight", "Frameworks", "Used", "Offered", "Reserved", "Quota",
                                     "DominantShare"}
    finally:
        await instance.stop()


def test_config_rejects_bad_weight():
    with pytest.raises(ValueError, match="weight"):
        MasterConfig(role_weights={"web": 0})


# Metrics


async def test_metrics_render_allocator(master, state):
    await register_agent(state)
    subscription, offer = await subscribe_with_offer(master)
    await master.accept(subscription.framework_id, accept_call(offer, task_info("t1", offer)))
    metrics = Metrics()
    metrics.allocator = master
    text = metrics.to_prometheus().decode()
    assert "corral_allocator_offers_made_total 1.0" in text
    assert "corral_allocator_offers_accepted_total 1.0" in text
    assert 'corral_allocator_cycle_seconds_bucket{le="+Inf"}' in text
    assert 'corral_allocator_role_dominant_share{role="web"}' in text
    assert "corral_allocator_launches_per_second" in text
    consul = metrics.to_consul_json()
    assert any(counter["Name"] == "corral.allocator.offers_made" for counter in consul["Counters"])


# Mesos parity: executor ids, TASK_KILLING, ended tasks on a failed agent


async def test_update_names_command_executor(master, state):
    await register_agent(state)
    subscription, store_id = await launch(master, state)
    await set_task_state(state, store_id, TaskState.RUNNING)
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    # Mesos's command executor has the ExecutorID of its task.
    assert status["executor_id"] == {"value": "t1"}


async def test_killing_skipped_without_capability(master, state):
    await register_agent(state)
    subscription, store_id = await launch(master, state)
    await set_task_state(state, store_id, TaskState.RUNNING)
    await next_event(subscription, "UPDATE")
    await set_task_state(state, store_id, TaskState.KILLING)
    await no_event(subscription, "UPDATE")
    master.reconcile(subscription.framework_id, {"tasks": [{"task_id": {"value": "t1"}}]})
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_RUNNING"
    await set_task_state(state, store_id, TaskState.KILLED)
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_KILLED"


async def test_killing_sent_with_capability(master, state):
    await register_agent(state)
    subscription, store_id = await launch(master, state, capabilities=[{"type": "TASK_KILLING_STATE"}])
    await set_task_state(state, store_id, TaskState.RUNNING)
    await next_event(subscription, "UPDATE")
    await set_task_state(state, store_id, TaskState.KILLING)
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_KILLING"
    master.reconcile(subscription.framework_id, {"tasks": [{"task_id": {"value": "t1"}}]})
    status = (await next_event(subscription, "UPDATE"))["update"]["status"]
    assert status["state"] == "TASK_KILLING"


async def test_agent_failure_keeps_failed(state, clock):
    monitor = AgentMonitor(state, timeout=5)
    instance = Master(state, _config(), monitor=monitor, clock=clock)
    await instance.start()
    try:
        await register_agent(state)
        monitor.registered("n1")
        subscription, store_id = await launch(instance, state)
        await set_task_state(state, store_id, TaskState.FAILED, "exited with code 3")
        await next_event(subscription, "UPDATE")
        await monitor.fail("n1", 6.0)
        assert state.task(store_id).state is TaskState.FAILED
        assert state.task(store_id).message == "exited with code 3"
        await no_event(subscription, "UPDATE")
    finally:
        await instance.stop()


# Static reservations and quotas


async def register_reserving_agent(state: State, node: str = "n1") -> None:
    reserved = {"analytics": {"cpus": 1.0, "memory": 256, "disk": 0, "port_ranges": [[32000, 32001]]}}
    await state.register_agent(AgentInfo(node, "127.0.0.1", cpus=2.0, memory=1024, disk=5000,
                                         port_ranges=[[31000, 31009]], reserved=reserved))
    await state.register_node(Node(node, "127.0.0.1", "dc1"))


def reserved_items(offer: dict) -> list[dict]:
    return [item for item in offer["resources"] if "reservations" in item]


async def test_reservation_offered_to_role(master, state):
    await register_reserving_agent(state)
    _, offer = await subscribe_with_offer(master, role="analytics")
    reserved = {item["name"]: item for item in reserved_items(offer)}
    assert reserved["cpus"]["scalar"]["value"] == 1.0
    assert reserved["mem"]["scalar"]["value"] == 256
    assert reserved["ports"]["ranges"]["range"] == [{"begin": 32000, "end": 32001}]
    assert reserved["cpus"]["reservations"] == [{"type": "STATIC", "role": "analytics"}]
    assert sum(item["scalar"]["value"] for item in offer["resources"] if item["name"] == "cpus") == 3.0


async def test_reservation_hidden_from_other_role(master, state):
    await register_reserving_agent(state)
    _, offer = await subscribe_with_offer(master, role="web")
    assert reserved_items(offer) == []
    assert scalar(offer, "cpus") == 2.0


async def test_launch_uses_reservation_first(master, state):
    await register_reserving_agent(state)
    subscription, offer = await subscribe_with_offer(master, role="analytics")
    await master.accept(subscription.framework_id, accept_call(offer, task_info("t1", offer, cpus=1.5, mem=128)))
    free, free_reserved = master.allocator.free_resources("n1")
    assert "analytics" not in free_reserved or free_reserved["analytics"].cpus == 0
    assert free.cpus == 1.5


async def test_roles_view_reserved_and_quota(state, clock):
    quota = Quota(cpus=2.0, mem=1024)
    instance = Master(state, _config(role_quotas={"analytics": quota}), clock=clock)
    await instance.start()
    try:
        await register_reserving_agent(state)
        await wait_for(lambda: "n1" in instance._agents)
        roles = {role["Role"]: role for role in instance.roles_view()}
        assert roles["analytics"]["Reserved"] == {"cpus": 1.0, "mem": 256.0, "disk": 0.0, "ports": 2}
        assert roles["analytics"]["Quota"] == {"cpus": 2.0, "mem": 1024.0}
        assert roles["analytics"]["Frameworks"] == []
    finally:
        await instance.stop()


async def test_quota_limits_offer(state, clock):
    instance = Master(state, _config(role_quotas={"web": Quota(cpus=0.5)}), clock=clock)
    await instance.start()
    try:
        await register_agent(state)
        _, offer = await subscribe_with_offer(instance)
        assert scalar(offer, "cpus") == 0.5
        assert scalar(offer, "mem") == 1024
    finally:
        await instance.stop()
