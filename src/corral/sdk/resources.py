"""Offers, resources and TaskInfo in Mesos's v1 JSON, without writing the JSON by hand.

Mesos wraps every id in an object (`{"value": "..."}`) and describes each
resource as a typed entry: `cpus`, `mem` and `disk` are SCALAR (mem and disk
in MB), `ports` is RANGES with inclusive bounds. An entry may also carry a
role, reservations or an `allocation_info`, and a TaskInfo must echo those
fields for the resources it takes from an offer, so `Offer.allocate` copies
an entry and changes only its amount.
"""

from __future__ import annotations

import copy
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Scalar amounts are compared with this tolerance, as Mesos stores scalars
# with three decimal digits (0.001) of precision.
_EPSILON = 0.0005


class InsufficientResources(ValueError):
    """An offer does not have the resources that an allocation requests."""


def id_value(value: str | Mapping[str, Any]) -> str:
    """Return the string of an id given either as a string or as Mesos's `{"value": ...}`."""
    if isinstance(value, str):
        if not value:
            raise ValueError("an id must be a non-empty string")
        return value
    if isinstance(value, Mapping) and isinstance(value.get("value"), str) and value["value"]:
        return value["value"]
    raise ValueError(f"invalid id {value!r}: expected a non-empty string or {{'value': '...'}}")


def id_json(value: str | Mapping[str, Any]) -> dict[str, str]:
    """Return an id as Mesos's JSON object `{"value": ...}`."""
    return {"value": id_value(value)}


