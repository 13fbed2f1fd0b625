"""Tests for corral.agent.process, run against real child processes.

TaskProcess starts each task through its executor (corral.agent.executor),
so these tests also cover the executor's process group, output, exit
status and kill handling. tests/test_executor.py covers the rest.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from corral.agent.process import (
    ExitStatus,
    LaunchError,
    LaunchSpec,
    RestartBackoff,
    TaskProcess,
    kill_process_group,
)

PATH = os.environ.get("PATH", os.defpath)


def make_spec(sandbox: Path, argv: list[str], **overrides) -> LaunchSpec:
    fields = {
        "task_id": "web.1",
        "argv": argv,
        "env": {"PATH": PATH},
        "cwd": None,
        "sandbox": sandbox,
        "kill_timeout": 5.0,
    }
    fields.update(overrides)
    return LaunchSpec(**fields)


def python_argv(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def live_group_members(pgid: int) -> list[psutil.Process]:
    """Return the processes of group pgid that are alive (zombies do not count)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


async def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


@pytest.fixture
async def started():
    """Start TaskProcesses and SIGKILL whatever a test leaves running."""
    processes: list[TaskProcess] = []

    async def start(spec: LaunchSpec) -> TaskProcess:
        process = TaskProcess(spec)
        await process.start()
        processes.append(process)
        return process

    yield start
    for process in processes:
        await process.stop(timeout=0)


async def test_output_appended_to_sandbox_files(tmp_path, started):
    sandbox = tmp_path / "sandbox"
    code = "import sys; print('to stdout'); print('to stderr', file=sys.stderr)"
    for _ in range(2):
        process = await started(make_spec(sandbox, python_argv(code)))
        status = await process.wait()
        assert status == ExitStatus(code=0, signal=None)

    assert (sandbox / "stdout").read_text() == "to stdout\nto stdout\n"
    assert (sandbox / "stderr").read_text() == "to stderr\nto stderr\n"


async def test_environment_not_inherited(tmp_path, started, monkeypatch):
    monkeypatch.setenv("CORRAL_TEST_AGENT_ONLY", "1")
    code = "import os; print(os.environ.get('TASK_VAR'), os.environ.get('CORRAL_TEST_AGENT_ONLY'))"
    spec = make_spec(tmp_path, python_argv(code), env={"PATH": PATH, "TASK_VAR": "set"})
    process = await started(spec)
    await process.wait()

    assert (tmp_path / "stdout").read_text() == "set None\n"


async def test_cwd_defaults_to_sandbox(tmp_path, started):
    sandbox = tmp_path / "new" / "sandbox"
    process = await started(make_spec(sandbox, python_argv("import os; print(os.getcwd())")))
    await process.wait()

    assert (sandbox / "stdout").read_text().strip() == str(sandbox.resolve())


async def test_cwd_given(tmp_path, started):
    workdir = tmp_path / "work"
    workdir.mkdir()
    code = "import os; print(os.getcwd())"
    process = await started(make_spec(tmp_path / "sandbox", python_argv(code), cwd=str(workdir)))
    await process.wait()

    assert (tmp_path / "sandbox" / "stdout").read_text().strip() == str(workdir.resolve())


async def test_command_found_on_task_path(tmp_path, started):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "hello"
    script.write_text("#!/bin/sh\necho \"hello $0\"\n")
    script.chmod(0o755)
    spec = make_spec(tmp_path / "sandbox", ["hello"], env={"PATH": str(bin_dir)})
    process = await started(spec)
    status = await process.wait()

    assert status.success
    # argv[0] stays as given, even though the executable was found on PATH.
    assert (tmp_path / "sandbox" / "stdout").read_text() == f"hello {script}\n"


async def test_missing_command_raises_launch_error(tmp_path):
    spec = make_spec(tmp_path, ["corral-no-such-command"], env={"PATH": str(tmp_path)})
    process = TaskProcess(spec)

    with pytest.raises(LaunchError) as caught:
        await process.start()

    message = str(caught.value)
    assert "web.1" in message
    assert "corral-no-such-command" in message
    assert "not found" in message
    assert process.pid is None
    assert not process.running


async def test_missing_absolute_command_raises_launch_error(tmp_path):
    missing = str(tmp_path / "absent")
    process = TaskProcess(make_spec(tmp_path, [missing]))

    with pytest.raises(LaunchError) as caught:
        await process.start()

    assert "web.1" in str(caught.value)
    assert missing in str(caught.value)
    assert "No such file" in str(caught.value)


