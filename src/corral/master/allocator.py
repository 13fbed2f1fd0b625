"""The resource allocator: weighted DRF offers of agents' resources to frameworks.

This follows the hierarchical allocator of Apache Mesos
(src/master/allocator/mesos/hierarchical.cpp, read at commit 0166d4ba):

- Roles are ordered by weighted dominant share, then the frameworks inside
  each role by their own dominant share (two DRF sorters, see sorter.py).
  Offered resources count as held, as they do in Mesos.
- Each agent with free resources goes to the first framework in that order
  that wants offers and has no filter for the agent. The offer holds
  everything on the agent that the framework's role may use: the role's
  static reservations plus the unreserved resources, cut down to the role's
  quota limit.
- An offer is outstanding until it is accepted (launches use part of it and
  the rest returns), declined (with a refuse filter, 5 seconds by default),
  rescinded, or timed out.
- Quota is a limit. A role's consumption is its static reservations plus the
  unreserved resources offered to or used by its frameworks, and an offer
  never takes it over the limit.

Everything here is a pure function of the calls made: no sockets, no
processes, and no clock. Time comes in as `now` (seconds, monotonic), the
agent order comes from an injected random.Random, and the only timer, used
for the cycle-duration metrics, is injected too.

Performance comes from incremental bookkeeping. The sorters move one client per
change. The allocator keeps the set of agents with allocatable free
resources, and a cycle visits only the agents whose availability changed
since the last cycle or whose filters expired. It visits every free agent
only after an event that can make an agent offerable without touching it: a
framework starting to want offers, or a quota change or release.

One rule goes beyond Mesos, so that no framework starves: a framework that
declines an agent (or lets an offer time out) is passed over on that agent
while another eligible framework has not yet declined it. The agent then
moves down the DRF order instead of going back to the same low-share
framework that keeps declining with a short filter. The marks clear when a
framework launches on the agent, or when every eligible framework has
declined it.

NOTE: DRF decides who gets each offer, not how much of it is used. A
framework that launches on all of every offer it gets, on few large agents,
can end up to one agent's resources above its fair share. Frameworks that
contend from the start, launch a little per offer and accept with
refuse_seconds 0 converge to the weighted shares (tests/test_fairness.py).
A framework that subscribes after another has filled part of the cluster
catches up more slowly, because the offers it holds count toward its share:
with three agents and one task per offer it gained about two tasks per
round of offers to the other's one, and could still be behind when the
cluster filled (33 against 27 tasks where 30 each was fair).
"""

from __future__ import annotations

import enum
import heapq
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from corral.master.sorter import PAYLOAD, ClientRecord, DRFSorter, validate_weight

log = logging.getLogger(__name__)

# Mesos's Filters.refuse_seconds default (include/mesos/v1/mesos.proto).
DEFAULT_REFUSE_SECONDS = 5.0
# Mesos caps refuse_seconds at 365 days and logs a warning.
MAX_REFUSE_SECONDS = 365 * 24 * 3600.0

# Mesos's --min_allocatable_resources default is "cpus:0.01|mem:32": an offer
# must hold at least 0.01 cpus or at least 32 MB of memory.
DEFAULT_MIN_ALLOCATABLE: tuple[Mapping[str, float], ...] = ({"cpus": 0.01}, {"mem": 32})

MAX_PORT = 65535

# Scalars are stored as integers in thousandths, so sums and differences are
# exact. Mesos keeps scalars to three decimal places too.
_SCALE = 1000

PortRanges = tuple[tuple[int, int], ...]


class AllocatorError(Exception):
    """Base class of the allocator's errors."""


class NotFoundError(AllocatorError, LookupError):
    """Raised for an unknown agent, framework or offer id."""


class InvalidRequestError(AllocatorError, ValueError):
    """Raised for a call that does not fit the allocator's state, such as a launch larger than its offer."""


# --- Port ranges ------------------------------------------------------------
#
# A port set is a tuple of inclusive (begin, end) ranges, sorted, disjoint
# and not adjacent, so that equal sets have equal tuples.


def _normalize_ranges(ranges: Iterable[Sequence[int]]) -> PortRanges:
    checked = []
    for item in ranges:
        try:
            begin, end = (int(port) for port in item)
        except (TypeError, ValueError):
            raise ValueError(
                f"invalid port range {item!r}: expected a (begin, end) pair such as (31000, 32000)"
            ) from None
        if not 0 <= begin <= end <= MAX_PORT:
            raise ValueError(
                f"invalid port range {begin}-{end}: expected 0 <= begin <= end <= {MAX_PORT}"
            )
        checked.append((begin, end))
    return _merge_ranges(checked)


def _merge_ranges(ranges: list[tuple[int, int]]) -> PortRanges:
    if len(ranges) < 2:
        return tuple(ranges)
    ranges.sort()
    merged = [ranges[0]]
    for begin, end in ranges[1:]:
        last_begin, last_end = merged[-1]
        if begin <= last_end + 1:
            if end > last_end:
                merged[-1] = (last_begin, end)
        else:
            merged.append((begin, end))
    return tuple(merged)


def _subtract_ranges(left: PortRanges, right: PortRanges) -> PortRanges:
    if not left or not right:
        return left
    result = []
    j = 0
    count = len(right)
    for begin, end in left:
        while j < count and right[j][1] < begin:
            j += 1
        start = begin
        k = j
        while k < count and right[k][0] <= end:
            cut_begin, cut_end = right[k]
            if cut_begin > start:
                result.append((start, cut_begin - 1))
            if cut_end + 1 > start:
                start = cut_end + 1
            if start > end:
                break
            k += 1
        if start <= end:
            result.append((start, end))
    return tuple(result)


def _intersect_ranges(left: PortRanges, right: PortRanges) -> PortRanges:
    if not left or not right:
        return ()
    result = []
    i = j = 0
    while i < len(left) and j < len(right):
        low = max(left[i][0], right[j][0])
        high = min(left[i][1], right[j][1])
        if low <= high:
            result.append((low, high))
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return tuple(result)


def _ranges_contain(outer: PortRanges, inner: PortRanges) -> bool:
    # Each inner range must fit inside one outer range, because outer ranges
    # are neither overlapping nor adjacent.
    i = 0
    count = len(outer)
    for begin, end in inner:
        while i < count and outer[i][1] < begin:
            i += 1
        if i == count or outer[i][0] > begin or outer[i][1] < end:
            return False
    return True


def _format_ranges(ranges: PortRanges) -> str:
    return ",".join(f"{b}-{e}" if b != e else str(b) for b, e in ranges)


# --- Resources --------------------------------------------------------------


def _to_thousandths(value: float, name: str) -> int:
    number = float(value)
    if not 0.0 <= number < float("inf"):
        raise ValueError(f"invalid {name} {value!r}: expected a finite number >= 0")
    return round(number * _SCALE)