def scalar(name: str, value: float, role: str | None = None) -> dict[str, Any]:
    """Build a SCALAR resource entry, such as `scalar("cpus", 0.5)`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid amount {value!r} for resource {name!r}: expected a finite number of 0 or more")
    resource: dict[str, Any] = {"name": name, "type": "SCALAR", "scalar": {"value": float(value)}}
    if role is not None:
        resource["role"] = role
    return resource


def ranges(name: str, spans: Iterable[tuple[int, int]], role: str | None = None) -> dict[str, Any]:
    """Build a RANGES resource entry from inclusive `(begin, end)` pairs, such as ports."""
    entries = []
    for begin, end in spans:
        if not (isinstance(begin, int) and isinstance(end, int)) or begin < 0 or end < begin:
            raise ValueError(f"invalid range {begin!r}-{end!r} for resource {name!r}: expected 0 <= begin <= end")
        entries.append({"begin": begin, "end": end})
    resource: dict[str, Any] = {"name": name, "type": "RANGES", "ranges": {"range": entries}}
    if role is not None:
        resource["role"] = role
    return resource


def scalar_total(resources: Iterable[Mapping[str, Any]], name: str) -> float:
    """Return the sum of the SCALAR entries named `name`, 0.0 when there are none."""
    return sum(
        float(resource.get("scalar", {}).get("value", 0.0))
        for resource in resources
        if resource.get("name") == name and resource.get("type", "SCALAR") == "SCALAR"
    )


def range_list(resources: Iterable[Mapping[str, Any]], name: str) -> list[tuple[int, int]]:
    """Return the inclusive `(begin, end)` ranges of the RANGES entries named `name`, sorted."""
    found = []
    for resource in resources:
        if resource.get("name") == name and resource.get("type") == "RANGES":
            for span in resource.get("ranges", {}).get("range", []):
                found.append((int(span["begin"]), int(span["end"])))
    return sorted(found)


def _range_count(spans: Iterable[tuple[int, int]]) -> int:
    return sum(end - begin + 1 for begin, end in spans)


class Offer:
    """One offer of an agent's resources, with what is left of it after `allocate` calls.

    `raw` is the offer's JSON as the master sent it. The resource properties
    (`cpus`, `mem`, `disk`, `ports`) report what remains unallocated, so a
    scheduler can place several tasks on one offer and then decline it only
    if nothing was used.
    """

    def __init__(self, raw: Mapping[str, Any]):
        self.raw = raw
        self.id = id_value(raw["id"])
        self.agent_id = id_value(raw["agent_id"])
        self.framework_id = id_value(raw["framework_id"]) if "framework_id" in raw else None
        self.hostname: str = raw.get("hostname", "")
        self.attributes = _attributes(raw.get("attributes", []))
        self._remaining: list[dict[str, Any]] = copy.deepcopy(list(raw.get("resources", [])))
        self.used = False

    def __repr__(self) -> str:
        return (
            f"Offer(id={self.id!r}, agent_id={self.agent_id!r}, hostname={self.hostname!r}, "
            f"cpus={self.cpus:g}, mem={self.mem:g}, disk={self.disk:g}, ports={self.ports!r})"
        )

    @property
    def resources(self) -> list[dict[str, Any]]:
        """The remaining resource entries, in the offer's JSON form."""
        return copy.deepcopy(self._remaining)

    @property
    def cpus(self) -> float:
        return scalar_total(self._remaining, "cpus")

    @property
    def mem(self) -> float:
        """Remaining memory in MB."""
        return scalar_total(self._remaining, "mem")

    @property
    def disk(self) -> float:
        """Remaining disk in MB."""
        return scalar_total(self._remaining, "disk")

    @property
    def ports(self) -> list[tuple[int, int]]:
        """Remaining ports as inclusive `(begin, end)` ranges."""
        return range_list(self._remaining, "ports")

    def fits(self, cpus: float = 0.0, mem: float = 0.0, disk: float = 0.0, ports: int = 0) -> bool:
        """Return whether the remaining resources cover the given amounts (mem and disk in MB)."""
        return (
            self.cpus + _EPSILON >= cpus
            and self.mem + _EPSILON >= mem
            and self.disk + _EPSILON >= disk
            and _range_count(self.ports) >= ports
        )

    def allocate(
        self, cpus: float = 0.0, mem: float = 0.0, disk: float = 0.0, ports: int | Sequence[int] = 0
    ) -> list[dict[str, Any]]:
        """Take resources from the offer and return them as entries for a TaskInfo.

        `ports` is a count of ports to take from the lowest free ones, or a
        list of specific port numbers. Raise InsufficientResources, and take
        nothing, when the remaining resources do not cover the request.
        """
        wanted_ports = list(ports) if not isinstance(ports, int) else None
        port_count = len(wanted_ports) if wanted_ports is not None else ports
        for name, amount in (("cpus", cpus), ("mem", mem), ("disk", disk), ("ports", port_count)):
            if not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount < 0:
                raise ValueError(f"invalid {name} amount {amount!r}: expected a finite number of 0 or more")
        if not self.fits(cpus, mem, disk, port_count):
            raise InsufficientResources(
                f"offer {self.id} on agent {self.agent_id} has cpus={self.cpus:g} mem={self.mem:g} "
                f"disk={self.disk:g} ports={_range_count(self.ports)} left, but the request is "
                f"cpus={cpus:g} mem={mem:g} disk={disk:g} ports={port_count}"
            )
        remaining = copy.deepcopy(self._remaining)
        taken: list[dict[str, Any]] = []
        for name, amount in (("cpus", cpus), ("mem", mem), ("disk", disk)):
            if amount > 0:
                taken.extend(_take_scalar(remaining, name, amount))
        if wanted_ports is not None:
            if wanted_ports:
                taken.extend(_take_ports(remaining, wanted_ports, self.id))
        elif port_count:
            taken.extend(_take_ports(remaining, _lowest_ports(remaining, port_count), self.id))
        self._remaining = [resource for resource in remaining if not _is_empty(resource)]
        self.used = True
        return taken

    def task(
        self,
        name: str,
        command: str | Sequence[str],
        cpus: float,
        mem: float,
        disk: float = 0.0,
        ports: int | Sequence[int] = 0,
        **options: Any,
    ) -> dict[str, Any]:
        """Allocate resources from this offer and return a TaskInfo that uses them.

        `options` go to `task_info` (task_id, env, labels, kill_grace_seconds).
        Raise InsufficientResources when the offer cannot cover the task.
        """
        resources = self.allocate(cpus=cpus, mem=mem, disk=disk, ports=ports)
        return task_info(name, self.agent_id, resources, command, **options)


