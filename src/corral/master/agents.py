"""Agent failure detection: heartbeat deadlines, and what happens when one passes.

Agents register, then heartbeat over the HTTP API. An agent that has not
heartbeated for `timeout` seconds is declared failed at once. Its node's
serfHealth check turns critical, so DNS and `?passing` leave out its
services. Its agent record is removed, so nothing new is placed on it. Its
tasks that have not ended become LOST with desired state STOP, so the job
scheduler replaces them elsewhere, except the started tasks of
partition-aware frameworks: those become UNREACHABLE and keep desired state
RUN, as in Mesos, because the agent may come back. An agent that comes back
registers again, which turns serfHealth passing, and kills the tasks it
still runs that have desired state STOP. The master turns its UNREACHABLE
tasks that still have desired state RUN back to RUNNING (see
Master._reach_tasks_again).

Mesos waits longer before it acts (`--agent_ping_timeout` 15 s times
`--max_agent_ping_timeouts` 5) and first marks tasks UNREACHABLE; corral
acts at the first missed deadline, as Nomad's `heartbeat_grace` does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from corral.agent.registry import SERF_HEALTH_ID
from corral.agent.resources import role_name_problem
from corral.master.allocator import Resources
from corral.master.protocol import PARTITION_AWARE
from corral.state import State
from corral.state.records import AgentInfo, Task
from corral.types import CheckStatus, DesiredState, TaskState

log = logging.getLogger(__name__)

DEFAULT_AGENT_TIMEOUT = 10.0


class AgentStatus:
    """Liveness of an agent as GET /v1/agents reports it."""

    ALIVE = "alive"
    FAILED = "failed"


@dataclass(slots=True)
class FailedAgent:
    """An agent declared failed while this server runs, kept for GET /v1/agents."""

    info: AgentInfo
    failed_at: float  # wall-clock seconds


class AgentMonitor:
    """Tracks the last heartbeat of every registered agent and fails those that stop.

    Deadlines use `clock` (monotonic seconds), so tests can drive it.
    """

    def __init__(
        self, state: State, timeout: float = DEFAULT_AGENT_TIMEOUT, clock: Callable[[], float] = time.monotonic
    ):
        if timeout <= 0:
            raise ValueError(f"invalid agent timeout {timeout!r}: expected more than 0 seconds")
        self.state = state
        self.timeout = timeout
        self.clock = clock
        self.last_seen: dict[str, float] = {}
        self.failed: dict[str, FailedAgent] = {}
        # Nodes whose agent runs in this server's process (`corral dev`). Such an agent
        # stops only with the server, so it sends no heartbeats and has no deadline.
        self.in_process: set[str] = set()
        self._task: asyncio.Task | None = None

    # Lifecycle

    def start(self) -> None:
        """Give every stored agent a full timeout from now, then check deadlines in the background."""
        if self._task is not None:
            return
        # NOTE: heartbeats are kept in this server's memory only, so a restarted server
        # gives every agent a fresh deadline, and a second server would not share them.
        now = self.clock()
        for agent in self.state.agents():
            if agent.node not in self.in_process:
                self.last_seen.setdefault(agent.node, now)
        self._task = asyncio.create_task(self._run(), name="agent-monitor")
        log.info("agent monitor started timeout=%gs agents=%d", self.timeout, len(self.last_seen))

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        log.info("agent monitor stopped")

    async def _run(self) -> None:
        # A quarter of the timeout between checks, so a failure is declared at most
        # timeout * 1.25 after the last heartbeat.
        interval = self.timeout / 4
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_deadlines()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("agent deadline check failed; retrying in %gs", interval)

    # Events from the agents

    def registered(self, node: str, in_process: bool = False) -> None:
        """Record a registration, which counts as a heartbeat.

        An agent `in_process` runs in this server's process and is never declared failed.
        """
        previous = self.failed.pop(node, None)
        if in_process:
            self.in_process.add(node)
            self.last_seen.pop(node, None)
        else:
            self.last_seen[node] = self.clock()
        if previous is not None:
            log.info("agent recovered node=%s: registered again after it was declared failed", node)
        elif in_process:
            log.info("agent registered node=%s: it runs in the server's process, so it has no heartbeat deadline",
                     node)
        else:
            log.info("agent registered node=%s", node)

    def heartbeat(self, node: str) -> bool:
        """Record a heartbeat; return False when the agent is not registered and must register."""
        if node in self.in_process:
            return True
        if node not in self.last_seen:
            return False
        self.last_seen[node] = self.clock()
        return True

    def forget(self, node: str) -> None:
        """Stop expecting heartbeats from an agent that leaves."""
        self.last_seen.pop(node, None)
        self.failed.pop(node, None)
        self.in_process.discard(node)

    # Failure detection

    def expired(self, now: float) -> list[str]:
        """Return the nodes whose last heartbeat is more than `timeout` seconds before `now`."""
        return sorted(node for node, seen in self.last_seen.items() if now - seen > self.timeout)

    async def check_deadlines(self) -> list[str]:
        """Declare every agent past its deadline failed; return their nodes."""
        now = self.clock()
        nodes = self.expired(now)
        for node in nodes:
            await self.fail(node, now - self.last_seen[node])
        return nodes

    async def fail(self, node: str, silent_for: float) -> None:
        """Declare the agent of `node` failed: critical serfHealth, no agent record, tasks LOST."""
        self.last_seen.pop(node, None)
        log.warning("agent failed node=%s: no heartbeat for %.1fs (timeout %gs)", node, silent_for, self.timeout)
        info = self.state.agent(node)
        if info is not None:
            self.failed[node] = FailedAgent(info, time.time())
        output = f"Agent not heard from for {silent_for:.1f}s; declared failed by the server"
        await self.state.update_check(node, SERF_HEALTH_ID, CheckStatus.CRITICAL, output)
        await self.state.deregister_agent(node)
        partition_aware = {
            framework.id for framework in self.state.frameworks() if PARTITION_AWARE in framework.capabilities
        }
        lost = await lose_tasks(self.state, node, f"agent on node {node} failed: no heartbeat for {silent_for:.1f}s",
                                partition_aware=partition_aware)
        unreachable = sum(1 for task in lost if task.state is TaskState.UNREACHABLE)
        log.info("agent failure handled node=%s tasks_lost=%d tasks_unreachable=%d", node,
                 len(lost) - unreachable, unreachable)


async def lose_tasks(
    state: State, node: str, message: str, partition_aware: Collection[str] = frozenset()
) -> list[Task]:
    """Mark the tasks of `node` that have not ended LOST with desired state STOP; return them.

    Tasks that have ended keep their state, a framework task that FAILED included.

    Desired STOP keeps them out of the scheduler's live tasks for good. An
    agent process that resumes (after a pause or a partition) still has their
    runners, reads desired STOP and kills them. An agent that restarts stops
    the executors of tasks that have ended, LOST ones included.

    A started task of a framework in `partition_aware` (framework ids) becomes
    UNREACHABLE instead and keeps its desired state, so that it runs on if its
    agent comes back. A STAGING one becomes UNREACHABLE with desired STOP: it
    may not have started, so the agent kills it on return.
    """
    # NOTE: an UNREACHABLE task whose agent never comes back is kept for good (no state
    # ends it and ended-task collection skips it); Mesos drops it with the agent after
    # registry_max_agent_age.
    lost = []
    for task in state.tasks(node=node):
        # Task.ended, not TaskState.is_terminal: a framework task that FAILED has ended
        # and keeps that state, while a job task that FAILED is restarted in place.
        reachable_later = bool(task.framework_id) and task.framework_id in partition_aware
        if task.ended or (reachable_later and task.state is TaskState.UNREACHABLE):
            continue

        def lose(record: Task, reachable_later: bool = reachable_later) -> None:
            if record.ended or (reachable_later and record.state is TaskState.UNREACHABLE):
                return
            if not reachable_later:
                record.state = TaskState.LOST
                record.desired = DesiredState.STOP
            else:
                if record.state is TaskState.STAGING:
                    record.desired = DesiredState.STOP
                record.state = TaskState.UNREACHABLE
            record.message = message

        updated = await state.update_task(task.id, lose)
        if updated is not None and updated.state in (TaskState.LOST, TaskState.UNREACHABLE):
            lost.append(updated)
            log.info("task state changed task=%s job=%s framework=%s node=%s from=%s to=%s desired=%s: %s",
                     task.id, task.job, task.framework_id or "-", node, task.state.value, updated.state.value,
                     updated.desired.value, message)
    return lost


def agent_reserved_resources(agent: AgentInfo) -> dict[str, Resources]:
    """Return the static reservations of an agent record by role; raise ValueError naming a bad entry."""
    if not isinstance(agent.reserved, dict):
        raise ValueError(f"invalid reserved resources of agent {agent.node!r}: expected an object by role")
    reserved = {}
    for role, fields in agent.reserved.items():
        problem = role_name_problem(role) if isinstance(role, str) else "is not a string"
        if problem is not None:
            raise ValueError(f"invalid reservation role {role!r} of agent {agent.node!r}: the role {problem}")
        if not isinstance(fields, dict):
            raise ValueError(f"invalid reservation for role {role!r} of agent {agent.node!r}: expected an object")
        unknown = set(fields) - {"cpus", "memory", "disk", "port_ranges"}
        if unknown:
            raise ValueError(f"invalid reservation for role {role!r} of agent {agent.node!r}: unknown field "
                             f"{sorted(unknown)[0]!r}; expected cpus, memory, disk and port_ranges")
        try:
            reserved[role] = Resources(
                cpus=fields.get("cpus", 0.0), mem=fields.get("memory", 0), disk=fields.get("disk", 0),
                ports=fields.get("port_ranges", ()),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid reservation for role {role!r} of agent {agent.node!r}: {exc}") from None
    return reserved
