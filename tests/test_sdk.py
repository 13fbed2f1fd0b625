"""corral.sdk: offer and task helpers, the driver's protocol, and frameworks against real corral processes.

The driver tests in the middle part talk to a scripted master: an aiohttp
server on 127.0.0.1 that serves `/api/v1/scheduler` and plays events that a
real master only sends on faults (silence, a broken record, an ERROR, a 503).
The last part runs frameworks against `corral server` and `corral agent`
subprocesses.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import subprocess
import sys
import threading

import pytest
from aiohttp import web
from cluster import ProcessCluster, commands_running
from devcluster import EXAMPLES, free_port, wait_until

from corral.sdk import (
    CallError,
    DriverStatus,
    FrameworkInfo,
    InsufficientResources,
    NotSubscribedError,
    Offer,
    Scheduler,
    SchedulerDriver,
    TaskState,
    TaskStatus,
    id_value,
    scalar,
    task_info,
)
from corral.sdk.recordio import encode

OFFER = {
    "id": {"value": "o-1"},
    "framework_id": {"value": "fw-1"},
    "agent_id": {"value": "a1"},
    "hostname": "host-a1",
    "resources": [
        {"name": "cpus", "type": "SCALAR", "scalar": {"value": 2.0}},
        {"name": "mem", "type": "SCALAR", "scalar": {"value": 1024.0}},
        {"name": "disk", "type": "SCALAR", "scalar": {"value": 500.0}},
        {"name": "ports", "type": "RANGES", "ranges": {"range": [{"begin": 31000, "end": 31002},
                                                                  {"begin": 31010, "end": 31010}]}},
        {"name": "cpus", "type": "SCALAR", "scalar": {"value": 1.0},
         "reservations": [{"type": "STATIC", "role": "batch"}]},
    ],
    "attributes": [
        {"name": "rack", "type": "TEXT", "text": {"value": "r1"}},
        {"name": "level", "type": "SCALAR", "scalar": {"value": 3}},
    ],
}

# Offers and resources


def test_offer_reads_resources():
    offer = Offer(OFFER)
    assert offer.id == "o-1"
    assert offer.agent_id == "a1"
    assert offer.framework_id == "fw-1"
    assert offer.hostname == "host-a1"
    assert offer.cpus == 3.0
    assert offer.mem == 1024.0
    assert offer.disk == 500.0
    assert offer.ports == [(31000, 31002), (31010, 31010)]
    assert offer.attributes == {"rack": "r1", "level": 3.0}


def test_offer_allocate_subtracts():
    offer = Offer(OFFER)
    taken = offer.allocate(cpus=0.5, mem=256, ports=2)
    assert {"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.5}} in taken
    assert {"name": "mem", "type": "SCALAR", "scalar": {"value": 256.0}} in taken
    ports = next(resource for resource in taken if resource["name"] == "ports")
    assert ports["ranges"]["range"] == [{"begin": 31000, "end": 31001}]
    assert offer.cpus == 2.5
    assert offer.mem == 768.0
    assert offer.ports == [(31002, 31002), (31010, 31010)]
    assert offer.used
    # The offer's JSON is left as the master sent it.
    assert OFFER["resources"][0]["scalar"]["value"] == 2.0


def test_offer_allocate_keeps_reservation():
    offer = Offer(OFFER)
    taken = offer.allocate(cpus=2.5)
    assert taken[0] == {"name": "cpus", "type": "SCALAR", "scalar": {"value": 2.0}}
    assert taken[1]["scalar"] == {"value": 0.5}
    assert taken[1]["reservations"] == [{"type": "STATIC", "role": "batch"}]


def test_offer_allocate_named_ports():
    offer = Offer(OFFER)
    taken = offer.allocate(cpus=0.1, ports=[31010, 31001])
    assert taken[-1]["ranges"]["range"] == [{"begin": 31001, "end": 31001}, {"begin": 31010, "end": 31010}]
    assert offer.ports == [(31000, 31000), (31002, 31002)]


def test_offer_allocate_insufficient_takes_nothing():
    offer = Offer(OFFER)
    with pytest.raises(InsufficientResources, match="offer o-1 on agent a1 has cpus=3 mem=1024"):
        offer.allocate(cpus=1, mem=2048)
    with pytest.raises(InsufficientResources, match=r"ports \[40000\]"):
        offer.allocate(cpus=1, ports=[40000])
    assert offer.cpus == 3.0
    assert not offer.used


def test_offer_allocate_rejects_negative():
    with pytest.raises(ValueError, match="invalid mem amount -1"):
        Offer(OFFER).allocate(mem=-1)


def test_offer_fits():
    offer = Offer(OFFER)
    assert offer.fits(cpus=3, mem=1024, disk=500, ports=4)
    assert not offer.fits(ports=5)
    assert not offer.fits(cpus=3.01)


def test_offer_task_builds_task_info():
    offer = Offer(OFFER)
    task = offer.task("job", "sleep 1; echo done", cpus=0.1, mem=32, task_id="job-1", env={"A": "1"})
    assert task["task_id"] == {"value": "job-1"}
    assert task["agent_id"] == {"value": "a1"}
    assert task["command"] == {"shell": True, "value": "sleep 1; echo done",
                               "environment": {"variables": [{"name": "A", "value": "1"}]}}
    assert [resource["name"] for resource in task["resources"]] == ["cpus", "mem"]


def test_task_info_argv_command():
    task = task_info("t", "a1", [scalar("cpus", 0.1)], ["/bin/echo", "hi"], labels={"k": "v"}, kill_grace_seconds=2)
    assert task["command"] == {"shell": False, "value": "/bin/echo", "arguments": ["/bin/echo", "hi"]}
    assert task["labels"] == {"labels": [{"key": "k", "value": "v"}]}
    assert task["kill_policy"] == {"grace_period": {"nanoseconds": 2_000_000_000}}
    assert task["task_id"]["value"].startswith("t-")


@pytest.mark.parametrize(
    ("command", "named"), [("  ", "the shell command is empty"), ([], "invalid command \\[\\]")]
)
def test_task_info_rejects_command(command, named):
    with pytest.raises(ValueError, match=named):
        task_info("t", "a1", [], command)


def test_scalar_rejects_nan():
    with pytest.raises(ValueError, match="invalid amount nan for resource 'cpus'"):
        scalar("cpus", math.nan)


def test_id_value_forms():
    assert id_value("x") == "x"
    assert id_value({"value": "x"}) == "x"
    with pytest.raises(ValueError, match="invalid id"):
        id_value({"id": "x"})


# FrameworkInfo and TaskStatus


def test_framework_info_one_role():
    info = FrameworkInfo("batch", user="u", roles=["analytics"], failover_timeout=60,
                         capabilities=["PARTITION_AWARE"], id="fw-9").to_json()
    assert info["role"] == "analytics"
    assert "roles" not in info
    assert info["capabilities"] == [{"type": "PARTITION_AWARE"}]
    assert info["failover_timeout"] == 60.0
    assert info["id"] == {"value": "fw-9"}
    assert info["user"] == "u"


def test_framework_info_many_roles():
    info = FrameworkInfo("batch", roles=["a", "b"]).to_json()
    assert info["roles"] == ["a", "b"]
    assert info["capabilities"] == [{"type": "MULTI_ROLE"}]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"capabilities": ["PARTITION_AWARENESS"]}, "PARTITION_AWARENESS"),
        ({"failover_timeout": -1}, "failover_timeout -1"),
        ({"roles": []}, "invalid roles"),
    ],
)
def test_framework_info_rejects(options, named):
    with pytest.raises(ValueError, match=named):
        FrameworkInfo("batch", **options)


def test_task_status_parse():
    status = TaskStatus.from_json({
        "task_id": {"value": "t1"}, "agent_id": {"value": "a1"}, "state": "TASK_FAILED",
        "uuid": base64.b64encode(b"0123456789abcdef").decode(), "message": "exit 1",
        "reason": "REASON_COMMAND_EXECUTOR_FAILED", "source": "SOURCE_EXECUTOR", "timestamp": 12.5,
    })
    assert status.state is TaskState.TASK_FAILED
    assert status.is_terminal
    assert status.uuid_bytes == b"0123456789abcdef"
    assert status.reason == "REASON_COMMAND_EXECUTOR_FAILED"


def test_task_status_unknown_state():
    status = TaskStatus.from_json({"task_id": {"value": "t1"}, "state": "TASK_SLEEPY"})
    assert status.state is TaskState.TASK_UNKNOWN
    assert status.raw["state"] == "TASK_SLEEPY"


def test_terminal_states_follow_mesos():
    assert TaskState.TASK_LOST.is_terminal
    assert not TaskState.TASK_UNREACHABLE.is_terminal
    assert not TaskState.TASK_KILLING.is_terminal


def test_driver_rejects_master_address():
    with pytest.raises(ValueError, match="invalid master address 'ftp://x:1'"):
        SchedulerDriver(Scheduler(), FrameworkInfo("f"), "ftp://x:1")
    assert SchedulerDriver(Scheduler(), FrameworkInfo("f"), "127.0.0.1:5050").master == "http://127.0.0.1:5050"


def test_calls_before_run_rejected():
    driver = SchedulerDriver(Scheduler(), FrameworkInfo("f"))
    with pytest.raises(NotSubscribedError, match="DECLINE call failed: the driver is not running"):
        driver.decline("o-1")


# The driver against a scripted master


class ScriptedMaster:
    """A master that responds to SUBSCRIBE with scripted events and records every call.

    `subscriptions` contains one list of events per SUBSCRIBE, played in order.
    An entry that is bytes is written to the stream as it is. ("sleep", S)
    pauses S seconds, and "hold" keeps the stream open and silent. A SUBSCRIBE
    past the script's end gets SUBSCRIBED, and its stream is then held open.
    """

    def __init__(self):
        self.subscriptions: list[list] = []
        self.subscribe_bodies: list[dict] = []
        self.calls: list[tuple[dict, str | None]] = []
        self.subscribe_status: list[int] = []
        self.call_status = 202
        # For each call, in order, whether the newest event stream was still open when it arrived.
        self.stream_open: list[bool] = []
        self._stream: web.Request | None = None
        self.new_call = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v1/scheduler", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.runner.cleanup()

    def calls_of(self, kind: str) -> list[dict]:
        return [call for call, _ in self.calls if call["type"] == kind]

    async def wait_call(self, kind: str, count: int = 1, timeout: float = 5.0) -> list[dict]:
        async def enough():
            while len(self.calls_of(kind)) < count:
                self.new_call.clear()
                await self.new_call.wait()
        await asyncio.wait_for(enough(), timeout)
        return self.calls_of(kind)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["type"] != "SUBSCRIBE":
            self.calls.append((body, request.headers.get("Mesos-Stream-Id")))
            self.stream_open.append(self._stream is not None and self._stream.transport is not None
                                    and not self._stream.transport.is_closing())
            self.new_call.set()
            return web.Response(status=self.call_status, text="" if self.call_status == 202 else "rejected")
        number = len(self.subscribe_bodies)
        self.subscribe_bodies.append(body)
        if self.subscribe_status:
            status = self.subscribe_status.pop(0)
            if status != 200:
                return web.Response(status=status, text=f"scripted {status}")
        script = self.subscriptions[number] if number < len(self.subscriptions) else [subscribed(), "hold"]
        response = web.StreamResponse(headers={"Mesos-Stream-Id": f"stream-{number}",
                                               "Content-Type": "application/json"})
        await response.prepare(request)
        self._stream = request
        for event in script:
            if event == "hold":
                await asyncio.sleep(3600)
            elif isinstance(event, tuple):
                await asyncio.sleep(event[1])
            elif isinstance(event, bytes):
                await response.write(event)
            else:
                await response.write(encode(json.dumps(event).encode()))
        return response


def subscribed(framework_id: str = "fw-1", heartbeat: float = 15.0) -> dict:
    return {"type": "SUBSCRIBED", "subscribed": {"framework_id": {"value": framework_id},
                                                  "heartbeat_interval_seconds": heartbeat,
                                                  "master_info": {"id": "m1"}}}


def update(task_id: str, state: str, uuid: str | None = "AAECAwQFBgcICQoLDA0ODw==") -> dict:
    status = {"task_id": {"value": task_id}, "agent_id": {"value": "a1"}, "state": state}
    if uuid:
        status["uuid"] = uuid
    return {"type": "UPDATE", "update": {"status": status}}


class Recorder(Scheduler):
    """Records every callback as (name, argument) and wakes waiters."""

    def __init__(self):
        self.seen: list[tuple[str, object]] = []
        self.changed = asyncio.Event()

    def _record(self, name, value=None):
        self.seen.append((name, value))
        self.changed.set()

    def names(self) -> list[str]:
        return [name for name, _ in self.seen]

    async def wait_for(self, name: str, count: int = 1, timeout: float = 5.0):
        async def enough():
            while self.names().count(name) < count:
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(enough(), timeout)
        return [value for seen, value in self.seen if seen == name]

    def registered(self, driver, framework_id, master_info):
        self._record("registered", framework_id)

    def reregistered(self, driver, master_info):
        self._record("reregistered", master_info)

    def disconnected(self, driver):
        self._record("disconnected")

    def resource_offers(self, driver, offers):
        self._record("resource_offers", offers)

    def offer_rescinded(self, driver, offer_id):
        self._record("offer_rescinded", offer_id)

    def status_update(self, driver, status):
        self._record("status_update", status)

    def agent_lost(self, driver, agent_id):
        self._record("agent_lost", agent_id)

    def executor_lost(self, driver, executor_id, agent_id, status):
        self._record("executor_lost", (executor_id, agent_id, status))

    def framework_message(self, driver, executor_id, agent_id, data):
        self._record("framework_message", data)

    def error(self, driver, message):
        self._record("error", message)


@pytest.fixture
async def master():
    instance = ScriptedMaster()
    await instance.start()
    yield instance
    await instance.stop()


def _driver(master, scheduler, **options) -> SchedulerDriver:
    options = {"reconnect_min": 0.05, "reconnect_max": 0.2, **options}
    framework = options.pop("framework", None) or FrameworkInfo("test", user="tester", roles=["batch"],
                                                               capabilities=["PARTITION_AWARE"])
    return SchedulerDriver(scheduler, framework, master.url, **options)


async def _start(driver) -> asyncio.Task:
    return asyncio.create_task(driver.run())


async def _stop(driver, running, failover=True) -> DriverStatus:
    driver.stop(failover=failover)
    return await asyncio.wait_for(running, 10)


async def test_subscribe_sends_framework_info(master):
    scheduler = Recorder()
    driver = _driver(master, scheduler)
    running = await _start(driver)
    assert await scheduler.wait_for("registered") == ["fw-1"]
    body = master.subscribe_bodies[0]
    assert body["type"] == "SUBSCRIBE"
    assert "framework_id" not in body
    info = body["subscribe"]["framework_info"]
    assert info["name"] == "test"
    assert info["user"] == "tester"
    assert info["role"] == "batch"
    assert info["capabilities"] == [{"type": "PARTITION_AWARE"}]
    assert driver.framework_id == "fw-1"
    assert driver.stream_id == "stream-0"
    assert await _stop(driver, running) is DriverStatus.STOPPED


async def test_calls_carry_stream_and_framework(master):
    master.subscriptions = [[subscribed(), {"type": "OFFERS", "offers": {"offers": [OFFER]}}, "hold"]]
    scheduler = Recorder()
    driver = _driver(master, scheduler)
    running = await _start(driver)
    [offers] = await scheduler.wait_for("resource_offers")
    offer = offers[0]
    task = offer.task("t1", "true", cpus=0.5, mem=64, task_id="t1")
    await driver.launch(offer, [task], filters=2)
    await driver.decline(["o-2", {"value": "o-3"}], refuse_seconds=30)
    await driver.kill("t1", "a1")
    await driver.reconcile()
    await driver.reconcile(["t1", ("t2", "a2")])
    await driver.suppress()
    await driver.revive(["batch"])
    assert await _stop(driver, running) is DriverStatus.STOPPED

    assert {stream for _, stream in master.calls} == {"stream-0"}
    assert {call["framework_id"]["value"] for call, _ in master.calls} == {"fw-1"}
    [accept] = master.calls_of("ACCEPT")
    assert accept["accept"]["offer_ids"] == [{"value": "o-1"}]
    assert accept["accept"]["filters"] == {"refuse_seconds": 2.0}
    [operation] = accept["accept"]["operations"]
    assert operation["type"] == "LAUNCH"
    assert operation["launch"]["task_infos"] == [task]
    [decline] = master.calls_of("DECLINE")
    assert decline["decline"] == {"offer_ids": [{"value": "o-2"}, {"value": "o-3"}],
                                  "filters": {"refuse_seconds": 30.0}}
    assert master.calls_of("KILL")[0]["kill"] == {"task_id": {"value": "t1"}, "agent_id": {"value": "a1"}}
    implicit, explicit = master.calls_of("RECONCILE")
    assert implicit["reconcile"] == {"tasks": []}
    assert explicit["reconcile"]["tasks"] == [{"task_id": {"value": "t1"}},
                                              {"task_id": {"value": "t2"}, "agent_id": {"value": "a2"}}]
    assert master.calls_of("SUPPRESS") == [{"type": "SUPPRESS", "framework_id": {"value": "fw-1"}}]
    assert master.calls_of("REVIVE")[0]["revive"] == {"roles": ["batch"]}
    assert master.calls_of("TEARDOWN") == []


async def test_calls_keep_order(master):
    scheduler = Recorder()
    driver = _driver(master, scheduler)
    running = await _start(driver)
    await scheduler.wait_for("registered")
    tasks = [driver.decline(f"o-{number}") for number in range(20)]
    await asyncio.gather(*tasks)
    await _stop(driver, running)
    assert [call["decline"]["offer_ids"][0]["value"] for call in master.calls_of("DECLINE")] == \
        [f"o-{number}" for number in range(20)]


async def test_update_acknowledged_after_callback(master):
    master.subscriptions = [[subscribed(), update("t1", "TASK_RUNNING"), update("t1", "TASK_FINISHED", uuid=None),
                             "hold"]]
    scheduler = Recorder()
    driver = _driver(master, scheduler)
    running = await _start(driver)
    statuses = await scheduler.wait_for("status_update", 2)
    [ack] = await master.wait_call("ACKNOWLEDGE")
    await asyncio.sleep(0.2)
    await _stop(driver, running)
    assert [status.state for status in statuses] == [TaskState.TASK_RUNNING, TaskState.TASK_FINISHED]
    assert ack["acknowledge"] == {"agent_id": {"value": "a1"}, "task_id": {"value": "t1"},
                                  "uuid": "AAECAwQFBgcICQoLDA0ODw=="}
    # The update without a uuid (as reconciliation sends) is not acknowledged.
    assert len(master.calls_of("ACKNOWLEDGE")) == 1


async def test_manual_acknowledgement(master):
    master.subscriptions = [[subscribed(), update("t1", "TASK_RUNNING"), "hold"]]
    scheduler = Recorder()
    driver = _driver(master, scheduler, implicit_acknowledgements=False)
    running = await _start(driver)
    [status] = await scheduler.wait_for("status_update")
    await asyncio.sleep(0.2)
    assert master.calls_of("ACKNOWLEDGE") == []
    await driver.acknowledge(status)
    await _stop(driver, running)
    assert len(master.calls_of("ACKNOWLEDGE")) == 1
    with pytest.raises(ValueError, match="has no uuid"):
        driver.acknowledge(TaskStatus("t2", TaskState.TASK_RUNNING, agent_id="a1"))


async def test_raising_callback_not_acknowledged(master, caplog):
    master.subscriptions = [[subscribed(), update("t1", "TASK_RUNNING"), update("t2", "TASK_RUNNING"), "hold"]]

    class Failing(Recorder):
        def status_update(self, driver, status):
            super().status_update(driver, status)
            if status.task_id == "t1":
                raise RuntimeError("bug in the framework")

    scheduler = Failing()
    driver = _driver(master, scheduler)
    running = await _start(driver)
    await scheduler.wait_for("status_update", 2)
    [ack] = await master.wait_call("ACKNOWLEDGE")
    await asyncio.sleep(0.2)
    await _stop(driver, running)
    assert ack["acknowledge"]["task_id"] == {"value": "t2"}
    assert len(master.calls_of("ACKNOWLEDGE")) == 1
    assert "scheduler callback status_update raised" in caplog.text
    assert "not acknowledging the update of task t1" in caplog.text


async def test_other_events_reach_callbacks(master):
    master.subscriptions = [[
        subscribed(),
        {"type": "RESCIND", "rescind": {"offer_id": {"value": "o-7"}}},
        {"type": "FAILURE", "failure": {"agent_id": {"value": "a2"}}},
        {"type": "FAILURE", "failure": {"agent_id": {"value": "a2"}, "executor_id": {"value": "e1"}, "status": 9}},
        {"type": "MESSAGE", "message": {"agent_id": {"value": "a2"}, "executor_id": {"value": "e1"},
                                        "data": base64.b64encode(b"hello").decode()}},
        {"type": "SOMETHING_NEW", "something_new": {}},
        {"type": "HEARTBEAT"},
        "hold",
    ]]
    scheduler = Recorder()
    driver = _driver(master, scheduler)
    running = await _start(driver)
    await scheduler.wait_for("framework_message")
    await _stop(driver, running)
    assert scheduler.names() == ["registered", "offer_rescinded", "agent_lost", "executor_lost", "framework_message"]
    assert scheduler.seen[1:] == [("offer_rescinded", "o-7"), ("agent_lost", "a2"),
                                  ("executor_lost", ("e1", "a2", 9)), ("framework_message", b"hello")]


async def test_coroutine_callbacks_await_calls(master):
    master.subscriptions = [[subscribed(), {"type": "OFFERS", "offers": {"offers": [OFFER]}}, "hold"]]
    master.call_status = 400
    outcome: list[str] = []

    class Async(Scheduler):
        async def resource_offers(self, driver, offers):
            try:
                await driver.decline(offers)
            except CallError as error:
                outcome.append(str(error))

    driver = _driver(master, Async())
    running = await _start(driver)
    await master.wait_call("DECLINE")
    for _ in range(50):
        if outcome:
            break
        await asyncio.sleep(0.05)
    await _stop(driver, running)
    assert outcome == ["DECLINE call failed: HTTP 400: rejected"]


async def test_missed_heartbeats_resubscribe(master, caplog):
    master.subscriptions = [[subscribed(heartbeat=0.1), "hold"]]
    scheduler = Recorder()
    driver = _driver(master, scheduler, missed_heartbeats=3)
    running = await _start(driver)
    await scheduler.wait_for("reregistered", timeout=5)
    await _stop(driver, running)
    assert scheduler.names()[:3] == ["registered", "disconnected", "reregistered"]
    assert "(3 heartbeat intervals of 0.1s)" in caplog.text
    again = master.subscribe_bodies[1]
    assert again["framework_id"] == {"value": "fw-1"}
    assert again["subscribe"]["framework_info"]["id"] == {"value": "fw-1"}


async def test_heartbeats_keep_stream(master):
    # Ten heartbeats 0.1s apart, then silence: the stream is kept for the
    # heartbeats and dropped about 0.3s (three intervals) after the last one.
    master.subscriptions = [[subscribed(heartbeat=0.1)] + [("sleep", 0.1), {"type": "HEARTBEAT"}] * 10 + ["hold"]]
    scheduler = Recorder()
    driver = _driver(master, scheduler, missed_heartbeats=3)
    running = await _start(driver)
    await scheduler.wait_for("registered")
    await asyncio.sleep(0.9)
    assert "disconnected" not in scheduler.names()
    await scheduler.wait_for("disconnected", timeout=5)
    await _stop(driver, running)


async def test_broken_record_resubscribes(master, caplog):
    master.subscriptions = [[subscribed(), b"12x\n{}"], [subscribed(), b'3\n{"a'], [subscribed(), "hold"]]
    scheduler = Recorder()
    driver = _driver(master, scheduler)
    running = await _start(driver)
    await scheduler.wait_for("reregistered", 2)
    await _stop(driver, running)
    assert scheduler.names() == ["registered", "disconnected", "reregistered", "disconnected", "reregistered"]
    assert "invalid RecordIO length b'12x'" in caplog.text
    assert "invalid JSON in an event record" in caplog.text


async def test_unavailable_master_retried(master):
    master.subscribe_status = [503, 503, 200]
    scheduler = Recorder()
    driver = _driver(master, scheduler)
    running = await _start(driver)
    await scheduler.wait_for("registered")
    await _stop(driver, running)
    assert len(master.subscribe_bodies) == 3
    assert scheduler.names() == ["registered"]


async def test_rejected_subscribe_aborts(master):
    master.subscribe_status = [400]
    scheduler = Recorder()
    driver = _driver(master, scheduler)
    status = await asyncio.wait_for(driver.run(), 10)
    assert status is DriverStatus.ABORTED
    assert scheduler.seen == [("error", "SUBSCRIBE returned HTTP 400: scripted 400")]


async def test_error_event_aborts(master):
    master.subscriptions = [[subscribed(), {"type": "ERROR", "error": {"message": "framework removed"}}, "hold"]]
    scheduler = Recorder()
    driver = _driver(master, scheduler)
    status = await asyncio.wait_for(driver.run(), 10)
    assert status is DriverStatus.ABORTED
    assert scheduler.names() == ["registered", "error"]
    assert scheduler.seen[-1] == ("error", "framework removed")


async def test_stop_sends_teardown(master):
    scheduler = Recorder()
    driver = _driver(master, scheduler)
    running = await _start(driver)
    await scheduler.wait_for("registered")
    assert await _stop(driver, running, failover=False) is DriverStatus.STOPPED
    assert master.calls_of("TEARDOWN") == [{"type": "TEARDOWN", "framework_id": {"value": "fw-1"}}]


async def test_teardown_call_stops_driver(master):
    scheduler = Recorder()
    driver = _driver(master, scheduler)
    running = await _start(driver)
    await scheduler.wait_for("registered")
    await driver.teardown()
    assert await asyncio.wait_for(running, 10) is DriverStatus.STOPPED
    assert len(master.calls_of("TEARDOWN")) == 1


async def test_cancelled_run_leaves_no_task(master):
    scheduler = Recorder()
    driver = _driver(master, scheduler)
    running = await _start(driver)
    await scheduler.wait_for("registered")
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await asyncio.sleep(0)
    leftover = [task for task in asyncio.all_tasks() if task.get_name().startswith("corral-sdk")]
    assert leftover == []


async def test_stop_from_callback_acknowledges(master):
    master.subscriptions = [[subscribed(), update("t1", "TASK_FINISHED"), "hold"]]

    class StopOnFinish(Scheduler):
        def status_update(self, driver, status):
            driver.stop(failover=True)

    driver = _driver(master, StopOnFinish())
    assert await asyncio.wait_for(driver.run(), 10) is DriverStatus.STOPPED
    assert len(master.calls_of("ACKNOWLEDGE")) == 1
    assert master.calls_of("TEARDOWN") == []


async def test_stop_from_callback_tears_down_on_open_stream(master):
    master.subscriptions = [[subscribed(), update("t1", "TASK_RUNNING"), update("t2", "TASK_RUNNING"), "hold"]]

    class StopOnRunning(Scheduler):
        def status_update(self, driver, status):
            driver.stop()

    driver = _driver(master, StopOnRunning())
    assert await asyncio.wait_for(driver.run(), 10) is DriverStatus.STOPPED
    assert [call["type"] for call, _ in master.calls] == ["TEARDOWN"]
    # A stream closed before the TEARDOWN reads to the master as a disconnection.
    assert master.stream_open == [True]


async def test_calls_while_reconnecting_rejected(master):
    master.subscriptions = [[subscribed(), b"x"]]
    master.subscribe_status = [200, 503, 503, 503, 503, 503, 503, 503, 503, 503]
    errors: list[str] = []

    class CallOnDisconnect(Recorder):
        def disconnected(self, driver):
            try:
                driver.reconcile()
            except NotSubscribedError as error:
                errors.append(str(error))
            super().disconnected(driver)

    scheduler = CallOnDisconnect()
    driver = _driver(master, scheduler)
    running = await _start(driver)
    await scheduler.wait_for("disconnected")
    await _stop(driver, running)
    assert errors == ["RECONCILE call failed: the driver has no subscription (it is reconnecting to the master)"]


def test_run_forever_stops_from_thread():
    # The scripted master runs in this test's event loop, which is blocked
    # by run_forever below, so it gets a loop of its own in a thread.
    ready = threading.Event()
    holder: dict = {}

    def serve():
        loop = asyncio.new_event_loop()
        holder["loop"] = loop
        remote = ScriptedMaster()
        loop.run_until_complete(remote.start())
        holder["master"] = remote
        ready.set()
        loop.run_forever()
        loop.run_until_complete(remote.stop())
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        assert ready.wait(10)
        remote = holder["master"]

        class StopFromThread(Scheduler):
            def registered(self, driver, framework_id, master_info):
                threading.Timer(0.2, driver.stop).start()

        driver = SchedulerDriver(StopFromThread(), FrameworkInfo("threaded"), remote.url)
        assert driver.run_forever() is DriverStatus.STOPPED
        assert len(remote.calls_of("TEARDOWN")) == 1
    finally:
        holder["loop"].call_soon_threadsafe(holder["loop"].stop)
        thread.join(10)


# Frameworks against `corral server` and `corral agent` subprocesses


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdk")
    processes = ProcessCluster(folder)
    try:
        processes.start_server()
        processes.start_agent("sdk-a1", "cpus:2;mem:1024;ports:[24000-24099]")
        yield processes
    finally:
        processes.stop()


class TcpProxy:
    """Forwards TCP connections from a port on 127.0.0.1 to `target`; `cut` closes every open one."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, upstream_writer}
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self.writers.discard(writer)

    def cut(self) -> int:
        cut = len(self.writers)
        for writer in list(self.writers):
            writer.transport.abort()
        return cut

    async def stop(self) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()


