"""Launch 200 `sleep` tasks on one agent, time them until RUNNING and until stopped, and write the page.

Started by bench/tasks/run. Each round starts a fresh `corral server` and
one `corral agent` (own data folders under one temporary folder, free
ports on 127.0.0.1, the agent's --resources sized so that every instance
fits), submits a service job of --count instances of `sleep 600` with
PUT /v1/jobs, and follows GET /v1/tasks?job=NAME with blocking queries
until every task is RUNNING. It then stops the job with DELETE
/v1/jobs/NAME and polls the task processes and their executors until
none is left. A round gives up after --timeout seconds. The figures of
all rounds go to the "tasks" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BENCH_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH_DIR))
from kvbench import CPUAccount, Server, command_output, describe_machine, free_port, tail  # noqa: E402
from pages import write_section  # noqa: E402

ROOT = BENCH_DIR.parent
JOB_NAME = "bench-sleep"
NODE = "bench-agent"
TARGET_SECONDS = 10.0
# How long one blocking read of /v1/tasks waits on the server for a change.
BLOCKING_WAIT = "5s"
# How often the stop phase checks whether the task processes are gone.
PROCESS_POLL_INTERVAL = 0.05
# Each instance requests this little, so that the agent's --resources below fit all of them.
TASK_CPUS = 0.01
TASK_MEMORY_MB = 16


class RoundFailed(Exception):
    """A round that did not reach its end within the time limit, or whose cluster broke."""


@dataclass
class Round:
    """The figures of one round; times are seconds from the PUT of the job."""

    count: int
    submit_seconds: float = 0.0
    # When the poll first saw each task in each state, by task id.
    first_seen: dict[str, dict[str, float]] = field(default_factory=dict)
    all_running: float | None = None
    stop_all_processes_gone: float | None = None
    stop_all_terminal: float | None = None
    leftover_pids: list[int] = field(default_factory=list)
    server_cpu: float = 0.0
    agent_cpu: float = 0.0
    # The agent's fork server (corral.agent.launcher) with the launcher children it reaped, plus
    # any `python -m corral.agent.executor` launcher that the agent started and waited for itself.
    launcher_cpu: float = 0.0
    # CPU of the executors that stay beside each task, read just before the stop.
    executor_cpu: float = 0.0
    executor_rss_mib: float = 0.0
    other_cores: float = 0.0
    steal_cores: float = 0.0
    wall_seconds: float = 0.0
    failure: str = ""
    states_at_failure: dict[str, int] = field(default_factory=dict)

    def running_times(self) -> list[float]:
        return sorted(seen["RUNNING"] for seen in self.first_seen.values() if "RUNNING" in seen)

    def state_times(self, state: str) -> list[float]:
        return sorted(seen[state] for seen in self.first_seen.values() if state in seen)


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of sorted `values`."""
    rank = max(1, round(fraction * len(values) + 0.5 - 1e-9))
    return values[min(rank, len(values)) - 1]


# HTTP


