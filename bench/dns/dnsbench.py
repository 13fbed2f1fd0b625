"""Measure DNS SRV lookups per second of `corral dev` beside a minimal Python responder.

Started by bench/dns/run. Three servers listen on free ports of 127.0.0.1:

- `corral dev` with its answer cache on (the default),
- `corral dev` with `--dns-cache-mb 0`, which builds every answer from the catalog,
- bench/dns/ceiling.py, which sends one fixed packet (the answer captured from corral)
  with the query's ID: the ceiling for a Python server on the same event loop.

Each corral gets a service of N instances, one per node, through PUT
/v1/catalog/register. dnsperf then sends the same SRV query to each server in turn,
for a fixed time per run, for several rounds, and the section printed at the end
reports the median of the rounds. Every server is stopped when the run ends, fails or
is interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dnslib import EDNS0, QTYPE, DNSRecord

ROOT = Path(__file__).resolve().parents[2]
# bench/pages.py writes this benchmark's section of the shared page.
sys.path.insert(0, str(ROOT / "bench"))
from pages import PAGE, write_section  # noqa: E402
HOST = "127.0.0.1"
SERVICE = "bench"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
EDNS_PAYLOAD = 4096
# corral's queries/s as a share of the ceiling's that the benchmark aims for.
TARGET_SHARE = 0.7


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen
    results: list[dict] = field(default_factory=list)


def free_port() -> int:
    """Return a port that is free on 127.0.0.1 for both TCP and UDP."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((HOST, port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no port is free for both TCP and UDP on 127.0.0.1")


