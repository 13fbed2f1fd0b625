"""Acceptance: a real HAProxy finds the hello-web instances through corral's DNS interface.

HAProxy (Debian's package, 2.6) fills a backend with `server-template` from the SRV
records of `_hello-web._tcp.service.consul`, asking corral's DNS server as its only
nameserver, with EDNS0 (`accepted_payload_size`), once over UDP and once over TCP.
The tests read HAProxy's runtime API on a stats socket (`show servers state`,
`show resolvers`) and send HTTP requests through its frontends. Then they scale the
job from two instances to one, and check that HAProxy puts the removed instance's
server in maintenance while requests keep succeeding. Last, 40 instances of a
service `bulk`, registered through the catalog API, check EDNS0 sizes: HAProxy gets
all of them with a 4096-byte payload size and a part with 512 bytes, and counts no
response as invalid or too big. The tests run in file order on one cluster and one
HAProxy.

Both instances run on one node, so their SRV records share the target
`test-node.node.dc1.consul`, whose A record corral sends once in the additional
section, as Consul does over UDP (syncExtra in Consul's agent/dns.go). HAProxy 2.6 pairs an
additional record with one SRV record only (it logs "changed its IP ... by DNS
additional record" for the first server and "by corral_udp/corral" for the second),
so it resolves the other servers with an A query of the node's name, and these tests
cover that lookup too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from devcluster import EXAMPLES, DevProcess, free_port, task_processes, wait_until

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")

if HAPROXY is None:
    if os.environ.get("CI"):
        pytest.fail("haproxy is not installed in CI; run scripts/ci-deps.sh first", pytrace=False)
    pytest.skip("haproxy is not installed; scripts/ci-deps.sh installs Debian's package", allow_module_level=True)

GREETING = "Hello from corral"
GREETING_KEY = "config/hello-web/greeting"
SRV_NAME = "_hello-web._tcp.service.consul"
NODE_TARGET = "test-node.node.dc1.consul"
SERVER_SLOTS = 4
DISCOVERY_TIMEOUT = 30.0

# Backends filled from SRV responses over UDP and over TCP (the `tcp@` nameserver prefix).
UDP_BACKEND = "hello_udp"
TCP_BACKEND = "hello_tcp"

# Instances of the service `bulk`, each on its own node, registered through the catalog API.
# Their SRV response is about 3,100 bytes (measured over TCP with dnspython), and 512 bytes
# carry 5 of them, so HAProxy gets all of them only when it advertises a larger EDNS0 size.
BULK_INSTANCES = 40
BULK_LARGE_BACKEND = "bulk_large"
BULK_SMALL_BACKEND = "bulk_small"

# `show servers state` fields, from HAProxy 2.6's include/haproxy/server-t.h: srv_op_state 2
# is running. The srv_admin_state bits 0x23 mean maintenance, and 0x20 among them means
# that DNS resolution gave the server no address.
OP_STATE_RUNNING = 2
ADMIN_MAINT_MASK = 0x23
ADMIN_RESOLUTION_MAINT = 0x20

# Resolver counters of responses that HAProxy could not use.
RESOLVER_ERROR_COUNTERS = ("snd_error", "invalid", "too_big", "truncated", "any_err", "other", "refused")

CONFIG = """\
global
    nbthread 1
    stats socket {socket} mode 600 level admin

defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    retries 3
    option redispatch 1
    retry-on all-retryable-errors
    default-server init-addr none check inter 500ms fall 2 rise 1

resolvers corral_udp
    nameserver corral 127.0.0.1:{dns_port}
    accepted_payload_size 4096
    resolve_retries 3
    timeout resolve 250ms
    timeout retry 250ms
    hold valid 1s
    hold obsolete 0s
    hold nx 1s
    hold other 1s
    hold refused 1s
    hold timeout 1s

resolvers corral_512
    nameserver corral 127.0.0.1:{dns_port}
    accepted_payload_size 512
    timeout resolve 250ms
    timeout retry 250ms
    hold valid 1s
    hold obsolete 0s

resolvers corral_tcp
    nameserver corral tcp@127.0.0.1:{dns_port}
    accepted_payload_size 8192
    timeout resolve 250ms
    timeout retry 250ms
    hold valid 1s
    hold obsolete 0s

frontend web
    bind 127.0.0.1:{frontend_port}
    default_backend {udp_backend}