def http_json(base_url: str, method: str, path: str, body: dict | None = None,
              timeout: float = 30.0) -> tuple[object, int]:
    """Send one request; return the decoded JSON body and X-Consul-Index (0 when absent)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            index = response.headers.get("X-Consul-Index", "0")
            return json.load(response), int(index) if index.isdigit() else 0
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace").strip()
        raise RoundFailed(f"{method} {path} failed with HTTP {exc.code}: {text}") from None


def job_spec(count: int) -> dict:
    return {
        "name": JOB_NAME,
        "type": "service",
        "count": count,
        "task": {
            "command": "sleep",
            "args": ["600"],
            "kill_timeout": "5s",
            "resources": {"cpus": TASK_CPUS, "memory": TASK_MEMORY_MB},
        },
    }


# The cluster of one round


class Cluster:
    """One `corral server` and one `corral agent` on free ports, with data folders under `folder`."""

    def __init__(self, folder: Path, venv_bin: Path, count: int):
        self.folder = folder
        http_port, dns_port, agent_port = free_port(), free_port(), free_port()
        self.base_url = f"http://127.0.0.1:{http_port}"
        corral = str(venv_bin / "corral")
        # Twice what the instances request, so that rounding never leaves one out.
        cpus = max(1.0, 2 * count * TASK_CPUS)
        memory = max(256, 2 * count * TASK_MEMORY_MB)
        self.server = Server(
            name="corral server",
            command=[corral, "server", "--data-dir", str(folder / "server"),
                     "--http-addr", f"127.0.0.1:{http_port}", "--dns-addr", f"127.0.0.1:{dns_port}"],
            base_url=self.base_url,
            ready_path="/v1/status/leader",
            log_path=folder / "server.log",
        )
        self.agent = Server(
            name="corral agent",
            command=[corral, "agent", "--join", f"127.0.0.1:{http_port}", "--node", NODE,
                     "--data-dir", str(folder / "agent"), "--http-addr", f"127.0.0.1:{agent_port}",
                     "--resources", f"cpus:{cpus:g};mem:{memory}"],
            base_url=f"http://127.0.0.1:{agent_port}",
            ready_path="/v1/agent/members",
            log_path=folder / "agent.log",
        )

    def start(self) -> None:
        self.server.start()
        self.server.wait_ready()
        self.agent.start()
        self.agent.wait_ready()
        deadline = time.monotonic() + 30
        while not self._agent_registered():
            if time.monotonic() > deadline:
                raise RoundFailed(f"agent {NODE} did not register within 30s; its log ends with:\n"
                                  f"{tail(self.agent.log_path)}")
            time.sleep(0.1)

    def _agent_registered(self) -> bool:
        agents, _ = http_json(self.base_url, "GET", "/v1/agents")
        return any(agent["Node"] == NODE and agent["Status"] == "alive" for agent in agents)

    def stop(self) -> None:
        """Stop the agent, then the server; kill any task process that is still left. Safe to call twice."""
        self.agent.stop()
        self.server.stop()
        kill_processes(task_processes(self.folder))


def task_processes(folder: Path) -> list[psutil.Process]:
    """Return the live processes (tasks and executors) whose sandbox is under `folder`.

    Tasks carry CORRAL_SANDBOX in their environment. Executors do not, so
    they are found through the pid and create time in each sandbox's
    executor/executor.json.
    """
    prefix = str(folder) + "/"
    found = {}
    for process in psutil.process_iter(["environ", "status"]):
        sandbox = (process.info["environ"] or {}).get("CORRAL_SANDBOX", "")
        if sandbox.startswith(prefix) and process.info["status"] != psutil.STATUS_ZOMBIE:
            found[process.pid] = process
    for record_path in folder.glob("*/sandboxes/*/executor/executor.json"):
        process = recorded_executor(record_path)
        if process is not None:
            found[process.pid] = process
    return list(found.values())


def recorded_executor(record_path: Path) -> psutil.Process | None:
    """Return the live executor that executor.json names, or None when it has exited."""
    try:
        record = json.loads(record_path.read_text())
        process = psutil.Process(record["pid"])
        # psutil's create time can drift by up to a second between reads.
        same = abs(process.create_time() - record["create_time"]) < 1.0
        running = process.status() != psutil.STATUS_ZOMBIE
    except (OSError, ValueError, KeyError, TypeError, psutil.NoSuchProcess):
        return None
    return process if same and running else None


def kill_processes(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Return the processes that still run; a zombie counts as gone."""
    result = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                result.append(process)
        except psutil.NoSuchProcess:
            pass
    return result


def cpu_seconds(process: psutil.Process, children: bool = False) -> float:
    times = process.cpu_times()
    if children:
        return times.children_user + times.children_system
    return times.user + times.system


# One round


def follow_tasks(cluster: Cluster, result: Round, start: float, deadline: float) -> list[dict]:
    """Read the job's tasks with blocking queries until all `result.count` are RUNNING; return them."""
    index = 0
    while True:
        if time.monotonic() > deadline:
            raise RoundFailed("timed out before every task was RUNNING")
        query = f"/v1/tasks?job={JOB_NAME}"
        if index:
            query += f"&index={index}&wait={BLOCKING_WAIT}"
        tasks, index = http_json(cluster.base_url, "GET", query, timeout=30)
        now = time.monotonic() - start
        for task in tasks:
            seen = result.first_seen.setdefault(task["ID"], {})
            seen.setdefault(task["State"], now)
            if task["State"] in ("FAILED", "ERROR", "LOST"):
                raise RoundFailed(f"task {task['ID']} ended {task['State']}: {task['Message']}")
        running = [task for task in tasks if task["State"] == "RUNNING"]
        if len(running) >= result.count:
            result.all_running = now
            return running