def start_corral(name: str, workdir: Path, venv: Path, extra: list[str]) -> tuple[Server, str]:
    http_addr = f"{HOST}:{free_port()}"
    dns_port = free_port()
    data_dir = workdir / name
    log = open(workdir / f"{name}.log", "wb")
    command = [
        str(venv / "bin" / "corral"), "dev",
        "--data-dir", str(data_dir),
        "--http-addr", http_addr,
        "--dns-addr", f"{HOST}:{dns_port}",
        "--node", f"{name}-local",
        "--log-level", "warning",
        *extra,
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    server = Server(name, dns_port, process)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {workdir / name}.log")
        try:
            with urllib.request.urlopen(f"http://{http_addr}/v1/status/leader", timeout=2):
                return server, http_addr
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    stop(server)
    raise RuntimeError(f"{name} did not answer HTTP within {START_TIMEOUT}s")


def register_instances(http_addr: str, count: int) -> None:
    for index in range(count):
        body = {
            "Node": f"bench-node-{index}",
            "Address": f"127.0.1.{index + 1}",
            "Service": {"ID": f"{SERVICE}-{index}", "Service": SERVICE, "Port": 30000 + index},
        }
        request = urllib.request.Request(
            f"http://{http_addr}/v1/catalog/register", data=json.dumps(body).encode(), method="PUT"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            if json.load(response) is not True:
                raise RuntimeError(f"registering instance {index} through {http_addr} failed")


def srv_query(edns: bool) -> bytes:
    query = DNSRecord.question(f"{SERVICE}.service.consul", "SRV")
    if edns:
        query.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
    return bytes(query.pack())


def capture_answer(port: int, edns: bool, expected: int) -> bytes:
    """Query `port` once over UDP and return the response, after checking it has `expected` SRV records."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(srv_query(edns), (HOST, port))
        data = sock.recv(65535)
    answer = DNSRecord.parse(data)
    records = [record for record in answer.rr if record.rtype == QTYPE.SRV]
    if len(records) != expected:
        raise RuntimeError(f"expected {expected} SRV records from port {port}, got {len(records)}")
    return data


def start_ceiling(workdir: Path, venv: Path, answer: bytes) -> Server:
    response_file = workdir / "ceiling-response.bin"
    response_file.write_bytes(answer)
    port = free_port()
    command = [
        str(venv / "bin" / "python"), str(Path(__file__).with_name("ceiling.py")),
        "--port", str(port), "--response", str(response_file),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server("ceiling", port, process)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != "ready":
        stop(server)
        raise RuntimeError(f"ceiling.py did not start: {line!r}")
    return server


def stop(server: Server) -> None:
    process = server.process
    if process.poll() is not None:
        return
    # corral dev stops its tasks on SIGINT, as on Ctrl-C.
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def dnsperf_command(args: argparse.Namespace, port: int, query_file: Path) -> list[str]:
    command = [
        "dnsperf", "-s", HOST, "-p", str(port), "-d", str(query_file),
        "-l", str(args.seconds), "-c", str(args.clients), "-T", "1", "-q", str(args.outstanding),
    ]
    if not args.no_edns:
        command.append("-e")
    return command


def cpu_seconds(pid: int) -> float:
    """Return the CPU time, user and system, that process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the line, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_dnsperf(args: argparse.Namespace, server: Server, query_file: Path) -> dict:
    command = dnsperf_command(args, server.port, query_file)
    cpu_before = cpu_seconds(server.process.pid)
    wall_before = time.monotonic()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=args.seconds + 60)
    cpu_used = cpu_seconds(server.process.pid) - cpu_before
    cpu_share = cpu_used / (time.monotonic() - wall_before)
    if completed.returncode != 0:
        raise RuntimeError(f"dnsperf against {server.name} failed:\n{completed.stdout}\n{completed.stderr}")
    output = completed.stdout
    qps = float(_field(output, r"Queries per second:\s+([\d.]+)"))
    completed_count = int(_field(output, r"Queries completed:\s+(\d+)"))
    lost = int(_field(output, r"Queries lost:\s+(\d+)"))
    noerror = re.search(r"Response codes:.*?NOERROR (\d+)", output)
    return {
        "qps": qps,
        "completed": completed_count,
        "lost": lost,
        "noerror": int(noerror.group(1)) if noerror else 0,
        "cpu": cpu_share,
        "cpu_per_query": cpu_used / completed_count if completed_count else float("inf"),
    }


def _field(output: str, pattern: str) -> str:
    match = re.search(pattern, output)
    if match is None:
        raise RuntimeError(f"dnsperf output has no match for {pattern!r}:\n{output}")
    return match.group(1)


def command_output(command: list[str]) -> str:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (completed.stdout or completed.stderr).strip()


def describe_machine(venv: Path) -> dict[str, str]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    dnsperf_version = next(
        (line.strip() for line in command_output(["dnsperf", "-h"]).splitlines() if line.startswith("Version")),
        "unknown",
    )
    python = venv / "bin" / "python"
    uvloop = command_output([str(python), "-c", "import uvloop; print(uvloop.__version__)"])
    return {
        "logical CPUs (nproc)": command_output(["nproc"]),
        "CPU model": cpu_model,
        "kernel": f"{platform.system()} {platform.release()}",
        "corral": f"{command_output([str(venv / 'bin' / 'corral'), 'version'])} "
                  f"(git {command_output(['git', '-C', str(ROOT), 'describe', '--always', '--dirty'])})",
        "Python": command_output([str(python), "-c", "import platform; print(platform.python_version())"]),
        "uvloop": uvloop,
        "dnsperf": dnsperf_version,
    }


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def section(args: argparse.Namespace, servers: list[Server], machine: dict[str, str], started: datetime,
            answer_size: int, query_file: Path, loads: tuple[str, str]) -> str:
    medians = {server.name: statistics.median(result["qps"] for result in server.results) for server in servers}
    cpu_costs = {
        server.name: statistics.median(result["cpu_per_query"] for result in server.results) for server in servers
    }
    ceiling = medians["ceiling"]
    edns = "without EDNS0 (512-byte answers)" if args.no_edns else f"with EDNS0 (payload {EDNS_PAYLOAD})"
    example = shlex.join(dnsperf_command(args, 0, query_file)).replace(" -p 0 ", " -p PORT ")
    example = example.replace(str(query_file), "QUERYFILE")
    lines = [
        "## DNS: SRV lookups per second",
        "",
        f"`bench/dns/run {shlex.join(sys.argv[1:])}`".replace(" `", "`"),
        f"on {started.strftime('%Y-%m-%d %H:%M UTC')}. The query is `{SERVICE}.service.consul SRV` {edns},",
        f"for a service of {args.instances} instances, one per node, registered through",
        f"PUT /v1/catalog/register; each answer contains {args.instances} SRV records and their",
        f"{args.instances} A records ({answer_size} bytes). Each server got `{example}`",
        f"({args.seconds} s per run) in turn, {args.rounds} times; the figures are the medians.",
        "",
        "| server | queries/s | of the ceiling | runs (queries/s) | server CPU | CPU per query"
        " | ceiling's CPU per query ÷ this | lost | NOERROR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for server in servers:
        runs = ", ".join(f"{result['qps']:,.0f}" for result in server.results)
        lost = sum(result["lost"] for result in server.results)
        completed = sum(result["completed"] for result in server.results)
        noerror = sum(result["noerror"] for result in server.results)
        share = f"{100 * noerror / completed:.2f} %" if completed else "-"
        cpu = statistics.median(result["cpu"] for result in server.results)
        lines.append(
            f"| {server.name} | {medians[server.name]:,.0f} | {medians[server.name] / ceiling:.2f} | {runs} "
            f"| {100 * cpu:.0f} % | {1e6 * cpu_costs[server.name]:.1f} µs "
            f"| {cpu_costs['ceiling'] / cpu_costs[server.name]:.2f} | {lost} | {share} |"
        )
    corral_share = medians["corral"] / ceiling
    cost_share = cpu_costs["ceiling"] / cpu_costs["corral"]
    lines += [
        "",
        f"Target: corral at least {TARGET_SHARE} of the ceiling's queries/s: "
        f"**{'met' if corral_share >= TARGET_SHARE else 'not met'}** ({corral_share:.2f}, medians). "
        f"By CPU per query the ratio is {cost_share:.2f} (the ceiling's CPU per query divided by corral's).",
        "",
        "- corral: `corral dev` with default DNS flags, so its answer cache is on. A cached",
        "  answer is a dict lookup on the request's bytes after the ID, and hits rotate through",
        "  several encodings of the answer, each shuffled once.",
        "- corral, cache off: `corral dev --dns-cache-mb 0`, which parses each request with dnslib,",
        "  reads the catalog, shuffles the instances and packs a new answer.",
        "- server CPU: the server process's user and system CPU time during its runs, as a",
        "  share of one core. dnsperf, the kernel's loopback path and the server together keep",
        "  both CPUs busy, so the servers get less than a core and queries/s depends on the load",
        "  generator too. CPU per query (server CPU time ÷ queries completed) does not, and",
        "  compares the servers' own cost.",
        "- ceiling: bench/dns/ceiling.py, an asyncio UDP responder that sends the answer captured",
        "  from corral with the query's ID and does nothing else, on the same event loop as",
        "  corral (uvloop).",
        f"- dnsperf and the server under test share the machine's {machine['logical CPUs (nproc)']} logical",
        "  CPUs; the two servers not under test are idle meanwhile (each `corral dev` also runs",
        "  its agent, which syncs every few seconds).",
        f"- Load average (1, 5, 15 minutes) before the run: {loads[0]}, and after it: {loads[1]}.",
        "  Other programs running on the machine at the same time lower every server's figures,",
        "  and make queries/s vary from run to run more than CPU per query does.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in machine.items()],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each dnsperf run [10]")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server, alternating servers [3]")
    parser.add_argument("--instances", type=int, default=10, help="instances of the service [10]")
    parser.add_argument("--clients", type=int, default=4, help="dnsperf clients (-c) [4]")
    parser.add_argument("--outstanding", type=int, default=100, help="dnsperf queries in flight (-q) [100]")
    parser.add_argument("--no-edns", action="store_true", help="send queries without EDNS0, so answers fit 512 bytes")
    parser.add_argument("--page", type=Path, default=PAGE, help="the page whose DNS section to write [docs/benchmarks.md]")
    parser.add_argument("--print-only", action="store_true", help="print the section without writing the page")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="virtual environment with corral [.venv]")
    parser.add_argument("--keep-data", action="store_true", help="keep the data folders and server logs")
    args = parser.parse_args()
    if min(args.seconds, args.rounds, args.instances, args.clients, args.outstanding) < 1:
        parser.error("--seconds, --rounds, --instances, --clients and --outstanding must be at least 1")
    if shutil.which("dnsperf") is None:
        parser.error("dnsperf is not installed; run bench/dns/setup.sh as root")
    # SIGTERM (from a timeout or a CI runner) unwinds like Ctrl-C, so that the servers are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    started = datetime.now(timezone.utc)
    load_before = load_average()
    workdir = Path(tempfile.mkdtemp(prefix="corral-dnsbench-"))
    servers: list[Server] = []
    try:
        for name, extra in (("corral", []), ("corral, cache off", ["--dns-cache-mb", "0"])):
            server, http_addr = start_corral(name.replace(", ", "-").replace(" ", "-"), workdir, args.venv, extra)
            server.name = name
            servers.append(server)
            register_instances(http_addr, args.instances)
        answer = capture_answer(servers[0].port, not args.no_edns, args.instances)
        capture_answer(servers[1].port, not args.no_edns, args.instances)
        servers.append(start_ceiling(workdir, args.venv, answer))

        query_file = workdir / "queries.txt"
        query_file.write_text(f"{SERVICE}.service.consul SRV\n")
        for round_number in range(1, args.rounds + 1):
            for server in servers:
                result = run_dnsperf(args, server, query_file)
                server.results.append(result)
                print(f"bench: round {round_number} {server.name}: {result['qps']:,.0f} queries/s, "
                      f"lost {result['lost']}", file=sys.stderr)
        loads = (load_before, load_average())
        text = section(args, servers, describe_machine(args.venv), started, len(answer), query_file, loads)
    finally:
        for server in servers:
            stop(server)
        if args.keep_data:
            print(f"bench: data folders and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    if not args.print_only:
        page = write_section("dns", text, args.page)
        print(f"bench: wrote the DNS section of {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