class Resources:
    """An immutable bundle of cpus, mem (MB), disk (MB) and port ranges.

    Arithmetic is a multiset's: `+` adds scalars and unites port ranges, `-`
    subtracts scalars (never below zero) and removes ports, `contains` is the
    superset test, and `intersection` takes the smaller scalar and the
    common ports.
    """

    __slots__ = ("_cpus", "_mem", "_disk", "_ports")

    _cpus: int
    _mem: int
    _disk: int
    _ports: PortRanges

    def __init__(
        self,
        cpus: float = 0.0,
        mem: float = 0.0,
        disk: float = 0.0,
        ports: Iterable[Sequence[int]] = (),
    ) -> None:
        self._cpus = _to_thousandths(cpus, "cpus")
        self._mem = _to_thousandths(mem, "mem")
        self._disk = _to_thousandths(disk, "disk")
        self._ports = _normalize_ranges(ports)

    @classmethod
    def _make(cls, cpus: int, mem: int, disk: int, ports: PortRanges) -> Resources:
        resources = object.__new__(cls)
        resources._cpus = cpus
        resources._mem = mem
        resources._disk = disk
        resources._ports = ports
        return resources

    @property
    def cpus(self) -> float:
        return self._cpus / _SCALE

    @property
    def mem(self) -> float:
        """Memory in MB."""
        return self._mem / _SCALE

    @property
    def disk(self) -> float:
        """Disk in MB."""
        return self._disk / _SCALE

    @property
    def ports(self) -> PortRanges:
        return self._ports

    @property
    def port_count(self) -> int:
        return sum(end - begin + 1 for begin, end in self._ports)

    @property
    def is_empty(self) -> bool:
        return not (self._cpus or self._mem or self._disk or self._ports)

    def __bool__(self) -> bool:
        return bool(self._cpus or self._mem or self._disk or self._ports)

    def __add__(self, other: Resources) -> Resources:
        if not isinstance(other, Resources):
            return NotImplemented
        if other.is_empty:
            return self
        if self.is_empty:
            return other
        if not other._ports:
            ports = self._ports
        elif not self._ports:
            ports = other._ports
        else:
            ports = _merge_ranges(list(self._ports + other._ports))
        return Resources._make(
            self._cpus + other._cpus, self._mem + other._mem, self._disk + other._disk, ports
        )

    def __sub__(self, other: Resources) -> Resources:
        if not isinstance(other, Resources):
            return NotImplemented
        if other is self:
            return EMPTY
        return Resources._make(
            max(self._cpus - other._cpus, 0),
            max(self._mem - other._mem, 0),
            max(self._disk - other._disk, 0),
            _subtract_ranges(self._ports, other._ports),
        )

    def contains(self, other: Resources) -> bool:
        """Return whether every quantity and every port of other is in self."""
        return (
            self._cpus >= other._cpus
            and self._mem >= other._mem
            and self._disk >= other._disk
            and (not other._ports or _ranges_contain(self._ports, other._ports))
        )

    def intersection(self, other: Resources) -> Resources:
        """Return the smaller of each scalar and the ports in both."""
        return Resources._make(
            min(self._cpus, other._cpus),
            min(self._mem, other._mem),
            min(self._disk, other._disk),
            _intersect_ranges(self._ports, other._ports),
        )

    def first_ports(self, count: int) -> PortRanges:
        """Return the lowest `count` ports as ranges, or raise ValueError if there are fewer."""
        if count < 0:
            raise ValueError(f"invalid port count {count}: expected a number >= 0")
        taken = []
        needed = count
        for begin, end in self._ports:
            if needed == 0:
                break
            size = min(end - begin + 1, needed)
            taken.append((begin, begin + size - 1))
            needed -= size
        if needed:
            raise ValueError(f"{count} ports requested but only {self.port_count} are available")
        return tuple(taken)

    def scalars(self) -> tuple[int, int, int]:
        """Return cpus, mem and disk in thousandths."""
        return (self._cpus, self._mem, self._disk)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "mem": self.mem,
            "disk": self.disk,
            "ports": [list(r) for r in self._ports],
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Resources):
            return NotImplemented
        return (
            self._cpus == other._cpus
            and self._mem == other._mem
            and self._disk == other._disk
            and self._ports == other._ports
        )

    def __hash__(self) -> int:
        return hash((self._cpus, self._mem, self._disk, self._ports))

    def __repr__(self) -> str:
        parts = [f"cpus={self.cpus:g}", f"mem={self.mem:g}", f"disk={self.disk:g}"]
        if self._ports:
            parts.append(f"ports=[{_format_ranges(self._ports)}]")
        return f"Resources({', '.join(parts)})"


EMPTY = Resources()


def _total(items: Iterable[Resources]) -> Resources:
    result = EMPTY
    for item in items:
        result = result + item
    return result


@dataclass(frozen=True, slots=True)
class Quota:
    """A role's quota limits in cpus, mem (MB) and disk (MB), where None leaves a kind unlimited.

    Mesos supports quota on scalar resources only, so ports have no limit.
    NOTE: only limits are implemented. Mesos's deprecated quota guarantees,
    and dynamic reservations (RESERVE and UNRESERVE operations) are not:
    reservations change only through update_agent.
    """

    cpus: float | None = None
    mem: float | None = None
    disk: float | None = None

    def thousandths(self) -> tuple[int | None, int | None, int | None]:
        return (
            None if self.cpus is None else _to_thousandths(self.cpus, "quota cpus"),
            None if self.mem is None else _to_thousandths(self.mem, "quota mem"),
            None if self.disk is None else _to_thousandths(self.disk, "quota disk"),
        )


# --- Events and records returned to the master ---------------------------------


class RescindReason(enum.StrEnum):
    """The reason an outstanding offer was taken back."""

    TIMEOUT = "timeout"
    AGENT_REMOVED = "agent_removed"
    AGENT_UPDATED = "agent_updated"
    FRAMEWORK_REMOVED = "framework_removed"
    FRAMEWORK_DEACTIVATED = "framework_deactivated"
    REQUESTED = "requested"


# Offer and Allocation are NamedTuples because the allocator makes one per
# offer and per launch, and a NamedTuple is immutable yet about four times
# faster to create than a frozen dataclass (CPython 3.11).


class Offer(NamedTuple):
    """Resources of one agent offered to one framework.

    `resources` is unreserved and `reserved` is reserved for `role`. Launches
    take reserved resources first.
    """

    id: str
    framework_id: str
    agent_id: str
    role: str
    resources: Resources
    reserved: Resources
    attributes: Mapping[str, str | float]
    made_at: float

    @property
    def total(self) -> Resources:
        return self.resources + self.reserved


@dataclass(frozen=True, slots=True)
class Rescinded:
    """An offer that the allocator took back, for the master to send as a RESCIND event."""

    offer: Offer
    reason: RescindReason


class Allocation(NamedTuple):
    """Resources in use by one launch (a task) of a framework on an agent.

    Pass it to `recover_resources` when the task ends.
    """

    framework_id: str
    agent_id: str
    role: str
    resources: Resources
    reserved: Resources

    @property
    def total(self) -> Resources:
        return self.resources + self.reserved


@dataclass(frozen=True, slots=True)
class Cycle:
    """The result of one allocation cycle."""

    offers: list[Offer]
    rescinded: list[Rescinded]
    agents_visited: int
    seconds: float


@dataclass
class AllocatorMetrics:
    """Counters since the allocator was created, for the master's metrics endpoint."""

    offers_made: int = 0
    offers_accepted: int = 0
    offers_declined: int = 0
    offers_rescinded: int = 0
    offers_timed_out: int = 0
    launches: int = 0
    allocation_runs: int = 0
    cycle_seconds_total: float = 0.0
    cycle_seconds_max: float = 0.0
    # The durations of the latest allocation cycles, oldest first.
    cycle_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


