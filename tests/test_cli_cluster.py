"""`corral agents`, `corral tasks`, `corral frameworks` and `corral roles`.

The first part starts `corral server` and one `corral agent` as separate
processes, runs a job of two `sleep` instances and a corral.sdk framework
with one `sleep` task on them, and reads them back through the commands.
The second part serves fixed JSON (or 404 for every
path) from a small HTTP server on 127.0.0.1, to check how the documented
shapes of /v1/frameworks and /v1/roles print and how a server without an
endpoint is reported.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
from click.testing import CliRunner
from cluster import ProcessCluster, SleepFramework, ThreadedDriver
from devcluster import free_port, task_processes, wait_until

from corral.cli import cluster as cluster_cli
from corral.cli.main import cli
from corral.sdk import FrameworkInfo

NODE = "c1"
JOB = "sleepers"
JOB_FILE = f"""
name = "{JOB}"
type = "service"
count = 2

[task]
command = "sleep"
args = ["300"]
kill_timeout = "2s"
ports = ["http"]
resources = {{ cpus = 0.25, memory = 32 }}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-cluster")
    processes = ProcessCluster(folder)
    try:
        processes.start_server()
        processes.start_agent(NODE, "cpus:2;mem:512;disk:2000;ports:[24500-24599]")
        job_file = folder / "sleepers.toml"
        job_file.write_text(JOB_FILE)
        result = processes.cli("job", "run", str(job_file), "--timeout", "30")
        assert result.returncode == 0, result.stderr
        yield processes
        # Stopping the agent leaves its tasks running, so the job is stopped first.
        result = processes.cli("job", "stop", JOB)
        assert result.returncode == 0, result.stderr
    finally:
        processes.stop(kill_tasks=False)
        leftover = task_processes(folder)
        for process in leftover:
            process.kill()
    assert not leftover, f"task processes left after the tests: {[process.pid for process in leftover]}"


def _running_tasks(cluster: ProcessCluster) -> list[dict]:
    return [task for task in cluster.get(f"/v1/tasks?job={JOB}") if task["State"] == "RUNNING"]


def _table(stdout: str) -> list[list[str]]:
    """Split a printed table into rows of cells; the first row is the header."""
    return [line.split() for line in stdout.strip().splitlines()]


# corral agents


def test_agents_table_row(cluster):
    result = cluster.cli("agents")
    assert result.returncode == 0, result.stderr
    rows = _table(result.stdout)
    assert rows[0] == ["NODE", "ADDRESS", "STATUS", "CPUS", "MEM", "(MB)", "DISK", "(MB)", "PORTS", "LAST",
                       "HEARTBEAT"]
    assert len(rows) == 2
    node, address, status, cpus, memory, _disk, ports, heartbeat, ago = rows[1]
    assert (node, address, status) == (NODE, "127.0.0.1", "alive")
    assert cpus == "0.5/2"
    assert memory == "64/512"
    assert ports == "2/100"
    assert heartbeat.endswith("s")
    assert ago == "ago"


def test_agents_json_raw(cluster):
    result = cluster.cli("agents", "--json")
    assert result.returncode == 0, result.stderr
    agents = json.loads(result.stdout)
    assert [agent["Node"] for agent in agents] == [NODE]
    assert agents[0]["Total"]["cpus"] == 2


# corral tasks


def test_tasks_lists_running(cluster):
    expected = {task["ID"]: task for task in _running_tasks(cluster)}
    assert len(expected) == 2
    result = cluster.cli("tasks")
    assert result.returncode == 0, result.stderr
    rows = _table(result.stdout)
    assert rows[0] == ["ID", "JOB/FRAMEWORK", "NODE", "STATE", "PID", "PORTS", "AGE"]
    listed = {row[0]: row for row in rows[1:]}
    assert set(listed) == set(expected)
    for task_id, row in listed.items():
        task = expected[task_id]
        assert row[1:5] == [JOB, NODE, "RUNNING", str(task["PID"])]
        assert row[5] == f"http={task['Ports']['http']}"
        assert row[6].endswith(("s", "m"))


def test_tasks_state_mesos_spelling(cluster):
    result = cluster.cli("tasks", "--state", "task_running", "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(task["ID"] for task in json.loads(result.stdout)) == sorted(
        task["ID"] for task in _running_tasks(cluster))


def test_tasks_state_filters_out(cluster):
    result = cluster.cli("tasks", "--state", "KILLED")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "No tasks match."


