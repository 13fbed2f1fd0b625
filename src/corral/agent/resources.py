"""The resources an agent offers: CPUs, memory, disk and port ranges, some of them reserved for roles.

`parse_resources` and `parse_attributes` read the agent flags in Mesos's
syntax. A resource named with a role in parentheses, such as
`cpus(analytics):2`, is statically reserved for that role: the master
offers it only to the role's frameworks. `cpus(*):4` is the same as
`cpus:4`, unreserved.
"""

from __future__ import annotations

import errno
import random
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

MIB = 1024 * 1024

# The default range ends below 32768, where Linux's ephemeral range starts by default.
DEFAULT_PORT_RANGE = (20000, 32000)

EPHEMERAL_PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")

PortRange = tuple[int, int]


class PortsExhausted(Exception):
    """Raised when the port ranges do not have enough free ports for a request."""


def _port_range_problem(start: int, end: int) -> str | None:
    """Return why start-end is not a valid inclusive port range, or None if it is."""
    if not (1 <= start <= 65535 and 1 <= end <= 65535):
        return "ports must be within 1-65535"
    if start > end:
        return f"start {start} is greater than end {end}"
    return None


def validate_port_range(port_range: PortRange) -> PortRange:
    """Return port_range as a tuple of ints, or raise ValueError naming it."""
    try:
        start, end = (int(port) for port in port_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"invalid port range {port_range!r}: expected a pair of ports such as (20000, 32000)"
        ) from None
    problem = _port_range_problem(start, end)
    if problem is not None:
        raise ValueError(f"invalid port range {start}-{end}: {problem}")
    return (start, end)


def parse_port_range(text: str) -> PortRange:
    """Parse an inclusive range such as "20000-32000", or raise ValueError naming the text."""
    start_text, dash, end_text = text.strip().partition("-")
    start_text, end_text = start_text.strip(), end_text.strip()
    if not dash or not start_text.isdigit() or not end_text.isdigit():
        raise ValueError(f"invalid port range {text!r}: expected START-END, e.g. 20000-32000")
    start, end = int(start_text), int(end_text)
    problem = _port_range_problem(start, end)
    if problem is not None:
        raise ValueError(f"invalid port range {text!r}: {problem}")
    return (start, end)


def format_port_ranges(ranges: Iterable[PortRange]) -> str:
    return ", ".join(f"{start}-{end}" for start, end in ranges)


@dataclass(frozen=True)
class Reservation:
    """Resources of an agent statically reserved for one role."""

    cpus: float = 0.0
    memory: int = 0  # MB
    disk: int = 0  # MB
    ports: tuple[PortRange, ...] = ()  # inclusive ranges

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "memory": self.memory,
            "disk": self.disk,
            "port_ranges": [[start, end] for start, end in self.ports],
        }