async def test_non_executable_command_raises_launch_error(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "plain").write_text("#!/bin/sh\necho hi\n")
    (bin_dir / "plain").chmod(0o644)
    spec = make_spec(tmp_path / "sandbox", ["plain"], env={"PATH": str(bin_dir)})

    with pytest.raises(LaunchError, match="not executable"):
        await TaskProcess(spec).start()


async def test_missing_cwd_raises_launch_error(tmp_path):
    spec = make_spec(tmp_path, python_argv("pass"), cwd=str(tmp_path / "absent"))

    with pytest.raises(LaunchError, match="web.1"):
        await TaskProcess(spec).start()


async def test_wait_returns_exit_code(tmp_path, started):
    process = await started(make_spec(tmp_path, python_argv("raise SystemExit(3)")))
    status = await process.wait()

    assert status.code == 3
    assert status.signal is None
    assert not status.success
    assert status.describe() == "exited with code 3"
    assert not process.running
    assert process.exit_status == status


async def test_wait_returns_signal(tmp_path, started):
    process = await started(make_spec(tmp_path, python_argv("import time; time.sleep(300)")))
    assert process.running
    os.kill(process.pid, signal.SIGKILL)
    status = await process.wait()

    assert status.code is None
    assert status.signal == signal.SIGKILL
    assert not status.success
    assert status.describe() == "killed by signal 9 (SIGKILL)"


async def test_pid_group_and_create_time(tmp_path, started):
    process = await started(make_spec(tmp_path, python_argv("import time; time.sleep(300)")))

    assert process.pgid == process.pid
    assert os.getpgid(process.pid) == process.pid
    assert process.create_time == psutil.Process(process.pid).create_time()


async def test_stop_sends_sigterm_first(tmp_path, started):
    process = await started(make_spec(tmp_path, python_argv("import time; time.sleep(300)")))
    began = time.monotonic()
    status = await process.stop(timeout=5)

    assert status.signal == signal.SIGTERM
    assert time.monotonic() - began < 4


async def test_stop_kills_process_ignoring_sigterm(tmp_path, started):
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    process = await started(make_spec(tmp_path, python_argv(code), kill_timeout=0.5))
    stdout = tmp_path / "stdout"
    assert await wait_until(lambda: stdout.read_text() == "ready\n")
    began = time.monotonic()
    status = await process.stop()

    elapsed = time.monotonic() - began
    assert status.signal == signal.SIGKILL
    assert elapsed >= 0.5
    assert elapsed < 4


async def test_stop_kills_forked_children(tmp_path, started):
    process = await started(make_spec(tmp_path, ["sh", "-c", "sleep 300 & sleep 300 & wait"]))
    assert await wait_until(lambda: len(live_group_members(process.pgid)) == 3)
    await process.stop(timeout=2)

    assert await wait_until(lambda: not live_group_members(process.pgid))


async def test_stop_kills_children_outliving_main_process(tmp_path, started):
    # The background sleep inherits the ignored SIGTERM, and the main process
    # (sh replaced by "sleep 301") dies of it at once.
    script = "trap '' TERM; sleep 300 & trap - TERM; exec sleep 301"
    process = await started(make_spec(tmp_path, ["sh", "-c", script]))
    assert await wait_until(
        lambda: sorted(p.cmdline()[-1] for p in live_group_members(process.pgid)) == ["300", "301"]
    )
    began = time.monotonic()
    status = await process.stop(timeout=10)

    assert status.signal == signal.SIGTERM
    assert time.monotonic() - began < 5
    assert await wait_until(lambda: not live_group_members(process.pgid))


async def test_stop_twice_and_after_exit(tmp_path, started):
    process = await started(make_spec(tmp_path, python_argv("raise SystemExit(0)")))
    exited = await process.wait()

    assert await process.stop() == exited
    assert await process.stop() == exited


async def test_stop_concurrently(tmp_path, started):
    process = await started(make_spec(tmp_path, python_argv("import time; time.sleep(300)")))
    first, second = await asyncio.gather(process.stop(), process.stop())

    assert first == second
    assert first.signal == signal.SIGTERM


async def test_stop_before_start_raises(tmp_path):
    with pytest.raises(RuntimeError, match="not started"):
        await TaskProcess(make_spec(tmp_path, python_argv("pass"))).stop()


def test_exit_status_describe_unknown_signal():
    assert ExitStatus(code=None, signal=200).describe() == "killed by signal 200 (unknown signal)"