class Launcher(Recorder):
    """Launches the commands in `commands` on the first offers that fit, and declines the rest.

    With `agent`, only offers of that agent are used.
    """

    def __init__(self, commands: dict[str, str], cpus: float = 0.1, mem: float = 16, agent: str | None = None):
        super().__init__()
        self.commands = dict(commands)
        self.agent = agent
        self.cpus = cpus
        self.mem = mem
        self.states: dict[str, list[TaskState]] = {task_id: [] for task_id in commands}

    def resource_offers(self, driver, offers):
        super().resource_offers(driver, offers)
        for offer in offers:
            tasks = []
            while self.commands and offer.fits(cpus=self.cpus, mem=self.mem) and self.agent in (None, offer.agent_id):
                task_id, command = self.commands.popitem()
                tasks.append(offer.task(task_id, command, cpus=self.cpus, mem=self.mem, task_id=task_id))
            if tasks:
                driver.launch(offer, tasks)
            else:
                driver.decline(offer, refuse_seconds=1)

    def status_update(self, driver, status):
        self.states.setdefault(status.task_id, []).append(status.state)
        super().status_update(driver, status)

    async def wait_state(self, task_id: str, state: TaskState, timeout: float = 30.0) -> None:
        async def reached():
            while state not in self.states.get(task_id, []):
                self.changed.clear()
                await self.changed.wait()
        try:
            await asyncio.wait_for(reached(), timeout)
        except TimeoutError:
            raise AssertionError(f"task {task_id} did not reach {state} within {timeout}s: "
                                 f"{self.states.get(task_id)}") from None


