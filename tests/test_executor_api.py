"""Custom executors: Mesos's v1 executor API on agents, corral.sdk.Executor and the example framework.

The first part checks the parsers and helpers without processes. The
second part runs frameworks against `corral server` and one `corral agent`
as subprocesses, with examples/batch_executor.py as the executor (it runs
each task's `data` as a shell command and sends one framework message per
task with its own pid). The last part runs the same against `corral dev`,
whose agent runs in the server's process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from cluster import ProcessCluster, commands_running
from devcluster import EXAMPLES, DevProcess, task_processes, wait_until

from corral.master import protocol
from corral.master.protocol import ProtocolError
from corral.sdk import (
    DriverStatus,
    Executor,
    ExecutorDriver,
    FrameworkInfo,
    Offer,
    Scheduler,
    SchedulerDriver,
    TaskState,
    TaskStatus,
    executor_info,
    executor_task,
    task_data,
)
from corral.sdk.executor import parse_mesos_duration

EXECUTOR_ID = "batch-executor"
EXECUTOR_CPUS = 0.1
EXECUTOR_MEM = 32.0
BATCH_EXECUTOR = [sys.executable, str(EXAMPLES / "batch_executor.py")]

OFFER = {
    "id": {"value": "o-1"},
    "framework_id": {"value": "fw-1"},
    "agent_id": {"value": "a1"},
    "hostname": "host-a1",
    "resources": [
        {"name": "cpus", "type": "SCALAR", "scalar": {"value": 2.0}},
        {"name": "mem", "type": "SCALAR", "scalar": {"value": 1024.0}},
    ],
}

# Parsers and helpers


def test_executor_task_info_built():
    executor = executor_info("ex", ["/usr/bin/python3", "ex.py"], cpus=0.1, mem=32, env={"A": "1"})
    assert executor["executor_id"] == {"value": "ex"}
    assert executor["command"]["arguments"] == ["/usr/bin/python3", "ex.py"]
    assert executor["command"]["environment"] == {"variables": [{"name": "A", "value": "1"}]}
    assert [resource["name"] for resource in executor["resources"]] == ["cpus", "mem"]
    offer = Offer(OFFER)
    task = executor_task(offer, "t", executor, cpus=0.5, mem=64, data="echo hi", task_id="t-1",
                         kill_grace_seconds=2)
    assert task["executor"] == executor
    assert "command" not in task
    assert task_data(task) == b"echo hi"
    assert task["kill_policy"] == {"grace_period": {"nanoseconds": 2_000_000_000}}
    assert offer.cpus == 1.5


def test_protocol_parses_executor_task():
    executor = executor_info("ex", "run-executor", cpus=0.2, mem=16)
    task = executor_task(Offer(OFFER), "t", executor, cpus=0.5, mem=64, data=b"\x00\x01", task_id="t-1")
    info = protocol.parse_task_info(task, "task_infos[0]")
    assert info.command == {}
    assert info.executor is not None
    assert info.executor.executor_id == "ex"
    assert info.executor.command == {"shell": True, "value": "run-executor"}
    assert info.data == base64.b64encode(b"\x00\x01").decode()
    assert info.held_resources == info.resources
    info.starts_executor = True
    assert info.held_resources.cpus == pytest.approx(0.7)
    assert info.held_resources.mem == pytest.approx(80)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda task: task.update(command={"value": "true"}), "a command or an executor, not both"),
        (lambda task: task["executor"].update(type="DEFAULT"), "only CUSTOM executors"),
        (lambda task: task["executor"].update(executor_id={"value": "a/b"}), "executor_id.value"),
        (lambda task: task["executor"].pop("command"), "a task needs a CommandInfo"),
        (lambda task: task.update(data="not base64!"), "is not valid base64"),
    ],
)
def test_protocol_rejects_executor_task(change: Callable[[dict], None], named: str):
    task = executor_task(Offer(OFFER), "t", executor_info("ex", "run"), cpus=0.5, mem=64, task_id="t-1")
    change(task)
    with pytest.raises(ProtocolError, match=named):
        protocol.parse_task_info(task, "task_infos[0]")


@pytest.mark.parametrize(("text", "seconds"), [("15mins", 900.0), ("2secs", 2.0), ("500ms", 0.5), ("1.5hrs", 5400.0)])
def test_mesos_duration_parsed(text, seconds):
    assert parse_mesos_duration(text, "X") == seconds


def test_mesos_duration_rejected():
    with pytest.raises(ValueError, match="invalid MESOS_RECOVERY_TIMEOUT '15 minutes'"):
        parse_mesos_duration("15 minutes", "MESOS_RECOVERY_TIMEOUT")


def test_driver_needs_environment():
    with pytest.raises(ValueError, match="missing environment variable MESOS_EXECUTOR_ID"):
        ExecutorDriver(Executor(), {"MESOS_AGENT_ENDPOINT": "127.0.0.1:1", "MESOS_FRAMEWORK_ID": "f"})


# A framework that runs tasks through one custom executor


class ExecutorScheduler(Scheduler):
    """Launches `commands` (task id -> shell command) through `executor` on the first offer that fits them all."""

    def __init__(self, commands: dict[str, str], executor: dict, kill_grace: float | None = None):
        self.commands = dict(commands)
        self.executor = executor
        self.kill_grace = kill_grace
        self.agent_id: str | None = None
        self.updates: list[TaskStatus] = []
        self.messages: list[tuple[str, str, bytes]] = []
        self.executor_exits: list[tuple[str, str, int | None]] = []
        self.changed = asyncio.Event()
        # Set by Framework, for the tests' calls.
        self.driver: SchedulerDriver | None = None

    def resource_offers(self, driver, offers):
        for offer in offers:
            count = len(self.commands)
            if count and offer.fits(cpus=0.1 * count + EXECUTOR_CPUS, mem=16 * count + EXECUTOR_MEM):
                tasks = [
                    executor_task(offer, task_id, self.executor, cpus=0.1, mem=16, data=command, task_id=task_id,
                                  kill_grace_seconds=self.kill_grace)
                    for task_id, command in self.commands.items()
                ]
                offer.allocate(cpus=EXECUTOR_CPUS, mem=EXECUTOR_MEM)
                self.commands.clear()
                self.agent_id = offer.agent_id
                driver.launch(offer, tasks)
            else:
                driver.decline(offer, refuse_seconds=1)

    def status_update(self, driver, status):
        self.updates.append(status)
        self.changed.set()

    def framework_message(self, driver, executor_id, agent_id, data):
        self.messages.append((executor_id, agent_id, data))
        self.changed.set()

    def executor_lost(self, driver, executor_id, agent_id, status):
        self.executor_exits.append((executor_id, agent_id, status))
        self.changed.set()

    def states(self, task_id: str) -> list[TaskState]:
        return [status.state for status in self.updates if status.task_id == task_id]

    def last(self, task_id: str) -> TaskStatus:
        return [status for status in self.updates if status.task_id == task_id][-1]

    def reports(self) -> list[dict]:
        """Return the JSON reports that examples/batch_executor.py sends when a task's command ends."""
        return [json.loads(data) for _, _, data in self.messages if data.startswith(b"{")]

    async def wait_for(self, condition: Callable[[], object], description: str, timeout: float = 30.0) -> None:
        async def reached():
            while not condition():
                self.changed.clear()
                await self.changed.wait()
        try:
            await asyncio.wait_for(reached(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {description}; updates: "
                                 f"{[(s.task_id, s.state.value, s.message) for s in self.updates]}, "
                                 f"messages: {self.messages}") from None

    async def wait_state(self, task_id: str, state: TaskState, timeout: float = 30.0) -> None:
        await self.wait_for(lambda: state in self.states(task_id), f"task {task_id} to reach {state}", timeout)


class Framework:
    """An ExecutorScheduler running under a SchedulerDriver in the test's event loop."""

    def __init__(self, master: str, scheduler: ExecutorScheduler, name: str):
        self.scheduler = scheduler
        self.driver = SchedulerDriver(scheduler, FrameworkInfo(name, capabilities=["PARTITION_AWARE"]),
                                      f"http://{master}", reconnect_min=0.1, reconnect_max=0.5)
        self.running: asyncio.Task | None = None
        scheduler.driver = self.driver

    async def __aenter__(self) -> ExecutorScheduler:
        self.running = asyncio.create_task(self.driver.run())
        return self.scheduler

    async def __aexit__(self, *exc_info) -> None:
        self.driver.stop()
        assert await asyncio.wait_for(self.running, 30) is DriverStatus.STOPPED


def batch_executor() -> dict:
    return executor_info(EXECUTOR_ID, BATCH_EXECUTOR, cpus=EXECUTOR_CPUS, mem=EXECUTOR_MEM)


def executor_processes(folder: Path, executor_id: str) -> list[psutil.Process]:
    """Return the live executor processes `executor_id` of the cluster in `folder`, without their children.

    The commands an executor starts inherit its environment, so the executor
    is the process whose parent (corral's supervisor) has none of it.
    """
    found = []
    for process in task_processes(folder):
        try:
            parent = process.parent()
            if process.environ().get("MESOS_EXECUTOR_ID") != executor_id:
                continue
            if parent is None or parent.environ().get("MESOS_EXECUTOR_ID") != executor_id:
                found.append(process)
        except psutil.Error:
            pass
    return found


# The scenarios, each run against a process cluster and against `corral dev`


async def check_tasks_share_executor(master: str, folder: Path) -> None:
    commands = {f"share-{number}": f"sleep 1.5; echo task {number} done" for number in range(3)}
    scheduler = ExecutorScheduler(commands, batch_executor())
    async with Framework(master, scheduler, "share") as scheduler:
        for task_id in commands:
            await scheduler.wait_state(task_id, TaskState.TASK_FINISHED)
        await scheduler.wait_for(lambda: len(scheduler.reports()) == 3, "a message per task")
        await scheduler.wait_for(lambda: scheduler.executor_exits, "the executor's exit once it had no task")
    for task_id in commands:
        assert TaskState.TASK_RUNNING in scheduler.states(task_id)
        assert scheduler.last(task_id).executor_id == EXECUTOR_ID
        assert scheduler.last(task_id).source == "SOURCE_EXECUTOR"
    reports = {report["task_id"]: report for report in scheduler.reports()}
    assert set(reports) == set(commands)
    assert {report["output"] for report in reports.values()} == {f"task {number} done" for number in range(3)}
    pids = {report["executor_pid"] for report in reports.values()}
    assert len(pids) == 1, f"the three tasks ran in executors {pids}; expected one shared process"
    assert all(executor_id == EXECUTOR_ID for executor_id, _, _ in scheduler.messages)
    assert scheduler.executor_exits == [(EXECUTOR_ID, scheduler.agent_id, 0)]
    assert not executor_processes(folder, EXECUTOR_ID)


async def check_messages_and_kill(master: str, folder: Path) -> None:
    scheduler = ExecutorScheduler({"talker": "sleep 60"}, batch_executor())
    async with Framework(master, scheduler, "talk") as scheduler:
        await scheduler.wait_state("talker", TaskState.TASK_RUNNING)
        [executor] = executor_processes(folder, EXECUTOR_ID)
        driver = scheduler.driver
        await driver.message(scheduler.agent_id, EXECUTOR_ID, b"ping")
        await scheduler.wait_for(lambda: any(data.startswith(b"pong") for _, _, data in scheduler.messages),
                                 "the executor's answer to ping")
        [pong] = [data for _, _, data in scheduler.messages if data.startswith(b"pong")]
        assert pong == f"pong {executor.pid}".encode()
        await driver.kill("talker", scheduler.agent_id)
        await scheduler.wait_state("talker", TaskState.TASK_KILLED, timeout=20)
        await scheduler.wait_for(lambda: scheduler.executor_exits, "the executor's exit once it had no task")
    assert not commands_running(folder, "sleep 60")
    assert not executor.is_running()


async def check_shutdown(master: str, folder: Path) -> None:
    commands = {"down-1": "sleep 60", "down-2": "sleep 60"}
    scheduler = ExecutorScheduler(commands, batch_executor())
    async with Framework(master, scheduler, "shutdown") as scheduler:
        for task_id in commands:
            await scheduler.wait_state(task_id, TaskState.TASK_RUNNING)
        [executor] = executor_processes(folder, EXECUTOR_ID)
        await scheduler.driver.shutdown(EXECUTOR_ID, scheduler.agent_id)
        for task_id in commands:
            await scheduler.wait_state(task_id, TaskState.TASK_KILLED, timeout=20)
        await scheduler.wait_for(lambda: scheduler.executor_exits, "the executor's exit")
    # The executor ended by itself after SHUTDOWN: exit code 0, not a signal from the agent.
    assert scheduler.executor_exits == [(EXECUTOR_ID, scheduler.agent_id, 0)]
    assert not executor.is_running()
    assert not commands_running(folder, "sleep 60")


async def check_executor_crash(master: str, folder: Path) -> None:
    commands = {"crash-1": "sleep 60", "crash-2": "sleep 60"}
    scheduler = ExecutorScheduler(commands, batch_executor())
    async with Framework(master, scheduler, "crash") as scheduler:
        for task_id in commands:
            await scheduler.wait_state(task_id, TaskState.TASK_RUNNING)
        [executor] = executor_processes(folder, EXECUTOR_ID)
        executor.send_signal(signal.SIGKILL)
        for task_id in commands:
            await scheduler.wait_state(task_id, TaskState.TASK_FAILED, timeout=20)
        await scheduler.wait_for(lambda: scheduler.executor_exits, "the executor's exit")
    for task_id in commands:
        status = scheduler.last(task_id)
        assert status.reason == "REASON_EXECUTOR_TERMINATED"
        assert "killed by signal 9" in status.message
    assert scheduler.executor_exits == [(EXECUTOR_ID, scheduler.agent_id, signal.SIGKILL)]
    # The executor's supervisor kills what the executor left behind.
    wait_until(lambda: not commands_running(folder, "sleep 60"), 10, "the crashed executor's commands to end")


STUBBORN_EXECUTOR = textwrap.dedent("""
    from corral.sdk import Executor, ExecutorDriver

    class Stubborn(Executor):
        def launch_task(self, driver, task):
            driver.send_status_update(task["task_id"], "TASK_RUNNING", "running and ignoring kills")

        def kill_task(self, driver, task_id):
            print("ignoring the kill of", task_id, flush=True)

    ExecutorDriver(Stubborn()).run_forever()
""")


async def check_kill_ignored(master: str, folder: Path, tmp_path: Path) -> None:
    script = tmp_path / "stubborn_executor.py"
    script.write_text(STUBBORN_EXECUTOR)
    executor = executor_info("stubborn", [sys.executable, str(script)])
    scheduler = ExecutorScheduler({"stubborn-task": "unused"}, executor, kill_grace=0.5)
    async with Framework(master, scheduler, "stubborn") as scheduler:
        await scheduler.wait_state("stubborn-task", TaskState.TASK_RUNNING)
        killed_at = time.monotonic()
        await scheduler.driver.kill("stubborn-task", scheduler.agent_id)
        await scheduler.wait_state("stubborn-task", TaskState.TASK_FAILED, timeout=20)
        waited = time.monotonic() - killed_at
        await scheduler.wait_for(lambda: scheduler.executor_exits, "the idle executor's exit")
    status = scheduler.last("stubborn-task")
    assert "did not end the task within its kill grace period of 0.5s" in status.message
    assert status.reason == "REASON_EXECUTOR_TERMINATED"
    assert 0.5 <= waited < 10
    assert not executor_processes(folder, "stubborn")


# Against `corral server` and `corral agent` processes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("executors")
    processes = ProcessCluster(folder)
    try:
        processes.start_server()
        processes.start_agent("ex-a1", "cpus:2;mem:1024;ports:[25000-25099]")
        wait_until(lambda: processes.get("/v1/agents"), 30, "the agent's registration")
        yield processes
    finally:
        processes.stop()


async def test_tasks_share_one_executor(cluster):
    await check_tasks_share_executor(cluster.http, cluster.folder)


async def test_messages_and_kill(cluster):
    await check_messages_and_kill(cluster.http, cluster.folder)


async def test_shutdown_kills_tasks(cluster):
    await check_shutdown(cluster.http, cluster.folder)


async def test_executor_crash_fails_tasks(cluster):
    await check_executor_crash(cluster.http, cluster.folder)


async def test_ignored_kill_fails_task(cluster, tmp_path):
    await check_kill_ignored(cluster.http, cluster.folder, tmp_path)


async def test_executor_survives_agent_restart(cluster):
    scheduler = ExecutorScheduler({"long": "sleep 6; echo survived"}, batch_executor())
    async with Framework(cluster.http, scheduler, "restart") as scheduler:
        await scheduler.wait_state("long", TaskState.TASK_RUNNING)
        [executor] = executor_processes(cluster.folder, EXECUTOR_ID)
        agent = cluster.processes["ex-a1"]
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
        assert executor.is_running()
        cluster.start_agent("ex-a1", "cpus:2;mem:1024;ports:[25000-25099]")
        await scheduler.wait_state("long", TaskState.TASK_FINISHED, timeout=30)
        await scheduler.wait_for(lambda: scheduler.reports(), "the task's report")
    [report] = scheduler.reports()
    assert report["executor_pid"] == executor.pid
    assert report["output"] == "survived"
    assert "executor adopted after an agent restart" in cluster.log("ex-a1")


UNKNOWN_EXECUTOR = {"framework_id": {"value": "no-such-framework"}, "executor_id": {"value": "no-such-executor"}}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "named"),
    [
        ({"type": "SUBSCRIBE", **UNKNOWN_EXECUTOR}, "application/json", 400,
         "executor no-such-executor of framework no-such-framework is not running on agent ex-a1"),
        ({"type": "UPDATE", **UNKNOWN_EXECUTOR, "update": {"status": {}}}, "application/json", 400,
         "is not running"),
        ({"type": "SUBSCRIBE", "executor_id": {"value": "e"}}, "application/json", 400, "invalid 'framework_id'"),
        ({"executor_id": {"value": "e"}}, "application/json", 400, "with a 'type'"),
        ({"type": "SUBSCRIBE", **UNKNOWN_EXECUTOR}, "application/x-protobuf", 415, "JSON form of the executor API"),
    ],
)
def test_api_rejects_invalid_call(cluster, body, content_type, status, named):
    agent = cluster.agent_http["ex-a1"]
    request = urllib.request.Request(f"http://{agent}/api/v1/executor", data=json.dumps(body).encode(),
                                     headers={"Content-Type": content_type}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == status
    assert named in raised.value.read().decode()


def test_example_framework_exits_zero(cluster):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "executor_framework.py"), "--master", f"http://{cluster.http}",
         "--tasks", "4", "--command", "echo task {index} done", "--timeout", "60"],
        capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all 4 tasks ended: 4 finished, 0 did not" in done.stdout
    assert done.stdout.count("TASK_FINISHED") == 4
    assert "output 'task 3 done'" in done.stdout


