"""A server and agents as separate processes: registration, placement, failure detection.

The first part runs a Server in the test's event loop and talks to it with
HttpConnection. The second part starts `corral server` and three `corral
agent` processes on free ports. Its tests share that cluster and run in
file order. The job is placed, an agent is killed with SIGKILL and its
instance replaced, and another agent leaves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
import urllib.request
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import pytest
from cluster import ProcessCluster, get_json
from devcluster import EXAMPLES, free_port, task_processes, wait_until

from corral.agent.http_connection import AGENT_TASK_FIELDS, HttpConnection
from corral.agent.registry import SERF_HEALTH_ID, serf_health_check
from corral.agent.resources import AgentResources, Reservation, ResourceSpec, parse_attributes, parse_resources
from corral.api.agents import _AGENT_TASK_FIELDS
from corral.server import Server, ServerConfig
from corral.state.records import AgentInfo, Node, Task
from corral.types import CheckStatus, DesiredState, TaskState

AGENT_TIMEOUT = 3.0

# Parsers of Mesos's flag syntax


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpus:4;mem:8192;disk:10000;ports:[31000-32000]", ResourceSpec(4.0, 8192, 10000, ((31000, 32000),))),
        ("cpus:0.5", ResourceSpec(cpus=0.5)),
        ("mem:256;ports:[21000-21010,22000-22000];", ResourceSpec(memory=256, ports=((21000, 21010), (22000, 22000)))),
    ],
)
def test_resources_parse(text, expected):
    assert parse_resources(text) == expected


def test_resources_parse_reservations():
    spec = parse_resources("cpus:4;cpus(analytics):2;mem(analytics):1024;mem:8192;ports:[31000-31999];"
                           "ports(analytics):[32000-32009];disk(*):100")
    assert spec.reserved == {"analytics": Reservation(cpus=2.0, memory=1024, ports=((32000, 32009),))}
    assert spec.ports == ((31000, 31999),)
    assert spec.memory == 8192
    assert spec.disk == 100


def test_resources_unreserved_star_twice():
    with pytest.raises(ValueError, match="cpus is given twice"):
        parse_resources("cpus:4;cpus(*):1")


def test_reserved_kind_not_detected():
    # As in Mesos, a kind named only with a role is not detected: its unreserved amount is 0.
    spec = parse_resources("cpus(analytics):2")
    detected = AgentResources(cpus=8.0, memory=4096, disk=1000, ports=((20000, 20099),))
    applied = spec.apply(detected)
    assert applied.cpus == 0.0
    assert applied.memory == 4096
    assert applied.reserved == {"analytics": Reservation(cpus=2.0)}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("cpus:four", "'cpus:four'"),
        ("cpus:4;gpus:1", "'gpus:1'"),
        ("cpus(a/b):4", "'cpus(a/b):4'"),
        ("cpus(web):4;cpus(web):1", "cpus for role 'web' is given twice"),
        ("ports(web):[1-2]", "no unreserved ports"),
        ("ports:[21000-21010];ports(web):[21005-21020]", "overlap"),
        ("cpus:4;cpus:2", "'cpus:2'"),
        ("mem:-1", "'mem:-1'"),
        ("ports:31000-32000", "'ports:31000-32000'"),
        ("ports:[32000-31000]", "'ports:[32000-31000]'"),
        ("cpus:1;;mem:2", "empty part"),
        ("cpus", "'cpus'"),
    ],
)
def test_resources_reject(text, named):
    with pytest.raises(ValueError) as error:
        parse_resources(text)
    assert named in str(error.value)


def test_attributes_parse():
    assert parse_attributes("rack:r1; zone:a") == {"rack": "r1", "zone": "a"}


def test_attributes_reject_missing_value():
    with pytest.raises(ValueError, match="'zone'"):
        parse_attributes("rack:r1;zone")


def test_task_fields_agree():
    assert set(AGENT_TASK_FIELDS) == set(_AGENT_TASK_FIELDS)


# A Server in this event loop, reached through HttpConnection


@pytest.fixture
async def server(tmp_path):
    config = ServerConfig(
        data_dir=tmp_path / "server", http_port=free_port(), dns_port=free_port(), agent_timeout=AGENT_TIMEOUT
    )
    instance = Server(config)
    await instance.start()
    yield instance
    await instance.stop()


@pytest.fixture
async def connection(server):
    address = f"127.0.0.1:{server.config.http_port}"
    conn = HttpConnection(address, "n1", retry_min=0.05, retry_max=0.2)
    yield conn
    await conn.close()


async def _register(connection: HttpConnection, node: str = "n1") -> None:
    info = AgentInfo(node, "127.0.0.1", cpus=1.0, memory=256, disk=1000, port_ranges=[[21000, 21010]])
    await connection.register(info, Node(node, "127.0.0.1", "dc1", meta={"rack": "r1"}), [serf_health_check(node)])


def _task(task_id: str = "web.0.a", node: str = "n1") -> Task:
    return Task(id=task_id, job="web", instance=0, node=node, spec_version=1, desired=DesiredState.RUN,
                state=TaskState.STAGING, cpus=0.1, memory=64)


def _serf_status(server: Server, node: str) -> CheckStatus:
    return next(check.status for check in server.state.checks(node) if check.id == SERF_HEALTH_ID)


async def test_register_lists_agent(server, connection):
    await _register(connection)
    async with connection._session.get(f"{connection.base_url}/v1/agents") as answer:
        agents = await answer.json()
    assert [agent["Node"] for agent in agents] == ["n1"]
    assert agents[0]["Attributes"] == {"rack": "r1"}
    assert agents[0]["Total"]["ports"] == 11


async def test_update_task_resend_same(server, connection):
    await _register(connection)
    await server.state.put_tasks([_task()])

    def run(task: Task) -> None:
        task.state = TaskState.RUNNING
        task.pid = 1234

    first = await connection.update_task("web.0.a", run)
    second = await connection.update_task("web.0.a", run)
    assert first.state is TaskState.RUNNING
    assert second.pid == 1234
    assert server.state.task("web.0.a").state is TaskState.RUNNING


async def test_update_task_keeps_ended(server, connection):
    await _register(connection)
    await server.state.put_tasks([dataclasses.replace(_task(), state=TaskState.LOST)])

    def run(task: Task) -> None:
        task.state = TaskState.RUNNING

    returned = await connection.update_task("web.0.a", run)
    assert returned.state is TaskState.LOST
    assert server.state.task("web.0.a").state is TaskState.LOST


async def test_update_task_rejects_scheduler_field(server, connection):
    await _register(connection)
    await server.state.put_tasks([_task()])

    def move(task: Task) -> None:
        task.node = "n2"

    with pytest.raises(ValueError, match="node"):
        await connection.update_task("web.0.a", move)


async def test_update_task_other_node_missing(server, connection):
    await _register(connection)
    await server.state.put_tasks([_task(node="n2")])
    assert await connection.update_task("web.0.a", lambda task: None) is None


async def test_assignments_wait_wakes(server, connection):
    await _register(connection)
    tasks, index = await connection.assigned_tasks("n1")
    assert tasks == []
    waiter = asyncio.create_task(connection.wait_for_assignments("n1", index, 10.0))
    await asyncio.sleep(0.2)
    await server.state.put_tasks([_task()])
    await asyncio.wait_for(waiter, 5)
    tasks, _ = await connection.assigned_tasks("n1")
    assert [task.id for task in tasks] == ["web.0.a"]


async def test_kv_get_reads_value(server, connection):
    await server.state.kv_put("config/greeting", b"hello")
    entry, index = await connection.kv_get("config/greeting")
    assert entry.value == b"hello"
    assert index == entry.modify_index


async def test_missed_heartbeats_fail_agent(server, connection):
    await _register(connection)
    await server.state.put_tasks([dataclasses.replace(_task(), state=TaskState.RUNNING)])
    server.monitor.last_seen["n1"] -= AGENT_TIMEOUT + 1
    assert await server.monitor.check_deadlines() == ["n1"]
    assert _serf_status(server, "n1") is CheckStatus.CRITICAL
    assert server.state.agent("n1") is None
    task = server.state.task("web.0.a")
    assert task.state is TaskState.LOST
    assert task.desired is DesiredState.STOP


async def test_heartbeat_registers_again(server, connection):
    await _register(connection)
    server.monitor.last_seen["n1"] -= AGENT_TIMEOUT + 1
    await server.monitor.check_deadlines()
    await connection.heartbeat()
    assert _serf_status(server, "n1") is CheckStatus.PASSING
    assert server.state.agent("n1") is not None


async def test_heartbeat_keeps_agent(server, connection):
    await _register(connection)
    server.monitor.last_seen["n1"] -= AGENT_TIMEOUT - 1
    await connection.heartbeat()
    assert await server.monitor.check_deadlines() == []


async def test_request_retries_until_server(tmp_path, caplog):
    port = free_port()
    conn = HttpConnection(f"127.0.0.1:{port}", "n1", retry_min=0.05, retry_max=0.2)
    instance = Server(ServerConfig(data_dir=tmp_path / "server", http_port=port, dns_port=free_port()))
    caplog.set_level(logging.WARNING, logger="corral.agent.http_connection")
    try:
        reading = asyncio.create_task(conn.kv_get("missing"))
        await asyncio.sleep(0.5)
        assert not reading.done()
        await instance.start()
        entry, _ = await asyncio.wait_for(reading, 5)
    finally:
        await conn.close()
        await instance.stop()
    assert entry is None
    assert "retrying in" in caplog.text


# Separate processes: one `corral server` and three `corral agent`


def _put(address: str, path: str, body: bytes) -> None:
    request = urllib.request.Request(f"http://{address}{path}", data=body, method="PUT")
    with urllib.request.urlopen(request, timeout=10):
        pass


class Cluster(ProcessCluster):
    """The cluster of these tests, with lookups of the hello-web service and the agents' health."""

    def __init__(self, folder: Path):
        super().__init__(folder, ["--agent-timeout", f"{AGENT_TIMEOUT:g}s"])

    def start_sized_agent(self, node: str, memory: int, ports: str) -> None:
        self.start_agent(node, f"cpus:1;mem:{memory};ports:[{ports}]", attributes=f"rack:{node}")

    def passing_nodes(self) -> list[str]:
        return sorted(entry["Node"]["Node"] for entry in self.get("/v1/health/service/hello-web?passing"))

    def srv_ports(self) -> list[int]:
        query = dns.message.make_query("hello-web.service.consul", dns.rdatatype.SRV)
        response = dns.query.udp(query, "127.0.0.1", port=self.dns_port, timeout=5)
        return sorted(record.port for rrset in response.answer for record in rrset)

    def serf_status(self, node: str) -> str:
        checks = self.get(f"/v1/health/node/{node}")
        return next(check["Status"] for check in checks if check["CheckID"] == SERF_HEALTH_ID)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi")
    processes = Cluster(folder)
    try:
        processes.start_server()
        # Two agents fit one instance (64 MB) each and the third fits two, so that bin
        # packing places one instance per agent and has room for one replacement.
        processes.start_sized_agent("a1", 100, "21000-21099")
        processes.start_sized_agent("a2", 100, "22000-22099")
        processes.start_sized_agent("a3", 160, "23000-23099")
        yield processes
    finally:
        processes.stop()
    leftover = task_processes(folder)
    assert not leftover, f"task processes left after the test: {[p.pid for p in leftover]}"


