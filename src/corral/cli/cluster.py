"""Operator views of the resource manager: `corral agents`, `corral tasks`, `corral frameworks`, `corral roles`.

Each command reads one list endpoint (/v1/agents, /v1/tasks,
/v1/frameworks, /v1/roles) and prints it as a table, or as the server's
JSON with --json. Resources are shown as "used/total" (agents) or as
cpus and memory (frameworks and roles); memory and disk are in MB.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from corral.cli.common import http_addr_option
from corral.client import Client, CorralError
from corral.types import TaskState

json_option = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead of a table.")

# Spelling of a task state accepted by --state besides the state itself: Mesos's TASK_ prefix.
_MESOS_STATE_PREFIX = "TASK_"


# Fetching and printing


def fetch_list(client: Client, path: str, what: str, query: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """GET a list endpoint; turn a 404 (a server without that endpoint) into a clear error."""
    try:
        data = client.request_json("GET", path, query=query)
    except CorralError as exc:
        if exc.status == 404:
            raise click.ClickException(
                f"the server at {client.base_url} has no GET {path} endpoint (HTTP 404), so it cannot list "
                f"{what}; point --http-addr at a `corral server` whose version provides it"
            ) from None
        raise
    if not isinstance(data, list):
        raise click.ClickException(f"invalid response from GET {path}: expected a JSON list, got {type(data).__name__}")
    return data


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def print_table(columns: tuple[str, ...], rows: list[list[str]], empty: str) -> None:
    if not rows:
        click.echo(empty)
        return
    table = Table(box=None, pad_edge=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(width=220, soft_wrap=True, highlight=False).print(table)


# Formatting of single values


def format_number(value: Any) -> str:
    """Format a resource amount: integers without a decimal point, fractions with at most 2 decimals."""
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{int(value)}" if isinstance(value, (int, float)) else str(value)


def resource(resources: Mapping[str, Any] | None, name: str) -> Any:
    """Read one resource amount; memory is "mem" in Mesos's spelling and "memory" in corral's records."""
    if not resources:
        return None
    if name == "mem":
        return resources.get("mem", resources.get("memory"))
    return resources.get(name)


def ports_count(value: Any) -> Any:
    """Count ports given as a number, a list of ports or a list of [low, high] ranges."""
    if isinstance(value, list):
        return sum(item[1] - item[0] + 1 if isinstance(item, list) else 1 for item in value)
    return value


def used_of_total(used: Any, total: Any) -> str:
    if used is None and total is None:
        return "-"
    return f"{format_number(used)}/{format_number(total)}"


def format_resources(resources: Mapping[str, Any] | None) -> str:
    """Format cpus, memory, disk and ports, leaving out the ones that are absent or zero."""
    if not resources:
        return "-"
    parts = []
    for name, unit in (("cpus", ""), ("mem", " MB"), ("disk", " MB"), ("ports", " ports")):
        amount = ports_count(resource(resources, name))
        if amount:
            label = "" if name == "ports" else f"{name} "
            parts.append(f"{label}{format_number(amount)}{unit}")
    return ", ".join(parts) or "-"


def format_share(share: Any) -> str:
    """Format a dominant share (a fraction from 0 to 1) as a percentage."""
    if share is None:
        return "-"
    return f"{share * 100:.1f}%"


def format_age(seconds: float | None) -> str:
    """Format a duration compactly, at most two units: 45s, 3m12s, 2h05m, 4d03h."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def age_since(timestamp: float | None, now: float) -> str:
    """Format the time since a Unix timestamp; 0 or None (never set) prints "-"."""
    if not timestamp:
        return "-"
    if not isinstance(timestamp, (int, float)):
        return str(timestamp)
    return format_age(now - timestamp)


def count_or_length(value: Any) -> str:
    """Format a field that the API gives either as a count or as a list of ids."""
    if isinstance(value, (list, dict)):
        return str(len(value))
    return "-" if value is None else str(value)


# corral agents


def agent_row(agent: dict[str, Any], now: float) -> list[str]:
    used = agent.get("Used") or {}
    total = agent.get("Total") or {}
    status = agent.get("Status", "-")
    if status == "failed":
        heartbeat = f"failed {age_since(agent.get('FailedAt'), now)} ago"
    elif agent.get("LastHeartbeatAgo") is None:
        heartbeat = "-"
    else:
        heartbeat = f"{agent['LastHeartbeatAgo']:.1f}s ago"
    return [
        agent.get("Node", "-"),
        agent.get("Address", "-"),
        status,
        used_of_total(resource(used, "cpus"), resource(total, "cpus")),
        used_of_total(resource(used, "mem"), resource(total, "mem")),
        used_of_total(resource(used, "disk"), resource(total, "disk")),
        used_of_total(ports_count(resource(used, "ports")), ports_count(resource(total, "ports"))),
        heartbeat,
    ]


@click.command()
@json_option
@http_addr_option
def agents(client: Client, as_json: bool) -> None:
    """List the agents with their status, resources used of total, and last heartbeat.

    Memory and disk are in MB; ports count the ports of the agent's ranges.
    A failed agent is one the server stopped hearing from.
    """
    data = fetch_list(client, "/v1/agents", "agents")
    if as_json:
        print_json(data)
        return
    now = time.time()
    rows = [agent_row(agent, now) for agent in sorted(data, key=lambda agent: agent.get("Node", ""))]
    print_table(("NODE", "ADDRESS", "STATUS", "CPUS", "MEM (MB)", "DISK (MB)", "PORTS", "LAST HEARTBEAT"),
                rows, "No agents registered.")


