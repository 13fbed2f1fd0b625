"""End to end: `corral dev` as a subprocess runs the hello-web example for real.

The tests in this module share one cluster and run in file order: the job
is started once, then checked over HTTP, DNS and on each instance, then an
instance is killed, the job is stopped, and the cluster is restarted on the
same data folder. The last part runs a DevCluster in the test's event loop
with a short agent timeout, to check that the agent monitor never fails
the in-process agent but still fails an agent that joined and went silent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal

import aiohttp
import psutil
import pytest
from devcluster import EXAMPLES, DevProcess, free_port, task_processes, http_text, port_is_open, wait_until

from corral.agent.registry import SERF_HEALTH_ID, serf_health_check
from corral.dev import DevCluster, DevConfig
from corral.state.records import AgentInfo, Node
from corral.types import CheckStatus

GREETING = "Hello from the end-to-end test"
GREETING_KEY = "config/hello-web/greeting"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    dev = DevProcess(folder / "data", folder / "corral-dev.log")
    dev.start()
    yield dev
    if dev.process is not None and dev.process.poll() is None:
        dev.stop()
    leftover = task_processes(dev.data_dir)
    for process in leftover:
        process.kill()
    assert not leftover, f"task processes left after corral dev stopped: {[p.pid for p in leftover]}"


def test_job_run_succeeds(cluster):
    cluster.cli("kv", "put", GREETING_KEY, GREETING)
    result = cluster.cli("job", "run", str(EXAMPLES / "hello-web.toml"))
    assert "2 of 2 instances running and passing" in result.stdout


def test_two_instances_passing(cluster):
    instances = cluster.passing_instances()
    assert len(instances) == 2
    ids = {entry["Service"]["ID"] for entry in instances}
    assert len(ids) == 2


def test_dns_srv_returns_two_ports(cluster):
    ports = cluster.srv_ports()
    assert len(ports) == 2
    assert len(set(ports)) == 2


def test_instances_serve_greeting(cluster):
    for entry in cluster.passing_instances():
        assert http_text(entry["Service"]["Port"]).strip() == GREETING


def test_agents_lists_dev_node(cluster):
    # `corral dev` offers what psutil detects; the two hello-web instances use 0.1 CPU and 64 MB each.
    cpus = psutil.cpu_count(logical=True)
    memory = psutil.virtual_memory().total // (1024 * 1024)
    result = cluster.cli("agents")
    rows = [line.split() for line in result.stdout.strip().splitlines()]
    assert rows[0] == ["NODE", "ADDRESS", "STATUS", "CPUS", "MEM", "(MB)", "DISK", "(MB)", "PORTS", "LAST",
                       "HEARTBEAT"]
    assert len(rows) == 2
    node, address, status, cpu_cell, memory_cell, _disk, ports_cell, heartbeat = rows[1]
    assert node == "test-node"
    assert address == "127.0.0.1"
    assert status == "alive"
    assert cpu_cell == f"0.2/{cpus}"
    assert memory_cell == f"128/{memory}"
    assert ports_cell == "2/12001"
    # The agent runs inside the `corral dev` process, so it sends no heartbeats.
    assert heartbeat == "-"


def test_agents_json_marks_in_process(cluster):
    agents = cluster.get("/v1/agents")
    assert [agent["Node"] for agent in agents] == ["test-node"]
    assert agents[0]["Status"] == "alive"
    assert agents[0]["InProcess"] is True
    assert agents[0]["LastHeartbeatAgo"] is None


def test_killed_instance_is_restarted(cluster):
    tasks = [task for task in cluster.get("/v1/tasks?job=hello-web") if task["State"] == "RUNNING"]
    victim = tasks[0]
    os.kill(victim["PID"], signal.SIGKILL)

    def replaced() -> bool:
        task = cluster.get(f"/v1/tasks/{victim['ID']}")
        return task["PID"] not in (None, victim["PID"]) and task["Health"] == "passing"

    wait_until(replaced, 30, f"task {victim['ID']} to run again and pass its check")
    instances = wait_until(lambda: len(cluster.passing_instances()) == 2 and cluster.passing_instances(), 30,
                           "2 passing instances")
    assert len(instances) == 2
    for entry in instances:
        assert port_is_open(entry["Service"]["Port"]), f"nothing listens on {entry['Service']['Port']}"
    restarted = cluster.get(f"/v1/tasks/{victim['ID']}")
    assert restarted["Restarts"] == 1


def test_job_stop_leaves_nothing(cluster):
    pids = [task["PID"] for task in cluster.get("/v1/tasks?job=hello-web") if task["State"] == "RUNNING"]
    cluster.cli("job", "stop", "hello-web")
    assert cluster.get("/v1/catalog/service/hello-web") == []
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert task_processes(cluster.data_dir) == []
    assert cluster.srv_ports() == []


def test_kv_survives_restart(cluster):
    cluster.cli("job", "run", str(EXAMPLES / "hello-web.toml"))
    assert cluster.stop() == 0
    assert task_processes(cluster.data_dir) == []
    cluster.start()
    result = cluster.cli("kv", "get", GREETING_KEY)
    assert result.stdout.strip() == GREETING


def test_restart_brings_job_back(cluster):
    wait_until(lambda: len(cluster.passing_instances()) == 2, 60, "the stored job to run 2 passing instances again")
    running = [task for task in cluster.get("/v1/tasks?job=hello-web") if task["State"] == "RUNNING"]
    assert len(running) == 2
    catalog_ids = {entry["ServiceID"] for entry in cluster.get("/v1/catalog/service/hello-web")}
    assert catalog_ids == {task["ID"] for task in running}


# The agent monitor of a DevCluster in this event loop

DEV_NODE = "dev-node"
# Short, so that each test waits several timeouts in about a second.
AGENT_TIMEOUT = 0.3


@pytest.fixture
async def dev_cluster(tmp_path):
    config = DevConfig(
        data_dir=tmp_path / "dev", http_port=free_port(), dns_port=free_port(), node=DEV_NODE, cpus=2.0,
        memory=256, agent_timeout=AGENT_TIMEOUT,
    )
    cluster = DevCluster(config)
    session = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{config.http_port}")
    try:
        await cluster.start()
        yield cluster, session
    finally:
        await session.close()
        await cluster.stop()


def _serf_status(cluster: DevCluster, node: str) -> CheckStatus:
    return next(check.status for check in cluster.state.checks(node) if check.id == SERF_HEALTH_ID)


def _registration(node: str) -> dict:
    agent = AgentInfo(node, "127.0.0.1", cpus=1.0, memory=128, disk=100, port_ranges=[[21000, 21009]])
    return {
        "Agent": dataclasses.asdict(agent),
        "Node": dataclasses.asdict(Node(node, "127.0.0.1", "dc1")),
        "Checks": [dataclasses.asdict(serf_health_check(node))],
    }


async def _agents(session: aiohttp.ClientSession) -> dict[str, dict]:
    async with session.get("/v1/agents") as response:
        assert response.status == 200
        return {agent["Node"]: agent for agent in await response.json()}


async def test_dev_agent_outlives_timeout(dev_cluster):
    cluster, session = dev_cluster
    # The monitor checks deadlines every timeout / 4, so this waits through about 16 checks.
    await asyncio.sleep(AGENT_TIMEOUT * 4)
    agents = await _agents(session)
    assert agents[DEV_NODE]["Status"] == "alive"
    assert agents[DEV_NODE]["InProcess"] is True
    assert agents[DEV_NODE]["Total"]["cpus"] == 2.0
    assert agents[DEV_NODE]["Total"]["memory"] == 256
    assert cluster.state.agent(DEV_NODE) is not None
    assert _serf_status(cluster, DEV_NODE) is CheckStatus.PASSING


async def test_dev_agent_alive_after_restart(dev_cluster):
    # The agent record stored by the first run must not get a deadline when the monitor starts again.
    first, session = dev_cluster
    await first.stop()
    second = DevCluster(first.config)
    await second.start()
    try:
        await asyncio.sleep(AGENT_TIMEOUT * 4)
        agents = await _agents(session)
        serf_status = _serf_status(second, DEV_NODE)
    finally:
        await second.stop()
    assert agents[DEV_NODE]["Status"] == "alive"
    assert serf_status is CheckStatus.PASSING


async def test_joined_agent_silent_fails(dev_cluster):
    cluster, session = dev_cluster
    async with session.put("/v1/agents/register", json=_registration("joined")) as response:
        assert response.status == 200
    deadline = asyncio.get_running_loop().time() + AGENT_TIMEOUT * 1.25 + 5
    while (await _agents(session))["joined"]["Status"] != "failed":
        assert asyncio.get_running_loop().time() < deadline, "the silent agent was not declared failed"
        await asyncio.sleep(0.1)
    assert _serf_status(cluster, "joined") is CheckStatus.CRITICAL
    assert (await _agents(session))[DEV_NODE]["Status"] == "alive"


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/v1/agents/register"), ("PUT", f"/v1/agents/{DEV_NODE}/leave"), ("DELETE", f"/v1/agents/{DEV_NODE}")],
)
async def test_dev_agent_rejects_takeover(dev_cluster, method, path):
    cluster, session = dev_cluster
    body = _registration(DEV_NODE) if path.endswith("register") else None
    async with session.request(method, path, json=body) as response:
        status = response.status
        error = (await response.json())["error"]
    assert status == 409
    assert DEV_NODE in error
    assert "inside the server's process" in error
    agents = await _agents(session)
    assert agents[DEV_NODE]["Status"] == "alive"
    assert agents[DEV_NODE]["Total"]["cpus"] == 2.0