@pytest.fixture
def session_child():
    """Start a sleeping child in its own session, as a task left by an earlier agent."""
    children: list[subprocess.Popen] = []

    def spawn(code: str = "import time; time.sleep(300)") -> subprocess.Popen:
        child = subprocess.Popen(python_argv(code), start_new_session=True)
        children.append(child)
        return child

    yield spawn
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_kill_process_group_wrong_create_time(session_child):
    child = session_child()
    create_time = psutil.Process(child.pid).create_time()

    assert kill_process_group(child.pid, create_time - 100, timeout=1) is False
    time.sleep(0.1)
    assert child.poll() is None


def test_kill_process_group_matching_create_time(session_child):
    child = session_child()
    create_time = psutil.Process(child.pid).create_time()

    assert kill_process_group(child.pid, create_time, timeout=2) is True
    assert child.wait(timeout=5) == -signal.SIGTERM


def test_kill_process_group_without_create_time(session_child):
    child = session_child()

    assert kill_process_group(child.pid, None, timeout=2) is True
    assert child.wait(timeout=5) == -signal.SIGTERM


def test_kill_process_group_kills_children():
    child = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while len(live_group_members(child.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(live_group_members(child.pid)) == 3

        assert kill_process_group(child.pid, None, timeout=2) is True
        child.wait(timeout=5)
        deadline = time.monotonic() + 5
        while live_group_members(child.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not live_group_members(child.pid)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def test_kill_process_group_sigkills_after_timeout(session_child):
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    child = subprocess.Popen(python_argv(code), start_new_session=True, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        began = time.monotonic()

        assert kill_process_group(child.pid, None, timeout=0.3) is True
        assert child.wait(timeout=5) == -signal.SIGKILL
        assert time.monotonic() - began >= 0.3
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()


def test_kill_process_group_exited_process(session_child):
    child = session_child("pass")
    child.wait()

    # The pid may be reused by now, but then with another create time.
    assert kill_process_group(child.pid, time.time() - 3600, timeout=1) is False


def test_kill_process_group_rejects_init_and_self():
    assert kill_process_group(0, None, timeout=0) is False
    assert kill_process_group(1, None, timeout=0) is False
    assert kill_process_group(-5, None, timeout=0) is False
    assert kill_process_group(os.getpid(), None, timeout=0) is False


def test_kill_process_group_rejects_own_group():
    # A child that stays in our process group: killing its group would kill us.
    child = subprocess.Popen(python_argv("import time; time.sleep(300)"))
    try:
        assert kill_process_group(child.pid, None, timeout=0) is False
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


BACKOFF_TABLE = [
    # (now, last_started_at, expected delay, expected attempts)
    (10.0, 9.0, 1.0, 1),
    (12.0, 11.0, 2.0, 2),
    (15.0, 13.0, 4.0, 3),
    (20.0, 19.0, 8.0, 4),
    (30.0, 29.0, 16.0, 5),
    (50.0, 49.0, 32.0, 6),
    (90.0, 89.0, 60.0, 7),
    (200.0, 199.0, 60.0, 8),
    # A run of exactly reset_after seconds starts over.
    (300.0, 240.0, 1.0, 1),
    (302.0, 301.0, 2.0, 2),
    # One second short of reset_after still counts as a quick failure.
    (400.0, 341.0, 4.0, 3),
]


def test_restart_backoff_table():
    backoff = RestartBackoff(initial=1.0, factor=2.0, maximum=60.0, reset_after=60.0)
    for now, last_started_at, delay, attempts in BACKOFF_TABLE:
        assert backoff.next_delay(now, last_started_at) == delay, (now, last_started_at)
        assert backoff.attempts == attempts, (now, last_started_at)


def test_restart_backoff_reset():
    backoff = RestartBackoff(initial=0.5, factor=3.0, maximum=10.0, reset_after=30.0)
    assert backoff.next_delay(1.0, 0.0) == 0.5
    assert backoff.next_delay(2.0, 1.5) == 1.5
    backoff.reset()

    assert backoff.attempts == 0
    assert backoff.next_delay(3.0, 2.5) == 0.5


@pytest.mark.parametrize(
    "arguments",
    [
        {"initial": 0},
        {"factor": 0.5},
        {"initial": 10, "maximum": 5},
        {"reset_after": -1},
    ],
)
def test_restart_backoff_rejects_invalid_arguments(arguments):
    with pytest.raises(ValueError):
        RestartBackoff(**arguments)
