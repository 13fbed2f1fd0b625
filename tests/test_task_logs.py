"""Tests for task logs (`GET /v1/tasks/ID/logs`, `corral logs`) and sandbox garbage collection.

The endpoint tests run a whole DevCluster in the test's event loop on free
ports on 127.0.0.1, with real task processes. `corral logs` runs as a
subprocess against it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from corral.agent.executor import ExecutorFiles, write_json
from corral.agent.sandbox import SandboxInfo, SandboxRetention, collect_sandboxes, select_for_removal
from corral.api.logs import OFFSET_HEADER, tail_offset
from corral.dev import DevCluster, DevConfig
from corral.types import TaskState
from devcluster import free_port

HOST = "127.0.0.1"
WAIT_TIMEOUT = 20.0

GREETER = (
    "import sys, time\n"
    "print('hello'); print('world', flush=True)\n"
    "print('oops', file=sys.stderr, flush=True)\n"
    "time.sleep(300)\n"
)
TICKER = (
    "import itertools, time\n"
    "for number in itertools.count(1):\n"
    "    print(f'tick {number}', flush=True)\n"
    "    time.sleep(0.1)\n"
)


class Cluster:
    def __init__(self, dev: DevCluster, session: aiohttp.ClientSession):
        self.dev = dev
        self.session = session
        self.http_addr = f"{HOST}:{dev.config.http_port}"

    def url(self, path: str) -> str:
        return f"http://{self.http_addr}{path}"

    async def run_job(self, name: str, code: str) -> str:
        """Submit a one-instance job running `code` and return its task id once it runs."""
        job = {
            "name": name,
            "task": {"command": sys.executable, "args": ["-c", code], "resources": {"cpus": 0.1, "memory": 64}},
        }
        async with self.session.put(self.url("/v1/jobs"), json=job) as response:
            assert response.status == 200, await response.text()

        def running() -> str | None:
            tasks = [task for task in self.dev.state.tasks(job=name) if task.state is TaskState.RUNNING]
            return tasks[0].id if tasks else None

        return await wait_until(running, f"job {name} to run")

    async def stop_job(self, name: str) -> None:
        async with self.session.delete(self.url(f"/v1/jobs/{name}")) as response:
            assert response.status == 200, await response.text()

    async def logs(self, task_id: str, **query: str) -> tuple[int, str, Any]:
        async with self.session.get(self.url(f"/v1/tasks/{task_id}/logs"), params=query) as response:
            return response.status, await response.text(), response.headers

    async def cli(self, *args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "corral", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "CORRAL_HTTP_ADDR": self.http_addr},
        )
        try:
            async with asyncio.timeout(60):
                stdout, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        return process.returncode, stdout.decode(), stderr.decode()


async def wait_until(predicate, what: str, timeout: float = WAIT_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    config = DevConfig(
        data_dir=tmp_path / "data", http_host=HOST, http_port=free_port(), dns_host=HOST,
        dns_port=free_port(), node="logs-test", memory=1024, cpus=4.0,
    )
    dev = DevCluster(config)
    session = aiohttp.ClientSession()
    try:
        await dev.start()
        yield Cluster(dev, session)
    finally:
        await dev.stop()
        await session.close()


def sandbox_of(cluster: Cluster, task_id: str) -> Path:
    return cluster.dev.agent.sandbox_path(task_id)


async def greeter(cluster: Cluster) -> str:
    task_id = await cluster.run_job("greeter", GREETER)
    stdout = sandbox_of(cluster, task_id) / "stdout"
    await wait_until(lambda: stdout.exists() and stdout.read_text() == "hello\nworld\n", "the greeting")
    return task_id


def ticks(text: str) -> list[int]:
    return [int(number) for number in re.findall(r"tick (\d+)", text)]


# ---------------------------------------------------------------------------
# GET /v1/tasks/ID/logs


async def test_logs_return_stdout(cluster):
    task_id = await greeter(cluster)
    status, text, headers = await cluster.logs(task_id)

    assert status == 200
    assert text == "hello\nworld\n"
    assert headers["Content-Type"].startswith("text/plain")
    assert headers[OFFSET_HEADER] == "0"


async def test_logs_return_stderr(cluster):
    task_id = await greeter(cluster)
    stderr = sandbox_of(cluster, task_id) / "stderr"
    await wait_until(lambda: stderr.read_text() == "oops\n", "the task's stderr")
    status, text, _ = await cluster.logs(task_id, stream="stderr")

    assert status == 200
    assert text == "oops\n"


async def test_logs_tail_and_offset(cluster):
    task_id = await greeter(cluster)
    _, last, last_headers = await cluster.logs(task_id, tail="1")
    _, none, _ = await cluster.logs(task_id, tail="0")
    _, rest, rest_headers = await cluster.logs(task_id, offset="6")

    assert last == "world\n"
    assert last_headers[OFFSET_HEADER] == "6"
    assert none == ""
    assert rest == "world\n"
    assert rest_headers[OFFSET_HEADER] == "6"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"stream": "stdin"}, "invalid stream"),
        ({"offset": "-1"}, "invalid offset"),
        ({"tail": "many"}, "invalid tail"),
        ({"offset": "1", "tail": "1"}, "cannot be used together"),
        ({"follow": "maybe"}, "invalid follow"),
    ],
)
async def test_logs_invalid_query(cluster, query, message):
    task_id = await greeter(cluster)
    status, text, _ = await cluster.logs(task_id, **query)

    assert status == 400
    assert message in text


async def test_logs_unknown_task(cluster):
    status, text, _ = await cluster.logs("nope.0.00000000")

    assert status == 404
    assert "not found" in text


async def test_logs_follow_streams_new_lines(cluster):
    task_id = await cluster.run_job("ticker", TICKER)
    stdout = sandbox_of(cluster, task_id) / "stdout"
    await wait_until(lambda: stdout.exists() and ticks(stdout.read_text()), "the first tick")
    url = cluster.url(f"/v1/tasks/{task_id}/logs?follow=true")
    received: list[int] = []
    async with cluster.session.get(url) as response:
        written_before = max(ticks(stdout.read_text()))
        async with asyncio.timeout(WAIT_TIMEOUT):
            while not received or received[-1] < written_before + 5:
                line = await response.content.readline()
                assert line, "the followed response ended while the task runs"
                received += ticks(line.decode())

    assert response.status == 200
    assert received[0] == 1
    assert received == list(range(1, received[-1] + 1))


async def test_logs_follow_ends_with_task(cluster):
    task_id = await cluster.run_job("ticker", TICKER)
    url = cluster.url(f"/v1/tasks/{task_id}/logs?follow=true")
    async with cluster.session.get(url) as response:
        first = await response.content.readline()
        await cluster.stop_job("ticker")
        async with asyncio.timeout(WAIT_TIMEOUT):
            rest = await response.content.read()

    assert ticks(first.decode()) == [1]
    assert cluster.dev.state.task(task_id).state is TaskState.KILLED
    # The response ended on its own, and with everything the task wrote.
    assert first + rest == (sandbox_of(cluster, task_id) / "stdout").read_bytes()


async def test_logs_after_sandbox_removed(cluster):
    task_id = await greeter(cluster)
    await cluster.stop_job("greeter")
    await wait_until(lambda: cluster.dev.state.task(task_id).state.is_terminal, "the task to end")
    cluster.dev.agent.sandbox_retention = SandboxRetention(max_age=0, max_per_job=0)
    removed = await cluster.dev.agent.collect_sandboxes()
    status, text, _ = await cluster.logs(task_id)

    assert removed == [task_id]
    assert status == 404
    assert "removed" in text


# ---------------------------------------------------------------------------
# corral logs


async def test_cli_logs_prints_output(cluster):
    task_id = await greeter(cluster)
    code, stdout, stderr = await cluster.cli("logs", task_id)

    assert code == 0, stderr
    assert stdout == "hello\nworld\n"


async def test_cli_logs_stderr_and_tail(cluster):
    task_id = await greeter(cluster)
    stderr_file = sandbox_of(cluster, task_id) / "stderr"
    await wait_until(lambda: stderr_file.read_text() == "oops\n", "the task's stderr")
    _, errors, _ = await cluster.cli("logs", "--stderr", task_id)
    _, last, _ = await cluster.cli("logs", "--tail", "1", task_id)

    assert errors == "oops\n"
    assert last == "world\n"


async def test_cli_logs_unknown_task(cluster):
    code, stdout, stderr = await cluster.cli("logs", "nope.0.00000000")

    assert code == 1
    assert stdout == ""
    assert "not found" in stderr


async def test_cli_logs_follow_prints_lines(cluster):
    task_id = await cluster.run_job("ticker", TICKER)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral", "logs", "-f", task_id,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "CORRAL_HTTP_ADDR": cluster.http_addr},
    )
    stdout = sandbox_of(cluster, task_id) / "stdout"
    arrivals: list[tuple[int, int]] = []
    try:
        async with asyncio.timeout(WAIT_TIMEOUT):
            while len(arrivals) < 15:
                line = await process.stdout.readline()
                assert line, "corral logs -f ended while the task runs"
                # How far the task had written when this line reached us.
                arrivals.append((ticks(line.decode())[0], max(ticks(stdout.read_text()))))
        await cluster.stop_job("ticker")
        async with asyncio.timeout(WAIT_TIMEOUT):
            await process.stdout.read()
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    # Fifteen lines arrived while the task still ran, the last one within a few
    # seconds (ticks are 0.1 s apart) of being written, and the command ended with the task.
    printed, written = arrivals[-1]
    assert printed == 15
    assert written - printed < 50
    assert code == 0


# ---------------------------------------------------------------------------
# Reading the files


@pytest.mark.parametrize(
    ("content", "lines", "expected"),
    [
        (b"a\nb\nc\n", 1, b"c\n"),
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc\n", 5, b"a\nb\nc\n"),
        (b"a\nb\nc", 1, b"c"),
        (b"a\nb\nc", 2, b"b\nc"),
        (b"", 3, b""),
        (b"a\n", 0, b""),
        (b"\n\n", 1, b"\n"),
    ],
)
def test_tail_offset(tmp_path, content, lines, expected):
    path = tmp_path / "stdout"
    path.write_bytes(content)

    assert content[tail_offset(path, lines):] == expected


def test_tail_offset_across_blocks(tmp_path):
    path = tmp_path / "stdout"
    path.write_bytes(b"".join(f"line {number:05d}\n".encode() for number in range(5000)))
    start = tail_offset(path, 1500)

    assert path.read_bytes()[start:].startswith(b"line 03500\n")


def test_tail_offset_missing_file(tmp_path):
    assert tail_offset(tmp_path / "absent", 10) == 0


# ---------------------------------------------------------------------------
# Sandbox garbage collection


def info(task_id: str, job: str, age: float, now: float = 10_000.0) -> SandboxInfo:
    return SandboxInfo(task_id, job, Path("/sandboxes") / task_id, now - age)


def test_select_for_removal_age_and_count():
    retention = SandboxRetention(max_age=3600, max_per_job=2)
    sandboxes = [
        info("web.0.a", "web", 10),
        info("web.1.b", "web", 20),
        info("web.2.c", "web", 30),
        info("api.0.d", "api", 4000),
        info("api.1.e", "api", 100),
        info("db.0.f", "db", 5000),
    ]
    chosen = {sandbox.task_id for sandbox in select_for_removal(sandboxes, {"db.0.f"}, 10_000.0, retention)}

    assert chosen == {"web.2.c", "api.0.d"}


def test_select_for_removal_keeps_young():
    retention = SandboxRetention(max_age=3600, max_per_job=5)
    sandboxes = [info(f"web.{n}.x", "web", 60 * n) for n in range(5)]

    assert select_for_removal(sandboxes, set(), 10_000.0, retention) == []


def test_retention_rejects_negative():
    with pytest.raises(ValueError, match="max_age"):
        SandboxRetention(max_age=-1)


def make_sandbox(root: Path, task_id: str, job: str, age: float, running: bool = False) -> Path:
    sandbox = root / task_id
    files = ExecutorFiles(sandbox)
    files.reset()
    write_json(files.launch, {"task_id": task_id, "job": job})
    write_json(files.executor, {"pid": 0, "create_time": 0})
    if not running:
        write_json(files.exit, {"code": 0, "signal": None})
    files.stdout.write_text("output\n")
    stamp = time.time() - age
    for path in (*files.folder.iterdir(), files.folder, files.stdout, sandbox):
        os.utime(path, (stamp, stamp))
    return sandbox


def test_collect_sandboxes_removes_old(tmp_path, caplog):
    old = make_sandbox(tmp_path, "web.0.old", "web", age=7200)
    young = make_sandbox(tmp_path, "web.1.new", "web", age=10)
    running = make_sandbox(tmp_path, "web.2.run", "web", age=7200, running=True)
    kept = make_sandbox(tmp_path, "web.3.live", "web", age=7200)
    caplog.set_level(logging.INFO, logger="corral.agent.sandbox")
    removed = collect_sandboxes(tmp_path, {"web.3.live"}, SandboxRetention(), node="n1")

    assert removed == ["web.0.old"]
    assert not old.exists()
    assert young.exists()
    assert running.exists()
    assert kept.exists()
    assert "sandbox removed node=n1 task=web.0.old job=web" in caplog.text


def test_collect_sandboxes_caps_per_job(tmp_path):
    for number in range(4):
        make_sandbox(tmp_path, f"api.{number}.x", "api", age=100 + number)
    removed = collect_sandboxes(tmp_path, set(), SandboxRetention(max_per_job=2))

    assert sorted(removed) == ["api.2.x", "api.3.x"]
