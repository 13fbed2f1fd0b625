"""Run corral's and etcd's key/value HTTP APIs side by side and write docs/benchmarks.md.

Started by bench/run. Both servers listen on free ports of 127.0.0.1 with
fresh data folders under one temporary folder, get the same load from the
same wrk command in turn, and are stopped when the run ends, fails or is
interrupted. See docs/benchmarks.md for what each test measures.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO

import psutil
from pages import write_section

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
LUA_SCRIPT = BENCH_DIR / "request.lua"
WATCHERS_SCRIPT = BENCH_DIR / "watchers.py"
OUTPUT = ROOT / "docs" / "benchmarks.md"

VALUE = "small-value"
GET_KEY = "bench/get"
ONE_KEY = "bench/one"
PUT_PREFIX = "bench/put/"
PUT_KEY_COUNT = 10_000
WATCH_KEY = "bench/watch"

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
# wrk's own time limit for one request; slower ones count as timeouts.
WRK_TIMEOUT = "5s"
WATCHERS_TIMEOUT = 600.0
WAKE_TARGET_SECONDS = 1.0


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass
class Server:
    """One server under test: its command, its process and where its log goes."""

    name: str
    command: list[str]
    base_url: str
    ready_path: str
    log_path: Path
    process: subprocess.Popen | None = None
    log_file: IO[bytes] | None = None

    def start(self) -> None:
        self.log_file = open(self.log_path, "wb")
        # A new session, so that a Ctrl-C at the terminal reaches only bench/run,
        # which then stops the servers in order.
        self.process = subprocess.Popen(
            self.command, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        url = self.base_url + self.ready_path
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.process.returncode} before it was ready; "
                    f"its log {self.log_path} ends with:\n{tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not respond with 200 to {url} within {READY_TIMEOUT:.0f}s; "
                    f"see its log {self.log_path}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server with SIGTERM, then SIGKILL after STOP_TIMEOUT; safe to call twice."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"bench: {self.name} did not stop within {STOP_TIMEOUT:.0f}s; killing it", file=sys.stderr)
                self.process.kill()
                self.process.wait()
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system


@dataclass
class Load:
    """The URL and request.lua arguments that wrk uses for one server in one test."""

    url: str
    script_args: list[str]


@dataclass
class Test:
    name: str
    description: str
    corral: Load
    etcd: Load


@dataclass
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    cpu_cores: float
    wrk_cpu_cores: float
    raw: dict = field(repr=False)


SERVERS = ("corral", "etcd")

# Every measured wrk run, by (test name, server name), in round order.
Results = dict[tuple[str, str], list[WrkResult]]
# Every wake-up run's output from bench/watchers.py, by server name, in round order.
WakeResults = dict[str, list[dict]]


@dataclass
class RunContext:
    """Facts about one run that the page reports beside the figures."""

    started: datetime.datetime
    wall_seconds: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    # Average cores used by programs other than this benchmark, and stolen by the hypervisor.
    other_cores: float
    steal_cores: float
    machine: dict[str, str]
    versions: dict[str, str]


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


class CPUAccount:
    """The machine's CPU time over a run, to show how much of it other programs used.

    Busy time comes from /proc/stat (user, nice, system, irq and softirq, in
    clock ticks). This benchmark's own share is the servers' CPU time plus
    this process's and its finished children's (wrk and bench/watchers.py).
    """

    def __init__(self) -> None:
        self.busy, self.steal = self._read_proc_stat()
        self.own = self._own_seconds()

    @staticmethod
    def _read_proc_stat() -> tuple[float, float]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(value) for value in fields]
        user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
        tick = os.sysconf("SC_CLK_TCK")
        return (user + nice + system + irq + softirq) / tick, steal / tick

    @staticmethod
    def _own_seconds() -> float:
        total = 0.0
        for target in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(target)
            total += usage.ru_utime + usage.ru_stime
        return total

    def other_and_steal(self, servers_seconds: float, wall_seconds: float) -> tuple[float, float]:
        """Return the average cores used by other programs and stolen, since this object was made."""
        busy, steal = self._read_proc_stat()
        own = self._own_seconds() - self.own + servers_seconds
        other = max(0.0, busy - self.busy - own)
        return other / wall_seconds, (steal - self.steal) / wall_seconds


def free_port() -> int:
    """Return a port that is free for TCP and UDP on 127.0.0.1 (corral's DNS uses both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


def raise_fd_limit() -> int:
    """Raise the soft open file limit to the hard limit, for this process and the servers it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def build_servers(workdir: Path, venv_bin: Path) -> tuple[Server, Server]:
    corral_port, dns_port, etcd_port, peer_port = (free_port() for _ in range(4))
    corral = Server(
        name="corral",
        command=[
            str(venv_bin / "corral"), "dev",
            "--data-dir", str(workdir / "corral"),
            "--http-addr", f"127.0.0.1:{corral_port}",
            "--dns-addr", f"127.0.0.1:{dns_port}",
            "--node", "bench",
        ],
        base_url=f"http://127.0.0.1:{corral_port}",
        ready_path="/v1/status/leader",
        log_path=workdir / "corral.log",
    )
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    etcd = Server(
        name="etcd",
        # etcd's defaults otherwise, so its WAL is fsynced before a write is acknowledged.
        command=[
            "etcd",
            "--name", "bench",
            "--data-dir", str(workdir / "etcd"),
            "--listen-client-urls", etcd_url,
            "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"bench={peer_url}",
        ],
        base_url=etcd_url,
        ready_path="/health",
        log_path=workdir / "etcd.log",
    )
    return corral, etcd


def build_tests(corral: Server, etcd: Server) -> list[Test]:
    etcd_range = json.dumps({"key": b64(GET_KEY)})
    etcd_serializable = json.dumps({"key": b64(GET_KEY), "serializable": True})
    return [
        Test(
            "PUT, 10,000 keys",
            f"a PUT of an {len(VALUE)}-byte value that differs on every request, each connection "
            f"writing keys `{PUT_PREFIX}000000` to `{PUT_PREFIX}{PUT_KEY_COUNT - 1:06d}` in turn",
            Load(f"{corral.base_url}/v1/kv/", ["keys", "corral", PUT_PREFIX, str(PUT_KEY_COUNT), VALUE]),
            Load(f"{etcd.base_url}/v3/kv/put", ["keys", "etcd", PUT_PREFIX, str(PUT_KEY_COUNT), VALUE]),
        ),
        Test(
            "PUT, one key",
            f"a PUT of an {len(VALUE)}-byte value that differs on every request, to the one key "
            f"`{ONE_KEY}` from every connection",
            Load(f"{corral.base_url}/v1/kv/", ["keys", "corral", ONE_KEY, "0", VALUE]),
            Load(f"{etcd.base_url}/v3/kv/put", ["keys", "etcd", ONE_KEY, "0", VALUE]),
        ),
        Test(
            "GET, default / linearizable",
            f"a read of `{GET_KEY}`: corral's default mode against etcd's linearizable range",
            Load(f"{corral.base_url}/v1/kv/{GET_KEY}", ["fixed", "GET"]),
            Load(f"{etcd.base_url}/v3/kv/range", ["fixed", "POST", etcd_range]),
        ),
        Test(
            "GET, ?stale / serializable",
            f"a read of `{GET_KEY}`: corral's `?stale` against etcd's serializable range",
            Load(f"{corral.base_url}/v1/kv/{GET_KEY}?stale", ["fixed", "GET"]),
            Load(f"{etcd.base_url}/v3/kv/range", ["fixed", "POST", etcd_serializable]),
        ),
    ]


def seed(corral: Server, etcd: Server) -> None:
    """Write the key that the GET tests read, to both servers."""
    requests = [
        urllib.request.Request(f"{corral.base_url}/v1/kv/{GET_KEY}", data=VALUE.encode(), method="PUT"),
        urllib.request.Request(
            f"{etcd.base_url}/v3/kv/put",
            data=json.dumps({"key": b64(GET_KEY), "value": b64(VALUE)}).encode(),
            method="POST",
        ),
    ]
    for request in requests:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


def run_wrk(args: argparse.Namespace, load: Load, seconds: int, server: Server) -> WrkResult:
    command = [
        "wrk",
        "-t", str(args.threads),
        "-c", str(args.connections),
        "-d", f"{seconds}s",
        "--timeout", WRK_TIMEOUT,
        "-s", str(LUA_SCRIPT),
        load.url,
        "--",
        *load.script_args,
    ]

    cpu_before = server.cpu_seconds()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    elapsed = time.monotonic() - started
    cpu_used = server.cpu_seconds() - cpu_before
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )

    summary = None
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            summary = json.loads(line.removeprefix("BENCH_JSON "))
    if completed.returncode != 0 or summary is None:
        raise RuntimeError(
            f"wrk failed for {load.url} with status {completed.returncode}:\n"
            f"{completed.stdout}\n{completed.stderr}"
        )

    errors = {name.removeprefix("errors_"): value for name, value in summary.items() if name.startswith("errors_")}
    return WrkResult(
        requests_per_second=summary["requests"] / (summary["duration_us"] / 1e6),
        p50_ms=summary["latency_p50_us"] / 1000,
        p99_ms=summary["latency_p99_us"] / 1000,
        errors={name: value for name, value in errors.items() if value},
        cpu_cores=cpu_used / elapsed,
        wrk_cpu_cores=wrk_cpu / elapsed,
        raw=summary,
    )


def run_watchers(args: argparse.Namespace, server: Server, venv_bin: Path) -> dict:
    command = [
        str(venv_bin / "python"), str(WATCHERS_SCRIPT), server.name,
        "--addr", server.base_url.removeprefix("http://"),
        "--count", str(args.watchers),
        "--key", WATCH_KEY,
        "--server-pid", str(server.process.pid),
    ]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=WATCHERS_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"failed": f"bench/watchers.py timed out after {WATCHERS_TIMEOUT:.0f}s"}
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {"failed": f"bench/watchers.py exited with status {completed.returncode}: {last_line}"}
    return json.loads(completed.stdout)


def command_output(command: list[str]) -> str:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(failed: {exc})"
    return (completed.stdout + completed.stderr).strip()


def describe_machine(workdir: Path) -> dict[str, str]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    filesystem = command_output(["df", "--output=source,fstype", str(workdir)]).splitlines()[-1]
    return {
        "logical CPUs (nproc)": str(os.cpu_count()),
        "CPU model": cpu_model,
        "memory": f"{memory_kib / 1024 / 1024:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "data folders on": " ".join(filesystem.split()),
    }


def describe_versions(venv_bin: Path) -> dict[str, str]:
    etcd_lines = command_output(["etcd", "--version"]).splitlines()
    git = command_output(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    sqlite_version = command_output(
        [str(venv_bin / "python"), "-c", "import sqlite3; print(sqlite3.sqlite_version)"]
    )
    return {
        "corral": f"{command_output([str(venv_bin / 'corral'), 'version'])} (git {git})",
        "etcd": ", ".join(line.strip() for line in etcd_lines if line.startswith(("etcd Version", "Go Version"))),
        "wrk": command_output(["wrk", "-v"]).splitlines()[0].split(" Copyright")[0],
        "Python": platform.python_version(),
        "aiohttp": metadata.version("aiohttp"),
        "uvloop": metadata.version("uvloop"),
        "SQLite": sqlite_version or sqlite3.sqlite_version,
    }


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def median_run(runs: list[WrkResult]) -> WrkResult:
    """Return the run with the median requests per second (the lower one of two middle runs)."""
    ordered = sorted(runs, key=lambda run: run.requests_per_second)
    return ordered[(len(ordered) - 1) // 2]


def format_rate(runs: list[WrkResult]) -> str:
    median = median_run(runs)
    text = f"{median.requests_per_second:,.0f}"
    if len(runs) > 1:
        low = min(run.requests_per_second for run in runs)
        high = max(run.requests_per_second for run in runs)
        text += f" ({low:,.0f}-{high:,.0f})"
    errors: dict[str, int] = {}
    for run in runs:
        for name, count in run.errors.items():
            errors[name] = errors.get(name, 0) + count
    if errors:
        text += " errors: " + ", ".join(f"{name} {count}" for name, count in errors.items())
    return text


def format_latency(result: WrkResult) -> str:
    return f"{result.p50_ms:.2f} / {result.p99_ms:.2f}"


def format_ratio(corral: WrkResult, etcd: WrkResult) -> str:
    if etcd.requests_per_second == 0:
        return "-"
    return f"{corral.requests_per_second / etcd.requests_per_second:.2f}x"


def median_wake(runs: list[dict]) -> dict:
    """Return the wake-up run with the median time to the last response; a failed run counts as slowest."""
    ordered = sorted(runs, key=lambda run: run.get("last_s", float("inf")) if "failed" not in run else float("inf"))
    return ordered[(len(ordered) - 1) // 2]


def wake_row(name: str, result: dict) -> str:
    if "failed" in result:
        return f"| {name} | failed: {result['failed']} |" + " |" * 8
    answered = f"{result['answered']:,} of {result['watchers']:,}"
    if result["errors"]:
        answered += f" ({result['errors']} errors: {'; '.join(result['first_errors'])})"
    cells = [name, answered, f"{result['setup_s']:.1f}"]
    for field_name in ("write_s", "first_s", "p50_s", "p99_s", "last_s", "server_cpu_s", "client_cpu_s"):
        cells.append(f"{result[field_name] * 1000:.0f}" if field_name in result else "-")
    return "| " + " | ".join(cells) + " |"


def format_last_times(runs: list[dict]) -> str:
    times = []
    for run in runs:
        if "failed" in run:
            times.append("failed")
        elif run["answered"] < run["watchers"]:
            times.append(f"{run['answered']:,} of {run['watchers']:,} responses")
        else:
            times.append(f"{run['last_s'] * 1000:,.0f} ms")
    return ", ".join(times)


def wake_target_met(run: dict) -> bool:
    if "failed" in run or "last_s" not in run:
        return False
    return run["answered"] == run["watchers"] and run["last_s"] <= WAKE_TARGET_SECONDS


def target_lines(tests: list[Test], results: Results, wake: WakeResults) -> list[str]:
    lines = []
    for test in tests:
        corral = median_run(results[test.name, "corral"])
        etcd = median_run(results[test.name, "etcd"])
        verdict = "met" if corral.requests_per_second >= etcd.requests_per_second else "not met"
        lines.append(
            f"- {test.name}: at least 1.0x etcd's requests per second: **{verdict}** "
            f"({format_ratio(corral, etcd)}, medians)."
        )
    corral_runs = wake["corral"]
    if corral_runs:
        watchers = corral_runs[0].get("watchers", 0)
        met = sum(wake_target_met(run) for run in corral_runs)
        verdict = "met" if met == len(corral_runs) else "not met"
        lines.append(
            f"- Wake-up: all {watchers:,} corral watchers respond within {WAKE_TARGET_SECONDS:g} s of the "
            f"write, in every round: **{verdict}**, as {met} of {len(corral_runs)} rounds met it "
            f"(last response: {format_last_times(corral_runs)})."
        )
    return lines


def render(
    args: argparse.Namespace,
    tests: list[Test],
    results: Results,
    wake: WakeResults,
    context: RunContext,
) -> str:
    """Return the whole Markdown page."""
    command = shlex.join([os.environ.get("BENCH_ENTRY", "bench/run"), *sys.argv[1:]])
    out = [
        "# Key/value benchmark: corral and etcd",
        "",
        "corral's Consul-style KV API and etcd's v3 JSON gateway, run side by side on one",
        "machine in one run, under the same HTTP load generator. `bench/run` writes this section,",
        "so run it again to refresh the figures rather than editing them.",
        "",
        f"Produced by `{command}` on {context.started:%Y-%m-%d %H:%M} UTC. The whole run took "
        f"{context.wall_seconds / 60:.1f} minutes.",
        "",
    ]
    out += render_rates(args, tests, results)
    out += render_wake(args, wake)
    out += ["## Targets", ""]
    out += target_lines(tests, results, wake)
    out.append("")
    out += render_conditions(results, context)
    out += ["## Machine and versions", "", "| | |", "|---|---|"]
    out += [f"| {name} | {value} |" for name, value in context.machine.items()]
    out += [f"| {name} | {value} |" for name, value in context.versions.items()]
    out.append("")
    return "\n".join(out)


def render_rates(args: argparse.Namespace, tests: list[Test], results: Results) -> list[str]:
    out = [
        "## Requests per second",
        "",
        f"wrk with {plural(args.threads, 'thread')} and {args.connections} keep-alive connections. "
        f"Each run lasts {plural(args.duration, 'second')} after a warm-up of "
        f"{plural(args.warmup, 'second')} with the same load, and every test ran "
        f"{plural(args.rounds, 'time')} against each server. "
        "A cell shows the median run, with the lowest and highest requests per second of all runs "
        "in brackets; its latency and CPU come from that median run. Latency is wrk's p50 / p99 in "
        "milliseconds. CPU is the server process's user and system time divided by the run's wall "
        "time, in cores.",
        "",
        "| test | corral req/s | etcd req/s | corral / etcd | corral p50 / p99 ms "
        "| etcd p50 / p99 ms | corral CPU | etcd CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for test in tests:
        corral_runs = results[test.name, "corral"]
        etcd_runs = results[test.name, "etcd"]
        corral = median_run(corral_runs)
        etcd = median_run(etcd_runs)
        out.append(
            f"| {test.name} | {format_rate(corral_runs)} | {format_rate(etcd_runs)} "
            f"| {format_ratio(corral, etcd)} "
            f"| {format_latency(corral)} | {format_latency(etcd)} "
            f"| {corral.cpu_cores:.2f} | {etcd.cpu_cores:.2f} |"
        )
    out += ["", "What each test sends:", ""]
    out += [f"- {test.name}: {test.description}." for test in tests]
    out.append("")
    return out


def render_wake(args: argparse.Namespace, wake: WakeResults) -> list[str]:
    if not args.watchers:
        return ["## Wake-up of blocked readers", "", "Not run (`--watchers 0`).", ""]
    rounds = len(wake["corral"])
    return [
        "## Wake-up of blocked readers",
        "",
        f"{args.watchers:,} watchers of one key, each on its own connection, held by one aiohttp client "
        "process (bench/watchers.py, on uvloop), then one write of the key. Times are in milliseconds "
        "from just before the write is sent. A watcher's time is taken when the client has read its "
        "response, so the client's own work of reading every response on one event loop is included. "
        "Setup is the time to open every watcher, in seconds. The server's and the client's CPU "
        "time are measured from the write until the last response (or the 60-second limit). "
        f"Each server ran {plural(rounds, 'round')}, and a row shows the round "
        "with the median time to the last response.",
        "",
        "| server | responses | setup s | write acknowledged | first | median | p99 | last "
        "| server CPU | client CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        wake_row("corral: `GET /v1/kv/KEY?index=N&wait=60s`", median_wake(wake["corral"])),
        wake_row("etcd: `POST /v3/watch` stream", median_wake(wake["etcd"])),
        "",
        f"Last response in each round: corral {format_last_times(wake['corral'])}; "
        f"etcd {format_last_times(wake['etcd'])}.",
        "",
        "corral sends nothing until a blocking GET returns, so the client writes only once corral",
        "has one established connection per watcher and its process has been idle for half a",
        "second. Each etcd watch stream first sends a `created` message, and the client writes",
        "once every stream has sent one. etcd's figure includes its JSON gateway, which turns",
        "every watch event into a chunk of a long-running HTTP response.",
        "",
    ]


def render_conditions(results: Results, context: RunContext) -> list[str]:
    busiest_wrk = max(run.wrk_cpu_cores for runs in results.values() for run in runs)
    load_before = " ".join(f"{value:.2f}" for value in context.load_before)
    load_after = " ".join(f"{value:.2f}" for value in context.load_after)
    return [
        "## Conditions",
        "",
        "- Both servers run on this machine at the same time, on free ports of 127.0.0.1, with",
        "  fresh data folders in one temporary folder on the same file system. Each test runs",
        "  against corral, then against etcd, while the other server is idle. Each round runs",
        "  every test once, so the servers' data grows over the rounds in the same way.",
        "- Both fsync before they acknowledge a write. corral's SQLite store runs in WAL mode",
        "  with `synchronous=FULL` and commits the writes waiting in its queue together (group",
        "  commit). etcd, a single-member cluster with default flags, fsyncs its WAL by default.",
        "- etcd is written in Go, which runs its goroutines on every core (GOMAXPROCS defaults to",
        "  the number of CPUs). `corral dev` serves HTTP on one Python event loop (uvloop) with one",
        "  SQLite writer thread, and it also runs its scheduler, agent and DNS server in that process.",
        "  Its Python code runs under one interpreter lock, so about 1.0 core is all it can use.",
        "- corral serves the PUTs and GETs of these tests on its lean HTTP path for plain",
        "  reads and writes of one key (src/corral/api/fastkv.py). The wake-up's blocking GETs",
        "  carry `?index`, so aiohttp serves them, as it serves every other request.",
        "- wrk, the watcher client and both servers share the machine's "
        f"{context.machine['logical CPUs (nproc)']} logical CPUs. wrk used at most "
        f"{busiest_wrk:.2f} cores in any measured run.",
        "- etcd is measured through its JSON gateway (grpc-gateway), which turns each HTTP request",
        "  into a gRPC call over a loopback connection to etcd itself. etcd's own gRPC clients skip",
        "  that step, and this page does not measure them.",
        "- corral is one server without raft, and it serves both its default and its `?stale`",
        "  reads from its in-memory copy of the store. etcd's linearizable range first confirms",
        "  through raft that its member is still the leader (ReadIndex), even in a one-member cluster.",
        f"- Other programs used {context.other_cores:.2f} cores on average during the run, and the",
        f"  hypervisor took {context.steal_cores:.2f} cores as steal time (from /proc/stat, less the",
        "  servers', wrk's and the watcher client's CPU time). Load average (1, 5, 15 minutes)",
        f"  before the run: {load_before}, and after it: {load_after}. Other programs running on",
        "  the machine at the same time lower both servers' figures.",
        "",
    ]


def run(args: argparse.Namespace) -> int:
    venv_bin = Path(args.venv) / "bin"
    for tool in ("wrk", "etcd"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found on PATH; run bench/setup.sh first", file=sys.stderr)
            return 2
    if args.rounds < 1 or args.duration < 1 or args.warmup < 1:
        print("bench: --rounds, --duration and --warmup must each be 1 or more", file=sys.stderr)
        return 2
    fd_limit = raise_fd_limit()
    if fd_limit < args.watchers + 256:
        print(
            f"bench: open file limit {fd_limit} is too low for {args.watchers} watchers; "
            "raise the hard limit (ulimit -Hn) or pass a smaller --watchers",
            file=sys.stderr,
        )
        return 2

    started = datetime.datetime.now(datetime.timezone.utc)
    wall_start = time.monotonic()
    load_before = os.getloadavg()
    cpu_account = CPUAccount()
    # Taken before the servers start, so the git state is that of the code under test.
    versions = describe_versions(venv_bin)
    workdir = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    corral, etcd = build_servers(workdir, venv_bin)
    tests = build_tests(corral, etcd)
    results: Results = {(test.name, server): [] for test in tests for server in SERVERS}
    wake: WakeResults = {server: [] for server in SERVERS}
    finished = False
    try:
        for server in (corral, etcd):
            server.start()
        for server in (corral, etcd):
            server.wait_ready()
        seed(corral, etcd)
        # Rounds are the outer loop, so that a burst of other work on the machine
        # lands in one round of every test rather than in every round of one test.
        for round_number in range(1, args.rounds + 1):
            for test in tests:
                for server, load in ((corral, test.corral), (etcd, test.etcd)):
                    print(f"bench: round {round_number}: {test.name}: {server.name}", file=sys.stderr)
                    run_wrk(args, load, args.warmup, server)
                    result = run_wrk(args, load, args.duration, server)
                    print(
                        f"bench:   {result.requests_per_second:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
                        f"p99 {result.p99_ms:.2f} ms, errors {result.errors or 'none'}",
                        file=sys.stderr,
                    )
                    results[test.name, server.name].append(result)
        wake_rounds = args.rounds if args.watchers else 0
        for round_number in range(1, wake_rounds + 1):
            for server in (corral, etcd):
                print(
                    f"bench: round {round_number}: wake-up of {args.watchers} watchers: {server.name}",
                    file=sys.stderr,
                )
                outcome = run_watchers(args, server, venv_bin)
                print(f"bench:   {json.dumps(outcome)}", file=sys.stderr)
                wake[server.name].append(outcome)
        # Read before the servers stop, while their CPU time can still be read.
        servers_seconds = corral.cpu_seconds() + etcd.cpu_seconds()
        other_cores, steal_cores = cpu_account.other_and_steal(servers_seconds, time.monotonic() - wall_start)
        finished = True
    finally:
        for server in (corral, etcd):
            server.stop()
        if not finished:
            print(f"bench: run failed; data folders and server logs kept in {workdir}", file=sys.stderr)

    machine = describe_machine(workdir)
    if args.keep_data:
        print(f"bench: data folders and server logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    context = RunContext(
        started=started,
        wall_seconds=time.monotonic() - wall_start,
        load_before=load_before,
        load_after=os.getloadavg(),
        other_cores=other_cores,
        steal_cores=steal_cores,
        machine=machine,
        versions=versions,
    )
    page = render(args, tests, results, wake, context)
    output = write_section("kv", page, Path(args.output))
    print(f"bench: wrote the key/value section of {output}", file=sys.stderr)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # wrk takes whole seconds only.
    parser.add_argument("--duration", type=int, default=10, help="whole seconds of each measured wrk run [10]")
    parser.add_argument("--warmup", type=int, default=2, help="whole seconds of the warm-up before each run [2]")
    parser.add_argument("--connections", type=int, default=64, help="wrk keep-alive connections [64]")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads [1]")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measured runs of every test and of the wake-up; the page shows the median [3]")
    parser.add_argument("--watchers", type=int, default=10_000,
                        help="blocking readers in the wake-up test; 0 skips it [10000]")
    parser.add_argument("--output", default=str(OUTPUT), help="the Markdown page whose key/value section to write [docs/benchmarks.md]")
    parser.add_argument("--venv", default=str(ROOT / ".venv"), help="virtual environment with corral [.venv]")
    parser.add_argument("--keep-data", action="store_true", help="keep the data folders and server logs")
    args = parser.parse_args()
    # SIGTERM (from a timeout or a CI runner) unwinds like Ctrl-C, so that the servers are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(run(args))


if __name__ == "__main__":
    main()