def _attributes(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for entry in entries:
        kind = entry.get("type")
        if kind == "TEXT":
            found[entry["name"]] = entry.get("text", {}).get("value", "")
        elif kind == "SCALAR":
            found[entry["name"]] = float(entry.get("scalar", {}).get("value", 0.0))
        elif kind == "RANGES":
            found[entry["name"]] = range_list([dict(entry, name="_")], "_")
        elif kind == "SET":
            found[entry["name"]] = list(entry.get("set", {}).get("item", []))
    return found


def _is_empty(resource: Mapping[str, Any]) -> bool:
    if resource.get("type") == "RANGES":
        return not resource.get("ranges", {}).get("range")
    if resource.get("type", "SCALAR") == "SCALAR":
        return float(resource.get("scalar", {}).get("value", 0.0)) <= _EPSILON
    return False


def _take_scalar(remaining: list[dict[str, Any]], name: str, amount: float) -> list[dict[str, Any]]:
    """Subtract `amount` from the entries named `name`, and return what was taken, entry by entry."""
    taken = []
    for resource in remaining:
        if amount <= _EPSILON:
            break
        if resource.get("name") != name or resource.get("type", "SCALAR") != "SCALAR":
            continue
        available = float(resource["scalar"]["value"])
        part = min(available, amount)
        if part <= 0:
            continue
        piece = copy.deepcopy(resource)
        piece["scalar"] = {"value": round(part, 3)}
        taken.append(piece)
        resource["scalar"] = {"value": round(available - part, 3)}
        amount -= part
    return taken


def _lowest_ports(remaining: list[dict[str, Any]], count: int) -> list[int]:
    chosen: list[int] = []
    for begin, end in range_list(remaining, "ports"):
        for port in range(begin, end + 1):
            if len(chosen) == count:
                return chosen
            chosen.append(port)
    return chosen


def _take_ports(remaining: list[dict[str, Any]], wanted: list[int], offer_id: str) -> list[dict[str, Any]]:
    """Remove `wanted` ports from the RANGES entries that hold them; return one entry per source entry."""
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"ports {wanted} name a port twice")
    left = set(wanted)
    taken = []
    for resource in remaining:
        if resource.get("name") != "ports" or resource.get("type") != "RANGES" or not left:
            continue
        spans = [(int(span["begin"]), int(span["end"])) for span in resource["ranges"]["range"]]
        mine = sorted(port for port in left if any(begin <= port <= end for begin, end in spans))
        if not mine:
            continue
        left -= set(mine)
        piece = copy.deepcopy(resource)
        piece["ranges"] = {"range": [{"begin": b, "end": e} for b, e in _to_spans(mine)]}
        taken.append(piece)
        resource["ranges"] = {"range": [{"begin": b, "end": e} for b, e in _subtract(spans, set(mine))]}
    if left:
        raise InsufficientResources(f"offer {offer_id} does not hold ports {sorted(left)}")
    return taken


def _to_spans(ports: list[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for port in ports:
        if spans and spans[-1][1] == port - 1:
            spans[-1] = (spans[-1][0], port)
        else:
            spans.append((port, port))
    return spans


def _subtract(spans: list[tuple[int, int]], ports: set[int]) -> list[tuple[int, int]]:
    result = []
    for begin, end in spans:
        start = begin
        for port in sorted(port for port in ports if begin <= port <= end):
            if port > start:
                result.append((start, port - 1))
            start = port + 1
        if start <= end:
            result.append((start, end))
    return result


def task_info(
    name: str,
    agent_id: str | Mapping[str, Any],
    resources: Sequence[Mapping[str, Any]],
    command: str | Sequence[str],
    *,
    task_id: str | None = None,
    env: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    kill_grace_seconds: float | None = None,
) -> dict[str, Any]:
    """Build a TaskInfo for a LAUNCH operation, run by the agent's command executor.

    `command` as a string runs through `/bin/sh -c` (Mesos's `shell: true`);
    as a list it runs directly, the first item being the program. `task_id`
    defaults to `name` and a random suffix, unique across the framework.
    """
    if not name:
        raise ValueError("a task name must be a non-empty string")
    if isinstance(command, str):
        if not command.strip():
            raise ValueError(f"task {name!r}: the shell command is empty")
        command_info: dict[str, Any] = {"shell": True, "value": command}
    else:
        argv = list(command)
        if not argv or not all(isinstance(part, str) for part in argv):
            raise ValueError(f"task {name!r}: invalid command {command!r}: expected a string or a non-empty list of strings")
        command_info = {"shell": False, "value": argv[0], "arguments": argv}
    if env:
        command_info["environment"] = {"variables": [{"name": key, "value": str(value)} for key, value in env.items()]}
    info: dict[str, Any] = {
        "name": name,
        "task_id": {"value": task_id or f"{name}-{uuid.uuid4().hex[:12]}"},
        "agent_id": id_json(agent_id),
        "resources": [dict(resource) for resource in resources],
        "command": command_info,
    }
    if labels:
        info["labels"] = {"labels": [{"key": key, "value": str(value)} for key, value in labels.items()]}
    if kill_grace_seconds is not None:
        if not math.isfinite(kill_grace_seconds) or kill_grace_seconds < 0:
            raise ValueError(f"task {name!r}: invalid kill_grace_seconds {kill_grace_seconds!r}: expected 0 or more")
        info["kill_policy"] = {"grace_period": {"nanoseconds": int(kill_grace_seconds * 1e9)}}
    return info
