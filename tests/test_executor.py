"""Tests for the per-task executor, cgroup limits and agent recovery, run against real processes.

The executor tests start tasks through TaskProcess, which runs the real
`python -m corral.agent.executor`. The agent tests run an Agent on a real
State over SQLite, stop it without stopping its tasks, and start a new
Agent on the same data folder. A fixture kills every executor and task that
a test leaves behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from corral.agent.agent import Agent
from corral.agent.cgroups import (
    CgroupError,
    Limits,
    LimitMode,
    TaskCgroup,
    cpu_shares,
    cpu_weight,
    create_task_cgroup,
    parse_mountinfo,
    parse_proc_cgroup,
)
from corral.agent.connection import LocalConnection
from corral.agent.executor import ExecutorFiles, read_json
from corral.agent.process import LaunchError, LaunchSpec, TaskProcess, kill_process_group, recover_task_process
from corral.jobspec import parse_job
from corral.state import State
from corral.state.records import Task
from corral.store import SQLiteStore
from corral.types import DesiredState, TaskState

PATH = os.environ.get("PATH", os.defpath)
NODE = "executor-test"
WAIT_TIMEOUT = 20.0

SLEEPER = "import time; time.sleep(300)"
# Exits 0 on SIGUSR1, so a test can end the task cleanly from outside.
EXIT_ON_USR1 = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))\n"
    "print('ready', flush=True)\n"
    "time.sleep(300)\n"
)
# Allocates 1 MiB after another until something stops it.
MEMORY_HOG = "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n"


def python_argv(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def make_spec(sandbox: Path, argv: list[str], **overrides: Any) -> LaunchSpec:
    fields: dict[str, Any] = {
        "task_id": f"exec.1.{uuid.uuid4().hex[:8]}",
        "argv": argv,
        "env": {"PATH": PATH},
        "cwd": None,
        "sandbox": sandbox,
        "kill_timeout": 5.0,
    }
    fields.update(overrides)
    return LaunchSpec(**fields)


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


def exists(process: psutil.Process) -> bool:
    """Whether the process still exists, alive or as a zombie (not a later one with its pid)."""
    return process.is_running()


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def executor_record(sandbox: Path) -> dict:
    record = read_json(ExecutorFiles(sandbox).executor)
    assert record is not None, f"no executor.json in {sandbox}"
    return record


def executor_process(sandbox: Path) -> psutil.Process:
    return psutil.Process(executor_record(sandbox)["pid"])


def kill_strays(root: Path) -> None:
    """SIGKILL every executor under root that still runs, with its task's group and cgroup."""
    for state_file in root.rglob("executor/executor.json"):
        files = ExecutorFiles(state_file.parent.parent)
        try:
            executor, task = read_json(files.executor), read_json(files.task)
        except Exception:  # noqa: BLE001 - teardown must go on
            continue
        if executor is not None:
            try:
                process = psutil.Process(executor["pid"])
                if abs(process.create_time() - (executor["create_time"] or 0)) < 1:
                    process.kill()
            except psutil.Error:
                pass
        if task is not None:
            kill_process_group(task["pid"], task["create_time"], timeout=0)
            if task.get("cgroup"):
                TaskCgroup.from_record(task["cgroup"]).remove(timeout=1)


@pytest.fixture(autouse=True)
def no_strays(tmp_path: Path):
    yield
    kill_strays(tmp_path)


@pytest.fixture
async def started() -> AsyncIterator[Callable[[LaunchSpec], Awaitable[TaskProcess]]]:
    """Start TaskProcesses and stop whatever a test leaves running."""
    processes: list[TaskProcess] = []

    async def start(spec: LaunchSpec) -> TaskProcess:
        process = TaskProcess(spec)
        processes.append(process)
        await process.start()
        return process

    yield start
    for process in processes:
        if process.pid is not None and not process.released:
            await process.stop(timeout=0)


def memory_cgroup_problem() -> str | None:
    """Return why this machine cannot limit memory with a cgroup, or None when it can."""
    try:
        cgroup = create_task_cgroup(f"corral-test-probe-{os.getpid()}", Limits(memory_mb=16))
    except CgroupError as exc:
        return str(exc)
    cgroup.remove()
    return None


@pytest.fixture
def memory_cgroup() -> None:
    problem = memory_cgroup_problem()
    if problem is not None:
        pytest.skip(f"the kernel gives no memory cgroup here ({problem}); the rlimit tests cover this machine")


