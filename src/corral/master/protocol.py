"""Mesos's v1 scheduler API in JSON: resources, offers, task infos and task statuses.

Field names and enum spellings follow include/mesos/v1/mesos.proto and
scheduler/scheduler.proto of Apache Mesos, as their JSON mapping writes
them: ids are objects such as {"value": "..."}, resources are a list of
{"name", "type", "scalar" | "ranges"}, task states are TASK_RUNNING and so
on, and the status uuid is base64.

Everything here converts between that JSON and corral's own types, and the
Master decides what to do with it.
"""

from __future__ import annotations

import base64
import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.master.allocator import Offer, Resources
from corral.types import TaskState

# Update states that are never stored in a task record: the master sends them
# about tasks it never launched or does not know.
TASK_DROPPED = "TASK_DROPPED"
TASK_UNKNOWN = "TASK_UNKNOWN"

PARTITION_AWARE = "PARTITION_AWARE"

SOURCE_MASTER = "SOURCE_MASTER"
SOURCE_AGENT = "SOURCE_AGENT"
SOURCE_EXECUTOR = "SOURCE_EXECUTOR"

# Mesos's TaskStatus.Reason values that corral sends.
REASON_TASK_INVALID = "REASON_TASK_INVALID"
REASON_INVALID_OFFERS = "REASON_INVALID_OFFERS"
REASON_RECONCILIATION = "REASON_RECONCILIATION"
REASON_AGENT_REMOVED = "REASON_AGENT_REMOVED"
REASON_AGENT_UNREACHABLE = "REASON_AGENT_UNREACHABLE"
REASON_COMMAND_EXECUTOR_FAILED = "REASON_COMMAND_EXECUTOR_FAILED"
REASON_FRAMEWORK_REMOVED = "REASON_FRAMEWORK_REMOVED"
REASON_MEMORY_LIMIT = "REASON_CONTAINER_LIMITATION_MEMORY"
REASON_EXECUTOR_TERMINATED = "REASON_EXECUTOR_TERMINATED"

# Task ids become part of store keys and sandbox folder names.
_TASK_ID = re.compile(r"[A-Za-z0-9_.:@+-]{1,200}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ProtocolError(ValueError):
    """A call or a field that does not follow the v1 scheduler API. The message names the field."""


# --- Small readers ------------------------------------------------------------------


def read_object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"invalid '{path}': expected a JSON object, got {_type_name(value)}")
    return value


def read_list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise ProtocolError(f"invalid '{path}': expected a JSON list, got {_type_name(value)}")
    return value


def read_id(value: Any, path: str) -> str:
    """Read an id message such as {"value": "abc"}."""
    message = read_object(value, path)
    text = message.get("value")
    if not isinstance(text, str) or not text:
        raise ProtocolError(f"invalid '{path}.value': expected a non-empty string, got {text!r}")
    return text


def read_number(value: Any, path: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"invalid '{path}': expected a number, got {value!r}")
    if value < minimum:
        raise ProtocolError(f"invalid '{path}': expected a number >= {minimum:g}, got {value!r}")
    return float(value)


def id_message(value: str) -> dict[str, str]:
    return {"value": value}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --- Resources ----------------------------------------------------------------------


def resources_to_json(resources: Resources, reserved: Resources | None = None, role: str = "") -> list[dict]:
    """Render unreserved resources, and resources statically reserved for `role`, as Mesos's Resource list."""
    result = _resource_list(resources, None)
    if reserved is not None and reserved:
        result += _resource_list(reserved, role)
    return result


def _resource_list(resources: Resources, reserved_for: str | None) -> list[dict]:
    items: list[dict] = []
    for name, amount in (("cpus", resources.cpus), ("mem", resources.mem), ("disk", resources.disk)):
        if amount > 0:
            items.append({"name": name, "type": "SCALAR", "scalar": {"value": amount}})
    if resources.ports:
        ranges = [{"begin": begin, "end": end} for begin, end in resources.ports]
        items.append({"name": "ports", "type": "RANGES", "ranges": {"range": ranges}})
    if reserved_for is not None:
        for item in items:
            item["reservations"] = [{"type": "STATIC", "role": reserved_for}]
    return items