def _real_driver(url: str, scheduler: Scheduler, name: str, **options) -> SchedulerDriver:
    framework = FrameworkInfo(name, capabilities=["PARTITION_AWARE"],
                              failover_timeout=options.pop("failover_timeout", 0.0))
    return SchedulerDriver(scheduler, framework, url, reconnect_min=0.1, reconnect_max=0.5, **options)


async def test_real_launch_to_finished(cluster):
    scheduler = Launcher({f"echo-{number}": f"echo hello {number}" for number in range(3)})
    driver = _real_driver(f"http://{cluster.http}", scheduler, "sdk-finish")
    running = await _start(driver)
    try:
        for number in range(3):
            await scheduler.wait_state(f"echo-{number}", TaskState.TASK_FINISHED)
        frameworks = {entry["ID"]: entry for entry in cluster.get("/v1/frameworks")}
        assert frameworks[driver.framework_id]["Name"] == "sdk-finish"
        assert frameworks[driver.framework_id]["Capabilities"] == ["PARTITION_AWARE"]
    finally:
        assert await _stop(driver, running, failover=False) is DriverStatus.STOPPED
    assert scheduler.names()[0] == "registered"
    for number in range(3):
        states = scheduler.states[f"echo-{number}"]
        assert states[-1] is TaskState.TASK_FINISHED
        assert TaskState.TASK_RUNNING in states or TaskState.TASK_STARTING in states, states