def test_agents_alive(cluster):
    agents = cluster.get("/v1/agents")
    assert sorted(agent["Node"] for agent in agents) == ["a1", "a2", "a3"]
    assert {agent["Status"] for agent in agents} == {"alive"}


def test_job_spreads_across_agents(cluster):
    job = (EXAMPLES / "hello-web.toml").read_text()
    job = job.replace("count = 2", "count = 3").replace('workdir = "."', f'workdir = "{EXAMPLES}"')
    path = cluster.folder / "hello-web.toml"
    path.write_text(job)
    _put(cluster.http, "/v1/kv/config/hello-web/greeting", b"hello")
    result = cluster.cli("job", "run", str(path))
    assert result.returncode == 0, result.stderr
    assert cluster.passing_nodes() == ["a1", "a2", "a3"]


def test_agent_serves_own_services(cluster):
    services = get_json(cluster.agent_http["a2"], "/v1/agent/services")
    catalog = cluster.get("/v1/catalog/node-services/a2")["Services"]
    assert sorted(services) == sorted(service["ID"] for service in catalog)
    assert len(services) == 1


def test_agent_forwards_kv(cluster):
    entries = get_json(cluster.agent_http["a1"], "/v1/kv/config/hello-web/greeting")
    assert entries[0]["Key"] == "config/hello-web/greeting"


