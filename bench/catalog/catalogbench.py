"""Load corral's catalog with nodes and service instances, then time a health watch wake-up.

Started by bench/catalog/run. Starts `corral dev` on free ports of
127.0.0.1 with a fresh data folder, registers --nodes nodes with
--per-node service instances each through PUT /v1/catalog/register
(--services names, so each name has nodes * per-node / services instances),
records the server's RSS before and after, and then runs
bench/catalog/watch_health.py once in its own process: --watchers blocking
health queries on one service, woken by one check set to critical.
The server is stopped when the run ends, fails or is interrupted, and the
figures go to the "catalog" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import aiohttp
import psutil

BENCH_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH_DIR))
from kvbench import Server, command_output, describe_machine, free_port, raise_fd_limit  # noqa: E402
from pages import write_section  # noqa: E402

ROOT = BENCH_DIR.parent
WATCH_SCRIPT = Path(__file__).resolve().parent / "watch_health.py"
WATCH_TIMEOUT = 600.0
REGISTER_TIMEOUT = 600.0
WAKE_TARGET_SECONDS = 1.0
MIB = 1024 * 1024


@dataclass
class LoadResult:
    registrations: int
    errors: int
    first_errors: list[str]
    seconds: float
    server_cpu_seconds: float

    @property
    def per_second(self) -> float:
        return self.registrations / self.seconds


def node_name(node: int) -> str:
    return f"node-{node:05d}"


def node_address(node: int) -> str:
    return f"10.{node // 65536 % 256}.{node // 256 % 256}.{node % 256}"


def service_name(node: int, slot: int, services: int) -> str:
    return f"svc-{(node * 10 + slot) % services:04d}"


def registration(node: int, slot: int, services: int) -> dict:
    name = service_name(node, slot, services)
    return {
        "Node": node_name(node),
        "Address": node_address(node),
        "Service": {
            "ID": f"{name}-{node_name(node)}",
            "Service": name,
            "Port": 20000 + slot,
            "Tags": ["bench", f"slot-{slot}"],
        },
    }


async def register_all(args: argparse.Namespace, base_url: str, server: psutil.Process) -> LoadResult:
    """Send every registration with --concurrency requests in flight at once."""
    bodies = (
        registration(node, slot, args.services)
        for node in range(args.nodes)
        for slot in range(args.per_node)
    )
    errors: list[str] = []
    done = 0
    url = f"{base_url}/v1/catalog/register"
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=60)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        for body in bodies:
            try:
                async with session.put(url, json=body) as response:
                    text = await response.text()
                    if response.status != 200 or text.strip() != "true":
                        errors.append(f"HTTP {response.status}: {text[:200]}")
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            done += 1
            if done % 10_000 == 0:
                print(f"catalog bench:   {done:,} registered", file=sys.stderr)

    cpu_before = sum(server.cpu_times()[:2])
    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # The workers share one generator, so each body is sent once.
        await asyncio.wait_for(
            asyncio.gather(*(worker(session) for _ in range(args.concurrency))), REGISTER_TIMEOUT
        )
    seconds = time.perf_counter() - start
    return LoadResult(done, len(errors), errors[:5], seconds, sum(server.cpu_times()[:2]) - cpu_before)


def run_watchers(args: argparse.Namespace, server: Server, venv_bin: Path, round_number: int) -> dict:
    # Each round watches a different service, the one in slot 0 of node `round_number`:
    # adding the same critical check to the same instance again would wake no watcher.
    service = service_name(round_number, 0, args.services)
    command = [
        str(venv_bin / "python"), str(WATCH_SCRIPT),
        "--addr", server.base_url.removeprefix("http://"),
        "--count", str(args.watchers),
        "--service", service,
        "--service-id", f"{service}-{node_name(round_number)}",
        "--node", node_name(round_number),
        "--address", node_address(round_number),
        "--server-pid", str(server.process.pid),
    ]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=WATCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"failed": f"watch_health.py timed out after {WATCH_TIMEOUT:.0f}s"}
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {"failed": f"watch_health.py exited with status {completed.returncode}: {last_line}"}
    result = json.loads(completed.stdout)
    result["service"] = service
    return result


def response_size(wake: dict) -> str:
    low, high = wake["response_bytes_min"], wake["response_bytes_max"]
    return f"{high:,} bytes" if low == high else f"{low:,} to {high:,} bytes"


def rss_mib(process: psutil.Process) -> float:
    return process.memory_info().rss / MIB


def render(args: argparse.Namespace, figures: dict, machine: dict[str, str], started: datetime.datetime,
           wall_seconds: float, versions: dict[str, str]) -> str:
    load: LoadResult = figures["load"]
    rounds: list[dict] = figures["wakes"]
    # The round with the median time to the last response. A failed round counts as the slowest.
    ranked = sorted(rounds, key=lambda result: result.get("last_s", math.inf) if "failed" not in result else math.inf)
    wake = ranked[len(ranked) // 2]
    instances = args.nodes * args.per_node
    command = " ".join(["bench/catalog/run", *map(shlex.quote, sys.argv[1:])])
    lines = [
        "# Catalog: registration and health watch wake-up",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC with `{command}`: one load, then {len(rounds)} rounds of "
        f"the wake-up test, {wall_seconds:.0f} s in all. The table shows the round with the median time "
        "to the last answer.",
        "",
        f"`corral dev` with a fresh data folder on 127.0.0.1. The client registers {args.nodes:,} nodes "
        f"and {instances:,} service instances ({args.per_node} per node, {args.services:,} service names, "
        f"so {instances // args.services:,} instances per name) with one PUT /v1/catalog/register per "
        f"instance, from one aiohttp client with {args.concurrency} requests in flight. RSS is the "
        "`corral dev` process's resident memory (psutil), which includes its agent.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| registrations | {load.registrations:,} ({load.errors:,} errors) |",
        f"| registration time | {load.seconds:.1f} s |",
        f"| registrations per second | {load.per_second:,.0f} |",
        f"| server CPU during registration | {load.server_cpu_seconds:.1f} s "
        f"({load.server_cpu_seconds / load.seconds:.2f} cores) |",
        f"| server RSS before registration | {figures['rss_before']:.1f} MiB |",
        f"| server RSS after registration | {figures['rss_after']:.1f} MiB |",
        f"| server RSS after the wake-up test | {figures['rss_end']:.1f} MiB |",
    ]
    if "failed" in wake:
        lines.append(f"| health watch wake-up | failed: {wake['failed']} |")
    else:
        lines += [
            f"| watchers on `{wake['service']}` ({wake['instances']} instances) | {wake['watchers']:,} |",
            f"| watchers answered with a new index | {wake['answered']:,} "
            f"({wake['not_answered']:,} not answered, {wake['errors']:,} errors) |",
            f"| time to open every watcher | {wake['setup_s']:.1f} s |",
            f"| check write acknowledged | {wake['write_s'] * 1000:.1f} ms |",
            f"| first / median / p99 / last answer, of the {wake['answered']:,} answered | "
            f"{wake.get('first_s', 0):.3f} / {wake.get('p50_s', 0):.3f} / "
            f"{wake.get('p99_s', 0):.3f} / **{wake.get('last_s', 0):.3f} s** |",
            f"| server / client CPU from the write to the last answer | {wake['server_cpu_s']:.2f} s / "
            f"{wake['client_cpu_s']:.2f} s |",
        ]
        if "response_bytes_max" in wake:
            lines += [
                f"| size of one response, status line and headers included | {response_size(wake)} |",
                f"| bytes corral sent to the watchers after the write | {wake['received_bytes']:,} "
                f"({wake['received_bytes'] / MIB:,.1f} MiB) |",
            ]
    met_rounds = [
        result for result in rounds
        if "failed" not in result and result["not_answered"] == 0 and result.get("last_s", math.inf) < WAKE_TARGET_SECONDS
    ]
    met = len(met_rounds) == len(rounds)
    lasts = ", ".join(
        "failed" if "failed" in result else f"{result.get('last_s', 0):.3f} s" for result in rounds
    )
    last = f"{len(met_rounds)} of {len(rounds)} rounds met it; last answer in each round: {lasts}"
    lines += [
        "",
        "How the wake-up is measured: bench/catalog/watch_health.py, a separate process on uvloop, opens "
        f"{args.watchers:,} `GET /v1/health/service/NAME?index=N&wait=60s` requests, each on its own "
        "HTTP/1.1 keep-alive connection, and waits until corral holds one connection per watcher and is "
        "idle. Its watchers are a small asyncio protocol (bench/catalog/lean_client.py). It reads every "
        "connection into one receive buffer that all of them share, parses the status line and headers, "
        "and counts the body's Content-Length bytes without decoding the JSON. A watcher counts as "
        "answered when the status is 200 and X-Consul-Index is past N. Any other status, a chunked or "
        "compressed body, a missing Content-Length, extra bytes or a connection closed early counts as "
        "an error. The script then sends, with aiohttp, one PUT /v1/catalog/register that adds a check "
        "with Status critical to one instance of that service. "
        "The clock starts just before that PUT and stops when the client has read the last byte of the "
        "last response, so the client's own work of reading every response on one event loop is "
        "part of the figure; the CPU times above show which side limits it. The client waits at most "
        "60 s after the PUT (WAKE_TIMEOUT in bench/watchers.py) and counts watchers without a response "
        "by then as not answered, so the answer times cover only the watchers answered in that window.",
        "",
        "Target:",
        "",
        f"- all {args.watchers:,} watchers answered within {WAKE_TARGET_SECONDS:.0f} s of the change, "
        f"in every round: **{'met' if met else 'not met'}** ({last}).",
        "",
        "Machine and versions:",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in {**machine, **versions}.items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    venv_bin = Path(args.venv) / "bin"
    fd_limit = raise_fd_limit()
    if fd_limit < args.watchers + 256:
        print(f"catalog bench: open file limit {fd_limit} is too low for {args.watchers} watchers; "
              "raise the hard limit (ulimit -Hn) or pass a smaller --watchers", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc)
    wall_start = time.monotonic()
    git = command_output(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    versions = {
        "corral": f"{command_output([str(venv_bin / 'corral'), 'version'])} (git {git})",
        "aiohttp": metadata.version("aiohttp"),
        "uvloop": metadata.version("uvloop"),
    }
    workdir = Path(tempfile.mkdtemp(prefix="corral-catalog-bench-"))
    http_port, dns_port = free_port(), free_port()
    server = Server(
        name="corral",
        command=[
            str(venv_bin / "corral"), "dev",
            "--data-dir", str(workdir / "corral"),
            "--http-addr", f"127.0.0.1:{http_port}",
            "--dns-addr", f"127.0.0.1:{dns_port}",
            "--log-level", "warning",
        ],
        base_url=f"http://127.0.0.1:{http_port}",
        ready_path="/v1/status/leader",
        log_path=workdir / "corral.log",
    )
    figures: dict = {}
    finished = False
    try:
        server.start()
        server.wait_ready()
        process = psutil.Process(server.process.pid)
        # Let the agent settle before the baseline is read.
        time.sleep(2)
        figures["rss_before"] = rss_mib(process)
        print(f"catalog bench: registering {args.nodes * args.per_node:,} instances on {args.nodes:,} nodes",
              file=sys.stderr)
        figures["load"] = asyncio.run(register_all(args, server.base_url, process))
        load = figures["load"]
        print(f"catalog bench:   {load.per_second:,.0f} registrations/s, {load.errors} errors "
              f"{load.first_errors}", file=sys.stderr)
        figures["rss_after"] = rss_mib(process)
        figures["wakes"] = []
        for round_number in range(args.rounds):
            print(f"catalog bench: round {round_number + 1} of {args.rounds}: wake-up of {args.watchers:,} "
                  "health watchers", file=sys.stderr)
            result = run_watchers(args, server, venv_bin, round_number)
            figures["wakes"].append(result)
            print(f"catalog bench:   {json.dumps(result)}", file=sys.stderr)
        figures["rss_end"] = rss_mib(process)
        finished = True
    finally:
        server.stop()
        if not finished:
            print(f"catalog bench: run failed; data folder and server log kept in {workdir}", file=sys.stderr)
    machine = describe_machine(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    page = render(args, figures, machine, started, time.monotonic() - wall_start, versions)
    output = write_section("catalog", page, Path(args.output))
    print(f"catalog bench: wrote the catalog section of {output}", file=sys.stderr)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000, help="nodes to register [10000]")
    parser.add_argument("--per-node", type=int, default=10, help="service instances per node [10]")
    parser.add_argument("--services", type=int, default=1_000, help="distinct service names [1000]")
    parser.add_argument("--concurrency", type=int, default=64, help="registrations in flight at once [64]")
    parser.add_argument("--watchers", type=int, default=10_000, help="blocking health queries [10000]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the wake-up test [3]")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"),
                        help="the Markdown page whose catalog section to write [docs/benchmarks.md]")
    parser.add_argument("--venv", default=str(ROOT / ".venv"), help="virtual environment with corral [.venv]")
    args = parser.parse_args()
    if not 1 <= args.rounds <= min(args.nodes, args.services // 10):
        parser.error("--rounds must be at least 1, and at most the nodes and a tenth of the services")
    if args.per_node > 10 or args.services % 10:
        # service_name() spreads slot s of node n over (n * 10 + s) % services.
        parser.error("--per-node must be at most 10 and --services a multiple of 10")
    # SIGTERM unwinds like Ctrl-C, so that the server is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(run(args))


if __name__ == "__main__":
    main()
