"""The resources an agent offers: CPUs, memory, disk and port ranges."""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
class AgentResources:
    """The totals an agent offers to the master."""

    cpus: float
    memory: int  # MB
    disk: int  # MB free on the filesystem of the agent's data directory
    ports: tuple[PortRange, ...]  # inclusive ranges

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