async def test_real_kill_and_reconcile(cluster):
    scheduler = Launcher({"sleeper": "sleep 60", "quick": "true"})
    driver = _real_driver(f"http://{cluster.http}", scheduler, "sdk-kill")
    running = await _start(driver)
    try:
        await scheduler.wait_state("sleeper", TaskState.TASK_RUNNING)
        await scheduler.wait_state("quick", TaskState.TASK_FINISHED)
        await driver.kill("sleeper", "sdk-a1")
        await scheduler.wait_state("sleeper", TaskState.TASK_KILLED)
        before = len(scheduler.seen)
        await driver.reconcile(["quick", ("sleeper", "sdk-a1"), "never-launched"])
        await scheduler.wait_for("status_update", scheduler.names().count("status_update") + 3)
        answers = {status.task_id: status for name, status in scheduler.seen[before:] if name == "status_update"}
    finally:
        await _stop(driver, running, failover=False)
    assert answers["quick"].state is TaskState.TASK_FINISHED
    assert answers["sleeper"].state is TaskState.TASK_KILLED
    # A partition-aware framework hears TASK_UNKNOWN for a task the master never had.
    assert answers["never-launched"].state is TaskState.TASK_UNKNOWN
    for status in answers.values():
        assert status.uuid is None
        assert status.reason == "REASON_RECONCILIATION"
    assert not commands_running(cluster.folder, "sleep 60")