# ---------------------------------------------------------------------------
# Process groups, zombies and kills


async def test_kill_leaves_no_process(tmp_path, started):
    script = "sleep 100 & sleep 100 & setsid sleep 100 & wait"
    process = await started(make_spec(tmp_path, ["sh", "-c", script]))
    executor = executor_process(tmp_path)
    descendants = await wait_until(
        lambda: (found := executor.children(recursive=True)) and len(found) == 4 and found,
        "the shell and its three sleeps",
    )
    escaped = [p for p in descendants if os.getsid(p.pid) != process.pid]
    status = await process.stop(timeout=2)

    assert status.signal == signal.SIGTERM
    assert len(escaped) == 1
    for child in descendants:
        assert not exists(child), f"pid {child.pid} ({child.name()}) outlived the task"


async def test_exit_kills_children_left_behind(tmp_path, started):
    script = "sleep 100 & setsid sleep 100 & sleep 2; exit 3"
    process = await started(make_spec(tmp_path, ["sh", "-c", script]))
    executor = executor_process(tmp_path)
    children = await wait_until(
        lambda: (found := executor.children(recursive=True)) and len(found) >= 3 and found,
        "the shell's background sleeps",
    )
    status = await process.wait()

    assert status.code == 3
    for child in children:
        assert not exists(child), f"pid {child.pid} outlived the task's exit"


async def test_orphans_reaped_by_executor(tmp_path, started):
    # The main process forks a child that forks a grandchild and exits at once,
    # so the grandchild is orphaned. The grandchild records its new parent, then exits.
    code = (
        "import os, time\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(0.3)\n"
        "        with open('orphan-parent', 'w') as out:\n"
        "            out.write(str(os.getppid()))\n"
        "        os._exit(0)\n"
        "    os._exit(0)\n"
        "os.waitpid(child, 0)\n"
        "time.sleep(300)\n"
    )
    await started(make_spec(tmp_path, python_argv(code)))
    executor = executor_process(tmp_path)
    parent_file = tmp_path / "orphan-parent"
    await wait_until(lambda: parent_file.exists() and parent_file.read_text(), "the orphan to record its parent")
    await asyncio.sleep(0.3)
    zombies = [child for child in executor.children() if child.status() == psutil.STATUS_ZOMBIE]

    assert int(parent_file.read_text()) == executor.pid
    assert zombies == []


async def test_executor_in_own_session(tmp_path, started):
    process = await started(make_spec(tmp_path, python_argv(SLEEPER)))
    executor = executor_process(tmp_path)

    assert os.getsid(executor.pid) != os.getsid(0)
    assert executor.ppid() != os.getpid()
    assert os.getpgid(process.pid) == process.pid


async def test_task_signals_not_ignored(tmp_path, started):
    process = await started(make_spec(tmp_path, ["cat", "/proc/self/status"]))
    await process.wait()
    (line,) = [line for line in (tmp_path / "stdout").read_text().splitlines() if line.startswith("SigIgn:")]
    ignored = int(line.split()[1], 16)

    for signum in (signal.SIGPIPE, signal.SIGHUP, signal.SIGXFSZ):
        assert not ignored & (1 << (signum - 1)), f"{signum.name} is ignored in the task"


async def test_stop_timeout_overrides_spec(tmp_path, started):
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    process = await started(make_spec(tmp_path, python_argv(code), kill_timeout=60))
    await wait_until(lambda: (tmp_path / "stdout").read_text() == "ready\n", "the task to ignore SIGTERM")
    began = time.monotonic()
    status = await process.stop(timeout=0.3)

    elapsed = time.monotonic() - began
    assert status.signal == signal.SIGKILL
    assert elapsed >= 0.3
    assert elapsed < 10


async def test_state_files_written(tmp_path, started):
    process = await started(make_spec(tmp_path, python_argv(SLEEPER), job="exec"))
    files = ExecutorFiles(tmp_path)
    await process.stop(timeout=2)
    launch, task, ended = read_json(files.launch), read_json(files.task), read_json(files.exit)

    assert launch["job"] == "exec"
    assert task["pid"] == process.pid
    assert ended["signal"] == signal.SIGTERM
    assert ended["kill_requested"] is True