# --- Internal state ---------------------------------------------------------------


class _Agent:
    __slots__ = (
        "id",
        "attributes",
        "total",
        "reserved_total",
        "free",
        "free_reserved",
        "used",
        "used_reserved",
        "offers",
        "declined",
    )

    def __init__(
        self,
        agent_id: str,
        total: Resources,
        reserved: dict[str, Resources],
        attributes: Mapping[str, str | float],
    ) -> None:
        self.id = agent_id
        self.attributes = attributes
        self.total = total
        self.reserved_total = reserved
        # Free means neither offered nor used by a task.
        self.free = total
        self.free_reserved = {role: r for role, r in reserved.items() if r}
        # Framework id -> resources its tasks use here: unreserved, and reserved
        # (listed only when not empty). Two flat dicts keep the objects that the
        # garbage collector walks to a minimum.
        self.used: dict[str, Resources] = {}
        self.used_reserved: dict[str, Resources] = {}
        self.offers: dict[str, None] = {}
        # Frameworks that declined this agent in the current rotation.
        self.declined: dict[str, None] = {}


class _Framework:
    __slots__ = ("id", "role", "active", "suppressed", "filters", "offers", "agents")

    def __init__(self, framework_id: str, role: str, active: bool, suppressed: bool) -> None:
        self.id = framework_id
        self.role = role
        self.active = active
        self.suppressed = suppressed
        # Agent id -> [(expires_at, refused resources)].
        self.filters: dict[str, list[tuple[float, Resources]]] = {}
        self.offers: dict[str, None] = {}
        # Agents where the framework's tasks use resources.
        self.agents: set[str] = set()

    @property
    def wants_offers(self) -> bool:
        return self.active and not self.suppressed


class _Role:
    __slots__ = ("name", "weight", "quota", "limits", "reserved", "unreserved_held", "frameworks")

    def __init__(self, name: str) -> None:
        self.name = name
        self.weight = 1.0
        self.quota: Quota | None = None
        self.limits: tuple[int | None, int | None, int | None] | None = None
        # Static reservations for the role on all agents, in thousandths.
        self.reserved = [0, 0, 0]
        # Unreserved resources offered to or used by the role's frameworks, in thousandths.
        self.unreserved_held = [0, 0, 0]
        self.frameworks = DRFSorter()

    def limit(self, free: Resources) -> Resources:
        """Cut unreserved free resources down to what the role's quota limits still allow."""
        limits = self.limits
        if limits is None:
            return free
        values = [free._cpus, free._mem, free._disk]
        changed = False
        for kind, limit in enumerate(limits):
            if limit is None:
                continue
            headroom = limit - self.reserved[kind] - self.unreserved_held[kind]
            if headroom < values[kind]:
                values[kind] = max(headroom, 0)
                changed = True
        if not changed:
            return free
        return Resources._make(values[0], values[1], values[2], free._ports)


def _parse_min_allocatable(
    entries: Sequence[Mapping[str, float]],
) -> tuple[tuple[int, int, int, int], ...]:
    parsed = []
    for entry in entries:
        unknown = set(entry) - {"cpus", "mem", "disk", "ports"}
        if unknown:
            raise ValueError(
                f"invalid minimum allocatable resources {dict(entry)!r}: "
                f"unknown kind {sorted(unknown)[0]!r}, expected cpus, mem, disk or ports"
            )
        ports = entry.get("ports", 0)
        if ports < 0 or ports != int(ports):
            raise ValueError(f"invalid minimum port count {ports!r}: expected a whole number >= 0")
        parsed.append(
            (
                _to_thousandths(entry.get("cpus", 0), "cpus"),
                _to_thousandths(entry.get("mem", 0), "mem"),
                _to_thousandths(entry.get("disk", 0), "disk"),
                int(ports),
            )
        )
    return tuple(parsed)


def _filtered(filters: list[tuple[float, Resources]], candidate: Resources, now: float) -> bool:
    """Return whether refuse filters of one framework on one agent block an offer of candidate.

    As in Mesos, a filter applies only while the offer would hold no more
    than was refused. Allocator._expire_filters removes expired filters at
    the start of each cycle, so this only skips them.
    """
    # Resources.contains is written out, because _pick calls this for every
    # framework with a filter on the agent.
    for expires_at, refused in filters:
        if (
            expires_at > now
            and refused._cpus >= candidate._cpus
            and refused._mem >= candidate._mem
            and refused._disk >= candidate._disk
            and (not candidate._ports or _ranges_contain(refused._ports, candidate._ports))
        ):
            return True
    return False


# Builds a NamedTuple from a tuple of its fields, as its _make does, without a
# Python-level call: Offer(...) costs a call to the generated __new__.
_new_tuple = tuple.__new__


def _shuffle(rng: random.Random, items: list[str]) -> None:
    """Shuffle items in place exactly as rng.shuffle(items) does, but faster for random.Random.

    random.Random.shuffle calls the Python method _randbelow once per item,
    which is about half of its time. For an rng whose shuffle, _randbelow
    and getrandbits are random.Random's own, this loop draws the same bits in
    the same order with that call written out, so the result is the same. A
    test compares the two. Any other rng uses its own shuffle.
    """
    kind = type(rng)
    if not (
        kind.shuffle is random.Random.shuffle
        and kind._randbelow is random.Random._randbelow_with_getrandbits
        and kind.getrandbits is random.Random.getrandbits
    ):
        rng.shuffle(items)
        return
    getrandbits = rng.getrandbits
    for i in range(len(items) - 1, 0, -1):
        bound = i + 1
        bits = bound.bit_length()
        j = getrandbits(bits)
        while j >= bound:
            j = getrandbits(bits)
        items[i], items[j] = items[j], items[i]


def _refuse_duration(refuse_seconds: float) -> float:
    if math.isnan(refuse_seconds) or refuse_seconds < 0:
        log.warning(
            "invalid refuse_seconds %r, using the default of %g seconds",
            refuse_seconds,
            DEFAULT_REFUSE_SECONDS,
        )
        return DEFAULT_REFUSE_SECONDS
    if refuse_seconds > MAX_REFUSE_SECONDS:
        log.warning("refuse_seconds %g is above the limit, using 365 days", refuse_seconds)
        return MAX_REFUSE_SECONDS
    return float(refuse_seconds)


# --- The allocator ---------------------------------------------------------------