async def test_real_reconnect_keeps_framework(cluster):
    proxy = TcpProxy(cluster.http)
    await proxy.start()
    scheduler = Launcher({"across-cut": "sleep 2"})
    driver = _real_driver(proxy.url, scheduler, "sdk-reconnect", failover_timeout=60)
    running = await _start(driver)
    try:
        [framework_id] = await scheduler.wait_for("registered")
        await scheduler.wait_state("across-cut", TaskState.TASK_RUNNING)
        assert proxy.cut() > 0
        await scheduler.wait_for("reregistered", timeout=15)
        assert driver.framework_id == framework_id
        # The task ends while the framework is subscribed again, and its update arrives.
        await scheduler.wait_state("across-cut", TaskState.TASK_FINISHED, timeout=15)
        await driver.reconcile()
        frameworks = {entry["ID"]: entry for entry in cluster.get("/v1/frameworks")}
        assert frameworks[framework_id]["Connected"] is True
    finally:
        await _stop(driver, running, failover=False)
        await proxy.stop()
    names = scheduler.names()
    assert names.index("disconnected") < names.index("reregistered")
    assert names.count("registered") == 1


async def test_real_reconnect_without_failover_aborts(cluster):
    # With failover_timeout 0 the master removes the framework when its stream
    # drops, so the SUBSCRIBE that follows is rejected, as Mesos rejects it.
    proxy = TcpProxy(cluster.http)
    await proxy.start()
    scheduler = Recorder()
    driver = _real_driver(proxy.url, scheduler, "sdk-no-failover")
    running = await _start(driver)
    try:
        await scheduler.wait_for("registered")
        proxy.cut()
        assert await asyncio.wait_for(running, 15) is DriverStatus.ABORTED
    finally:
        driver.stop()
        await proxy.stop()
    [message] = await scheduler.wait_for("error")
    assert "HTTP 403" in message
    assert driver.framework_id in message