async def test_executor_killed_reports_unknown(tmp_path, started):
    process = await started(make_spec(tmp_path, python_argv(SLEEPER)))
    task = psutil.Process(process.pid)
    executor_process(tmp_path).kill()
    status = await asyncio.wait_for(process.wait(), WAIT_TIMEOUT)

    assert status.code is None
    assert "without recording" in status.unknown_reason
    assert await wait_until(lambda: not alive(task), "the task to be killed after its executor died")
    assert "without recording" in read_json(ExecutorFiles(tmp_path).exit)["unknown_reason"]


async def test_stuck_executor_killed_on_stop(tmp_path, started):
    process = await started(make_spec(tmp_path, python_argv(SLEEPER)))
    task = psutil.Process(process.pid)
    executor = executor_process(tmp_path)
    executor.suspend()
    began = time.monotonic()
    status = await asyncio.wait_for(process.stop(timeout=0.2), WAIT_TIMEOUT)

    assert "did not stop the task" in status.unknown_reason
    assert time.monotonic() - began >= 5
    assert await wait_until(lambda: not alive(task), "the task to be killed without its executor")
    assert await wait_until(lambda: not alive(executor), "the stuck executor to be killed")


async def test_launch_failure_in_executor(tmp_path):
    process = TaskProcess(make_spec(tmp_path, python_argv("pass"), cwd=str(tmp_path / "absent")))
    with pytest.raises(LaunchError, match="working directory"):
        await process.start()

    assert process.pid is None
    assert "launch_error" in read_json(ExecutorFiles(tmp_path).exit)


# ---------------------------------------------------------------------------
# Limits


async def test_memory_limit_oom_killed(tmp_path, started, memory_cgroup):
    spec = make_spec(tmp_path, python_argv(MEMORY_HOG), limits=Limits(memory_mb=48))
    process = await started(spec)
    status = await asyncio.wait_for(process.wait(), WAIT_TIMEOUT)

    assert status.oom_killed
    assert status.signal == signal.SIGKILL
    assert "out of memory" in status.describe()
    assert "48 MB" in status.describe()


async def test_cgroup_created_and_removed(tmp_path, started, memory_cgroup):
    spec = make_spec(tmp_path, python_argv(SLEEPER), limits=Limits(cpus=0.25, memory_mb=64))
    process = await started(spec)
    record = read_json(ExecutorFiles(tmp_path).task)
    cgroup = TaskCgroup.from_record(record["cgroup"])
    memory = cgroup.folders.get("memory") or cgroup.folders["unified"]

    assert record["limit_mode"] in (LimitMode.CGROUP_V1, LimitMode.CGROUP_V2)
    assert process.pid in cgroup.pids()
    if cgroup.mode is LimitMode.CGROUP_V1:
        assert int((memory / "memory.limit_in_bytes").read_text()) == 64 << 20
        assert int((cgroup.folders["cpu"] / "cpu.shares").read_text()) == 256
    await process.stop(timeout=2)
    for folder in cgroup.folders.values():
        assert not folder.exists(), f"{folder} was not removed"


async def test_cpu_hard_limit_sets_quota(tmp_path, started, memory_cgroup):
    limits = Limits(cpus=0.5, memory_mb=64, cpu_hard_limit=True)
    await started(make_spec(tmp_path, python_argv(SLEEPER), limits=limits))
    cgroup = TaskCgroup.from_record(read_json(ExecutorFiles(tmp_path).task)["cgroup"])
    if cgroup.mode is not LimitMode.CGROUP_V1:
        pytest.skip("the quota file checked here is cgroup v1's")

    assert int((cgroup.folders["cpu"] / "cpu.cfs_quota_us").read_text()) == 50_000
    assert int((cgroup.folders["cpu"] / "cpu.cfs_period_us").read_text()) == 100_000


async def test_rlimit_limits_memory(tmp_path, started):
    spec = make_spec(tmp_path, python_argv(MEMORY_HOG), limits=Limits(memory_mb=64), use_cgroups=False)
    process = await started(spec)
    status = await asyncio.wait_for(process.wait(), WAIT_TIMEOUT)
    record = read_json(ExecutorFiles(tmp_path).task)

    assert record["limit_mode"] == LimitMode.RLIMIT
    assert record["cgroup"] is None
    assert status.code == 1
    assert not status.oom_killed
    assert "MemoryError" in (tmp_path / "stderr").read_text()


def test_parse_proc_cgroup_hybrid():
    text = "9:name=systemd:/\n4:memory:/agent/x\n2:cpu,cpuacct:/\n0::/\n"
    v1, v2 = parse_proc_cgroup(text)

    assert v1["memory"] == "/agent/x"
    assert v1["cpu"] == "/"
    assert v1["cpuacct"] == "/"
    assert v2 == "/"