class Allocator:
    """Offers agents' resources to frameworks by weighted DRF over roles, then frameworks.

    The master calls the methods below as agents, frameworks and offers
    change, and calls `allocate(now)` periodically (Mesos's default
    --allocation_interval is 1 second). Calls that take offers back return
    them as `Rescinded` events; nothing is sent from here.
    """

    def __init__(
        self,
        *,
        offer_timeout: float | None = None,
        min_allocatable: Sequence[Mapping[str, float]] = DEFAULT_MIN_ALLOCATABLE,
        rng: random.Random | None = None,
        timer: Callable[[], float] = time.perf_counter,
        offer_id_prefix: str = "O",
    ) -> None:
        """Create an empty allocator.

        offer_timeout: seconds after which an unanswered offer is rescinded,
        or None to keep offers until answered (Mesos's --offer_timeout has
        no default either). min_allocatable: an offer must contain at least
        one of these quantities (ports is a count). rng: orders the agents of
        a cycle; seed it for repeatable results. timer: measures cycle
        durations and nothing else.
        """
        if offer_timeout is not None and not offer_timeout > 0:
            raise ValueError(
                f"invalid offer timeout {offer_timeout!r}: expected seconds > 0 or None"
            )
        self.offer_timeout = offer_timeout
        self._min_allocatable = _parse_min_allocatable(min_allocatable)
        self._rng = rng if rng is not None else random.Random()
        self._timer = timer
        self._offer_id_prefix = offer_id_prefix
        self._offer_sequence = 0

        self._agents: dict[str, _Agent] = {}
        self._frameworks: dict[str, _Framework] = {}
        self._roles: dict[str, _Role] = {}
        self._role_sorter = DRFSorter()
        self._total = [0, 0, 0]

        self._offers: dict[str, Offer] = {}
        # (made_at, offer id) in the order offers were made, for the timeout.
        self._offer_deadlines: deque[tuple[float, str]] = deque()
        # Refuse filters by expiry time, so that an expiry removes the filter and
        # makes its agent a candidate. The heap contains each time once: the filters
        # of one cycle mostly share a time, and a heap of 10,000s of equal times
        # would compare agent ids at every step.
        self._filter_expiry_times: list[float] = []
        self._filters_expiring: dict[float, list[tuple[str, str]]] = {}

        # Agents whose free resources are allocatable, in a stable order.
        self._free: dict[str, _Agent] = {}
        # Agents to visit in the next cycle.
        self._dirty: dict[str, None] = {}
        self._visit_all = False

        self.metrics = AllocatorMetrics()

    # --- Agents ---------------------------------------------------------------

    def add_agent(
        self,
        agent_id: str,
        resources: Resources,
        *,
        reserved: Mapping[str, Resources] | None = None,
        attributes: Mapping[str, str | float] | None = None,
    ) -> None:
        """Add an agent with unreserved `resources` and static reservations per role."""
        if agent_id in self._agents:
            raise InvalidRequestError(f"agent {agent_id!r} already exists")
        reservations = self._check_reservations(reserved)
        agent = _Agent(
            agent_id, resources, reservations, MappingProxyType(dict(attributes or {}))
        )
        self._agents[agent_id] = agent
        self._count_totals(agent, 1)
        self._update_free(agent)
        self._dirty[agent_id] = None
        log.debug("agent added agent=%s resources=%r reserved=%r", agent_id, resources, reservations)

    def remove_agent(self, agent_id: str) -> list[Rescinded]:
        """Remove an agent, rescind its offers and release what its tasks used, returning the rescinds."""
        agent = self._agent(agent_id)
        rescinded = [
            self._rescind(self._offers[offer_id], RescindReason.AGENT_REMOVED)
            for offer_id in list(agent.offers)
        ]
        for framework_id, unreserved in agent.used.items():
            framework = self._frameworks[framework_id]
            reserved = agent.used_reserved.get(framework_id, EMPTY)
            self._release(framework, self._roles[framework.role], unreserved, reserved)
            framework.agents.discard(agent_id)
        for framework in self._frameworks.values():
            framework.filters.pop(agent_id, None)
        self._count_totals(agent, -1)
        del self._agents[agent_id]
        self._free.pop(agent_id, None)
        self._dirty.pop(agent_id, None)
        log.info("agent removed agent=%s rescinded=%d", agent_id, len(rescinded))
        return rescinded

    def update_agent(
        self,
        agent_id: str,
        resources: Resources,
        *,
        reserved: Mapping[str, Resources] | None = None,
        attributes: Mapping[str, str | float] | None = None,
    ) -> list[Rescinded]:
        """Replace an agent's resources and reservations, rescinding its outstanding offers.

        Attributes stay as they were when None. Changed attributes clear every
        framework's filters for the agent, as in Mesos, because a framework
        may have declined the agent for its attributes. Raise
        InvalidRequestError, changing nothing, when the tasks on the agent use
        more than the new resources hold.
        """
        agent = self._agent(agent_id)
        reservations = self._check_reservations(reserved)
        used_unreserved = _total(agent.used.values())
        if not resources.contains(used_unreserved):
            raise InvalidRequestError(
                f"cannot update agent {agent_id!r}: its tasks use {used_unreserved!r} "
                f"unreserved, more than the new {resources!r}"
            )
        used_reserved = self._used_reserved_by_role(agent)
        for role, used in used_reserved.items():
            if not reservations.get(role, EMPTY).contains(used):
                raise InvalidRequestError(
                    f"cannot update agent {agent_id!r}: tasks of role {role!r} use {used!r} "
                    f"reserved, more than the new reservation {reservations.get(role, EMPTY)!r}"
                )

        rescinded = [
            self._rescind(self._offers[offer_id], RescindReason.AGENT_UPDATED)
            for offer_id in list(agent.offers)
        ]
        self._count_totals(agent, -1)
        agent.total = resources
        agent.reserved_total = reservations
        agent.free = resources - used_unreserved
        agent.free_reserved = {}
        for role, total in reservations.items():
            free = total - used_reserved.get(role, EMPTY)
            if free:
                agent.free_reserved[role] = free
        self._count_totals(agent, 1)
        if attributes is not None:
            new_attributes = MappingProxyType(dict(attributes))
            if new_attributes != agent.attributes:
                agent.attributes = new_attributes
                for framework in self._frameworks.values():
                    framework.filters.pop(agent_id, None)
        self._update_free(agent)
        self._dirty[agent_id] = None
        log.info("agent updated agent=%s resources=%r reserved=%r", agent_id, resources, reservations)
        return rescinded

    # --- Frameworks -------------------------------------------------------------

    def add_framework(
        self,
        framework_id: str,
        role: str,
        *,
        weight: float = 1.0,
        active: bool = True,
        suppressed: bool = False,
    ) -> None:
        """Add a framework in `role`.

        weight orders the frameworks inside the role as a role weight orders
        roles. Mesos has no framework weights, and the default of 1 matches it.
        NOTE: a framework has exactly one role for its lifetime, and roles are
        flat. Mesos's MULTI_ROLE frameworks, role changes through
        UPDATE_FRAMEWORK and hierarchical roles such as eng/backend are not
        supported.
        """
        if framework_id in self._frameworks:
            raise InvalidRequestError(f"framework {framework_id!r} already exists")
        if not role:
            raise InvalidRequestError(f"invalid role {role!r} for framework {framework_id!r}")
        role_state = self._role(role)
        framework = _Framework(framework_id, role, active, suppressed)
        role_state.frameworks.add(framework_id, weight, framework)
        if len(role_state.frameworks) == 1:
            self._role_sorter.add(role, role_state.weight, role_state)
            self._role_sorter.set_total(*self._total)
        role_state.frameworks.set_total(*self._total)
        self._frameworks[framework_id] = framework
        self._update_wanting(framework)
        log.info(
            "framework added framework=%s role=%s active=%s suppressed=%s",
            framework_id,
            role,
            active,
            suppressed,
        )

    def remove_framework(self, framework_id: str) -> list[Rescinded]:
        """Remove a framework, rescind its offers and free what its tasks used, returning the rescinds."""
        framework = self._framework(framework_id)
        rescinded = [
            self._rescind(self._offers[offer_id], RescindReason.FRAMEWORK_REMOVED)
            for offer_id in list(framework.offers)
        ]
        role = self._roles[framework.role]
        for agent_id in framework.agents:
            agent = self._agents[agent_id]
            unreserved = agent.used.pop(framework_id)
            reserved = agent.used_reserved.pop(framework_id, EMPTY)
            self._release(framework, role, unreserved, reserved)
            self._return_free(agent, role.name, unreserved, reserved)
        role.frameworks.remove(framework_id)
        if len(role.frameworks) == 0:
            self._role_sorter.remove(role.name)
        else:
            self._sync_role_activity(role)
        del self._frameworks[framework_id]
        log.info("framework removed framework=%s rescinded=%d", framework_id, len(rescinded))
        return rescinded

    def activate_framework(self, framework_id: str) -> None:
        framework = self._framework(framework_id)
        framework.active = True
        self._update_wanting(framework)
        log.info("framework activated framework=%s", framework_id)

    def deactivate_framework(self, framework_id: str) -> list[Rescinded]:
        """Stop offers to a framework, rescind its offers and clear its filters, as Mesos does.

        Its tasks keep their resources, which still count in its share.
        """
        framework = self._framework(framework_id)
        rescinded = [
            self._rescind(self._offers[offer_id], RescindReason.FRAMEWORK_DEACTIVATED)
            for offer_id in list(framework.offers)
        ]
        framework.active = False
        framework.filters.clear()
        self._update_wanting(framework)
        log.info("framework deactivated framework=%s rescinded=%d", framework_id, len(rescinded))
        return rescinded

    def suppress(self, framework_id: str) -> None:
        """Stop offers to a framework until it revives. Its filters and outstanding offers stay."""
        framework = self._framework(framework_id)
        framework.suppressed = True
        self._update_wanting(framework)
        log.info("offers suppressed framework=%s", framework_id)

    def revive(self, framework_id: str) -> None:
        """Resume offers to a framework and clear its refuse filters.

        Its marks from declines stay, so a decline-and-revive loop cannot
        take an agent ahead of frameworks that have not declined it.
        """
        framework = self._framework(framework_id)
        framework.suppressed = False
        framework.filters.clear()
        self._update_wanting(framework)
        self._visit_all = True
        log.info("offers revived framework=%s", framework_id)

    # --- Roles ---------------------------------------------------------------------

    def update_weight(self, role: str, weight: float) -> None:
        """Set a role's weight (default 1), which takes effect from the next cycle, as in Mesos."""
        role_state = self._role(role)
        role_state.weight = validate_weight(weight)
        if role in self._role_sorter:
            self._role_sorter.update_weight(role, role_state.weight)
        log.info("role weight updated role=%s weight=%g", role, role_state.weight)

    def update_quota(self, role: str, quota: Quota | None) -> None:
        """Set a role's quota limits, or remove them with None.

        Offers already made stay outstanding even when they exceed a lowered
        limit, and later offers respect it.
        """
        role_state = self._role(role)
        role_state.quota = quota
        role_state.limits = None if quota is None else quota.thousandths()
        self._visit_all = True
        log.info("role quota updated role=%s quota=%r", role, quota)

    # --- Offers ---------------------------------------------------------------------

    def allocate(self, now: float) -> Cycle:
        """Run one allocation cycle at time `now` and return the offers it made.

        The cycle first rescinds offers older than the offer timeout, then
        visits the candidate agents in random order. For each one it offers
        the free resources to the framework first in DRF order that is
        eligible for them, and repeats while resources are left that another
        role may use.

        NOTE: the cost is linear in the offers made, about 3.5 to 8.5
        microseconds each in bench/allocator/run on a shared 2-CPU machine,
        where a cycle that offers all of 10,000 agents took 32 to 85 ms. Other
        work on the machine makes it slower. A garbage collection that starts
        inside the cycle adds its pause, which the allocator cannot prevent.
        Under the master's thresholds the benchmark measured up to 24 ms for a
        young collection and 73 ms for a middle one, and with CPython's
        defaults 260 ms for a full one.
        """
        started = self._timer()
        rescinded = self.expire_offers(now)
        self._expire_filters(now)

        if self._visit_all:
            candidates = list(self._free.values())
            self._visit_all = False
        else:
            candidates = [agent for agent in map(self._free.get, self._dirty) if agent is not None]
        self._dirty.clear()

        offers: list[Offer] = []
        if candidates and self._role_sorter.active_count:
            # The agents are shuffled as their ids were before, because the
            # permutation depends only on the length and the rng.
            _shuffle(self._rng, candidates)
            free = self._free
            pick = self._pick
            # Every candidate is still free when its turn comes, because an
            # offer changes only the free resources of its own agent.
            for agent in candidates:
                offer = pick(agent, now, None)
                if offer is not None:
                    offers.append(offer)
                    if agent.id in free:
                        self._offer_rest(agent, now, offers, offer)
            self.metrics.offers_made += len(offers)

        seconds = self._timer() - started
        self._record_cycle(seconds)
        # One line per cycle: INFO when it changed something, DEBUG when idle.
        level = logging.INFO if offers or rescinded else logging.DEBUG
        log.log(
            level,
            "allocation cycle done offers=%d agents_visited=%d timed_out=%d duration_ms=%.1f",
            len(offers),
            len(candidates),
            len(rescinded),
            seconds * 1000,
        )
        return Cycle(offers, rescinded, len(candidates), seconds)

    def accept(
        self,
        offer_id: str,
        launches: Iterable[Resources],
        now: float,
        *,
        refuse_seconds: float = DEFAULT_REFUSE_SECONDS,
    ) -> list[Allocation]:
        """Accept an offer with launches and return one Allocation per launch.

        Each launch takes its reserved resources first and the rest from the
        offer's unreserved part. The resources no launch uses return to the
        agent behind a refuse filter of refuse_seconds, as Mesos applies an
        ACCEPT call's filters. An accept with no launches is a decline.
        Raise InvalidRequestError, changing nothing, when the launches do not
        fit in the offer.
        """
        offer = self._offers.get(offer_id)
        if offer is None:
            raise NotFoundError(f"offer {offer_id!r} not found: it was accepted, declined, rescinded or timed out")
        launches = list(launches)
        if not launches:
            self.decline(offer_id, now, refuse_seconds=refuse_seconds)
            return []

        allocations, left_unreserved, left_reserved = self._split_launches(offer, launches)
        del self._offers[offer_id]
        agent = self._agents[offer.agent_id]
        framework = self._frameworks[offer.framework_id]
        del agent.offers[offer_id]
        del framework.offers[offer_id]

        used_unreserved = offer.resources - left_unreserved
        used_reserved = offer.reserved - left_reserved
        self._add_used(agent, framework, used_unreserved, used_reserved)
        agent.declined.clear()

        if left_unreserved or left_reserved:
            self._release(framework, self._roles[offer.role], left_unreserved, left_reserved)
            self._return_free(agent, offer.role, left_unreserved, left_reserved)
            self._add_filter(framework, agent.id, left_unreserved + left_reserved, now, refuse_seconds)
        self.metrics.offers_accepted += 1
        self.metrics.launches += len(allocations)
        return allocations

    def decline(
        self, offer_id: str, now: float, *, refuse_seconds: float = DEFAULT_REFUSE_SECONDS
    ) -> None:
        """Decline an offer and return its resources to the agent.

        The framework is not offered them again on that agent for
        refuse_seconds. A value of 0 sets no filter, a negative one means the
        default of 5 seconds, and values above 365 days are cut to 365 days.
        """
        offer = self._offers.get(offer_id)
        if offer is None:
            raise NotFoundError(f"offer {offer_id!r} not found: it was accepted, declined, rescinded or timed out")
        self._take_back(offer)
        framework = self._frameworks[offer.framework_id]
        agent = self._agents[offer.agent_id]
        agent.declined[framework.id] = None
        self._add_filter(framework, agent.id, offer.total, now, refuse_seconds)
        self.metrics.offers_declined += 1

    def rescind(self, offer_id: str) -> Rescinded:
        """Take an offer back at the master's request, setting no filter."""
        offer = self._offers.get(offer_id)
        if offer is None:
            raise NotFoundError(f"offer {offer_id!r} not found: it was accepted, declined, rescinded or timed out")
        return self._rescind(offer, RescindReason.REQUESTED)

    def expire_offers(self, now: float) -> list[Rescinded]:
        """Rescind the offers left unanswered for the offer timeout. `allocate` calls this first.

        A timed-out offer counts as a decline for the rotation among
        frameworks, so a framework that sits on offers loses its first claim
        on the agent.
        """
        timeout = self.offer_timeout
        if timeout is None:
            return []
        rescinded = []
        deadlines = self._offer_deadlines
        while deadlines and deadlines[0][0] + timeout <= now:
            _, offer_id = deadlines.popleft()
            offer = self._offers.get(offer_id)
            if offer is None:
                continue
            rescinded.append(self._rescind(offer, RescindReason.TIMEOUT))
            self._agents[offer.agent_id].declined[offer.framework_id] = None
            self.metrics.offers_timed_out += 1
        return rescinded

    def recover_resources(self, allocation: Allocation) -> bool:
        """Return the resources of an ended task to its agent.

        Return False when the agent or the framework is gone, because their
        removal already released everything. Raise InvalidRequestError when
        the framework does not use these resources on the agent, as after a
        second recovery of one task.
        """
        agent = self._agents.get(allocation.agent_id)
        framework = self._frameworks.get(allocation.framework_id)
        if agent is None or framework is None:
            return False
        used = agent.used.get(framework.id)
        used_reserved = agent.used_reserved.get(framework.id, EMPTY)
        if (
            used is None
            or not used.contains(allocation.resources)
            or not used_reserved.contains(allocation.reserved)
        ):
            raise InvalidRequestError(
                f"framework {framework.id!r} does not use {allocation.total!r} on agent {agent.id!r}"
            )
        used = used - allocation.resources
        used_reserved = used_reserved - allocation.reserved
        if used_reserved:
            agent.used_reserved[framework.id] = used_reserved
        else:
            agent.used_reserved.pop(framework.id, None)
        if used or used_reserved:
            agent.used[framework.id] = used
        else:
            del agent.used[framework.id]
            framework.agents.discard(agent.id)
        role = self._roles[framework.role]
        self._release(framework, role, allocation.resources, allocation.reserved)
        self._return_free(agent, role.name, allocation.resources, allocation.reserved)
        return True

    def add_allocation(
        self,
        framework_id: str,
        agent_id: str,
        resources: Resources,
        reserved: Resources = EMPTY,
    ) -> Allocation:
        """Record a task that already runs, as after a master failover, and return its Allocation.

        The resources must be free on the agent: neither offered nor used.
        """
        framework = self._framework(framework_id)
        agent = self._agent(agent_id)
        free_reserved = agent.free_reserved.get(framework.role, EMPTY)
        if not agent.free.contains(resources) or not free_reserved.contains(reserved):
            raise InvalidRequestError(
                f"cannot add allocation of {resources!r} and {reserved!r} reserved for framework "
                f"{framework_id!r}: agent {agent_id!r} has {agent.free!r} free and "
                f"{free_reserved!r} free for role {framework.role!r}"
            )
        role = self._roles[framework.role]
        agent.free = agent.free - resources
        if reserved:
            self._take_reserved(agent, role.name, reserved)
        self._add_used(agent, framework, resources, reserved)
        self._hold(framework, role, resources, reserved, count_offer=False)
        self._update_free(agent)
        return Allocation(framework_id, agent_id, role.name, resources, reserved)

    # --- Queries ---------------------------------------------------------------------

    def offer(self, offer_id: str) -> Offer:
        offer = self._offers.get(offer_id)
        if offer is None:
            raise NotFoundError(f"offer {offer_id!r} not found")
        return offer

    def outstanding_offers(self) -> list[Offer]:
        return list(self._offers.values())

    def free_resources(self, agent_id: str) -> tuple[Resources, dict[str, Resources]]:
        """Return an agent's free unreserved resources and its free reservations by role."""
        agent = self._agent(agent_id)
        return agent.free, dict(agent.free_reserved)

    def used_resources(self, framework_id: str) -> Resources:
        """Return what a framework's tasks use on all agents, reserved and unreserved together."""
        framework = self._framework(framework_id)
        return _total(
            self._agents[a].used[framework_id] + self._agents[a].used_reserved.get(framework_id, EMPTY)
            for a in sorted(framework.agents)
        )

    def filter_count(self) -> int:
        """Return the number of refuse filters stored, expired ones not yet removed included."""
        return sum(
            len(filters)
            for framework in self._frameworks.values()
            for filters in framework.filters.values()
        )

    def dominant_shares(self) -> dict[str, float]:
        """Return each role's dominant share of the cluster (not divided by its weight).

        Only roles with frameworks are listed. Offered resources count, as in
        the DRF order.
        """
        return {role: self._role_sorter.dominant_share(role) for role in self._role_sorter.names()}

    def framework_suppressed(self, framework_id: str) -> bool:
        return self._framework(framework_id).suppressed

    def framework_dominant_share(self, framework_id: str) -> float:
        framework = self._framework(framework_id)
        return self._roles[framework.role].frameworks.dominant_share(framework_id)

    def reservations(self) -> dict[str, Resources]:
        """Return the static reservations of all agents added up by role, ports included."""
        by_role: dict[str, Resources] = {}
        for agent in self._agents.values():
            for role, reserved in agent.reserved_total.items():
                by_role[role] = by_role.get(role, EMPTY) + reserved
        return by_role

    def role_consumed_quota(self, role: str) -> Resources:
        """Return what counts against a role's quota: its reservations plus the unreserved
        resources offered to or used by its frameworks."""
        role_state = self._role(role)
        cpus, mem, disk = (a + b for a, b in zip(role_state.reserved, role_state.unreserved_held))
        return Resources._make(cpus, mem, disk, ())

    # --- Cycle internals -----------------------------------------------------------

    def _offer_rest(self, agent: _Agent, now: float, offers: list[Offer], first: Offer) -> None:
        """Offer what is left of an agent after its first offer of the cycle to other frameworks.

        Resources are left when a quota limit cut the first offer, or when
        other roles have reservations on the agent.
        """
        offered_to = {first.framework_id}
        while True:
            offer = self._pick(agent, now, offered_to)
            if offer is None:
                return
            offers.append(offer)
            if agent.id not in self._free:
                return
            offered_to.add(offer.framework_id)

    def _pick(self, agent: _Agent, now: float, offered_to: set[str] | None) -> Offer | None:
        # The first eligible framework that declined this agent in the current
        # rotation, with what it would be offered. It gets the agent only if no
        # other eligible framework can take it.
        fallback: tuple[ClientRecord, ClientRecord, Resources, Resources] | None = None
        agent_id = agent.id
        free = agent.free
        free_reserved = agent.free_reserved
        declined = agent.declined

        # Iterating the sorters' live record lists is safe because the loops
        # return as soon as an offer changes them.
        for role_record in self._role_sorter.ordered_records():
            role = role_record[PAYLOAD]
            if free_reserved or role.limits is not None:
                reserved = free_reserved.get(role.name, EMPTY)
                unreserved = free if role.limits is None else role.limit(free)
                candidate = unreserved + reserved if reserved else unreserved
                if not self._allocatable(candidate):
                    continue
            else:
                # The agent is in self._free, so its unreserved resources are allocatable.
                reserved = EMPTY
                unreserved = candidate = free
            for framework_record in role.frameworks.ordered_records():
                framework = framework_record[PAYLOAD]
                framework_id = framework.id
                if offered_to is not None and framework_id in offered_to:
                    continue
                if framework.filters:
                    filters = framework.filters.get(agent_id)
                    if filters is not None and _filtered(filters, candidate, now):
                        continue
                if declined and framework_id in declined:
                    if fallback is None:
                        fallback = (role_record, framework_record, unreserved, reserved)
                    continue
                return self._make_offer(
                    agent, role_record, framework_record, unreserved, reserved, now
                )

        if fallback is None:
            return None
        # Every eligible framework has declined this agent: start a new rotation.
        declined.clear()
        return self._make_offer(agent, *fallback, now)

    def _make_offer(
        self,
        agent: _Agent,
        role_record: ClientRecord,
        framework_record: ClientRecord,
        unreserved: Resources,
        reserved: Resources,
        now: float,
    ) -> Offer:
        """Make an offer to the framework and role of these sorter records, and hold its resources.

        This is a cycle's hot path, so _hold is written out here, the sorters
        take the records that _pick found, and the Offer is built without the
        keyword handling of its generated __new__.
        """
        self._offer_sequence += 1
        offer_id = f"{self._offer_id_prefix}{self._offer_sequence}"
        role = role_record[PAYLOAD]
        framework = framework_record[PAYLOAD]
        role_name = role.name
        framework_id = framework.id
        agent_id = agent.id
        offer = _new_tuple(
            Offer,
            (offer_id, framework_id, agent_id, role_name, unreserved, reserved, agent.attributes, now),
        )
        if unreserved is agent.free:
            agent.free = EMPTY
        else:
            agent.free = agent.free - unreserved
        # Free reservations are never empty, so reserved is either one of them or EMPTY.
        if reserved is not EMPTY:
            self._take_reserved(agent, role_name, reserved)
            cpus = unreserved._cpus + reserved._cpus
            mem = unreserved._mem + reserved._mem
            disk = unreserved._disk + reserved._disk
        else:
            cpus, mem, disk = unreserved._cpus, unreserved._mem, unreserved._disk
        self._role_sorter.add_offer(role_record, cpus, mem, disk)
        role.frameworks.add_offer(framework_record, cpus, mem, disk)
        held = role.unreserved_held
        held[0] += unreserved._cpus
        held[1] += unreserved._mem
        held[2] += unreserved._disk

        self._offers[offer_id] = offer
        agent.offers[offer_id] = None
        framework.offers[offer_id] = None
        if self.offer_timeout is not None:
            self._offer_deadlines.append((now, offer_id))
        if agent.free is EMPTY and not agent.free_reserved:
            self._free.pop(agent_id, None)
        else:
            self._update_free(agent)
        return offer

    def _allocatable(self, resources: Resources) -> bool:
        if resources.is_empty:
            return False
        for cpus, mem, disk, ports in self._min_allocatable:
            if (
                resources._cpus >= cpus
                and resources._mem >= mem
                and resources._disk >= disk
                and (ports == 0 or resources.port_count >= ports)
            ):
                return True
        return not self._min_allocatable

    def _add_filter(
        self,
        framework: _Framework,
        agent_id: str,
        refused: Resources,
        now: float,
        refuse_seconds: float,
    ) -> None:
        duration = _refuse_duration(refuse_seconds)
        if duration == 0:
            return
        expires_at = now + duration
        framework.filters.setdefault(agent_id, []).append((expires_at, refused))
        expiring = self._filters_expiring.get(expires_at)
        if expiring is None:
            expiring = self._filters_expiring[expires_at] = []
            heapq.heappush(self._filter_expiry_times, expires_at)
        expiring.append((agent_id, framework.id))

    def _expire_filters(self, now: float) -> None:
        times = self._filter_expiry_times
        frameworks = self._frameworks
        free = self._free
        dirty = self._dirty
        while times and times[0] <= now:
            for agent_id, framework_id in self._filters_expiring.pop(heapq.heappop(times)):
                framework = frameworks.get(framework_id)
                filters = None if framework is None else framework.filters.get(agent_id)
                if filters is None:
                    pass
                elif len(filters) == 1:
                    # The usual case, one filter per framework and agent, checked without a new list.
                    if filters[0][0] <= now:
                        del framework.filters[agent_id]
                else:
                    live = [f for f in filters if f[0] > now]
                    if live:
                        framework.filters[agent_id] = live
                    else:
                        del framework.filters[agent_id]
                if agent_id in free:
                    dirty[agent_id] = None

    def _record_cycle(self, seconds: float) -> None:
        metrics = self.metrics
        metrics.allocation_runs += 1
        metrics.cycle_seconds.append(seconds)
        metrics.cycle_seconds_total += seconds
        if seconds > metrics.cycle_seconds_max:
            metrics.cycle_seconds_max = seconds

    # --- Bookkeeping -----------------------------------------------------------------

    def _split_launches(
        self, offer: Offer, launches: Sequence[Resources]
    ) -> tuple[list[Allocation], Resources, Resources]:
        """Return the launches' allocations and what is left of the offer's unreserved and
        reserved resources, or raise InvalidRequestError if they do not fit."""
        if offer.reserved:
            return self._split_launches_with_reserved(offer, launches)
        # Without reservations each launch is wholly unreserved, so one pass sums them.
        cpus = mem = disk = 0
        ranges: list[tuple[int, int]] = []
        for number, launch in enumerate(launches, 1):
            if type(launch) is not Resources or not launch:
                raise InvalidRequestError(
                    f"invalid launch {number} for offer {offer.id!r}: expected non-empty Resources, "
                    f"got {launch!r}"
                )
            cpus += launch._cpus
            mem += launch._mem
            disk += launch._disk
            if launch._ports:
                ranges.extend(launch._ports)

        ports: PortRanges = ()
        if ranges:
            ranges.sort()
            for (_, end), (begin, _) in zip(ranges, ranges[1:]):
                if begin <= end:
                    raise InvalidRequestError(
                        f"launches for offer {offer.id!r} use port {begin} more than once"
                    )
            ports = _merge_ranges(ranges)

        used = Resources._make(cpus, mem, disk, ports)
        if not offer.resources.contains(used):
            raise InvalidRequestError(
                f"launches of {used!r} in total do not fit in offer {offer.id!r} of {offer.total!r}"
            )
        framework_id, agent_id, role = offer.framework_id, offer.agent_id, offer.role
        allocations = [Allocation(framework_id, agent_id, role, launch, EMPTY) for launch in launches]
        return allocations, offer.resources - used, EMPTY

    def _split_launches_with_reserved(
        self, offer: Offer, launches: Sequence[Resources]
    ) -> tuple[list[Allocation], Resources, Resources]:
        left_unreserved = offer.resources
        left_reserved = offer.reserved
        allocations = []
        for number, launch in enumerate(launches, 1):
            if not isinstance(launch, Resources) or launch.is_empty:
                raise InvalidRequestError(
                    f"invalid launch {number} for offer {offer.id!r}: expected non-empty Resources, "
                    f"got {launch!r}"
                )
            if left_reserved:
                from_reserved = launch.intersection(left_reserved)
                from_unreserved = launch - from_reserved
            else:
                from_reserved = EMPTY
                from_unreserved = launch
            if not left_unreserved.contains(from_unreserved):
                raise InvalidRequestError(
                    f"launch {number} of {launch!r} does not fit in offer {offer.id!r}: "
                    f"{left_unreserved + left_reserved!r} is left of {offer.total!r}"
                )
            left_unreserved = left_unreserved - from_unreserved
            if from_reserved:
                left_reserved = left_reserved - from_reserved
            allocations.append(
                Allocation(offer.framework_id, offer.agent_id, offer.role, from_unreserved, from_reserved)
            )
        return allocations, left_unreserved, left_reserved

    def _add_used(
        self, agent: _Agent, framework: _Framework, unreserved: Resources, reserved: Resources
    ) -> None:
        # Every framework with tasks on the agent has an entry in agent.used, even an empty one.
        used = agent.used.get(framework.id)
        agent.used[framework.id] = unreserved if used is None else used + unreserved
        if used is None:
            framework.agents.add(agent.id)
        if reserved:
            agent.used_reserved[framework.id] = (
                agent.used_reserved.get(framework.id, EMPTY) + reserved
            )

    def _take_back(self, offer: Offer) -> None:
        """Remove an outstanding offer and return all of its resources to the agent."""
        del self._offers[offer.id]
        agent = self._agents[offer.agent_id]
        framework = self._frameworks[offer.framework_id]
        del agent.offers[offer.id]
        del framework.offers[offer.id]
        self._release(framework, self._roles[offer.role], offer.resources, offer.reserved)
        self._return_free(agent, offer.role, offer.resources, offer.reserved)

    def _rescind(self, offer: Offer, reason: RescindReason) -> Rescinded:
        self._take_back(offer)
        self.metrics.offers_rescinded += 1
        return Rescinded(offer, reason)

    def _hold(
        self,
        framework: _Framework,
        role: _Role,
        unreserved: Resources,
        reserved: Resources,
        *,
        count_offer: bool,
    ) -> None:
        cpus = unreserved._cpus + reserved._cpus
        mem = unreserved._mem + reserved._mem
        disk = unreserved._disk + reserved._disk
        self._role_sorter.add_allocation(role.name, cpus, mem, disk, count_offer=count_offer)
        role.frameworks.add_allocation(framework.id, cpus, mem, disk, count_offer=count_offer)
        held = role.unreserved_held
        held[0] += unreserved._cpus
        held[1] += unreserved._mem
        held[2] += unreserved._disk

    def _release(
        self, framework: _Framework, role: _Role, unreserved: Resources, reserved: Resources
    ) -> None:
        cpus = unreserved._cpus + reserved._cpus
        mem = unreserved._mem + reserved._mem
        disk = unreserved._disk + reserved._disk
        self._role_sorter.add_allocation(role.name, -cpus, -mem, -disk)
        role.frameworks.add_allocation(framework.id, -cpus, -mem, -disk)
        held = role.unreserved_held
        held[0] -= unreserved._cpus
        held[1] -= unreserved._mem
        held[2] -= unreserved._disk
        if role.limits is not None and unreserved:
            # The role has room under its limit again, on agents this cycle would not visit.
            self._visit_all = True

    def _return_free(
        self, agent: _Agent, role: str, unreserved: Resources, reserved: Resources
    ) -> None:
        if unreserved:
            agent.free = agent.free + unreserved
        if reserved:
            agent.free_reserved[role] = agent.free_reserved.get(role, EMPTY) + reserved
        self._update_free(agent)
        self._dirty[agent.id] = None

    def _take_reserved(self, agent: _Agent, role: str, reserved: Resources) -> None:
        left = agent.free_reserved[role] - reserved
        if left:
            agent.free_reserved[role] = left
        else:
            del agent.free_reserved[role]

    def _update_free(self, agent: _Agent) -> None:
        free = agent.free
        if agent.free_reserved:
            free = free + _total(agent.free_reserved.values())
        if self._allocatable(free):
            self._free[agent.id] = agent
        else:
            self._free.pop(agent.id, None)

    def _count_totals(self, agent: _Agent, sign: int) -> None:
        resources = agent.total + _total(agent.reserved_total.values())
        total = self._total
        total[0] += sign * resources._cpus
        total[1] += sign * resources._mem
        total[2] += sign * resources._disk
        for role_name, reserved in agent.reserved_total.items():
            role = self._role(role_name)
            role.reserved[0] += sign * reserved._cpus
            role.reserved[1] += sign * reserved._mem
            role.reserved[2] += sign * reserved._disk
        self._role_sorter.set_total(*total)
        for role in self._roles.values():
            role.frameworks.set_total(*total)

    def _used_reserved_by_role(self, agent: _Agent) -> dict[str, Resources]:
        by_role: dict[str, Resources] = {}
        for framework_id, reserved in agent.used_reserved.items():
            role = self._frameworks[framework_id].role
            by_role[role] = by_role.get(role, EMPTY) + reserved
        return by_role

    def _update_wanting(self, framework: _Framework) -> None:
        role = self._roles[framework.role]
        if framework.wants_offers:
            if role.frameworks.activate(framework.id):
                self._visit_all = True
        else:
            role.frameworks.deactivate(framework.id)
        self._sync_role_activity(role)

    def _sync_role_activity(self, role: _Role) -> None:
        if role.frameworks.active_count:
            self._role_sorter.activate(role.name)
        else:
            self._role_sorter.deactivate(role.name)

    def _check_reservations(self, reserved: Mapping[str, Resources] | None) -> dict[str, Resources]:
        reservations = {}
        for role, resources in (reserved or {}).items():
            if not role:
                raise InvalidRequestError(f"invalid reservation role {role!r}: expected a role name")
            if resources:
                reservations[role] = resources
        return reservations

    def _role(self, name: str) -> _Role:
        role = self._roles.get(name)
        if role is None:
            role = self._roles[name] = _Role(name)
            role.frameworks.set_total(*self._total)
        return role

    def _agent(self, agent_id: str) -> _Agent:
        agent = self._agents.get(agent_id)
        if agent is None:
            raise NotFoundError(f"agent {agent_id!r} not found")
        return agent

    def _framework(self, framework_id: str) -> _Framework:
        framework = self._frameworks.get(framework_id)
        if framework is None:
            raise NotFoundError(f"framework {framework_id!r} not found")
        return framework
