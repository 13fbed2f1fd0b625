"""Weighted DRF under contention, on one `corral server` and three `corral agent` processes.

Two corral.sdk frameworks, each in its own role, want more than the
cluster has: they subscribe before any agent registers, then launch long
`sleep` tasks as offers come until every agent is full. The dominant shares that /v1/roles reports must then match
the tasks that run, and be equal for equal role weights and 2:1 for weights
2 and 1, each within 10 %. A third case checks that a framework declining
every offer with a 0.1 s filter does not keep a second framework from
getting offers. The last part runs an agent with static reservations and a
server with a role quota.
"""

from __future__ import annotations

import time

import pytest
from cluster import DecliningFramework, ProcessCluster, SleepFramework, ThreadedDriver
from devcluster import wait_until

from corral.sdk import FrameworkInfo

# Each agent fits 20 tasks of 0.1 cpus and 32 MB, both kinds exactly, so a full
# cluster has nothing left to offer and the shares count only running tasks.
AGENTS = {"f1": "21000-21019", "f2": "22000-22019", "f3": "23000-23019"}
TASK_CPUS = 0.1
TASK_MEM = 32
TASKS_PER_AGENT = 20
CLUSTER_TASKS = TASKS_PER_AGENT * len(AGENTS)
CLUSTER_CPUS = TASK_CPUS * CLUSTER_TASKS
# Seconds the frameworks get to fill the cluster.
FILL_TIMEOUT = 45


def _agent_resources(ports: str) -> str:
    return f"cpus:{TASK_CPUS * TASKS_PER_AGENT:g};mem:{TASK_MEM * TASKS_PER_AGENT};disk:1000;ports:[{ports}]"


def _start_cluster(folder, server_args: list[str], agents: bool = True) -> ProcessCluster:
    cluster = ProcessCluster(folder, server_args)
    cluster.start_server()
    if agents:
        _start_agents(cluster)
    return cluster


def _start_agents(cluster: ProcessCluster) -> None:
    for node, ports in AGENTS.items():
        cluster.start_agent(node, _agent_resources(ports))


def _running_by_framework(cluster: ProcessCluster) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in cluster.get("/v1/tasks"):
        if task["State"] == "RUNNING" and task["Framework"]:
            counts[task["Framework"]] = counts.get(task["Framework"], 0) + 1
    return counts


def _contend(cluster: ProcessCluster) -> tuple[dict[str, float], dict[str, int]]:
    """Subscribe a framework in role a and one in role b, start the agents, and run until the cluster is full.

    Both frameworks are there before the first offer. Offered resources
    count as held, so a framework that came later would catch up only as
    fast as offers are accepted or declined, and could still be behind
    when the cluster fills (see the NOTE in corral/master/allocator.py).
    Return the dominant shares of /v1/roles and the running tasks of each role.
    """
    url = f"http://{cluster.http}"
    drivers = {}
    try:
        for role in ("a", "b"):
            framework = FrameworkInfo(f"fair-{role}", roles=(role,))
            drivers[role] = ThreadedDriver(SleepFramework(TASK_CPUS, TASK_MEM), framework, url).start()
        started = time.monotonic()
        _start_agents(cluster)
        wait_until(lambda: sum(_running_by_framework(cluster).values()) == CLUSTER_TASKS, FILL_TIMEOUT,
                   f"{CLUSTER_TASKS} running tasks")
        assert time.monotonic() - started < FILL_TIMEOUT
        roles = {role["Role"]: role for role in cluster.get("/v1/roles")}
        running = _running_by_framework(cluster)
        shares = {role: roles[role]["DominantShare"] for role in drivers}
        tasks = {role: running.get(driver.driver.framework_id, 0) for role, driver in drivers.items()}
        return shares, tasks
    finally:
        for driver in drivers.values():
            driver.stop()


def _check_shares_match_tasks(shares: dict[str, float], tasks: dict[str, int]) -> None:
    assert sum(tasks.values()) == CLUSTER_TASKS
    for role, count in tasks.items():
        # cpus and mem give the same share here, because tasks fill both exactly.
        assert shares[role] == pytest.approx(count * TASK_CPUS / CLUSTER_CPUS, abs=1e-6), (role, shares, tasks)


@pytest.fixture
def folder(tmp_path):
    return tmp_path


def test_equal_weights_equal_shares(folder):
    cluster = _start_cluster(folder, [], agents=False)
    try:
        shares, tasks = _contend(cluster)
    finally:
        cluster.stop()
    _check_shares_match_tasks(shares, tasks)
    assert abs(shares["a"] - shares["b"]) <= 0.1 * max(shares.values()), (shares, tasks)