# Against `corral dev`


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    folder = tmp_path_factory.mktemp("executors-dev")
    process = DevProcess(folder / "data", folder / "dev.log", ["--cpus", "2", "--memory", "1024"])
    try:
        process.start()
        yield process
    finally:
        process.stop()


async def test_dev_tasks_share_one_executor(dev):
    await check_tasks_share_executor(dev.http_addr, dev.data_dir)


async def test_dev_messages_and_kill(dev):
    await check_messages_and_kill(dev.http_addr, dev.data_dir)


async def test_dev_shutdown_kills_tasks(dev):
    await check_shutdown(dev.http_addr, dev.data_dir)


async def test_dev_executor_crash_fails_tasks(dev):
    await check_executor_crash(dev.http_addr, dev.data_dir)


def test_dev_example_framework_exits_zero(dev):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "executor_framework.py"), "--master", f"http://{dev.http_addr}",
         "--tasks", "3", "--command", "echo task {index} done", "--timeout", "60"],
        capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all 3 tasks ended: 3 finished, 0 did not" in done.stdout


async def test_dev_stop_ends_executor(tmp_path):
    process = DevProcess(tmp_path / "data", tmp_path / "dev.log", ["--cpus", "2", "--memory", "1024"])
    process.start()
    try:
        scheduler = ExecutorScheduler({"until-stop": "sleep 60"}, batch_executor())
        async with Framework(process.http_addr, scheduler, "dev-stop") as scheduler:
            await scheduler.wait_state("until-stop", TaskState.TASK_RUNNING)
            [executor] = executor_processes(process.data_dir, EXECUTOR_ID)
            assert await asyncio.to_thread(process.stop) == 0
    finally:
        if process.process is not None and process.process.poll() is None:
            process.stop()
    assert not executor.is_running()
    assert not task_processes(process.data_dir)
    assert "executor exited executor=batch-executor" in process.log()
