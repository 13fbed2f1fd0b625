"""Mesos's v1 scheduler API over HTTP, against `corral server` and two `corral agent` processes.

A raw aiohttp client plays the framework: it subscribes, reads the RecordIO
stream, launches `sleep` tasks on the offers it gets, acknowledges their
updates, kills and reconciles them. The tests share one cluster and run in
file order; the last ones pause an agent with SIGSTOP and kill one with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
from cluster import ProcessCluster
from devcluster import free_port, task_processes

from corral.master.master import MasterConfig
from corral.server import Server, ServerConfig

AGENT_TIMEOUT = 3.0
HEARTBEAT_WAIT = 20.0


class Framework:
    """A framework that speaks the scheduler API's JSON with no SDK in between."""

    def __init__(self, address: str, name: str = "raw", **info: Any):
        self.url = f"http://{address}/api/v1/scheduler"
        self.info = {"name": name, "user": "tester", **info}
        self.framework_id = ""
        self.stream_id = ""
        self.events: asyncio.Queue[dict | None] = asyncio.Queue()
        self.session: aiohttp.ClientSession | None = None
        self.response: aiohttp.ClientResponse | None = None
        self._reader: asyncio.Task | None = None

    async def subscribe(self) -> dict:
        self.session = self.session or aiohttp.ClientSession()
        info = dict(self.info)
        if self.framework_id:
            info["id"] = {"value": self.framework_id}
        body = {"type": "SUBSCRIBE", "subscribe": {"framework_info": info}}
        self.response = await self.session.post(
            self.url, data=orjson.dumps(body), headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=None, sock_read=HEARTBEAT_WAIT),
        )
        assert self.response.status == 200, await self.response.text()
        self.stream_id = self.response.headers["Mesos-Stream-Id"]
        self.events = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(self.response, self.events))
        subscribed = await self.next("SUBSCRIBED")
        self.framework_id = subscribed["subscribed"]["framework_id"]["value"]
        return subscribed

    @staticmethod
    async def _read(response: aiohttp.ClientResponse, events: asyncio.Queue) -> None:
        try:
            while True:
                line = await response.content.readline()
                if not line:
                    break
                size = int(line.strip())
                events.put_nowait(orjson.loads(await response.content.readexactly(size)))
        except (aiohttp.ClientError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            events.put_nowait(None)

    async def next(self, kind: str, timeout: float = 15.0) -> dict:
        """Return the next event of type `kind`, skipping other types."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                assert event is not None, f"stream ended while waiting for {kind}"
                if event["type"] == kind:
                    return event

    async def update(self, task_id: str, state: str, timeout: float = 15.0, ack: bool = True) -> dict:
        """Wait for an UPDATE of `task_id` to `state`, acknowledging every update on the way."""
        async with asyncio.timeout(timeout):
            while True:
                status = (await self.next("UPDATE", timeout))["update"]["status"]
                if ack and "uuid" in status:
                    await self.acknowledge(status)
                if status["task_id"]["value"] == task_id and status["state"] == state:
                    return status

    async def offer(self, agent: str | None = None, timeout: float = 15.0) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next("OFFERS", timeout)
                for offer in event["offers"]["offers"]:
                    if agent is None or offer["agent_id"]["value"] == agent:
                        return offer

    async def call(self, body: dict, headers: dict | None = None, with_stream: bool = True) -> tuple[int, str]:
        assert self.session is not None
        sent = {"Content-Type": "application/json"}
        if with_stream:
            sent["Mesos-Stream-Id"] = self.stream_id
        sent.update(headers or {})
        if self.framework_id and "framework_id" not in body:
            body = {"framework_id": {"value": self.framework_id}, **body}
        async with self.session.post(self.url, data=orjson.dumps(body), headers=sent) as response:
            return response.status, await response.text()

    async def accept(self, offer: dict, *tasks: dict, refuse_seconds: float = 5.0) -> None:
        status, text = await self.call({"type": "ACCEPT", "accept": {
            "offer_ids": [offer["id"]],
            "operations": [{"type": "LAUNCH", "launch": {"task_infos": list(tasks)}}],
            "filters": {"refuse_seconds": refuse_seconds},
        }})
        assert status == 202, text

    async def acknowledge(self, status: dict) -> None:
        code, text = await self.call({"type": "ACKNOWLEDGE", "acknowledge": {
            "agent_id": status["agent_id"], "task_id": status["task_id"], "uuid": status["uuid"],
        }})
        assert code == 202, text

    async def drop(self) -> None:
        """Close the subscription connection, as a crashed framework would."""
        if self.response is not None:
            self.response.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def close(self) -> None:
        await self.drop()
        if self.session is not None:
            await self.session.close()


def sleep_task(task_id: str, offer: dict, command: str = "sleep 60", cpus: float = 0.1, mem: float = 32) -> dict:
    return {
        "name": task_id,
        "task_id": {"value": task_id},
        "agent_id": offer["agent_id"],
        "resources": [
            {"name": "cpus", "type": "SCALAR", "scalar": {"value": cpus}},
            {"name": "mem", "type": "SCALAR", "scalar": {"value": mem}},
        ],
        "command": {"shell": True, "value": command},
    }


def task_record(cluster: ProcessCluster, framework: Framework, task_id: str) -> dict:
    tasks = {task["ID"]: task for task in cluster.get("/v1/tasks")}
    return tasks[f"{task_id}@{framework.framework_id}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("scheduler")
    processes = ProcessCluster(folder, ["--agent-timeout", f"{AGENT_TIMEOUT:g}s", "--offer-timeout", "off"])
    try:
        processes.start_server()
        processes.start_agent("s1", "cpus:2;mem:1024;ports:[24000-24009]", "rack:r1")
        processes.start_agent("s2", "cpus:2;mem:1024;ports:[25000-25009]", "rack:r2")
        yield processes
    finally:
        processes.stop()
    leftover = task_processes(folder)
    assert not leftover, f"task processes left after the test: {[p.pid for p in leftover]}"


@pytest.fixture
async def framework(cluster):
    client = Framework(cluster.http, failover_timeout=0)
    yield client
    if client.framework_id and client.stream_id:
        await client.call({"type": "TEARDOWN"})
    await client.close()


# The stream


async def test_heartbeat_when_idle(tmp_path):
    config = ServerConfig(data_dir=tmp_path / "server", http_port=free_port(), dns_port=free_port(),
                          master=MasterConfig(heartbeat_interval=0.3))
    server = Server(config)
    await server.start()
    client = Framework(f"127.0.0.1:{config.http_port}")
    try:
        await client.subscribe()
        started = time.monotonic()
        await client.next("HEARTBEAT", timeout=3)
        assert time.monotonic() - started < 2
        await client.next("HEARTBEAT", timeout=3)
    finally:
        await client.close()
        await server.stop()


async def test_subscribe_stream(cluster):
    client = Framework(cluster.http)
    try:
        subscribed = await client.subscribe()
        assert client.response.headers["Content-Type"].startswith("application/json")
        assert client.stream_id
        assert subscribed["subscribed"]["heartbeat_interval_seconds"] == 15
        offer = await client.offer()
        assert offer["framework_id"] == {"value": client.framework_id}
        assert {item["name"] for item in offer["resources"]} == {"cpus", "mem", "disk", "ports"}
    finally:
        await client.call({"type": "TEARDOWN"})
        await client.close()


async def test_subscribe_rejects_stream_header(cluster):
    async with aiohttp.ClientSession() as session:
        body = {"type": "SUBSCRIBE", "subscribe": {"framework_info": {"name": "x", "user": "y"}}}
        async with session.post(f"http://{cluster.http}/api/v1/scheduler", data=orjson.dumps(body),
                                headers={"Content-Type": "application/json", "Mesos-Stream-Id": "x"}) as answer:
            assert answer.status == 400
            assert "Mesos-Stream-Id" in await answer.text()


async def test_call_errors(cluster, framework):
    await framework.subscribe()
    status, text = await framework.call({"type": "REVIVE"}, with_stream=False)
    assert status == 400
    assert "Mesos-Stream-Id" in text
    status, text = await framework.call({"type": "REVIVE"}, headers={"Mesos-Stream-Id": "not-this-one"})
    assert status == 400
    assert "didn't match" in text
    status, text = await framework.call({"type": "REVIVE", "framework_id": {"value": "no-such-framework"}})
    assert status == 400
    assert text == "Framework cannot be found"
    status, text = await framework.call({"type": "REVIVE", "framework_id": {"value": framework.framework_id}},
                                        headers={"Content-Type": "application/x-protobuf"})
    assert status == 415
    status, text = await framework.call({"type": "NO_SUCH_CALL"})
    assert status == 400
    status, text = await framework.call({"type": "REVIVE"})
    assert status == 202, text


async def test_call_without_framework_id(cluster):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{cluster.http}/api/v1/scheduler", data=b'{"type": "REVIVE"}',
                                headers={"Content-Type": "application/json"}) as answer:
            assert answer.status == 400
            assert "framework_id" in await answer.text()


async def test_call_invalid_json(cluster):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{cluster.http}/api/v1/scheduler", data=b"{not json",
                                headers={"Content-Type": "application/json"}) as answer:
            assert answer.status == 400


# Launching, killing, finishing


async def test_launch_sleep_running(cluster, framework):
    await framework.subscribe()
    offer = await framework.offer()
    await framework.accept(offer, sleep_task("sleeper", offer))
    starting = await framework.update("sleeper", "TASK_STARTING")
    running = await framework.update("sleeper", "TASK_RUNNING")
    assert starting["uuid"] != running["uuid"]
    assert running["agent_id"] == offer["agent_id"]
    record = task_record(cluster, framework, "sleeper")
    assert record["State"] == "RUNNING"
    assert psutil.pid_exists(record["PID"])


async def test_kill_task(cluster, framework):
    await framework.subscribe()
    offer = await framework.offer()
    await framework.accept(offer, sleep_task("victim", offer))
    await framework.update("victim", "TASK_RUNNING")
    pid = task_record(cluster, framework, "victim")["PID"]
    status, text = await framework.call({"type": "KILL", "kill": {"task_id": {"value": "victim"},
                                                                  "agent_id": offer["agent_id"]}})
    assert status == 202, text
    killed = await framework.update("victim", "TASK_KILLED")
    assert killed["source"] == "SOURCE_EXECUTOR"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_kill_unknown_task(cluster, framework):
    await framework.subscribe()
    status, _ = await framework.call({"type": "KILL", "kill": {"task_id": {"value": "ghost"}}})
    assert status == 202
    lost = await framework.update("ghost", "TASK_LOST")
    assert "uuid" not in lost


async def test_task_finished(cluster, framework):
    await framework.subscribe()
    offer = await framework.offer()
    await framework.accept(offer, sleep_task("quick", offer, command="true"))
    finished = await framework.update("quick", "TASK_FINISHED")
    assert finished["agent_id"] == offer["agent_id"]


async def test_task_failed(cluster, framework):
    await framework.subscribe()
    offer = await framework.offer()
    await framework.accept(offer, sleep_task("broken", offer, command="exit 3"))
    failed = await framework.update("broken", "TASK_FAILED")
    assert failed["reason"] == "REASON_COMMAND_EXECUTOR_FAILED"
    await asyncio.sleep(1.5)
    assert task_record(cluster, framework, "broken")["State"] == "FAILED"


async def test_invalid_task_error(cluster, framework):
    await framework.subscribe()
    offer = await framework.offer()
    await framework.accept(offer, sleep_task("huge", offer, cpus=64))
    error = await framework.update("huge", "TASK_ERROR")
    assert error["reason"] == "REASON_TASK_INVALID"


async def test_decline_gives_offer_to_others(cluster, framework):
    other = Framework(cluster.http, name="other", failover_timeout=0)
    try:
        await framework.subscribe()
        offer = await framework.offer()
        await other.subscribe()
        status, _ = await framework.call({"type": "DECLINE", "decline": {
            "offer_ids": [offer["id"]], "filters": {"refuse_seconds": 60}}})
        assert status == 202
        moved = await other.offer(offer["agent_id"]["value"])
        assert moved["agent_id"] == offer["agent_id"]
    finally:
        await other.call({"type": "TEARDOWN"})
        await other.close()


# Reconciliation and failover


async def test_reconcile(cluster, framework):
    await framework.subscribe()
    offer = await framework.offer()
    await framework.accept(offer, sleep_task("steady", offer))
    await framework.update("steady", "TASK_RUNNING")
    status, _ = await framework.call({"type": "RECONCILE", "reconcile": {"tasks": [
        {"task_id": {"value": "steady"}}, {"task_id": {"value": "ghost"}}]}})
    assert status == 202
    known = await framework.update("steady", "TASK_RUNNING")
    assert known["reason"] == "REASON_RECONCILIATION"
    await framework.update("ghost", "TASK_LOST")
    status, _ = await framework.call({"type": "RECONCILE", "reconcile": {"tasks": []}})
    assert status == 202
    await framework.update("steady", "TASK_RUNNING")


async def test_task_survives_reconnect(cluster):
    client = Framework(cluster.http, name="survivor", failover_timeout=60)
    try:
        await client.subscribe()
        first_id = client.framework_id
        offer = await client.offer()
        await client.accept(offer, sleep_task("durable", offer))
        await client.update("durable", "TASK_RUNNING")
        pid = task_record(cluster, client, "durable")["PID"]
        await client.drop()
        await asyncio.sleep(1.5)
        frameworks = {entry["ID"]: entry for entry in cluster.get("/v1/frameworks")}
        assert frameworks[first_id]["Connected"] is False
        await client.subscribe()
        assert client.framework_id == first_id
        status, _ = await client.call({"type": "RECONCILE", "reconcile": {"tasks": []}})
        assert status == 202
        await client.update("durable", "TASK_RUNNING")
        assert task_record(cluster, client, "durable")["PID"] == pid
    finally:
        await client.call({"type": "TEARDOWN"})
        await client.close()


async def test_second_subscribe_replaces_stream(cluster):
    first = Framework(cluster.http, name="twice", failover_timeout=60)
    second = Framework(cluster.http, name="twice", failover_timeout=60)
    try:
        await first.subscribe()
        second.framework_id = first.framework_id
        await second.subscribe()
        error = await first.next("ERROR")
        assert "failed over" in error["error"]["message"]
        async with asyncio.timeout(5):
            while (event := await first.events.get()) is not None:
                pass
        status, text = await first.call({"type": "REVIVE"})
        assert status == 400
        status, text = await second.call({"type": "REVIVE"})
        assert status == 202, text
    finally:
        await second.call({"type": "TEARDOWN"})
        await first.close()
        await second.close()


async def test_disconnect_without_failover_removes(cluster):
    client = Framework(cluster.http, name="fleeting", failover_timeout=0)
    try:
        await client.subscribe()
        offer = await client.offer()
        await client.accept(offer, sleep_task("short-lived", offer))
        await client.update("short-lived", "TASK_RUNNING")
        await client.drop()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ids = [entry["ID"] for entry in cluster.get("/v1/frameworks")]
            if client.framework_id not in ids:
                break
            await asyncio.sleep(0.2)
        assert client.framework_id not in ids
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and task_record(cluster, client, "short-lived")["State"] != "KILLED":
            await asyncio.sleep(0.2)
        assert task_record(cluster, client, "short-lived")["State"] == "KILLED"
    finally:
        await client.close()


# Operator endpoints


async def test_frameworks_endpoint(cluster, framework):
    await framework.subscribe()
    offer = await framework.offer()
    await framework.accept(offer, sleep_task("counted", offer, cpus=0.5, mem=64))
    await framework.update("counted", "TASK_RUNNING")
    entries = {entry["ID"]: entry for entry in cluster.get("/v1/frameworks")}
    entry = entries[framework.framework_id]
    assert set(entry) >= {"ID", "Name", "Role", "Active", "Connected", "Suppressed", "Tasks", "Used", "Offered",
                          "DominantShare", "RegisteredAt", "FailoverTimeout"}
    assert entry["Role"] == "*"
    assert entry["Tasks"] == 1
    assert entry["Used"]["cpus"] == 0.5
    assert entry["Used"]["mem"] == 64
    assert 0 < entry["DominantShare"] <= 1
    roles = {role["Role"]: role for role in cluster.get("/v1/roles")}
    assert framework.framework_id in roles["*"]["Frameworks"]
    assert roles["*"]["Weight"] == 1.0


async def test_metrics_count_offers(cluster):
    with urllib.request.urlopen(f"http://{cluster.http}/v1/agent/metrics?format=prometheus", timeout=10) as answer:
        text = answer.read().decode()
    made = next(line for line in text.splitlines() if line.startswith("corral_allocator_offers_made_total"))
    assert float(made.split()[-1]) > 0
    assert "corral_allocator_cycle_seconds_count" in text


# Agent failure (destructive: runs last)


def wait_for_process_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"task process {pid} still runs after {timeout:g}s"
        time.sleep(0.1)


async def test_paused_agent_keeps_partition_aware_tasks(cluster):
    """SIGSTOP an agent past the timeout, then SIGCONT it: its tasks kept running meanwhile."""
    aware = Framework(cluster.http, name="aware-pause", failover_timeout=60, capabilities=[{"type": "PARTITION_AWARE"}])
    plain = Framework(cluster.http, name="plain-pause", failover_timeout=60)
    agent = cluster.processes["s1"]
    paused = False
    try:
        await aware.subscribe()
        await plain.subscribe()
        offer = await aware.offer("s1")
        await aware.accept(offer, sleep_task("returns", offer), sleep_task("killed-away", offer))
        await aware.update("returns", "TASK_RUNNING")
        plain_offer = await plain.offer("s1", timeout=20)
        await plain.accept(plain_offer, sleep_task("replaced", plain_offer))
        await plain.update("replaced", "TASK_RUNNING")
        await asyncio.wait_for(_until(lambda: all(
            task_record(cluster, framework, task_id)["PID"]
            for framework, task_id in ((aware, "returns"), (aware, "killed-away"), (plain, "replaced"))
        )), 15)
        pids = {task_id: task_record(cluster, framework, task_id)["PID"]
                for framework, task_id in ((aware, "returns"), (aware, "killed-away"), (plain, "replaced"))}

        agent.send_signal(signal.SIGSTOP)
        paused = True
        await aware.next("FAILURE", timeout=AGENT_TIMEOUT * 1.25 + 5)
        unreachable = await aware.update("returns", "TASK_UNREACHABLE")
        assert unreachable["source"] == "SOURCE_MASTER"
        lost = await plain.update("replaced", "TASK_LOST")
        assert lost["reason"] == "REASON_AGENT_REMOVED"
        assert task_record(cluster, aware, "returns")["DesiredState"] == "run"
        assert task_record(cluster, plain, "replaced")["DesiredState"] == "stop"

        # A KILL of an unreachable task returns its state, and the agent kills it on return.
        status, text = await aware.call({"type": "KILL", "kill": {"task_id": {"value": "killed-away"}}})
        assert status == 202, text
        answer = await aware.update("killed-away", "TASK_UNREACHABLE")
        assert answer["reason"] == "REASON_RECONCILIATION"
        assert task_record(cluster, aware, "killed-away")["DesiredState"] == "stop"
        assert all(psutil.pid_exists(pid) for pid in pids.values())

        agent.send_signal(signal.SIGCONT)
        paused = False
        running = await aware.update("returns", "TASK_RUNNING", timeout=20)
        assert running["agent_id"] == {"value": "s1"}
        record = task_record(cluster, aware, "returns")
        assert (record["State"], record["PID"]) == ("RUNNING", pids["returns"])
        assert psutil.pid_exists(pids["returns"])
        await aware.update("killed-away", "TASK_KILLED", timeout=20)
        await asyncio.to_thread(wait_for_process_exit, pids["killed-away"], 15)
        await asyncio.to_thread(wait_for_process_exit, pids["replaced"], 15)
        assert task_record(cluster, plain, "replaced")["State"] in ("LOST", "KILLED")
    finally:
        if paused:
            agent.send_signal(signal.SIGCONT)
        await aware.call({"type": "TEARDOWN"})
        await plain.call({"type": "TEARDOWN"})
        await aware.close()
        await plain.close()
    await asyncio.to_thread(wait_for_process_exit, pids["returns"], 15)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.1)


async def test_agent_kill_reports_lost(cluster):
    aware = Framework(cluster.http, name="aware", failover_timeout=60, capabilities=[{"type": "PARTITION_AWARE"}])
    plain = Framework(cluster.http, name="plain", failover_timeout=60)
    try:
        await aware.subscribe()
        await plain.subscribe()
        aware_offer = await aware.offer("s2")
        await aware.accept(aware_offer, sleep_task("partitioned", aware_offer))
        await aware.update("partitioned", "TASK_RUNNING")
        plain_offer = await plain.offer("s2", timeout=20)
        await plain.accept(plain_offer, sleep_task("lost", plain_offer))
        await plain.update("lost", "TASK_RUNNING")
        killed_at = time.monotonic()
        cluster.kill("s2")
        failure = await aware.next("FAILURE", timeout=AGENT_TIMEOUT * 1.25 + 5)
        assert failure["failure"]["agent_id"] == {"value": "s2"}
        assert time.monotonic() - killed_at < AGENT_TIMEOUT * 1.25 + 5
        unreachable = await aware.update("partitioned", "TASK_UNREACHABLE")
        assert unreachable["source"] == "SOURCE_MASTER"
        lost = await plain.update("lost", "TASK_LOST")
        assert lost["reason"] == "REASON_AGENT_REMOVED"
        assert task_record(cluster, aware, "partitioned")["State"] == "UNREACHABLE"
    finally:
        await aware.call({"type": "TEARDOWN"})
        await plain.call({"type": "TEARDOWN"})
        await aware.close()
        await plain.close()
    # The killed agent's tasks keep running until it comes back; the fixture kills them.
    assert os.path.isdir(cluster.folder / "s2")