# corral tasks


def parse_task_state(ctx: click.Context, param: click.Parameter, value: str | None) -> TaskState | None:
    """Accept a task state as corral spells it (RUNNING) or as Mesos does (TASK_RUNNING), in any case."""
    if value is None:
        return None
    name = value.strip().upper().removeprefix(_MESOS_STATE_PREFIX)
    try:
        return TaskState(name)
    except ValueError:
        states = ", ".join(state.value for state in TaskState)
        raise click.BadParameter(f"invalid task state {value!r}: expected one of {states}") from None


def task_owner(task: dict[str, Any]) -> str:
    """Return the task's job, or for a framework's task the framework id."""
    if task.get("Job"):
        return task["Job"]
    if task.get("Framework"):
        return f"framework {task['Framework']}"
    return "-"


def task_row(task: dict[str, Any], now: float) -> list[str]:
    ports = ",".join(f"{label}={port}" for label, port in (task.get("Ports") or {}).items())
    return [
        task.get("ID", "-"),
        task_owner(task),
        task.get("Node", "-"),
        task.get("State", "-"),
        str(task["PID"]) if task.get("PID") else "-",
        ports or "-",
        age_since(task.get("CreatedAt"), now),
    ]


@click.command()
@click.option("--node", default=None, help="Only the tasks placed on this node.")
@click.option("--state", default=None, callback=parse_task_state,
              help="Only the tasks in this state, such as RUNNING or TASK_RUNNING (any case).")
@click.option("--job", default=None, help="Only the tasks of this job.")
@json_option
@http_addr_option
def tasks(client: Client, node: str | None, state: TaskState | None, job: str | None, as_json: bool) -> None:
    """List tasks with their job or framework, node, state, pid, ports and age.

    Ended tasks are listed too, for as long as the server keeps their
    records; use --state RUNNING to see only the running ones.
    """
    data = fetch_list(client, "/v1/tasks", "tasks", query={"job": job} if job else None)
    selected = [
        task for task in data
        if (node is None or task.get("Node") == node)
        and (state is None or task.get("State") == state.value)
        and (job is None or task.get("Job") == job)
    ]
    if as_json:
        print_json(selected)
        return
    now = time.time()
    rows = [task_row(task, now) for task in selected]
    print_table(("ID", "JOB/FRAMEWORK", "NODE", "STATE", "PID", "PORTS", "AGE"), rows, "No tasks match.")


# corral frameworks


def framework_status(framework: dict[str, Any]) -> str:
    parts = ["active" if framework.get("Active") else "inactive"]
    if not framework.get("Connected", True):
        parts.append("disconnected")
    if framework.get("Suppressed"):
        parts.append("suppressed")
    return ",".join(parts)


def framework_row(framework: dict[str, Any], now: float) -> list[str]:
    failover = framework.get("FailoverTimeout")
    if isinstance(failover, (int, float)):
        failover = format_age(failover) if failover else "-"
    return [
        framework.get("ID", "-"),
        framework.get("Name", "-"),
        framework.get("Role", "-"),
        framework_status(framework),
        count_or_length(framework.get("Tasks")),
        format_resources(framework.get("Used")),
        format_resources(framework.get("Offered")),
        format_share(framework.get("DominantShare")),
        age_since(framework.get("RegisteredAt"), now),
        str(failover or "-"),
    ]


@click.command()
@json_option
@http_addr_option
def frameworks(client: Client, as_json: bool) -> None:
    """List the registered frameworks with their role, tasks, resources used and offered, and DRF share.

    SHARE is the framework's dominant share: its largest fraction of any
    one resource of the cluster. AGE is the time since it registered.
    """
    data = fetch_list(client, "/v1/frameworks", "frameworks")
    if as_json:
        print_json(data)
        return
    now = time.time()
    ordered = sorted(data, key=lambda item: (item.get("Role", ""), item.get("Name", ""), item.get("ID", "")))
    rows = [framework_row(framework, now) for framework in ordered]
    print_table(("ID", "NAME", "ROLE", "STATUS", "TASKS", "USED", "OFFERED", "SHARE", "AGE", "FAILOVER"),
                rows, "No frameworks registered.")


# corral roles


def role_row(role: dict[str, Any]) -> list[str]:
    return [
        role.get("Role", "-"),
        format_number(role.get("Weight")),
        count_or_length(role.get("Frameworks")),
        format_resources(role.get("Used")),
        format_resources(role.get("Offered")),
        format_resources(role.get("Reserved")),
        format_resources(role.get("Quota")),
        format_share(role.get("DominantShare")),
    ]


@click.command()
@json_option
@http_addr_option
def roles(client: Client, as_json: bool) -> None:
    """List the roles with their weight, frameworks, resources and DRF dominant share.

    The allocator offers resources to the role with the lowest dominant
    share divided by its weight first. QUOTA is a limit on what the role
    may use; "-" means none.
    """
    data = fetch_list(client, "/v1/roles", "roles")
    if as_json:
        print_json(data)
        return
    rows = [role_row(role) for role in sorted(data, key=lambda item: item.get("Role", ""))]
    print_table(("ROLE", "WEIGHT", "FRAMEWORKS", "USED", "OFFERED", "RESERVED", "QUOTA", "SHARE"),
                rows, "No roles known.")