def resources_from_json(value: Any, path: str) -> Resources:
    """Parse a Resource list with cpus, mem, disk and ports. Other names raise ProtocolError."""
    cpus = mem = disk = 0.0
    ports: list[tuple[int, int]] = []
    for index, item in enumerate(read_list(value, path)):
        item_path = f"{path}[{index}]"
        resource = read_object(item, item_path)
        name = resource.get("name")
        if name in ("cpus", "mem", "disk"):
            scalar = read_object(resource.get("scalar"), f"{item_path}.scalar")
            amount = read_number(scalar.get("value"), f"{item_path}.scalar.value")
            if name == "cpus":
                cpus += amount
            elif name == "mem":
                mem += amount
            else:
                disk += amount
        elif name == "ports":
            ranges = read_object(resource.get("ranges"), f"{item_path}.ranges")
            for number, span in enumerate(read_list(ranges.get("range"), f"{item_path}.ranges.range")):
                span_path = f"{item_path}.ranges.range[{number}]"
                bounds = read_object(span, span_path)
                begin, end = bounds.get("begin"), bounds.get("end")
                if not (_is_port(begin) and _is_port(end) and begin <= end):
                    raise ProtocolError(
                        f"invalid '{span_path}': expected 0 <= begin <= end <= 65535, got {begin!r}-{end!r}"
                    )
                ports.append((begin, end))
        else:
            raise ProtocolError(
                f"invalid '{item_path}.name' {name!r}: expected cpus, mem, disk or ports"
            )
    return Resources(cpus=cpus, mem=mem, disk=disk, ports=ports)


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535


def resources_summary(resources: Resources) -> dict[str, float]:
    """Return cpus, mem, disk and the number of ports, as the operator endpoints list them."""
    return {"cpus": resources.cpus, "mem": resources.mem, "disk": resources.disk, "ports": resources.port_count}


# --- Offers ---------------------------------------------------------------------------