def test_killed_agent_replaced(cluster):
    a1_ports = [entry["Service"]["Port"] for entry in cluster.get("/v1/health/service/hello-web")
                if entry["Node"]["Node"] == "a1"]
    killed_at = time.monotonic()
    cluster.processes["a1"].kill()
    cluster.processes["a1"].wait()
    wait_until(lambda: cluster.serf_status("a1") == "critical", AGENT_TIMEOUT * 1.25 + 2, "a1's serfHealth critical")
    assert time.monotonic() - killed_at < AGENT_TIMEOUT * 1.25 + 2
    assert "a1" not in cluster.passing_nodes()
    assert a1_ports[0] not in cluster.srv_ports()
    wait_until(lambda: len(cluster.passing_nodes()) == 3, 15, "three passing instances again")
    assert cluster.passing_nodes() == ["a2", "a3", "a3"]
    assert "agent failed node=a1" in cluster.log("server")


def test_killed_agent_tasks_lost(cluster):
    tasks = cluster.get("/v1/tasks")
    states = {task["State"] for task in tasks if task["Node"] == "a1"}
    assert states == {"LOST"}
    # Their own HTTP check last passed, but a1's serfHealth is critical.
    healths = {task["Health"] for task in tasks if task["Node"] == "a1"}
    assert healths == {"critical"}


