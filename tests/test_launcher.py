"""The launcher fork server (corral.agent.launcher) as a real process, and its client.

Each test writes a launch.json for a `sleep` task into a sandbox under
tmp_path, has the fork server start its executor, and stops every
executor it started through the executor's SIGTERM path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from corral.agent import process as process_module
from corral.agent.executor import EXIT_LAUNCH_FAILED, EXIT_STARTED, ExecutorFiles, LaunchRecord, read_json, write_json
from corral.agent.launcher import LaunchClient, LauncherUnavailable
from corral.agent.process import LaunchSpec, TaskProcess


def _prepare(sandbox: Path, executable: str = "/bin/sleep", argv: tuple[str, ...] = ("sleep", "30")) -> ExecutorFiles:
    files = ExecutorFiles(sandbox)
    files.reset()
    record = LaunchRecord(
        task_id=sandbox.name, job="launcher-test", argv=list(argv), executable=executable,
        env={"PATH": "/usr/bin:/bin", "CORRAL_SANDBOX": str(sandbox)}, cwd=str(sandbox), kill_timeout=1.0,
    )
    write_json(files.launch, record.to_dict())
    return files


def _wait_for(condition, timeout: float, description: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {description}")


@pytest.fixture
def executors():
    """Collect sandboxes whose executors the test started; stop each one at the end."""
    started: list[ExecutorFiles] = []
    yield started
    for files in started:
        record = read_json(files.executor)
        if record is None:
            continue
        try:
            os.kill(record["pid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
    for files in started:
        if read_json(files.executor) is not None:
            _wait_for(lambda: files.exit.exists(), 10, f"exit.json in {files.sandbox}")


@pytest.fixture
def fork_server():
    process = subprocess.Popen(
        [sys.executable, "-m", "corral.agent.launcher"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        start_new_session=True,
    )
    yield process
    if process.poll() is None:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    process.stdout.close()


def _request(server: subprocess.Popen, line: str) -> None:
    server.stdin.write(line.encode())
    server.stdin.flush()


def test_server_starts_task(tmp_path, fork_server, executors):
    files = _prepare(tmp_path / "task-a")
    executors.append(files)
    _request(fork_server, f"7 {files.sandbox}\n")
    assert fork_server.stdout.readline() == f"7 {EXIT_STARTED}\n".encode()
    task_pid = read_json(files.task)["pid"]
    assert psutil.Process(task_pid).cmdline() == ["sleep", "30"]


def test_executor_detached_from_server(tmp_path, fork_server, executors):
    files = _prepare(tmp_path / "task-b")
    executors.append(files)
    _request(fork_server, f"1 {files.sandbox}\n")
    assert fork_server.stdout.readline() == b"1 0\n"
    executor = psutil.Process(read_json(files.executor)["pid"])
    assert executor.ppid() != fork_server.pid
    assert os.getsid(executor.pid) != os.getsid(fork_server.pid)


def test_server_reports_launch_failure(tmp_path, fork_server, executors):
    files = _prepare(tmp_path / "task-c", executable=str(tmp_path / "missing"), argv=("missing",))
    executors.append(files)
    _request(fork_server, f"2 {files.sandbox}\n")
    assert fork_server.stdout.readline() == f"2 {EXIT_LAUNCH_FAILED}\n".encode()
    assert "launch_error" in read_json(files.exit)


def test_server_skips_invalid_request(tmp_path, fork_server, executors):
    files = _prepare(tmp_path / "task-d")
    executors.append(files)
    _request(fork_server, "no-sandbox-here\n")
    _request(fork_server, f"3 {files.sandbox}\n")
    assert fork_server.stdout.readline() == b"3 0\n"


def test_server_exits_at_end_of_input(fork_server):
    fork_server.stdin.close()
    assert fork_server.wait(timeout=10) == 0


def test_client_concurrent_launches(tmp_path, executors):
    client = LaunchClient()
    sandboxes = [tmp_path / f"task-{number}" for number in range(8)]
    for sandbox in sandboxes:
        executors.append(_prepare(sandbox))
    codes: dict[str, int] = {}

    def launch(sandbox: Path) -> None:
        codes[sandbox.name] = client.launch(sandbox, timeout=30)

    threads = [threading.Thread(target=launch, args=(sandbox,)) for sandbox in sandboxes]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        server = client._process
    finally:
        client.close()
    assert codes == {sandbox.name: EXIT_STARTED for sandbox in sandboxes}
    assert server.returncode == 0


def test_client_restarts_killed_server(tmp_path, executors):
    client = LaunchClient()
    first, second = _prepare(tmp_path / "task-x"), _prepare(tmp_path / "task-y")
    executors.extend([first, second])
    try:
        assert client.launch(first.sandbox, timeout=30) == EXIT_STARTED
        old_server = client._process
        old_server.kill()
        old_server.wait()
        # The reply reader sees the end of the old server's output and drops that server.
        _wait_for(lambda: client._process is None, 5, "the client to forget the killed server")
        assert client.launch(second.sandbox, timeout=30) == EXIT_STARTED
        assert client._process.pid != old_server.pid
    finally:
        client.close()


def test_client_after_server_gone(tmp_path):
    client = LaunchClient()
    files = _prepare(tmp_path / "task-z")
    try:
        process = client._ensure_started()
        process.stdin.close()
        with pytest.raises(LauncherUnavailable, match="gone"):
            client.launch(files.sandbox, timeout=5)
    finally:
        client.close()


# TaskProcess, which launches through the shared client


def _sleep_spec(sandbox: Path) -> LaunchSpec:
    return LaunchSpec(task_id=sandbox.name, argv=["sleep", "30"], env={"PATH": "/usr/bin:/bin"}, cwd=None,
                      sandbox=sandbox, kill_timeout=1.0)


async def test_task_process_uses_server(tmp_path):
    task = TaskProcess(_sleep_spec(tmp_path / "through-server"))
    pid = await task.start()
    try:
        assert psutil.Process(pid).cmdline() == ["sleep", "30"]
        assert "corral.agent.launcher" in psutil.Process(task.executor_pid).cmdline()
    finally:
        await task.stop(timeout=0)


class _UnavailableClient:
    def launch(self, sandbox: Path, timeout: float) -> int:
        raise LauncherUnavailable("the launcher fork server cannot start: disabled by the test")


async def test_task_process_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(process_module, "shared_client", lambda: _UnavailableClient())
    task = TaskProcess(_sleep_spec(tmp_path / "fallback"))
    pid = await task.start()
    try:
        assert psutil.Process(pid).cmdline() == ["sleep", "30"]
        assert "corral.agent.executor" in psutil.Process(task.executor_pid).cmdline()
    finally:
        status = await task.stop(timeout=0)
    assert status.signal in (signal.SIGTERM, signal.SIGKILL)