def test_parse_mountinfo_v1_and_v2():
    text = (
        "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n"
        "31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
        "32 25 0:28 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
        "33 25 0:29 /nested /mnt/other rw - cgroup cgroup rw,pids\n"
    )
    v1, v2 = parse_mountinfo(text)

    assert v1["memory"] == Path("/sys/fs/cgroup/memory")
    assert v1["cpu"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert "pids" not in v1
    assert v2 == Path("/sys/fs/cgroup/unified")


@pytest.mark.parametrize(
    ("cpus", "shares", "weight"),
    [(0.001, 2, 1), (0.1, 102, 4), (1.0, 1024, 39), (256.0, 262144, 10000)],
)
def test_cpu_shares_and_weight(cpus, shares, weight):
    assert cpu_shares(cpus) == shares
    assert cpu_weight(cpus) == weight


# ---------------------------------------------------------------------------
# Recovery of one process


async def test_released_process_recovered(tmp_path, started):
    process = await started(make_spec(tmp_path, python_argv(SLEEPER)))
    pid = process.pid
    process.release()
    await asyncio.sleep(0.1)
    recovered = await recover_task_process("ignored", tmp_path)

    assert recovered.process is not None
    assert recovered.process.pid == pid
    assert alive(psutil.Process(pid))
    status = await recovered.process.stop(timeout=2)
    assert status.signal == signal.SIGTERM


async def test_recover_reads_exit_after_release(tmp_path, started):
    process = await started(make_spec(tmp_path, python_argv(SLEEPER)))
    executor = executor_process(tmp_path)
    process.release()
    os.kill(process.pid, signal.SIGKILL)
    await wait_until(lambda: not alive(executor), "the executor to exit")
    recovered = await recover_task_process("ignored", tmp_path)

    assert recovered.process is None
    assert recovered.exit_status is not None
    assert recovered.exit_status.signal == signal.SIGKILL


async def test_recover_without_executor(tmp_path):
    recovered = await recover_task_process("ignored", tmp_path / "empty")

    assert recovered.process is None
    assert recovered.exit_status is None
    assert "no executor" in recovered.problem


# ---------------------------------------------------------------------------
# Agent: limits, stop without stopping tasks, and adoption


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[State]:
    store = SQLiteStore(tmp_path / "corral.db")
    await store.open()
    state = State(store)
    await state.start()
    yield state
    await state.stop()
    await store.close()


@pytest.fixture
async def agents(state: State, tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[Agent]]]:
    """Start Agents on one data folder; stop the last one with its tasks at teardown."""
    running: list[Agent] = []

    async def start() -> Agent:
        agent = Agent(LocalConnection(state), node=NODE, address="127.0.0.1", datacenter="dc1",
                      data_dir=tmp_path / "agent")
        running.append(agent)
        await agent.start()
        return agent

    yield start
    for agent in running:
        await agent.stop()


async def place_task(state: State, name: str, code: str, memory: int = 64) -> str:
    """Store a task of a one-instance job, as the scheduler would, and return its id."""
    spec = parse_job({
        "name": name,
        "task": {
            "command": sys.executable,
            "args": ["-c", code],
            "ports": ["http"],
            "resources": {"cpus": 0.1, "memory": memory},
            "kill_timeout": "2s",
        },
        "service": {"name": name, "port": "http", "tags": ["v1"]},
    }).to_dict()
    task = Task(
        id=f"{name}.0.{uuid.uuid4().hex[:8]}", job=name, instance=0, node=NODE, spec_version=1,
        desired=DesiredState.RUN, state=TaskState.STAGING, cpus=0.1, memory=memory, port_labels=["http"],
        spec=spec, created_at=time.time(),
    )
    await state.put_tasks([task])
    return task.id


def running_task(state: State, task_id: str) -> Task | None:
    task = state.task(task_id)
    if task is not None and task.state is TaskState.RUNNING and task.pid is not None:
        return task
    return None


async def test_agent_oom_task_failed(state, agents, memory_cgroup):
    await agents()
    task_id = await place_task(state, "hog", MEMORY_HOG, memory=48)

    def failed_for_memory() -> Task | None:
        task = state.task(task_id)
        return task if task.state is TaskState.FAILED and "out of memory" in task.message else None

    task = await wait_until(failed_for_memory, "the task to fail for memory")
    assert "48 MB" in task.message
    assert "restarting" in task.message


