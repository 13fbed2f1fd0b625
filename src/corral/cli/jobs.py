"""`corral job`: submit, inspect and stop jobs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from corral.client import Client, CorralError
from corral.cli.common import http_addr_option
from corral.jobspec import JobSpecError, load_job_file
from corral.types import TaskState

# An instance restarted this many times while `job run` waits counts as failing.
FAILING_RESTARTS = 3
# Seconds every instance must stay running and passing, with no restart, before `job run`
# reports success, as Nomad's min_healthy_time (10 s by default there, shorter here for the demo).
MIN_HEALTHY_TIME = 3.0


@click.group()
def job() -> None:
    """Submit, inspect and stop jobs."""


def _resolve_workdir(spec: dict[str, Any], job_file: Path) -> None:
    """Make a relative task.workdir absolute, relative to the job file's folder."""
    task = spec.get("task")
    if not isinstance(task, dict):
        return
    workdir = task.get("workdir")
    if isinstance(workdir, str) and workdir and not Path(workdir).is_absolute():
        task["workdir"] = str((job_file.parent / workdir).resolve())


@job.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--detach", is_flag=True, help="Return once the job is stored, without waiting for its instances.")
@click.option("--timeout", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="Seconds to wait for every instance to be running and passing.")
@click.option("--min-healthy-time", type=click.FloatRange(min=0), default=MIN_HEALTHY_TIME, show_default=True,
              help="Seconds every instance must stay running and passing, with no restart, to count as started.")
@http_addr_option
def run(client: Client, file: Path, detach: bool, timeout: float, min_healthy_time: float) -> None:
    """Submit the job in FILE (TOML) and wait until every instance runs and passes its check.

    A job with the same name is updated. Exits non-zero with the reason when
    an instance cannot be placed or keeps failing.
    """
    try:
        spec = load_job_file(file)
    except JobSpecError as exc:
        raise click.ClickException(str(exc)) from None
    _resolve_workdir(spec, file.absolute())
    submitted = client.request_json("PUT", "/v1/jobs", spec)
    name = submitted["Name"]
    click.echo(f"==> job {name!r} submitted (version {submitted['Version']})")
    if detach:
        return
    _wait_for_job(client, name, timeout, min_healthy_time)


def _wait_for_job(client: Client, name: str, timeout: float, min_healthy_time: float) -> None:
    deadline = time.monotonic() + timeout
    index = "0"
    seen: dict[str, str] = {}
    # When every instance was last seen running and passing, and the tasks and restart counts then.
    healthy_since: float | None = None
    healthy_tasks: list[tuple[str, int]] = []
    while True:
        now = time.monotonic()
        remaining = deadline - now
        if remaining <= 0:
            raise CorralError(f"job {name!r}: timed out after {timeout:g}s; see `corral job status {name}`")
        wait = min(remaining, 5.0)
        if healthy_since is not None:
            wait = min(wait, healthy_since + min_healthy_time - now)
        wait_ms = max(int(wait * 1000), 10)
        response = client.request(
            "GET", f"/v1/jobs/{name}", query={"index": index, "wait": f"{wait_ms}ms"}, timeout=wait + 10
        )
        if response.status != 200:
            raise CorralError(f"job {name!r}: {response.body.decode(errors='replace').strip()}")
        index = response.header("X-Consul-Index", "0")
        status = response.json()
        _print_changes(status, seen)
        if status["Unplaced"]:
            reasons = "; ".join(f"instance {i}: {reason}" for i, reason in sorted(status["Unplaced"].items()))
            raise CorralError(f"job {name!r} cannot be placed: {reasons}")
        failing = [task for task in _current_tasks(status) if task["Restarts"] >= FAILING_RESTARTS]
        if failing:
            task = failing[0]
            raise CorralError(
                f"job {name!r}: task {task['ID']} keeps failing ({task['Restarts']} restarts): "
                f"{task['Message']}; its output is in the agent's sandbox for the task"
            )
        summary = status["Summary"]
        if summary["Running"] != summary["Desired"] or summary["Passing"] != summary["Desired"]:
            healthy_since = None
            continue
        tasks = sorted((task["ID"], task["Restarts"]) for task in _current_tasks(status))
        if healthy_since is None or tasks != healthy_tasks:
            healthy_since, healthy_tasks = time.monotonic(), tasks
        if time.monotonic() - healthy_since >= min_healthy_time:
            click.echo(f"==> job {name!r}: {summary['Desired']} of {summary['Desired']} instances running and passing")
            return


def _is_live(task: dict) -> bool:
    return not TaskState(task["State"]).is_terminal


def _current_tasks(status: dict) -> list[dict]:
    return [task for task in status["Tasks"] if _is_live(task) and task["JobVersion"] == status["TaskVersion"]]


def _describe(task: dict) -> str:
    ports = ", ".join(f"{label}={port}" for label, port in task["Ports"].items())
    parts = [task["State"]]
    if task["Health"]:
        parts.append(f"check {task['Health']}")
    if ports:
        parts.append(f"ports {ports}")
    if task["Message"]:
        parts.append(task["Message"])
    return "; ".join(parts)


def _print_changes(status: dict, seen: dict[str, str]) -> None:
    for task in status["Tasks"]:
        line = _describe(task)
        if seen.get(task["ID"]) != line:
            seen[task["ID"]] = line
            click.echo(f"    instance {task['Instance']} task {task['ID']}: {line}")


@job.command()
@click.argument("name")
@http_addr_option
def status(client: Client, name: str) -> None:
    """Show a job's instances with their state, node, ports and process id."""
    data = client.request_json("GET", f"/v1/jobs/{name}")
    summary = data["Summary"]
    state = "stopped" if data["Stopped"] else "running"
    click.echo(
        f"job {data['Name']}: {state}, version {data['Version']}, "
        f"{summary['Running']} of {summary['Desired']} running, {summary['Passing']} passing"
    )
    table = Table(box=None, pad_edge=False)
    for column in ("INSTANCE", "TASK", "STATE", "HEALTH", "NODE", "PORTS", "PID", "RESTARTS", "MESSAGE"):
        table.add_column(column)
    for task in data["Tasks"]:
        ports = ",".join(f"{label}={port}" for label, port in task["Ports"].items())
        table.add_row(
            str(task["Instance"]), task["ID"], task["State"], task["Health"] or "-", task["Node"],
            ports or "-", str(task["PID"] or "-"), str(task["Restarts"]), task["Message"],
        )
    Console(width=200, soft_wrap=True).print(table)
    for instance, reason in sorted(data["Unplaced"].items()):
        click.echo(f"instance {instance} not placed: {reason}")


@job.command()
@click.argument("name")
@click.option("--detach", is_flag=True, help="Return without waiting for the tasks to stop.")
@http_addr_option
def stop(client: Client, name: str, detach: bool) -> None:
    """Stop every instance of a job; the job stays stored and `job run` starts it again."""
    client.request_json("DELETE", f"/v1/jobs/{name}")
    click.echo(f"==> job {name!r} stopping")
    deadline = time.monotonic() + 60
    while not detach and time.monotonic() < deadline:
        data = client.request_json("GET", f"/v1/jobs/{name}")
        if not any(_is_live(task) for task in data["Tasks"]):
            break
        time.sleep(0.2)
    click.echo(f"==> job {name!r} stopped")