frontend web_tcp_dns
    bind 127.0.0.1:{frontend_tcp_port}
    default_backend {tcp_backend}

backend {udp_backend}
    balance roundrobin
    server-template web {slots} {srv_name} resolvers corral_udp resolve-prefer ipv4

backend {tcp_backend}
    balance roundrobin
    server-template web {slots} {srv_name} resolvers corral_tcp resolve-prefer ipv4

# No frontend sends traffic to these, and they have no health checks.
backend {bulk_large_backend}
    server-template bulk {bulk_slots} _bulk._tcp.service.consul resolvers corral_udp resolve-prefer ipv4 no-check

backend {bulk_small_backend}
    server-template bulk {bulk_slots} _bulk._tcp.service.consul resolvers corral_512 resolve-prefer ipv4 no-check
"""


class HAProxy:
    """An haproxy process in the foreground (`-db`) with its config and stats socket in `folder`."""

    def __init__(self, folder: Path, dns_port: int):
        self.folder = folder
        self.socket_path = folder / "haproxy.sock"
        self.config_path = folder / "haproxy.cfg"
        self.log_path = folder / "haproxy.log"
        self.port = free_port()
        self.tcp_dns_frontend_port = free_port()
        self.config_path.write_text(CONFIG.format(
            socket=self.socket_path,
            dns_port=dns_port,
            frontend_port=self.port,
            frontend_tcp_port=self.tcp_dns_frontend_port,
            udp_backend=UDP_BACKEND,
            tcp_backend=TCP_BACKEND,
            slots=SERVER_SLOTS,
            srv_name=SRV_NAME,
            bulk_large_backend=BULK_LARGE_BACKEND,
            bulk_small_backend=BULK_SMALL_BACKEND,
            bulk_slots=BULK_INSTANCES,
        ))
        self.process: subprocess.Popen | None = None

    def check_config(self) -> subprocess.CompletedProcess:
        return subprocess.run([HAPROXY, "-c", "-f", str(self.config_path)], capture_output=True, text=True,
                              timeout=30)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config_path)], stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_until(self._ready, 30, "the haproxy stats socket")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.process.returncode}:\n{self.log()}")
        try:
            self.command("show info")
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        return True

    def stop(self) -> int | None:
        """Stop haproxy with SIGTERM (a hard stop) and return its exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def command(self, line: str) -> str:
        """Send one command to the runtime API and return its whole output."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self, backend: str) -> list[dict[str, str]]:
        """Return the rows of `show servers state` for `backend`, keyed by the header's field names."""
        lines = self.command(f"show servers state {backend}").splitlines()
        header = next((line for line in lines if line.startswith("# ")), None)
        if header is None:
            raise AssertionError(f"no header in the output of show servers state {backend}: {lines}")
        names = header[2:].split()
        rows = []
        for line in lines:
            fields = line.split()
            if len(fields) == len(names) and not line.startswith("#"):
                rows.append(dict(zip(names, fields)))
        return rows

    def live_ports(self, backend: str) -> list[int]:
        """Return the ports of the servers that are running and not in maintenance, sorted."""
        return sorted(int(row["srv_port"]) for row in self.servers(backend) if is_live(row))

    def resolver_counters(self, resolvers: str) -> dict[str, int]:
        """Return the counters of the nameserver `corral` in `show resolvers RESOLVERS`."""
        output = self.command(f"show resolvers {resolvers}")
        counters: dict[str, int] = {}
        for line in output.splitlines():
            key, sep, value = line.strip().partition(":")
            if sep and value.strip().isdigit():
                counters[key.strip()] = int(value)
        if "valid" not in counters:
            raise AssertionError(f"no counters for resolvers {resolvers} in:\n{output}")
        return counters


def is_live(row: dict[str, str]) -> bool:
    admin = int(row["srv_admin_state"])
    return int(row["srv_op_state"]) == OP_STATE_RUNNING and not admin & ADMIN_MAINT_MASK


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def running_tasks(cluster: DevProcess) -> list[dict]:
    return [task for task in cluster.get("/v1/tasks?job=hello-web") if task["State"] == "RUNNING"]


def register(cluster: DevProcess, body: dict) -> None:
    request = urllib.request.Request(
        f"http://{cluster.http_addr}/v1/catalog/register", data=json.dumps(body).encode(), method="PUT"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response) is True