def test_tasks_node_filter(cluster):
    assert len(json.loads(cluster.cli("tasks", "--node", NODE, "--json").stdout)) == 2
    result = cluster.cli("tasks", "--node", "elsewhere")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "No tasks match."


def test_tasks_job_filter(cluster):
    result = cluster.cli("tasks", "--job", JOB, "--json")
    assert result.returncode == 0, result.stderr
    assert {task["Job"] for task in json.loads(result.stdout)} == {JOB}
    assert json.loads(cluster.cli("tasks", "--job", "other", "--json").stdout) == []


def test_tasks_rejects_bad_state(cluster):
    result = cluster.cli("tasks", "--state", "bogus")
    assert result.returncode == 2
    assert "invalid task state 'bogus'" in result.stderr
    assert "RUNNING" in result.stderr
    assert "Traceback" not in result.stderr


# corral frameworks and corral roles on the real server


@pytest.fixture(scope="module")
def framework(cluster):
    """A corral.sdk framework in role "batch" with one running `sleep` task of 0.5 cpus."""
    scheduler = SleepFramework(cpus=0.5, mem=32, limit=1, refuse_seconds=1)
    driver = ThreadedDriver(scheduler, FrameworkInfo("cli-sleeper", roles=("batch",)), f"http://{cluster.http}")
    driver.start()
    try:
        wait_until(lambda: scheduler.running() == 1, 30, "the framework's task running")
        yield driver
    finally:
        # Tearing the framework down kills its task before the agent stops.
        driver.stop()
        wait_until(lambda: not _framework_tasks_running(cluster), 15, "the framework's task stopped")


def _framework_tasks_running(cluster: ProcessCluster) -> list[dict]:
    return [task for task in cluster.get("/v1/tasks") if task["Framework"] and task["State"] == "RUNNING"]


def test_frameworks_match_endpoint(cluster, framework):
    result = cluster.cli("frameworks", "--json")
    assert result.returncode == 0, result.stderr
    frameworks = {entry["ID"]: entry for entry in json.loads(result.stdout)}
    entry = frameworks[framework.driver.framework_id]
    assert entry["Name"] == "cli-sleeper"
    assert entry["Role"] == "batch"
    assert entry["Tasks"] == 1
    # 0.5 of the agent's 2 cpus.
    assert entry["DominantShare"] == pytest.approx(0.25)
    table = cluster.cli("frameworks")
    assert table.returncode == 0, table.stderr
    [row] = [row for row in _table(table.stdout) if row[0] == framework.driver.framework_id]
    assert row[1:3] == ["cli-sleeper", "batch"]
    assert "25.0%" in row


def test_job_scheduler_listed(cluster, framework):
    frameworks = {entry["ID"]: entry for entry in json.loads(cluster.cli("frameworks", "--json").stdout)}
    assert frameworks["corral-jobs"]["Role"] == "corral-jobs"
    assert frameworks["corral-jobs"]["Connected"] is True
    roles = {entry["Role"]: entry for entry in json.loads(cluster.cli("roles", "--json").stdout)}
    assert roles["corral-jobs"]["Frameworks"] == ["corral-jobs"]


def test_roles_match_endpoint(cluster, framework):
    result = cluster.cli("roles", "--json")
    assert result.returncode == 0, result.stderr
    roles = {entry["Role"]: entry for entry in json.loads(result.stdout)}
    assert roles["batch"]["Frameworks"] == [framework.driver.framework_id]
    assert roles["batch"]["DominantShare"] == pytest.approx(0.25)
    table = cluster.cli("roles")
    assert table.returncode == 0, table.stderr
    [row] = [row for row in _table(table.stdout) if row[0] == "batch"]
    assert row[1:3] == ["1", "1"]
    assert row[-1] == "25.0%"


# Fixed responses from a small HTTP server


def _frameworks(now: float) -> list[dict]:
    return [
        {
            "ID": "fw-0001", "Name": "batch-runner", "Role": "analytics", "Active": True, "Connected": True,
            "Suppressed": True, "Tasks": 3, "Used": {"cpus": 1.5, "mem": 512, "disk": 0, "ports": 0},
            "Offered": {"cpus": 0, "mem": 0, "disk": 0, "ports": 0}, "DominantShare": 0.375,
            "RegisteredAt": now - 125, "FailoverTimeout": 3600,
        },
        {
            "ID": "fw-0002", "Name": "web", "Role": "serving", "Active": False, "Connected": False,
            "Suppressed": False, "Tasks": [], "Used": {"cpus": 0, "mem": 0, "disk": 0, "ports": 0},
            "Offered": {"cpus": 2, "mem": 1024, "disk": 100, "ports": 10}, "DominantShare": 0.0,
            "RegisteredAt": now - 10, "FailoverTimeout": 0,
        },
    ]