async def test_real_teardown_kills_tasks(cluster):
    scheduler = Launcher({"doomed": "sleep 120"})
    driver = _real_driver(f"http://{cluster.http}", scheduler, "sdk-teardown")
    running = await _start(driver)
    await scheduler.wait_state("doomed", TaskState.TASK_RUNNING)
    framework_id = driver.framework_id
    assert await _stop(driver, running, failover=False) is DriverStatus.STOPPED
    wait_until(lambda: not commands_running(cluster.folder, "sleep 120"), 15, "the torn-down task to stop")
    assert framework_id not in {entry["ID"] for entry in cluster.get("/v1/frameworks")}


class StopWhenRunning(Launcher):
    """Launches one task and stops its driver, without failover, from the status_update callback."""

    def status_update(self, driver, status):
        super().status_update(driver, status)
        if status.state is TaskState.TASK_RUNNING:
            driver.stop()


async def test_real_stop_from_callback_tears_down(cluster):
    # The framework has a failover timeout, so a master that saw the stream
    # close before the TEARDOWN would keep it, disconnected, with its task.
    scheduler = StopWhenRunning({"short-lived": "sleep 130"})
    driver = _real_driver(f"http://{cluster.http}", scheduler, "sdk-stop-in-callback", failover_timeout=60)
    running = await _start(driver)
    assert await asyncio.wait_for(running, 30) is DriverStatus.STOPPED
    framework_id = driver.framework_id
    assert framework_id not in {entry["ID"] for entry in cluster.get("/v1/frameworks")}
    wait_until(lambda: not commands_running(cluster.folder, "sleep 130"), 15, "the torn-down task to stop")
    log = cluster.log("server")
    assert f"framework teardown requested framework={framework_id}" in log
    assert f"framework disconnected framework={framework_id}" not in log