def stop_job(cluster: Cluster, result: Round, running: list[dict], deadline: float) -> None:
    """Stop the job and time until its task processes and executors are gone."""
    watched = []
    for task in running:
        try:
            process = psutil.Process(task["PID"])
            watched.append(process)
            watched.append(process.parent())
        except (psutil.NoSuchProcess, TypeError):
            pass
    watched = [process for process in watched if process is not None]
    start = time.monotonic()
    http_json(cluster.base_url, "DELETE", f"/v1/jobs/{JOB_NAME}")
    while alive(watched):
        if time.monotonic() > deadline:
            raise RoundFailed(f"timed out with {len(alive(watched))} task and executor processes still running")
        time.sleep(PROCESS_POLL_INTERVAL)
    result.stop_all_processes_gone = time.monotonic() - start
    while True:
        tasks, _ = http_json(cluster.base_url, "GET", f"/v1/tasks?job={JOB_NAME}")
        if all(task["State"] in ("KILLED", "FINISHED", "FAILED", "LOST", "ERROR", "GONE") for task in tasks):
            result.stop_all_terminal = time.monotonic() - start
            return
        if time.monotonic() > deadline:
            raise RoundFailed("timed out before every task had ended in /v1/tasks")
        time.sleep(PROCESS_POLL_INTERVAL)


def read_executors(result: Round, running: list[dict]) -> None:
    """Add up the CPU time and RSS of the executors that supervise the running tasks."""
    for task in running:
        try:
            executor = psutil.Process(task["PID"]).parent()
            if executor is None:
                continue
            result.executor_cpu += cpu_seconds(executor)
            result.executor_rss_mib += executor.memory_info().rss / 1024 / 1024
        except (psutil.NoSuchProcess, TypeError):
            continue


def fork_servers(agent: psutil.Process) -> list[psutil.Process]:
    """Return the agent's launcher fork servers (corral.agent.launcher), normally one."""
    found = []
    for child in agent.children():
        try:
            if "corral.agent.launcher" in child.cmdline():
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def read_fork_servers(servers: list[psutil.Process]) -> float:
    """Return the CPU time of the fork servers and of the launchers they reaped."""
    total = 0.0
    for server in servers:
        try:
            total += cpu_seconds(server) + cpu_seconds(server, children=True)
        except psutil.NoSuchProcess:
            continue
    return total


def run_round(args: argparse.Namespace, folder: Path, venv_bin: Path, number: int) -> Round:
    result = Round(count=args.count)
    cluster = Cluster(folder, venv_bin, args.count)
    launchers: list[psutil.Process] = []
    wall_start = time.monotonic()
    try:
        cluster.start()
        server = psutil.Process(cluster.server.process.pid)
        agent = psutil.Process(cluster.agent.process.pid)
        # Let the agent's first catalog sync and heartbeat pass before the clock starts.
        time.sleep(1.0)
        account = CPUAccount()
        server_before, agent_before = cpu_seconds(server), cpu_seconds(agent)
        launcher_before = cpu_seconds(agent, children=True)

        start = time.monotonic()
        deadline = start + args.timeout
        http_json(cluster.base_url, "PUT", "/v1/jobs", job_spec(args.count))
        result.submit_seconds = time.monotonic() - start
        running = follow_tasks(cluster, result, start, deadline)
        read_executors(result, running)
        launchers = fork_servers(agent)
        fork_server_cpu = read_fork_servers(launchers)

        stop_job(cluster, result, running, deadline)
        result.server_cpu = cpu_seconds(server) - server_before
        result.agent_cpu = cpu_seconds(agent) - agent_before
        result.launcher_cpu = cpu_seconds(agent, children=True) - launcher_before + fork_server_cpu
        own = result.server_cpu + result.agent_cpu + result.launcher_cpu + result.executor_cpu
        result.other_cores, result.steal_cores = account.other_and_steal(own, time.monotonic() - start)
        result.leftover_pids = [process.pid for process in task_processes(folder)]
    except RoundFailed as exc:
        result.failure = str(exc)
        for seen in result.first_seen.values():
            last = max(seen, key=seen.get)
            result.states_at_failure[last] = result.states_at_failure.get(last, 0) + 1
    finally:
        cluster.stop()
    # The fork server exits once the agent that started it has exited.
    _, left = psutil.wait_procs(launchers, timeout=10)
    result.leftover_pids += [process.pid for process in left]
    kill_processes(left)
    result.wall_seconds = time.monotonic() - wall_start
    if result.failure:
        print(f"tasks bench: round {number} failed: {result.failure}; logs kept in {folder}", file=sys.stderr)
    return result


