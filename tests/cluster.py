"""`corral server` and `corral agent` subprocesses for tests, on free ports with their own folders."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
from devcluster import free_port, task_processes, wait_until


def get_json(address: str, path: str):
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as answer:
        return json.load(answer)


class ProcessCluster:
    """A server and its agents as subprocesses, each with its own log in `folder`."""

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
        address = self.agent_http.setdefault(node, f"127.0.0.1:{free_port()}")
        args = ["agent", "--join", self.http, "--node", node, "--data-dir", str(self.folder / node),
                "--http-addr", address, "--resources", resources]
        if attributes:
            args += ["--attributes", attributes]
        self._spawn(node, args)
        wait_until(lambda: self._answers(address, node, "/v1/agent/members"), 30, f"the HTTP address of agent {node}")

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

    def stop(self) -> None:
        """Stop every process, then kill the task processes that agents leave running when they stop."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
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