def offer_to_json(offer: Offer, hostname: str) -> dict[str, Any]:
    attributes = []
    for name, value in sorted(offer.attributes.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attributes.append({"name": name, "type": "SCALAR", "scalar": {"value": value}})
        else:
            attributes.append({"name": name, "type": "TEXT", "text": {"value": str(value)}})
    return {
        "id": id_message(offer.id),
        "framework_id": id_message(offer.framework_id),
        "agent_id": id_message(offer.agent_id),
        "hostname": hostname,
        "resources": resources_to_json(offer.resources, offer.reserved, offer.role),
        "attributes": attributes,
    }


# --- Tasks ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ExecutorSpec:
    """A custom executor, read from a TaskInfo's ExecutorInfo."""

    executor_id: str
    name: str
    command: dict[str, Any]
    env: dict[str, str]
    resources: Resources
    # The ExecutorInfo as the framework sent it, for the executor's SUBSCRIBED event.
    raw: dict[str, Any]


@dataclass(slots=True)
class TaskInfo:
    """A task to launch, read from a LAUNCH operation's TaskInfo.

    A task has either a `command`, run by corral's own per-task executor, or
    an `executor` (with `command` empty) that receives the task in a LAUNCH
    event together with `data`, the base64 text of TaskInfo.data.
    """

    task_id: str
    name: str
    agent_id: str
    resources: Resources
    command: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    kill_grace_seconds: float | None = None
    executor: ExecutorSpec | None = None
    data: str = ""
    # Set by the master when this task's launch starts its executor, whose resources the task then uses too.
    starts_executor: bool = False

    @property
    def held_resources(self) -> Resources:
        """The resources the task holds: its own, plus its executor's when its launch starts the executor."""
        if self.executor is not None and self.starts_executor:
            return self.resources + self.executor.resources
        return self.resources


def parse_task_info(value: Any, path: str) -> TaskInfo:
    """Validate one TaskInfo, raising ProtocolError that names the first invalid field.

    A task names exactly one of a CommandInfo (`command`) and an ExecutorInfo
    (`executor`), as in Mesos. Containers are not supported.
    """
    info = read_object(value, path)
    task_id = read_id(info.get("task_id"), f"{path}.task_id")
    if not _TASK_ID.fullmatch(task_id):
        raise ProtocolError(
            f"invalid '{path}.task_id.value' {task_id!r}: expected 1-200 letters, digits and _.:@+-"
        )
    name = info.get("name", "")
    if not isinstance(name, str):
        raise ProtocolError(f"invalid '{path}.name': expected a string, got {_type_name(name)}")
    agent_id = read_id(info.get("agent_id"), f"{path}.agent_id")
    resources = resources_from_json(info.get("resources", []), f"{path}.resources")
    if resources.cpus <= 0 and resources.mem <= 0:
        raise ProtocolError(f"invalid '{path}.resources': a task needs cpus or mem")
    if "container" in info:
        raise ProtocolError(f"invalid '{path}.container': containers are not supported; give a command")
    executor = None
    data = ""
    if info.get("executor") is not None:
        if info.get("command") is not None:
            raise ProtocolError(f"invalid '{path}': a task needs a command or an executor, not both")
        executor = parse_executor_info(info["executor"], f"{path}.executor")
        command: dict[str, Any] = {}
        env: dict[str, str] = {}
        data = read_base64(info.get("data", ""), f"{path}.data")
    else:
        command, env = _parse_command(info.get("command"), f"{path}.command")
    grace = None
    policy = info.get("kill_policy")
    if policy is not None:
        period = read_object(read_object(policy, f"{path}.kill_policy").get("grace_period"),
                             f"{path}.kill_policy.grace_period")
        grace = read_number(period.get("nanoseconds"), f"{path}.kill_policy.grace_period.nanoseconds") / 1e9
    return TaskInfo(task_id, name or task_id, agent_id, resources, command, env, grace, executor, data)


def parse_executor_info(value: Any, path: str) -> ExecutorSpec:
    """Validate an ExecutorInfo of a custom executor, raising ProtocolError that names the first invalid field."""
    info = read_object(value, path)
    executor_id = read_id(info.get("executor_id"), f"{path}.executor_id")
    if not _TASK_ID.fullmatch(executor_id):
        raise ProtocolError(
            f"invalid '{path}.executor_id.value' {executor_id!r}: expected 1-200 letters, digits and _.:@+-"
        )
    kind = info.get("type", "CUSTOM")
    if kind != "CUSTOM":
        raise ProtocolError(f"invalid '{path}.type' {kind!r}: only CUSTOM executors are supported")
    if "container" in info:
        raise ProtocolError(f"invalid '{path}.container': containers are not supported")
    name = info.get("name", "")
    if not isinstance(name, str):
        raise ProtocolError(f"invalid '{path}.name': expected a string, got {_type_name(name)}")
    command, env = _parse_command(info.get("command"), f"{path}.command")
    resources = resources_from_json(info.get("resources", []), f"{path}.resources")
    if resources.ports:
        raise ProtocolError(f"invalid '{path}.resources': ports for an executor are not supported")
    return ExecutorSpec(executor_id, name or executor_id, command, env, resources, info)


def read_base64(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"invalid '{path}': expected base64 text, got {_type_name(value)}")
    try:
        base64.b64decode(value, validate=True)
    except ValueError:
        raise ProtocolError(f"invalid '{path}': {value[:40]!r} is not valid base64") from None
    return value


def _parse_command(value: Any, path: str) -> tuple[dict[str, Any], dict[str, str]]:
    if value is None:
        raise ProtocolError(f"missing '{path}': a task needs a CommandInfo")
    command = read_object(value, path)
    shell = command.get("shell", True)
    if not isinstance(shell, bool):
        raise ProtocolError(f"invalid '{path}.shell': expected true or false, got {shell!r}")
    text = command.get("value")
    if not isinstance(text, str) or not text:
        raise ProtocolError(f"invalid '{path}.value': expected a non-empty command, got {text!r}")
    parsed: dict[str, Any] = {"shell": shell, "value": text}
    if not shell:
        arguments = read_list(command.get("arguments", []), f"{path}.arguments")
        if not all(isinstance(argument, str) for argument in arguments):
            raise ProtocolError(f"invalid '{path}.arguments': expected a list of strings")
        parsed["arguments"] = list(arguments)
    env: dict[str, str] = {}
    environment = command.get("environment")
    if environment is not None:
        variables = read_list(read_object(environment, f"{path}.environment").get("variables", []),
                              f"{path}.environment.variables")
        for index, item in enumerate(variables):
            item_path = f"{path}.environment.variables[{index}]"
            variable = read_object(item, item_path)
            name, text = variable.get("name"), variable.get("value", "")
            if variable.get("type", "VALUE") != "VALUE":
                raise ProtocolError(f"invalid '{item_path}.type': only VALUE variables are supported")
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise ProtocolError(f"invalid '{item_path}.name' {name!r}: expected an environment variable name")
            if not isinstance(text, str):
                raise ProtocolError(f"invalid '{item_path}.value': expected a string")
            env[name] = text
    return parsed, env


def argv_of(command: Mapping[str, Any]) -> list[str]:
    """Return the program and arguments of a parsed CommandInfo. A shell command runs under /bin/sh -c."""
    if command.get("shell", True):
        return ["/bin/sh", "-c", command["value"]]
    arguments = list(command.get("arguments", []))
    # Mesos passes `arguments` as the whole argv, program name included, when shell is false.
    return [command["value"], *arguments[1:]] if arguments else [command["value"]]


# --- Task statuses -------------------------------------------------------------------------


def task_status(
    task_id: str,
    state: str,
    *,
    agent_id: str = "",
    source: str = SOURCE_MASTER,
    reason: str = "",
    message: str = "",
    with_uuid: bool = False,
    now: float | None = None,
    executor_id: str = "",
) -> dict[str, Any]:
    """Build a TaskStatus. The framework must acknowledge a status built `with_uuid`."""
    status: dict[str, Any] = {
        "task_id": id_message(task_id),
        "state": state,
        "source": source,
        "timestamp": time.time() if now is None else now,
    }
    if agent_id:
        status["agent_id"] = id_message(agent_id)
    if executor_id:
        status["executor_id"] = id_message(executor_id)
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    if with_uuid:
        status["uuid"] = base64.b64encode(uuid.uuid4().bytes).decode()
    return status


def state_name(state: TaskState) -> str:
    return "TASK_" + state.value


# --- Events -----------------------------------------------------------------------------------


def subscribed_event(framework_id: str, heartbeat_interval: float, master_info: dict[str, Any]) -> dict:
    return {
        "type": "SUBSCRIBED",
        "subscribed": {
            "framework_id": id_message(framework_id),
            "heartbeat_interval_seconds": heartbeat_interval,
            "master_info": master_info,
        },
    }


def offers_event(offers: list[dict]) -> dict:
    return {"type": "OFFERS", "offers": {"offers": offers}}


def rescind_event(offer_id: str) -> dict:
    return {"type": "RESCIND", "rescind": {"offer_id": id_message(offer_id)}}


def update_event(status: dict[str, Any]) -> dict:
    return {"type": "UPDATE", "update": {"status": status}}


def failure_event(agent_id: str) -> dict:
    return {"type": "FAILURE", "failure": {"agent_id": id_message(agent_id)}}


def executor_failure_event(agent_id: str, executor_id: str, status: int | None) -> dict:
    """Build the FAILURE event of an executor that exited. `status` is its wait status when known."""
    failure: dict[str, Any] = {"agent_id": id_message(agent_id), "executor_id": id_message(executor_id)}
    if status is not None:
        failure["status"] = status
    return {"type": "FAILURE", "failure": failure}


def message_event(agent_id: str, executor_id: str, data: str) -> dict:
    """Build the MESSAGE event of an executor's message to its framework. `data` is base64."""
    return {"type": "MESSAGE", "message": {"agent_id": id_message(agent_id),
                                           "executor_id": id_message(executor_id), "data": data}}


def error_event(message: str) -> dict:
    return {"type": "ERROR", "error": {"message": message}}


HEARTBEAT_EVENT = {"type": "HEARTBEAT"}