async def test_real_failover_stop_keeps_framework(cluster):
    scheduler = Launcher({})
    driver = _real_driver(f"http://{cluster.http}", scheduler, "sdk-failover", failover_timeout=60)
    running = await _start(driver)
    await scheduler.wait_for("registered")
    framework_id = driver.framework_id
    assert await _stop(driver, running, failover=True) is DriverStatus.STOPPED

    def disconnected():
        frameworks = {entry["ID"]: entry for entry in cluster.get("/v1/frameworks")}
        return framework_id in frameworks and not frameworks[framework_id]["Connected"]

    wait_until(disconnected, 10, "the framework to be kept, disconnected")
    # A new scheduler resumes the framework with its id, as after a scheduler failover.
    resumed = Recorder()
    framework = FrameworkInfo("sdk-failover", id=framework_id, failover_timeout=60)
    again = SchedulerDriver(resumed, framework, f"http://{cluster.http}")
    running = await _start(again)
    assert await resumed.wait_for("registered") == [framework_id]
    assert await _stop(again, running, failover=False) is DriverStatus.STOPPED


async def test_real_suppress_and_revive(cluster):
    scheduler = Recorder()
    driver = _real_driver(f"http://{cluster.http}", scheduler, "sdk-suppress")
    running = await _start(driver)
    try:
        [offers] = await scheduler.wait_for("resource_offers", timeout=15)
        await driver.suppress()
        await driver.decline(offers, refuse_seconds=0)
        count = scheduler.names().count("resource_offers")
        await asyncio.sleep(2.5)
        assert scheduler.names().count("resource_offers") == count
        await driver.revive()
        await scheduler.wait_for("resource_offers", count + 1, timeout=10)
    finally:
        await _stop(driver, running, failover=False)


