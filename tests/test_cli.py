"""The `corral` command against a real `corral dev` subprocess: errors a user meets first."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from devcluster import EXAMPLES, DevProcess, task_processes, wait_until


def run_corral(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory):
    """A cluster whose agent offers 300 MB, so that memory runs out after a few tasks."""
    folder = tmp_path_factory.mktemp("cli")
    dev = DevProcess(folder / "data", folder / "corral-dev.log", extra_args=["--memory", "300"])
    dev.start()
    yield dev
    assert dev.stop() == 0
    assert task_processes(dev.data_dir) == []


def write_job(tmp_path, body: str):
    path = tmp_path / "job.toml"
    path.write_text(textwrap.dedent(body))
    return path


def test_help_lists_commands():
    result = run_corral("--help")
    assert result.returncode == 0
    for command in ("dev", "job", "kv", "version"):
        assert command in result.stdout


def test_version_prints_version():
    result = run_corral("version")
    assert result.returncode == 0
    assert result.stdout.startswith("corral ")


def test_unreachable_server_is_named():
    result = run_corral("kv", "get", "x", "--http-addr", "127.0.0.1:1")
    assert result.returncode == 1
    assert "127.0.0.1:1" in result.stderr
    assert "is `corral dev` running?" in result.stderr


def test_kv_get_missing_key_fails(small_cluster):
    result = small_cluster.cli("kv", "get", "no/such/key", check=False)
    assert result.returncode == 1
    assert "'no/such/key' not found" in result.stderr
    # The server responded, so the hint for an unreachable server would mislead.
    assert "running?" not in result.stderr


def test_kv_put_get_delete(small_cluster):
    small_cluster.cli("kv", "put", "cli/key", "value one")
    assert small_cluster.cli("kv", "get", "cli/key").stdout == "value one\n"
    small_cluster.cli("kv", "delete", "cli/key")
    assert small_cluster.cli("kv", "get", "cli/key", check=False).returncode == 1


def test_http_addr_in_use_is_named(small_cluster, tmp_path):
    result = run_corral(
        "dev", "--data-dir", str(tmp_path / "other"), "--http-addr", small_cluster.http_addr,
        "--dns-addr", "127.0.0.1:0",
    )
    assert result.returncode == 1
    assert f"HTTP address {small_cluster.http_addr} is already in use" in result.stderr
    assert "--http-addr" in result.stderr


def test_dns_addr_in_use_is_named(small_cluster, tmp_path):
    dns_addr = f"127.0.0.1:{small_cluster.dns_port}"
    result = run_corral(
        "dev", "--data-dir", str(tmp_path / "other"), "--http-addr", "127.0.0.1:0", "--dns-addr", dns_addr,
    )
    assert result.returncode == 1
    assert f"DNS address {dns_addr} is already in use" in result.stderr
    assert "--dns-addr" in result.stderr


def test_invalid_job_names_fields(small_cluster, tmp_path):
    path = write_job(tmp_path, """
        name = "bad"
        count = -1
        colour = "blue"
        [task]
        args = ["x"]
    """)
    result = small_cluster.cli("job", "run", str(path), check=False)
    assert result.returncode == 1
    assert "count" in result.stderr
    assert "colour" in result.stderr
    assert "task.command" in result.stderr
    assert small_cluster.get("/v1/jobs") == []


def test_malformed_toml_is_rejected(small_cluster, tmp_path):
    path = write_job(tmp_path, 'name = "broken\n')
    result = small_cluster.cli("job", "run", str(path), check=False)
    assert result.returncode == 1
    assert "malformed TOML" in result.stderr


def test_memory_over_agent_total_rejected(small_cluster, tmp_path):
    path = write_job(tmp_path, """
        name = "huge"
        [task]
        command = "sleep"
        args = ["60"]
        resources = { memory = 400 }
    """)
    result = small_cluster.cli("job", "run", str(path), check=False)
    assert result.returncode == 1
    assert "task.resources.memory" in result.stderr
    assert small_cluster.get("/v1/jobs") == []


def test_unplaced_instance_fails_run(small_cluster, tmp_path):
    path = write_job(tmp_path, """
        name = "sleepers"
        count = 3
        [task]
        command = "sleep"
        args = ["600"]
        resources = { memory = 120 }
    """)
    result = small_cluster.cli("job", "run", str(path), check=False)
    assert result.returncode == 1
    assert "cannot be placed" in result.stderr
    assert "memory" in result.stderr
    small_cluster.cli("job", "stop", "sleepers")


def test_crash_looping_task_fails_run(small_cluster, tmp_path):
    # No check, so the task passes as soon as it runs; it exits half a second later.
    path = write_job(tmp_path, """
        name = "crasher"
        [task]
        command = "sh"
        args = ["-c", "sleep 0.5; exit 3"]
    """)
    result = small_cluster.cli("job", "run", str(path), "--timeout", "60", check=False)
    small_cluster.cli("job", "stop", "crasher")
    assert result.returncode == 1, result.stdout
    assert "keeps failing" in result.stderr
    assert "running and passing" not in result.stdout


def test_steady_task_passes_run(small_cluster, tmp_path):
    path = write_job(tmp_path, """
        name = "steady"
        [task]
        command = "sleep"
        args = ["600"]
    """)
    result = small_cluster.cli("job", "run", str(path), "--min-healthy-time", "1")
    small_cluster.cli("job", "stop", "steady")
    assert "1 of 1 instances running and passing" in result.stdout


def test_task_waits_for_kv_key(small_cluster, tmp_path):
    path = write_job(tmp_path, f"""
        name = "waiter"
        [task]
        command = "sleep"
        args = ["600"]
        [task.env]
        SETTING = {{ key = "config/waiter/setting" }}
    """)
    small_cluster.cli("job", "run", str(path), "--detach")
    def waiting_message():
        tasks = small_cluster.get("/v1/tasks?job=waiter")
        return tasks and "config/waiter/setting" in tasks[0]["Message"] and tasks[0]

    task = wait_until(waiting_message, 20, "the task to wait for its KV key")
    assert task["State"] == "STAGING"
    small_cluster.cli("kv", "put", "config/waiter/setting", "on")
    wait_until(lambda: small_cluster.get("/v1/tasks?job=waiter")[0]["State"] == "RUNNING", 20,
               "the task to start once its key exists")
    small_cluster.cli("job", "stop", "waiter")


def test_job_status_shows_instances(small_cluster):
    small_cluster.cli("kv", "put", "config/hello-web/greeting", "hi")
    small_cluster.cli("job", "run", str(EXAMPLES / "hello-web.toml"))
    result = small_cluster.cli("job", "status", "hello-web")
    assert "2 of 2 running, 2 passing" in result.stdout
    tasks = small_cluster.get("/v1/tasks?job=hello-web")
    for task in tasks:
        assert task["ID"] in result.stdout
        assert str(task["PID"]) in result.stdout
        assert str(task["Ports"]["http"]) in result.stdout
    small_cluster.cli("job", "stop", "hello-web")


def test_kv_max_value_size_flag(tmp_path):
    dev = DevProcess(tmp_path / "data", tmp_path / "corral-dev.log", extra_args=["--kv-max-value-size", "16"])
    dev.start()
    try:
        small = dev.cli("kv", "put", "limit/small", "x" * 16, check=False)
        large = dev.cli("kv", "put", "limit/large", "x" * 17, check=False)
        assert small.returncode == 0
        assert large.returncode == 1
        assert "max size: 16 bytes" in large.stderr
    finally:
        assert dev.stop() == 0