def test_weights_two_to_one(folder):
    cluster = _start_cluster(folder, ["--role-weight", "a=2", "--role-weight", "b=1"], agents=False)
    try:
        shares, tasks = _contend(cluster)
    finally:
        cluster.stop()
    _check_shares_match_tasks(shares, tasks)
    assert 2 * 0.9 <= shares["a"] / shares["b"] <= 2 * 1.1, (shares, tasks)


def test_decliner_does_not_starve_other(folder):
    cluster = _start_cluster(folder, [])
    url = f"http://{cluster.http}"
    decliner = launcher = None
    try:
        decliner = ThreadedDriver(DecliningFramework(refuse_seconds=0.1), FrameworkInfo("decliner", roles=("a",)),
                                  url).start()
        wait_until(lambda: decliner.scheduler.offers_seen >= 3, 15, "offers to the declining framework")
        # A task at a time, so that the launcher needs offer after offer.
        scheduler = SleepFramework(TASK_CPUS, TASK_MEM, limit=10)
        launcher = ThreadedDriver(scheduler, FrameworkInfo("launcher", roles=("b",)), url).start()
        wait_until(lambda: scheduler.running() == 10, 20, "ten running tasks of the launching framework")
        seen = decliner.scheduler.offers_seen
        wait_until(lambda: decliner.scheduler.offers_seen > seen, 10, "more offers to the declining framework")
    finally:
        for driver in (launcher, decliner):
            if driver is not None:
                driver.stop()
        cluster.stop()


# Static reservations and quotas, configured on the command lines


def test_reservation_and_quota_shown(folder):
    cluster = ProcessCluster(folder, ["--role-quota", "analytics=cpus:3;mem:1024"])
    cluster.start_server()
    try:
        cluster.start_agent("r1", "cpus:1;cpus(analytics):2;mem:512;mem(analytics):256;disk:1000;"
                                  "ports:[24000-24009];ports(analytics):[24010-24011]")
        roles = {role["Role"]: role for role in cluster.get("/v1/roles")}
        assert roles["analytics"]["Reserved"] == {"cpus": 2.0, "mem": 256.0, "disk": 0.0, "ports": 2}
        assert roles["analytics"]["Quota"] == {"cpus": 3.0, "mem": 1024.0}
        [agent] = cluster.get("/v1/agents")
        assert agent["Total"]["cpus"] == 1.0
        assert agent["Reserved"]["analytics"]["cpus"] == 2.0
        table = cluster.cli("roles")
        assert table.returncode == 0, table.stderr
        [line] = [line for line in table.stdout.splitlines() if line.startswith("analytics")]
        assert "cpus 2, mem 256 MB, 2 ports" in line
        assert "cpus 3, mem 1024 MB" in line
    finally:
        cluster.stop()


def test_reserved_offer_to_role(folder):
    cluster = ProcessCluster(folder)
    cluster.start_server()
    url = f"http://{cluster.http}"
    drivers = []
    try:
        cluster.start_agent("r1", "cpus:1;cpus(analytics):1;mem:512;mem(analytics):256;disk:1000;ports:[24000-24009]")
        # Tasks of 1.5 cpus fit only with the reserved cpu; the analytics framework gets it.
        analytics = SleepFramework(1.5, 64, limit=1)
        drivers.append(ThreadedDriver(analytics, FrameworkInfo("reserved-user", roles=("analytics",)), url).start())
        wait_until(lambda: analytics.running() == 1, 20, "the analytics task running on reserved cpus")
        other = SleepFramework(0.5, 64, limit=1, refuse_seconds=1)
        drivers.append(ThreadedDriver(other, FrameworkInfo("other", roles=("web",)), url).start())
        wait_until(lambda: other.offers_seen >= 1, 20, "an offer to the web framework")
        frameworks = {entry["Name"]: entry for entry in cluster.get("/v1/frameworks")}
        assert frameworks["reserved-user"]["Used"]["cpus"] == 1.5
        # Only 0.5 unreserved cpus are left, and the web role is never offered the reserved ones.
        wait_until(lambda: other.running() == 1, 20, "the web task on the unreserved rest")
        assert _running_by_framework(cluster) == {frameworks["reserved-user"]["ID"]: 1, frameworks["other"]["ID"]: 1}
    finally:
        for driver in drivers:
            driver.stop()
        cluster.stop()
