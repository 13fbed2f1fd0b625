"""A `corral dev` subprocess for tests, on free ports with its own data folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from collections.abc import Callable
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import psutil

from corral.server import ListenError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# Ports this process has handed out. Once a probe socket is closed, the kernel may
# pick its port again, so two servers of one test (HTTP and DNS) could get the same port.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """Return a port that is free on 127.0.0.1 for both TCP and UDP and not handed out before."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            if port in _HANDED_OUT:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no port is free for both TCP and UDP on 127.0.0.1")


async def start_on_free_ports(make_cluster: Callable[[int, int], Any], attempts: int = 3) -> Any:
    """Start the in-process cluster that make_cluster(http_port, dns_port) builds, on free ports.

    A port free when chosen can be taken before the server binds it (by a
    client connection's local port, for one), so a ListenError is retried on
    new ports.
    """
    for attempt in range(attempts):
        cluster = make_cluster(free_port(), free_port())
        try:
            await cluster.start()
        except ListenError:
            await cluster.stop()
            if attempt == attempts - 1:
                raise
            continue
        return cluster
    raise AssertionError("unreachable")


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class DevProcess:
    """A `corral dev` subprocess on free ports with its own data folder."""

    def __init__(self, data_dir: Path, log_path: Path, extra_args: list[str] | None = None):
        self.data_dir = data_dir
        self.extra_args = extra_args or []
        self.log_path = log_path
        self.http_addr = f"127.0.0.1:{free_port()}"
        self.dns_port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "corral", "dev",
                "--data-dir", str(self.data_dir),
                "--http-addr", self.http_addr,
                "--dns-addr", f"127.0.0.1:{self.dns_port}",
                "--node", "test-node",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(self._ready, 30, "the HTTP API of corral dev")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"corral dev exited with {self.process.returncode}:\n{self.log()}")
        try:
            self.get("/v1/status/leader")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def stop(self) -> int:
        """Send SIGINT, as Ctrl-C does, and return the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"corral dev did not stop within 30s:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(f"http://{self.http_addr}{path}", timeout=10) as answer:
            return json.load(answer)

    def cli(self, *args: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "corral", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "CORRAL_HTTP_ADDR": self.http_addr},
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"corral {' '.join(args)} exited with {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def passing_instances(self) -> list[dict]:
        return self.get("/v1/health/service/hello-web?passing")

    def srv_ports(self) -> list[int]:
        query = dns.message.make_query("hello-web.service.consul", dns.rdatatype.SRV)
        response = dns.query.udp(query, "127.0.0.1", port=self.dns_port, timeout=5)
        return sorted(record.port for rrset in response.answer for record in rrset)


def http_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
        return answer.read().decode()


def port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def task_processes(data_dir: Path) -> list[psutil.Process]:
    """Return the live processes of tasks started by the cluster on `data_dir`.

    A task's environment names its sandbox, which is under the cluster's data
    folder, so processes of other clusters running at the same time are not counted.
    """
    found = []
    for process in psutil.process_iter():
        try:
            sandbox = process.environ().get("CORRAL_SANDBOX", "")
            zombie = process.status() == psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if sandbox.startswith(str(data_dir) + "/") and not zombie:
            found.append(process)
    return found