@dataclass(frozen=True)
class AgentResources:
    """The totals an agent offers to the master: unreserved amounts, and reservations by role."""

    cpus: float
    memory: int  # MB
    disk: int  # MB free on the filesystem of the agent's data directory
    ports: tuple[PortRange, ...]  # inclusive ranges
    reserved: Mapping[str, Reservation] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "memory": self.memory,
            "disk": self.disk,
            "ports": [[start, end] for start, end in self.ports],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentResources:
        """Build resources from to_dict's output, raising ValueError naming a bad field."""
        for field in ("cpus", "memory", "disk", "ports"):
            if field not in data:
                raise ValueError(f"invalid agent resources: missing field {field!r}")
        try:
            cpus = float(data["cpus"])
            memory = int(data["memory"])
            disk = int(data["disk"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid agent resources {dict(data)!r}: {exc}") from None
        if cpus < 0 or memory < 0 or disk < 0:
            raise ValueError(f"invalid agent resources {dict(data)!r}: values must not be negative")
        if isinstance(data["ports"], (str, bytes)):
            raise ValueError(f"invalid agent resources: ports {data['ports']!r} is not a list")
        ports = tuple(validate_port_range(tuple(item)) for item in data["ports"])
        return cls(cpus=cpus, memory=memory, disk=disk, ports=ports)


# --- Mesos's flag syntax: --resources and --attributes -----------------------------

_RESOURCE_NAMES = ("cpus", "mem", "disk", "ports")
_RANGE = re.compile(r"\[(.*)\]")
# NAME or NAME(ROLE), as in cpus(analytics).
_RESOURCE_NAME = re.compile(r"([a-z]+)(?:\((.*)\))?")
UNRESERVED_ROLE = "*"


@dataclass(frozen=True)
class ResourceSpec:
    """Resources given with --resources.

    The unreserved amounts are None where the flag does not name that kind
    of resource at all, so that the agent detects it. As in Mesos, a kind
    that is named only with a role (`cpus(analytics):2`) is not detected,
    and its unreserved amount is 0.
    """

    cpus: float | None = None
    memory: int | None = None  # MB
    disk: int | None = None  # MB
    ports: tuple[PortRange, ...] | None = None
    reserved: Mapping[str, Reservation] = field(default_factory=dict)

    def apply(self, detected: AgentResources) -> AgentResources:
        named = {kind for reservation in self.reserved.values() for kind in _named_kinds(reservation)}
        return AgentResources(
            cpus=_pick(self.cpus, "cpus" in named, detected.cpus, 0.0),
            memory=_pick(self.memory, "mem" in named, detected.memory, 0),
            disk=_pick(self.disk, "disk" in named, detected.disk, 0),
            ports=self.ports if self.ports is not None else detected.ports,
            reserved=dict(self.reserved),
        )


def _named_kinds(reservation: Reservation) -> set[str]:
    kinds = set()
    if reservation.cpus:
        kinds.add("cpus")
    if reservation.memory:
        kinds.add("mem")
    if reservation.disk:
        kinds.add("disk")
    return kinds


def _pick(given, reserved_only: bool, detected, zero):
    if given is not None:
        return given
    return zero if reserved_only else detected


def parse_resources(text: str) -> ResourceSpec:
    """Parse Mesos's --resources syntax, such as 'cpus:4;cpus(analytics):2;mem:8192;ports:[31000-32000]'.

    Raises ValueError naming the part that is invalid. Resources other than
    cpus, mem, disk and ports are not supported. Reserved ports need
    unreserved ports beside them, because the agent picks the ports of job
    tasks from the unreserved ranges.
    """
    values: dict[str, dict[str, Any]] = {}
    for part in _parts(text, "--resources"):
        name, value = _split_part(part, "--resources")
        kind, role = _resource_name(part, name)
        given = values.setdefault(role, {})
        if kind in given:
            where = "" if role == UNRESERVED_ROLE else f" for role {role!r}"
            raise ValueError(f"invalid --resources part {part!r}: {kind}{where} is given twice")
        given[kind] = _ports(part, value) if kind == "ports" else _scalar(part, kind, value)
    unreserved = values.pop(UNRESERVED_ROLE, {})
    reserved = {role: _reservation(given) for role, given in sorted(values.items())}
    if "ports" not in unreserved and any(reservation.ports for reservation in reserved.values()):
        raise ValueError(
            f"invalid --resources {text!r}: ports are reserved for a role but no unreserved ports are given; "
            "add unreserved ports such as ports:[31000-32000]"
        )
    spec = ResourceSpec(
        cpus=unreserved.get("cpus"),
        memory=_whole(unreserved["mem"]) if "mem" in unreserved else None,
        disk=_whole(unreserved["disk"]) if "disk" in unreserved else None,
        ports=unreserved.get("ports"),
        reserved=reserved,
    )
    _check_port_overlap(text, spec)
    return spec


def _resource_name(part: str, name: str) -> tuple[str, str]:
    match = _RESOURCE_NAME.fullmatch(name)
    kind = match.group(1) if match is not None else name
    if kind not in _RESOURCE_NAMES:
        raise ValueError(
            f"invalid --resources part {part!r}: unknown resource {name!r}; expected one of "
            + ", ".join(_RESOURCE_NAMES) + ", optionally with a role in parentheses such as cpus(analytics)"
        )
    assert match is not None
    role = match.group(2)
    if role is None:
        return kind, UNRESERVED_ROLE
    problem = role_name_problem(role)
    if problem is not None:
        raise ValueError(f"invalid --resources part {part!r}: role {role!r} {problem}")
    return kind, role


def role_name_problem(role: str) -> str | None:
    """Return why `role` is not a valid Mesos role name, or None when it is."""
    if not role or role in (".", ".."):
        return "is empty, '.' or '..'"
    if role.startswith("-"):
        return "starts with '-'"
    if "/" in role or any(character.isspace() for character in role):
        return "contains '/' or whitespace"
    return None


def _reservation(given: Mapping[str, Any]) -> Reservation:
    return Reservation(
        cpus=given.get("cpus", 0.0),
        memory=_whole(given["mem"]) if "mem" in given else 0,
        disk=_whole(given["disk"]) if "disk" in given else 0,
        ports=given.get("ports", ()),
    )


def _check_port_overlap(text: str, spec: ResourceSpec) -> None:
    owners: list[tuple[PortRange, str]] = [(span, "unreserved") for span in spec.ports or ()]
    for role, reservation in spec.reserved.items():
        owners += [(span, f"role {role!r}") for span in reservation.ports]
    owners.sort()
    for (first, first_owner), (second, second_owner) in zip(owners, owners[1:]):
        if second[0] <= first[1]:
            raise ValueError(
                f"invalid --resources {text!r}: ports {format_port_ranges([first])} ({first_owner}) and "
                f"{format_port_ranges([second])} ({second_owner}) overlap; each port belongs to one role"
            )


def parse_attributes(text: str) -> dict[str, str]:
    """Parse Mesos's --attributes syntax, such as 'rack:r1;zone:a', into names and text values.

    Raises ValueError naming the part that is invalid.
    """
    attributes: dict[str, str] = {}
    for part in _parts(text, "--attributes"):
        name, value = _split_part(part, "--attributes")
        if name in attributes:
            raise ValueError(f"invalid --attributes part {part!r}: {name} is given twice")
        attributes[name] = value
    return attributes


def _parts(text: str, flag: str) -> list[str]:
    parts = [part.strip() for part in text.split(";")]
    if not any(parts):
        raise ValueError(f"invalid {flag} {text!r}: expected NAME:VALUE pairs separated by ';'")
    # A trailing ';' is harmless; an empty part between two others is a typo worth naming.
    if parts[-1] == "":
        parts.pop()
    for part in parts:
        if not part:
            raise ValueError(f"invalid {flag} {text!r}: empty part between two ';'")
    return parts


def _split_part(part: str, flag: str) -> tuple[str, str]:
    name, colon, value = part.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not name or not value:
        raise ValueError(f"invalid {flag} part {part!r}: expected NAME:VALUE")
    return name, value


def _scalar(part: str, name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"invalid --resources part {part!r}: {name} must be a number") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"invalid --resources part {part!r}: {name} must be more than 0")
    return number


def _whole(value: object) -> int:
    return int(value)  # MB; Mesos keeps 3 decimals, corral counts whole megabytes


def _ports(part: str, value: str) -> tuple[PortRange, ...]:
    match = _RANGE.fullmatch(value)
    if match is None:
        raise ValueError(f"invalid --resources part {part!r}: ports must be ranges in brackets, such as [31000-32000]")
    ranges = []
    for item in match.group(1).split(","):
        start, dash, end = item.strip().partition("-")
        if not dash or not start.strip().isdigit() or not end.strip().isdigit():
            raise ValueError(f"invalid --resources part {part!r}: port range {item.strip()!r} is not START-END")
        try:
            ranges.append(validate_port_range((int(start), int(end))))
        except ValueError as exc:
            raise ValueError(f"invalid --resources part {part!r}: {exc}") from None
    return tuple(ranges)


def _nearest_existing(path: Path) -> Path:
    """Return path or its closest ancestor that exists, so disk space can be read early."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def detect_resources(
    data_dir: Path, port_range: PortRange = DEFAULT_PORT_RANGE
) -> AgentResources:
    """Measure this machine with psutil: logical CPUs, total memory and free disk.

    Disk is the free space on the filesystem of data_dir, or of its nearest
    existing ancestor when data_dir is not created yet.
    """
    # NOTE: this counts every logical CPU and all of the machine's memory, so an
    # agent in a container with a cgroup CPU quota, memory limit or CPU affinity
    # mask offers more than it can use. Pass explicit values in that case.
    cpus = psutil.cpu_count(logical=True) or 1
    memory = psutil.virtual_memory().total // MIB
    disk = psutil.disk_usage(str(_nearest_existing(data_dir))).free // MIB
    return AgentResources(
        cpus=float(cpus),
        memory=memory,
        disk=disk,
        ports=(validate_port_range(port_range),),
    )


def ephemeral_port_overlap(
    ranges: Iterable[PortRange], range_file: Path = EPHEMERAL_PORT_RANGE_FILE
) -> PortRange | None:
    """Return the first part of ranges inside the kernel's ephemeral port range, or None.

    Linux picks source ports for outgoing connections from that range (32768-60999
    by default, read from range_file), so a task port allocated there can already be
    held by a client socket at the moment the task binds it. Returns None when the
    file is missing or unreadable, or when nothing overlaps.
    """
    try:
        fields = range_file.read_text().split()
        low, high = int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return None
    for start, end in sorted(ranges):
        overlap_start, overlap_end = max(start, low), min(end, high)
        if overlap_start <= overlap_end:
            return (overlap_start, overlap_end)
    return None


class PortAllocator:
    """Picks free ports for tasks from the agent's port ranges.

    A port is chosen only if no other task holds it and binding it on host
    succeeds at the time of the check.
    NOTE: the check cannot reserve the port, so another process can take it
    before the task binds. A bind on host also misses a socket that is bound to
    another specific address of this machine with the same port.
    """

    def __init__(
        self,
        ranges: Iterable[PortRange],
        host: str = "127.0.0.1",
        rng: random.Random | None = None,
    ) -> None:
        self.ranges = tuple(validate_port_range(port_range) for port_range in ranges)
        if not self.ranges:
            raise ValueError("port allocator needs at least one port range")
        self.host = host
        self._rng = rng or random.Random()
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def _size(self) -> int:
        return sum(end - start + 1 for start, end in self.ranges)

    def _port_at(self, index: int) -> int:
        """Map an index over the concatenated ranges to a port."""
        for start, end in self.ranges:
            width = end - start + 1
            if index < width:
                return start + index
            index -= width
        raise IndexError(index)

    def is_free(self, port: int) -> bool:
        """Return whether a TCP socket can bind port on host right now."""
        with socket.socket(self._family, socket.SOCK_STREAM) as probe:
            # Off by default on Linux, and set explicitly because with it on, a
            # port with a connection in TIME_WAIT would look free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            try:
                probe.bind((self.host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
                raise
        return True

    def allocate(self, count: int, taken: set[int]) -> list[int]:
        """Return count distinct free ports that are not in taken.

        The scan starts at a random place in the ranges, so agents and tasks
        spread over them. Raises PortsExhausted when fewer than count are free.
        """
        if count < 0:
            raise ValueError(f"port count must not be negative, got {count}")
        chosen: list[int] = []
        if count == 0:
            return chosen
        size = self._size()
        offset = self._rng.randrange(size)
        for step in range(size):
            port = self._port_at((offset + step) % size)
            if port in taken or not self.is_free(port):
                continue
            chosen.append(port)
            if len(chosen) == count:
                return chosen
        raise PortsExhausted(
            f"requested {count} ports but only {len(chosen)} are free "
            f"in port ranges {format_port_ranges(self.ranges)}"
        )