def test_killed_agent_listed_failed(cluster):
    agents = {agent["Node"]: agent for agent in cluster.get("/v1/agents")}
    assert agents["a1"]["Status"] == "failed"


def test_restarted_agent_kills_lost(cluster):
    assert task_processes(cluster.folder / "a1")
    cluster.start_sized_agent("a1", 100, "21000-21099")
    wait_until(lambda: cluster.serf_status("a1") == "passing", 10, "a1's serfHealth passing again")
    wait_until(lambda: not task_processes(cluster.folder / "a1"), 15, "a1's lost task process killed")
    assert cluster.passing_nodes() == ["a2", "a3", "a3"]


def test_leave_deregisters_node(cluster):
    result = cluster.cli("agent", "leave", "--http-addr", cluster.agent_http["a2"])
    assert result.returncode == 0, result.stderr
    assert cluster.processes["a2"].wait(timeout=15) == 0
    nodes = [node["Node"] for node in cluster.get("/v1/catalog/nodes")]
    assert "a2" not in nodes
    states = {task["State"] for task in cluster.get("/v1/tasks") if task["Node"] == "a2"}
    assert states == {"KILLED"}


def test_sigterm_leaves_tasks_running(cluster):
    before = {process.pid for process in task_processes(cluster.folder / "a3")}
    cluster.processes["a3"].send_signal(signal.SIGTERM)
    assert cluster.processes["a3"].wait(timeout=15) == 0
    after = {process.pid for process in task_processes(cluster.folder / "a3")}
    assert len(before) == 2
    assert after == before