def _run_example(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "batch_framework.py"), "--master", f"http://{cluster.http}",
         "--timeout", "60", *args],
        capture_output=True, text=True, timeout=90,
    )


def test_example_batch_finishes(cluster):
    result = _run_example(cluster, "--tasks", "6", "--command", "sleep 0.5; echo done")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stdout.count("TASK_FINISHED") == 6
    assert "all 6 tasks ended: 6 finished, 0 did not" in result.stdout
    outputs = list(cluster.folder.glob("sdk-a1/**/batch-00*/stdout"))
    assert outputs, "no task sandbox found under the agent's data folder"


def test_example_failed_task_exits_one(cluster):
    result = _run_example(cluster, "--tasks", "2", "--command", "exit 3")
    assert result.returncode == 1, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stdout.count("TASK_FAILED") == 2


def test_example_unreachable_master_times_out(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "batch_framework.py"), "--master", f"http://127.0.0.1:{free_port()}",
         "--timeout", "1.5"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "timed out after 1.5s" in result.stdout


async def test_real_agent_lost(cluster):
    # A second agent with a short name, killed with SIGKILL; the server declares it
    # failed after its agent timeout (10 s by default) and sends FAILURE to the framework.
    cluster.start_agent("sdk-a2", "cpus:1;mem:256;ports:[24100-24199]")
    scheduler = Launcher({"on-a2": "sleep 120"}, agent="sdk-a2")
    driver = _real_driver(f"http://{cluster.http}", scheduler, "sdk-agent-lost")
    running = await _start(driver)
    try:
        await scheduler.wait_state("on-a2", TaskState.TASK_RUNNING)
        cluster.kill("sdk-a2")
        assert await scheduler.wait_for("agent_lost", timeout=30) == ["sdk-a2"]
        await scheduler.wait_state("on-a2", TaskState.TASK_UNREACHABLE, timeout=10)
    finally:
        await _stop(driver, running, failover=False)