def bulk_address(index: int) -> str:
    return f"127.0.4.{index + 1}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("haproxy-corral")
    dev = DevProcess(folder / "data", folder / "corral-dev.log")
    dev.start()
    yield dev
    if dev.process is not None and dev.process.poll() is None:
        assert dev.stop() == 0
    leftover = task_processes(dev.data_dir)
    for process in leftover:
        process.kill()
    assert not leftover, f"task processes left after corral dev stopped: {[p.pid for p in leftover]}"


@pytest.fixture(scope="module")
def haproxy(cluster, tmp_path_factory):
    server = HAProxy(tmp_path_factory.mktemp("haproxy"), cluster.dns_port)
    checked = server.check_config()
    assert checked.returncode == 0, f"haproxy -c rejected the config:\n{checked.stdout}\n{checked.stderr}"
    server.start()
    yield server
    server.stop()
    assert server.process is not None
    assert server.process.poll() is not None, f"haproxy pid {server.process.pid} is still running"


def test_job_runs(cluster):
    cluster.cli("kv", "put", GREETING_KEY, GREETING)
    result = cluster.cli("job", "run", str(EXAMPLES / "hello-web.toml"))
    assert "2 of 2 instances running and passing" in result.stdout


@pytest.mark.parametrize("backend", [UDP_BACKEND, TCP_BACKEND])
def test_servers_match_instances(cluster, haproxy, backend):
    ports = sorted(entry["Service"]["Port"] for entry in cluster.passing_instances())
    assert len(ports) == 2
    found = wait_until(lambda: haproxy.live_ports(backend) == ports and ports, DISCOVERY_TIMEOUT,
                       f"haproxy backend {backend} to run servers on ports {ports}")
    assert found == ports

    live = [row for row in haproxy.servers(backend) if is_live(row)]
    assert {row["srv_addr"] for row in live} == {"127.0.0.1"}
    assert {row["srv_fqdn"] for row in live} == {NODE_TARGET}
    assert {row["srvrecord"] for row in live} == {SRV_NAME}


def test_spare_slots_wait_in_maintenance(haproxy):
    idle = [row for row in haproxy.servers(UDP_BACKEND) if not is_live(row)]
    assert len(idle) == SERVER_SLOTS - 2
    for row in idle:
        assert int(row["srv_admin_state"]) & ADMIN_RESOLUTION_MAINT, row


@pytest.mark.parametrize("resolvers", ["corral_udp", "corral_tcp"])
def test_resolver_counts_no_errors(haproxy, resolvers):
    counters = haproxy.resolver_counters(resolvers)
    assert counters["valid"] > 0
    for name in RESOLVER_ERROR_COUNTERS:
        assert counters[name] == 0, f"resolvers {resolvers} counted {counters[name]} {name}: {counters}"


def test_servers_stable_across_resolutions(haproxy):
    """Check that each server keeps its instance, although corral shuffles the SRV records."""
    before = {row["srv_name"]: row["srv_port"] for row in haproxy.servers(UDP_BACKEND) if is_live(row)}
    start = haproxy.resolver_counters("corral_udp")["valid"]
    wait_until(lambda: haproxy.resolver_counters("corral_udp")["valid"] >= start + 6, DISCOVERY_TIMEOUT,
               "haproxy to resolve six more times")
    after = {row["srv_name"]: row["srv_port"] for row in haproxy.servers(UDP_BACKEND) if is_live(row)}
    assert after == before


def test_tcp_resolvers_connect_over_tcp(cluster, haproxy):
    assert haproxy.process is not None

    def dns_connections() -> list:
        connections = psutil.Process(haproxy.process.pid).net_connections(kind="tcp")
        return [item for item in connections if item.raddr and item.raddr.port == cluster.dns_port]

    found = wait_until(dns_connections, DISCOVERY_TIMEOUT,
                       f"haproxy to connect to corral's DNS port {cluster.dns_port} over TCP")
    assert found[0].raddr.ip == "127.0.0.1"


@pytest.mark.parametrize("frontend", ["udp", "tcp"])
def test_requests_reach_both_instances(cluster, haproxy, frontend):
    port = haproxy.port if frontend == "udp" else haproxy.tcp_dns_frontend_port
    task_ids = {task["ID"] for task in running_tasks(cluster)}
    assert len(task_ids) == 2

    status, body = fetch(port, "/")
    assert status == 200
    assert body.strip() == GREETING

    reached = set()
    for _ in range(10):
        status, body = fetch(port, "/info")
        assert status == 200, body
        reached.add(json.loads(body)["task"])
    assert reached == task_ids