# The page


def seconds_range(values: list[float], digits: int = 2) -> str:
    """Format the median and the range of `values`, such as "4.21 s (3.90 to 4.80)"."""
    if not values:
        return "no figure"
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f} s"
    return f"{median:.{digits}f} s ({min(values):.{digits}f} to {max(values):.{digits}f})"


def round_rows(rounds: list[Round]) -> list[str]:
    rows = [
        "| round | PUT /v1/jobs | first STARTING | first RUNNING | p50 RUNNING | p99 RUNNING | all RUNNING "
        "| stop: processes gone | stop: all KILLED | server CPU | agent CPU | launch CPU | executors CPU "
        "| other programs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for number, result in enumerate(rounds, 1):
        if result.failure:
            states = ", ".join(f"{count} {state}" for state, count in sorted(result.states_at_failure.items()))
            rows.append(f"| {number} | failed: {result.failure} (last states seen: {states or 'none'}) "
                        + "| " * 12 + "|")
            continue
        running = result.running_times()
        starting = result.state_times("STARTING")
        first_starting = f"{starting[0]:.2f} s" if starting else "not seen"
        rows.append(
            f"| {number} | {result.submit_seconds * 1000:.0f} ms | {first_starting} | {running[0]:.2f} s "
            f"| {percentile(running, 0.5):.2f} s | {percentile(running, 0.99):.2f} s "
            f"| **{result.all_running:.2f} s** | {result.stop_all_processes_gone:.2f} s "
            f"| {result.stop_all_terminal:.2f} s | {result.server_cpu:.1f} s | {result.agent_cpu:.1f} s "
            f"| {result.launcher_cpu:.1f} s | {result.executor_cpu:.1f} s | {result.other_cores:.2f} cores |"
        )
    return rows


def summary_rows(rounds: list[Round]) -> list[str]:
    done = [result for result in rounds if not result.failure]

    def figure(values: list[float]) -> str:
        return seconds_range(values)

    rows = [
        "| figure | median (range) over the rounds that finished |",
        "| --- | --- |",
        f"| all {rounds[0].count} RUNNING after the PUT | **{figure([r.all_running for r in done])}** |",
        f"| first RUNNING | {figure([r.running_times()[0] for r in done])} |",
        f"| p50 RUNNING | {figure([percentile(r.running_times(), 0.5) for r in done])} |",
        f"| p99 RUNNING | {figure([percentile(r.running_times(), 0.99) for r in done])} |",
        f"| stop: all task and executor processes gone | {figure([r.stop_all_processes_gone for r in done])} |",
        f"| stop: all tasks KILLED in /v1/tasks | {figure([r.stop_all_terminal for r in done])} |",
        f"| server CPU, PUT to end of stop | {figure([r.server_cpu for r in done])} |",
        f"| agent CPU, PUT to end of stop | {figure([r.agent_cpu for r in done])} |",
        f"| launch CPU (fork server and launchers) | {figure([r.launcher_cpu for r in done])} |",
        f"| executors CPU until all RUNNING | {figure([r.executor_cpu for r in done])} |",
    ]
    if done:
        rss = statistics.median(r.executor_rss_mib for r in done)
        rows.append(f"| executors' RSS while running, added up | {rss:,.0f} MiB "
                    f"({rss / rounds[0].count:.1f} MiB each) |")
    return rows


def render(args: argparse.Namespace, rounds: list[Round], machine: dict[str, str], versions: dict[str, str],
           started: datetime.datetime, wall_seconds: float, breakdown: list[str]) -> str:
    done = [result for result in rounds if not result.failure]
    command = " ".join(["bench/tasks/run", *map(shlex.quote, sys.argv[1:])])
    median_all = statistics.median(r.all_running for r in done) if done else None
    leftovers = sum(len(r.leftover_pids) for r in done)
    met = len(done) == len(rounds) and median_all is not None and median_all < args.target and leftovers == 0
    outcome = f"median {median_all:.2f} s" if median_all is not None else "no round finished"
    lines = [
        f"# Tasks: {args.count} sleep tasks on one agent",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC with `{command}`: {len(rounds)} rounds, "
        f"{len(done)} finished, {wall_seconds:.0f} s in all.",
        "",
        "## Conditions",
        "",
        f"Each round starts a fresh `corral server` and one `corral agent` (node `{NODE}`) as separate "
        "processes on 127.0.0.1, with new data folders and free ports; the agent's `--resources` give "
        f"it twice what {args.count} instances request. The benchmark submits a service job of "
        f"{args.count} instances of `sleep 600` (cpus {TASK_CPUS:g} and {TASK_MEMORY_MB} MB each, no "
        "ports, no service check) with one `PUT /v1/jobs`, and starts the clock just before it. It "
        f"follows `GET /v1/tasks?job={JOB_NAME}` as a blocking query (index and wait={BLOCKING_WAIT}), "
        "and a task counts as RUNNING when a response first shows it so; the agent sets RUNNING once "
        "the executor reports that the command started. It then sends `DELETE /v1/jobs/NAME` and "
        f"checks every {PROCESS_POLL_INTERVAL * 1000:.0f} ms whether the {args.count} `sleep` processes "
        "and their executors have exited; a zombie counts as exited. After the stop it looks for any "
        "process whose sandbox is under the round's data folder. A round gives up after "
        f"{args.timeout:g} s.",
        "",
        "CPU seconds are user plus system time from psutil: the server and the agent processes from "
        "just before the PUT to the end of the stop; launch is the agent's fork server "
        "(corral.agent.launcher) with the launcher child that it forks for each task, and any launcher process "
        "that the agent started itself; executors are the long-lived processes, one per task, read "
        "just before the stop. \"Other programs\" is the machine's busy CPU time from /proc/stat "
        "minus all of these, averaged over the round: other work on this machine during the round.",
        "",
        "## Results",
        "",
        *summary_rows(rounds),
        "",
        "Each round, in seconds after the PUT (stop times after the DELETE):",
        "",
        *round_rows(rounds),
        "",
        f"Processes left behind after the stop: {leftovers} in the rounds that finished.",
        "",
        "## Target",
        "",
        f"- {args.count} tasks RUNNING within {args.target:g} s: **{'met' if met else 'not met'}** "
        f"({outcome}). For scale, Mesos reports launching 1,000 containers on one agent in about 30 s.",
        "",
        "## What limits it",
        "",
        *breakdown,
        "",
        "## Machine and versions",
        "",
        *[f"- {key}: {value}" for key, value in {**machine, **versions}.items()],
    ]
    return "\n".join(lines)


def launch_latencies(result: Round) -> list[float]:
    """Return each task's time from its first STARTING to its first RUNNING, as the poll saw them, sorted."""
    return sorted(seen["RUNNING"] - seen["STARTING"] for seen in result.first_seen.values()
                  if "RUNNING" in seen and "STARTING" in seen)


def describe_breakdown(rounds: list[Round]) -> list[str]:
    """Explain where the time goes, from the state times and CPU figures of the rounds."""
    done = [result for result in rounds if not result.failure]
    if not done:
        return ["No round finished, so there is no breakdown."]
    count = done[0].count

    placed = statistics.median(r.state_times("STAGING")[-1] for r in done if r.state_times("STAGING"))
    first_starting = statistics.median(r.state_times("STARTING")[0] for r in done if r.state_times("STARTING"))
    latency_p50 = statistics.median(percentile(launch_latencies(r), 0.5) for r in done if launch_latencies(r))
    latency_p99 = statistics.median(percentile(launch_latencies(r), 0.99) for r in done if launch_latencies(r))
    per_task = {
        "server": statistics.median(r.server_cpu for r in done) / count,
        "agent": statistics.median(r.agent_cpu for r in done) / count,
        "launch (fork server and launchers)": statistics.median(r.launcher_cpu for r in done) / count,
        "executors": statistics.median(r.executor_cpu for r in done) / count,
    }
    largest = max(per_task, key=per_task.get)

    own = statistics.median(r.server_cpu + r.agent_cpu + r.launcher_cpu + r.executor_cpu for r in done)
    wall = statistics.median(r.all_running + r.stop_all_terminal for r in done)
    other = statistics.median(r.other_cores for r in done)
    cpus = os.cpu_count() or 1
    busy = min(1.0, (own / wall + other) / cpus)
    verdict = ", so the launch waits for CPU time" if busy >= 0.8 else ", so CPU time is not the only limit"

    costs = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in per_task.items())
    return [
        f"- Placement is not the limit: every task record exists (STAGING) {placed:.2f} s after the PUT and the "
        f"first task is STARTING at {first_starting:.2f} s (medians over the rounds).",
        f"- A task takes {latency_p50:.2f} s from STARTING to RUNNING at the median and {latency_p99:.2f} s at "
        "p99, as the poll sees it. The agent launches through the default thread pool of asyncio "
        f"({min(32, (os.cpu_count() or 1) + 4)} threads here), so launches beyond that wait their turn.",
        f"- CPU per task: {costs}. The {largest} is the largest part. The server's share includes "
        "serving this benchmark's blocking reads of /v1/tasks, which return every task of the job "
        "on each change.",
        f"- All in all a round used {own:.1f} CPU seconds of its own from the PUT to the end of the stop "
        f"({wall:.1f} s of wall time), on {cpus} logical CPUs of which other programs used "
        f"{other:.2f} cores on average: the machine was {busy:.0%} busy{verdict}.",
        "- Before the agent started executors through its fork server (corral.agent.launcher), each "
        "launch ran a new Python interpreter that spent about 100 ms of CPU on start-up and imports, "
        "and one round of 200 tasks took 16.2 s to all RUNNING on this machine (git 599be67-dirty).",
    ]


