"""The service scheduler: which instances of a job to start, which tasks to stop, and where.

Everything here is a pure function of a snapshot (a job, its tasks, the
agents and what they already run), so it is tested and benchmarked with
no sockets, processes or clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from corral.state.records import Task
from corral.types import DesiredState


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """An agent's capacity and what the tasks placed on it already use."""

    node: str
    cpus: float
    memory: int
    ports: int
    used_cpus: float = 0.0
    used_memory: int = 0
    used_ports: int = 0

    @property
    def free_cpus(self) -> float:
        return self.cpus - self.used_cpus

    @property
    def free_memory(self) -> int:
        return self.memory - self.used_memory

    @property
    def free_ports(self) -> int:
        return self.ports - self.used_ports

    def shortfall(self, request: TaskRequest) -> str | None:
        """Describe what this agent lacks for `request`, or None when it fits."""
        missing = []
        # A small tolerance, because cpus are fractional sums.
        if request.cpus > self.free_cpus + 1e-9:
            missing.append(f"cpus {self.free_cpus:g} free of {request.cpus:g} requested")
        if request.memory > self.free_memory:
            missing.append(f"memory {self.free_memory} MB free of {request.memory} MB requested")
        if request.ports > self.free_ports:
            missing.append(f"ports {self.free_ports} free of {request.ports} requested")
        return ", ".join(missing) or None

    def with_task(self, request: TaskRequest) -> AgentSnapshot:
        return AgentSnapshot(
            self.node,
            self.cpus,
            self.memory,
            self.ports,
            self.used_cpus + request.cpus,
            self.used_memory + request.memory,
            self.used_ports + request.ports,
        )


@dataclass(frozen=True, slots=True)
class TaskRequest:
    job: str
    instance: int
    cpus: float
    memory: int
    ports: int


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request goes: `node` is None when it fits nowhere, and `reason` says why."""

    request: TaskRequest
    node: str | None
    reason: str = ""


class Placer(Protocol):
    """Chooses agents for task requests; the offer-based allocator will implement this too."""

    def place(self, requests: Sequence[TaskRequest], agents: Sequence[AgentSnapshot]) -> list[Placement]: ...


class BinPackPlacer:
    """Place each request on the fitting agent with the least memory left, as Nomad's binpack does."""

    def place(self, requests: Sequence[TaskRequest], agents: Sequence[AgentSnapshot]) -> list[Placement]:
        pool = {agent.node: agent for agent in agents}
        placements = []
        for request in requests:
            fitting = [agent for agent in pool.values() if agent.shortfall(request) is None]
            if not fitting:
                placements.append(Placement(request, None, _unplaced_reason(request, pool.values())))
                continue
            chosen = min(fitting, key=lambda agent: (agent.free_memory - request.memory, agent.node))
            pool[chosen.node] = chosen.with_task(request)
            placements.append(Placement(request, chosen.node))
        return placements


def _unplaced_reason(request: TaskRequest, agents) -> str:
    if not agents:
        return "no agent is registered"
    details = "; ".join(f"node {agent.node}: {agent.shortfall(request)}" for agent in agents)
    return f"no agent has room for instance {request.instance} of job {request.job} ({details})"


@dataclass(slots=True)
class Reconciliation:
    """What a job needs: instance indexes to start, and task ids to stop."""

    start: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)


def reconcile_service(count: int, task_version: int, stopped: bool, tasks: Sequence[Task]) -> Reconciliation:
    """Compare a service job's wanted instances with its tasks.

    A live task is one the scheduler still wants running that has not
    ended. Each instance index below `count` keeps one live task of the
    current `task_version`; every other live task is stopped, and every
    index without a current live task gets a new one. Old tasks are stopped
    in the same pass as their replacements start.
    """
    result = Reconciliation()
    live = [task for task in tasks if task.desired is DesiredState.RUN and not task.state.is_terminal]
    if stopped:
        result.stop = sorted(task.id for task in live)
        return result
    kept: dict[int, Task] = {}
    for task in sorted(live, key=lambda t: (t.instance, -t.created_at)):
        wanted = task.instance < count and task.spec_version == task_version
        if wanted and task.instance not in kept:
            kept[task.instance] = task
        else:
            result.stop.append(task.id)
    result.start = [instance for instance in range(count) if instance not in kept]
    return result


def agent_snapshots(agents, tasks: Sequence[Task]) -> list[AgentSnapshot]:
    """Build each agent's snapshot from its capacity and the tasks that hold resources on it."""
    used: dict[str, list[float]] = {}
    for task in tasks:
        if not task.holds_resources:
            continue
        totals = used.setdefault(task.node, [0.0, 0, 0])
        totals[0] += task.cpus
        totals[1] += task.memory
        totals[2] += len(task.port_labels)
    snapshots = []
    for agent in agents:
        cpus, memory, ports = used.get(agent.node, [0.0, 0, 0])
        port_total = sum(high - low + 1 for low, high in agent.port_ranges)
        snapshots.append(
            AgentSnapshot(agent.node, agent.cpus, agent.memory, port_total, cpus, int(memory), int(ports))
        )
    return snapshots