async def test_agent_stop_leaves_task_running(state, agents, tmp_path):
    first = await agents()
    task_id = await place_task(state, "keep", SLEEPER)
    task = await wait_until(lambda: running_task(state, task_id), "the task to run")
    await wait_until(lambda: state.services(NODE), "the task's service in the catalog")
    await first.stop(stop_tasks=False)
    sandbox = first.sandbox_path(task_id)

    assert alive(psutil.Process(task.pid))
    assert alive(executor_process(sandbox))
    assert state.task(task_id).state is TaskState.RUNNING
    assert [service.id for service in state.services(NODE)] == [task_id]


async def test_agent_restart_adopts_task(state, agents):
    first = await agents()
    task_id = await place_task(state, "adopt", SLEEPER)
    before = await wait_until(lambda: running_task(state, task_id), "the task to run")
    (service_before,) = await wait_until(lambda: state.services(NODE), "the task's service in the catalog")
    task_process = psutil.Process(before.pid)
    await first.stop(stop_tasks=False)
    second = await agents()
    after = state.task(task_id)
    services = state.services(NODE)

    assert task_id in second.runners
    assert after.state is TaskState.RUNNING
    assert after.pid == before.pid
    assert "adopted" in after.message
    assert [service.id for service in services] == [task_id]
    assert services[0].port == service_before.port
    assert services[0].tags == ["v1"]
    await second.stop()
    assert state.task(task_id).state is TaskState.KILLED
    assert not alive(task_process)


async def test_adopted_task_exit_restarts(state, agents):
    first = await agents()
    task_id = await place_task(state, "watched", SLEEPER)
    before = await wait_until(lambda: running_task(state, task_id), "the task to run")
    await first.stop(stop_tasks=False)
    await agents()
    os.kill(before.pid, signal.SIGKILL)

    def restarted() -> Task | None:
        task = running_task(state, task_id)
        return task if task is not None and task.pid != before.pid else None

    task = await wait_until(restarted, "the adopted task to be restarted after it was killed")
    assert task.restarts == 1


async def test_exit_while_agent_down_lost(state, agents):
    first = await agents()
    task_id = await place_task(state, "ended", SLEEPER)
    before = await wait_until(lambda: running_task(state, task_id), "the task to run")
    sandbox = first.sandbox_path(task_id)
    executor = executor_process(sandbox)
    await first.stop(stop_tasks=False)
    os.kill(before.pid, signal.SIGKILL)
    await wait_until(lambda: not alive(executor), "the executor to record the exit")
    second = await agents()
    await asyncio.sleep(0.5)
    after = state.task(task_id)

    assert after.state is TaskState.LOST
    assert "killed by signal 9" in after.message
    assert "not restarted" in after.message
    assert task_id not in second.runners
    assert executor_record(sandbox)["pid"] == executor.pid
    assert state.services(NODE) == []


async def test_clean_exit_while_agent_down_finished(state, agents):
    first = await agents()
    task_id = await place_task(state, "done", EXIT_ON_USR1)
    before = await wait_until(lambda: running_task(state, task_id), "the task to run")
    sandbox = first.sandbox_path(task_id)
    await wait_until(lambda: (sandbox / "stdout").read_text() == "ready\n", "the task's signal handler")
    executor = executor_process(sandbox)
    await first.stop(stop_tasks=False)
    os.kill(before.pid, signal.SIGUSR1)
    await wait_until(lambda: not alive(executor), "the executor to record the exit")
    second = await agents()
    after = state.task(task_id)

    assert after.state is TaskState.FINISHED
    assert "exited with code 0" in after.message
    assert task_id not in second.runners
    await asyncio.sleep(0.5)
    assert executor_record(sandbox)["pid"] == executor.pid


async def test_orphan_executor_stopped(state, agents):
    first = await agents()
    task_id = await place_task(state, "orphan", SLEEPER)
    before = await wait_until(lambda: running_task(state, task_id), "the task to run")
    await first.stop(stop_tasks=False)

    def forget(task: Task) -> None:
        task.state = TaskState.LOST
        task.desired = DesiredState.STOP

    await state.update_task(task_id, forget)
    await agents()
    process = psutil.Process(before.pid)

    assert await wait_until(lambda: not alive(process), "the orphaned task to be stopped")
