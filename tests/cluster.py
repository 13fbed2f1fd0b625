"""`corral server` and `corral agent` subprocesses for tests, on free ports with their own folders.

Every test file that runs a server and agents as separate processes starts
them through ProcessCluster: each process writes its log to NAME.log in the
cluster's folder, and an agent keeps its data in the folder named after its
node.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import psutil
from devcluster import free_port, task_processes, wait_until

from corral.sdk import DriverStatus, FrameworkInfo, Scheduler, SchedulerDriver, TaskState


def get_json(address: str, path: str):
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as answer:
        return json.load(answer)


class ProcessCluster:
    """A server and its agents as subprocesses, each with its own log in `folder`.

    `server_args` are added to the `corral server` command line, such as
    ["--agent-timeout", "3s"]. Processes are named "server" and by the
    agent's node.
    """

    def __init__(self, folder: Path, server_args: list[str] | None = None):
        self.folder = folder
        self.server_args = server_args or []
        self.http = f"127.0.0.1:{free_port()}"
        self.dns_port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self.agent_http: dict[str, str] = {}

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.folder / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "corral", *args], stdout=log, stderr=subprocess.STDOUT
            )

    def start_server(self) -> None:
        self._spawn("server", [
            "server", "--data-dir", str(self.folder / "server"), "--http-addr", self.http,
            "--dns-addr", f"127.0.0.1:{self.dns_port}", *self.server_args,
        ])
        wait_until(lambda: self._answers(self.http, "server", "/v1/status/leader"), 30,
                   "the HTTP API of corral server")

    def stop_server(self) -> None:
        process = self.processes["server"]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)

    def start_agent(self, node: str, resources: str, attributes: str = "") -> None:
        """Start `corral agent` for `node` and wait until the server lists it as registered.

        A restarted agent keeps its HTTP address and data folder.
        """
        address = self.agent_http.setdefault(node, f"127.0.0.1:{free_port()}")
        args = ["agent", "--join", self.http, "--node", node, "--data-dir", str(self.folder / node),
                "--http-addr", address, "--resources", resources]
        if attributes:
            args += ["--attributes", attributes]
        self._spawn(node, args)
        wait_until(lambda: self._answers(address, node, "/v1/agent/members"), 30, f"the HTTP address of agent {node}")
        wait_until(lambda: self.agent_registered(node), 30, f"agent {node} registered")

    def agent_registered(self, node: str) -> bool:
        return any(agent["Node"] == node and agent.get("Status") == "alive" for agent in self.get("/v1/agents"))

    def kill(self, name: str) -> None:
        self.processes[name].kill()
        self.processes[name].wait()

    def _answers(self, address: str, name: str, path: str) -> bool:
        if self.processes[name].poll() is not None:
            raise AssertionError(f"{name} exited with {self.processes[name].returncode}:\n{self.log(name)}")
        try:
            get_json(address, path)
        except OSError:
            return False
        return True

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def get(self, path: str):
        return get_json(self.http, path)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run `corral ARGS` against this cluster's server and return the finished process."""
        return subprocess.run(
            [sys.executable, "-m", "corral", *args], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "CORRAL_HTTP_ADDR": self.http},
        )

    def stop(self, kill_tasks: bool = True) -> None:
        """Stop every process, then kill the task processes that agents leave running when they stop.

        With kill_tasks=False the task processes are left for the caller to check.
        """
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not kill_tasks:
            return
        # A killed process lingers until the kernel reaps it, so the kills are waited for.
        killed = []
        for process in task_processes(self.folder):
            try:
                for child in process.children(recursive=True):
                    child.kill()
                    killed.append(child)
                process.kill()
                killed.append(process)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(killed, timeout=10)


def commands_running(folder: Path, text: str) -> list[psutil.Process]:
    """Return the live task processes of the cluster in `folder` whose command line contains `text`."""
    found = []
    for process in task_processes(folder):
        try:
            if text in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # it exited, or became a zombie, since it was listed
            pass
    return found


class SleepFramework(Scheduler):
    """A framework that wants more than any cluster has: it launches `sleep` tasks as offers come.

    It launches at most `per_offer` tasks of `cpus` and `mem` on each offer
    (all that fit when None), up to `limit` tasks in all. It accepts with no
    refuse filter, because it wants the rest of the offer too, and declines
    an offer with no room for a task with a filter of `refuse_seconds`.
    """

    def __init__(self, cpus: float, mem: float, per_offer: int | None = 1, limit: int | None = None,
                 refuse_seconds: float = 0.1):
        self.cpus = cpus
        self.mem = mem
        self.per_offer = per_offer
        self.limit = limit
        self.refuse_seconds = refuse_seconds
        self.launched = 0
        self.offers_seen = 0
        self.states: dict[str, TaskState] = {}

    def resource_offers(self, driver, offers):
        for offer in offers:
            self.offers_seen += 1
            tasks = []
            while (offer.fits(cpus=self.cpus, mem=self.mem)
                   and (self.per_offer is None or len(tasks) < self.per_offer)
                   and (self.limit is None or self.launched < self.limit)):
                self.launched += 1
                tasks.append(offer.task(f"sleep-{self.launched}", "sleep 600", cpus=self.cpus, mem=self.mem))
            if tasks:
                driver.launch(offer, tasks, filters=0)
            else:
                driver.decline(offer, refuse_seconds=self.refuse_seconds)

    def status_update(self, driver, status):
        self.states[status.task_id] = status.state

    def running(self) -> int:
        return sum(state is TaskState.TASK_RUNNING for state in self.states.values())


class DecliningFramework(Scheduler):
    """A framework that declines every offer with a short filter and counts the offers."""

    def __init__(self, refuse_seconds: float = 0.1):
        self.refuse_seconds = refuse_seconds
        self.offers_seen = 0

    def resource_offers(self, driver, offers):
        self.offers_seen += len(offers)
        driver.decline(offers, refuse_seconds=self.refuse_seconds)


class ThreadedDriver:
    """A corral.sdk SchedulerDriver running in its own thread and event loop, for synchronous tests."""

    def __init__(self, scheduler: Scheduler, framework: FrameworkInfo, master_url: str):
        self.scheduler = scheduler
        self.driver = SchedulerDriver(scheduler, framework, master_url, reconnect_min=0.1, reconnect_max=0.5)
        self.status: DriverStatus | None = None
        self._thread = threading.Thread(target=self._run, name=f"driver-{framework.name}", daemon=True)

    def _run(self) -> None:
        self.status = asyncio.run(self.driver.run())

    def start(self) -> ThreadedDriver:
        self._thread.start()
        wait_until(lambda: self.driver.framework_id, 30, "the framework's SUBSCRIBED event")
        return self

    def stop(self, failover: bool = False) -> None:
        """Stop the driver; without failover it tears the framework down, which kills its tasks."""
        self.driver.stop(failover=failover)
        self._thread.join(15)
        if self._thread.is_alive():
            raise AssertionError(f"driver of framework {self.driver.framework_id} did not stop within 15s")