ROLES = [
    {
        "Role": "serving", "Weight": 2.0, "Frameworks": ["fw-0002"],
        "Used": {"cpus": 0.5, "mem": 128, "disk": 0, "ports": 1}, "Offered": {"cpus": 0, "mem": 0, "disk": 0, "ports": 0},
        "Reserved": {"cpus": 1, "mem": 256, "disk": 0, "ports": 0}, "Quota": None, "DominantShare": 0.125,
    },
    {
        "Role": "analytics", "Weight": 1, "Frameworks": 1,
        "Used": {"cpus": 1.5, "mem": 512, "disk": 0, "ports": 0}, "Offered": {"cpus": 0, "mem": 0, "disk": 0, "ports": 0},
        "Reserved": None, "Quota": {"cpus": 4, "mem": 4096}, "DominantShare": 0.375,
    },
]


class _FixedHandler(http.server.BaseHTTPRequestHandler):
    # Path to JSON body; paths not listed get 404 with aiohttp's text.
    responses: dict[str, object] = {}

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        body = self.responses.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"404: Not Found")
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fixed_server():
    """Serve _frameworks() and ROLES on 127.0.0.1, and 404 for every other path; yield its HOST:PORT."""
    responses = {"/v1/frameworks": _frameworks(time.time()), "/v1/roles": ROLES}
    handler = type("Handler", (_FixedHandler,), {"responses": responses})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def _invoke(address: str, *args: str):
    return CliRunner().invoke(cli, [*args, "--http-addr", address])


def test_frameworks_table_fields(fixed_server):
    result = _invoke(fixed_server, "frameworks")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["ID", "NAME", "ROLE", "STATUS", "TASKS", "USED", "OFFERED", "SHARE", "AGE",
                                "FAILOVER"]
    # Sorted by role: analytics before serving.
    assert lines[1].split()[:5] == ["fw-0001", "batch-runner", "analytics", "active,suppressed", "3"]
    assert "cpus 1.5, mem 512 MB" in lines[1]
    assert "37.5%" in lines[1]
    assert "2m05s" in lines[1] or "2m06s" in lines[1]
    assert lines[1].rstrip().endswith("1h00m")
    assert lines[2].split()[:5] == ["fw-0002", "web", "serving", "inactive,disconnected", "0"]
    assert "cpus 2, mem 1024 MB, disk 100 MB, 10 ports" in lines[2]


def test_roles_table_fields(fixed_server):
    result = _invoke(fixed_server, "roles")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["ROLE", "WEIGHT", "FRAMEWORKS", "USED", "OFFERED", "RESERVED", "QUOTA", "SHARE"]
    assert lines[1].split()[:3] == ["analytics", "1", "1"]
    assert "cpus 4, mem 4096 MB" in lines[1]
    assert lines[1].rstrip().endswith("37.5%")
    assert lines[2].split()[:3] == ["serving", "2", "1"]
    assert "cpus 0.5, mem 128 MB, 1 ports" in lines[2]
    assert lines[2].rstrip().endswith("12.5%")


def test_roles_json_raw(fixed_server):
    result = _invoke(fixed_server, "roles", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == ROLES


@pytest.mark.parametrize("command", ["agents", "tasks", "frameworks", "roles"])
def test_missing_endpoint_message(command):
    handler = type("Handler", (_FixedHandler,), {"responses": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = _invoke(f"127.0.0.1:{server.server_address[1]}", command)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert result.exit_code == 1
    assert f"has no GET /v1/{command} endpoint (HTTP 404)" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_unreachable_server_message():
    result = _invoke(f"127.0.0.1:{free_port()}", "agents")
    assert result.exit_code == 1
    assert "cannot reach corral" in result.output
    assert "--http-addr" in result.output


# Formatting


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"), (90061, "1d01h"), (-5, "0s")],
)
def test_format_age(seconds, expected):
    assert cluster_cli.format_age(seconds) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(2, "2"), (2.0, "2"), (0.25, "0.25"), (1 / 3, "0.33"), (None, "-")],
)
def test_format_number(value, expected):
    assert cluster_cli.format_number(value) == expected


def test_ports_count_ranges():
    assert cluster_cli.ports_count([[31000, 31999], [40000, 40000]]) == 1001
    assert cluster_cli.ports_count(7) == 7