def test_scaled_down_instance_dropped(cluster, haproxy, tmp_path):
    before = {task["Instance"]: task for task in running_tasks(cluster)}
    removed_port = before[1]["Ports"]["http"]
    kept_port = before[0]["Ports"]["http"]
    removed_servers = {
        backend: [row["srv_name"] for row in haproxy.servers(backend) if row["srv_port"] == str(removed_port)]
        for backend in (UDP_BACKEND, TCP_BACKEND)
    }
    assert all(len(names) == 1 for names in removed_servers.values()), removed_servers

    job = (EXAMPLES / "hello-web.toml").read_text()
    assert "count = 2" in job
    assert 'workdir = "."' in job
    job = job.replace("count = 2", "count = 1").replace('workdir = "."', f'workdir = "{EXAMPLES}"')
    job_file = tmp_path / "hello-web-one.toml"
    job_file.write_text(job)
    cluster.cli("job", "run", str(job_file))
    assert [task["Instance"] for task in running_tasks(cluster)] == [0]
    assert cluster.srv_ports() == [kept_port]

    statuses: list[int] = []

    def dropped() -> bool:
        # Requests go on while HAProxy catches up, and each must succeed.
        statuses.append(fetch(haproxy.port, "/")[0])
        return haproxy.live_ports(UDP_BACKEND) == [kept_port] and haproxy.live_ports(TCP_BACKEND) == [kept_port]

    wait_until(dropped, DISCOVERY_TIMEOUT, f"haproxy to drop the server on port {removed_port}")
    assert set(statuses) == {200}

    for backend, (name,) in removed_servers.items():
        (row,) = [row for row in haproxy.servers(backend) if row["srv_name"] == name]
        assert int(row["srv_admin_state"]) & ADMIN_RESOLUTION_MAINT, row


def test_requests_reach_remaining_instance(cluster, haproxy):
    tasks = running_tasks(cluster)
    assert len(tasks) == 1, tasks
    task = tasks[0]
    for _ in range(6):
        status, body = fetch(haproxy.port, "/info")
        assert status == 200, body
        assert json.loads(body)["task"] == task["ID"]


def test_bulk_instances_registered(cluster):
    for index in range(BULK_INSTANCES):
        register(cluster, {
            "Node": f"bulk-node-{index}",
            "Address": bulk_address(index),
            "Service": {"ID": f"bulk-{index}", "Service": "bulk", "Port": 20000 + index},
        })
    assert len(cluster.get("/v1/health/service/bulk?passing")) == BULK_INSTANCES


def test_large_payload_gets_every_instance(haproxy):
    expected = sorted(20000 + index for index in range(BULK_INSTANCES))
    found = wait_until(lambda: haproxy.live_ports(BULK_LARGE_BACKEND) == expected and expected,
                       DISCOVERY_TIMEOUT, f"haproxy backend {BULK_LARGE_BACKEND} to have {BULK_INSTANCES} servers")
    assert found == expected

    addresses = {row["srv_port"]: row["srv_addr"] for row in haproxy.servers(BULK_LARGE_BACKEND)}
    for index in range(BULK_INSTANCES):
        assert addresses[str(20000 + index)] == bulk_address(index)


def test_small_payload_gets_some_instances(haproxy):
    """Check that 512-byte responses carry some but not all of the 40 instances."""
    counts = []

    def sampled() -> bool:
        counts.append(len(haproxy.live_ports(BULK_SMALL_BACKEND)))
        return len(counts) >= 10 and min(counts[-5:]) > 0

    wait_until(sampled, DISCOVERY_TIMEOUT, f"haproxy backend {BULK_SMALL_BACKEND} to have servers")
    assert 0 < max(counts) < BULK_INSTANCES


@pytest.mark.parametrize("resolvers", ["corral_udp", "corral_512"])
def test_bulk_resolutions_count_no_errors(haproxy, resolvers):
    counters = haproxy.resolver_counters(resolvers)
    assert counters["valid"] > 0
    for name in RESOLVER_ERROR_COUNTERS:
        assert counters[name] == 0, f"resolvers {resolvers} counted {counters[name]} {name}: {counters}"
