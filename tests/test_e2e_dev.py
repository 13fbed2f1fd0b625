"""End to end: `corral dev` as a subprocess runs the hello-web example for real.

The tests in this module share one cluster and run in file order: the job
is started once, then checked over HTTP, DNS and on each instance, then an
instance is killed, the job is stopped, and the cluster is restarted on the
same data folder.
"""

from __future__ import annotations

import os
import signal

import psutil
import pytest
from devcluster import EXAMPLES, DevProcess, task_processes, http_text, port_is_open, wait_until

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