def run(args: argparse.Namespace) -> int:
    venv_bin = Path(args.venv) / "bin"
    started = datetime.datetime.now(datetime.timezone.utc)
    wall_start = time.monotonic()
    git = command_output(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    versions = {
        "corral": f"{command_output([str(venv_bin / 'corral'), 'version'])} (git {git})",
        "Python": command_output([str(venv_bin / "python"), "-c", "import platform; print(platform.python_version())"]),
    }

    workdir = Path(tempfile.mkdtemp(prefix="corral-tasks-bench-"))
    rounds = []
    for number in range(1, args.rounds + 1):
        folder = workdir / f"round-{number}"
        folder.mkdir()
        print(f"tasks bench: round {number} of {args.rounds}: {args.count} instances of sleep 600",
              file=sys.stderr)
        result = run_round(args, folder, venv_bin, number)
        rounds.append(result)
        if not result.failure:
            running = result.running_times()
            print(f"tasks bench:   all RUNNING {result.all_running:.2f} s (first {running[0]:.2f}, "
                  f"p50 {percentile(running, 0.5):.2f}, p99 {percentile(running, 0.99):.2f}); "
                  f"stopped in {result.stop_all_processes_gone:.2f} s; server CPU {result.server_cpu:.1f} s, "
                  f"agent CPU {result.agent_cpu:.1f} s, executors {result.launcher_cpu + result.executor_cpu:.1f} s; "
                  f"{len(result.leftover_pids)} processes left", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)

    machine = describe_machine(workdir)
    if all(not result.failure for result in rounds):
        shutil.rmtree(workdir, ignore_errors=True)
    page = render(args, rounds, machine, versions, started, time.monotonic() - wall_start,
                  describe_breakdown(rounds))
    if args.print_only:
        print(page)
    else:
        output = write_section("tasks", page, Path(args.output))
        print(f"tasks bench: wrote the tasks section of {output}", file=sys.stderr)
    failed = any(result.failure or result.leftover_pids for result in rounds)
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="instances of sleep 600 to launch [200]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each on a fresh server and agent [3]")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds after which a round gives up, from the PUT to the end of the stop [120]")
    parser.add_argument("--target", type=float, default=TARGET_SECONDS,
                        help="seconds within which every task should be RUNNING [10]")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"),
                        help="the Markdown page whose tasks section to write [docs/benchmarks.md]")
    parser.add_argument("--print-only", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--venv", default=str(ROOT / ".venv"), help="virtual environment with corral [.venv]")
    args = parser.parse_args()
    if args.count < 1 or args.rounds < 1 or args.timeout <= 0:
        parser.error("--count and --rounds must be at least 1 and --timeout more than 0")
    # SIGTERM unwinds like Ctrl-C, so that the server and the agent are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(run(args))


if __name__ == "__main__":
    main()
