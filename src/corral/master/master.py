"""The master: drives the allocator from the state and serves frameworks their offers.

The Master keeps the Allocator (corral.master.allocator) in step with the
store: agents join, change and leave it as their records do, and every task
that has not ended uses its resources on its agent. Job tasks count against
the internal framework JOBS_FRAMEWORK_ID. corral's job scheduler subscribes
as that framework in-process (subscribe_jobs) and places job tasks on its
offers. Without it, the framework stays inactive and gets no offers.

Frameworks subscribe with Mesos's FrameworkInfo and receive events on a
Subscription. corral.api.scheduler turns that into the v1 scheduler API's
RecordIO stream, and an in-process framework can use the same calls. The
allocation loop runs every `allocation_interval` seconds and at once after
a change: a new agent or framework, freed resources, a revive. It sends the
allocator's offers as OFFERS events and the offers it takes back as RESCIND.

Status updates come from the store: when an agent changes the state of a
framework's task, the master sends an UPDATE with a fresh uuid. The task
record keeps that uuid until the framework acknowledges it, and the master
resends the update every `status_retry_interval` seconds while the framework
is connected.

A framework whose stream drops is deactivated (its offers rescinded) and
removed once its failover_timeout passes, which kills its tasks, as in
Mesos. Subscribing again with its framework id within the timeout resumes it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from corral.duration import format_duration
from corral.events import EventQueue
from corral.master import protocol
from corral.metrics import ALLOCATION_CYCLE_BUCKETS, AllocatorFigures
from corral.master.agents import AgentMonitor
from corral.master.allocator import (
    DEFAULT_REFUSE_SECONDS,
    EMPTY,
    Allocation,
    Allocator,
    AllocatorError,
    InvalidRequestError,
    NotFoundError,
    Offer,
    Quota,
    Rescinded,
    Resources,
)
from corral.master.agents import agent_reserved_resources
from corral.master.protocol import PARTITION_AWARE, ProtocolError, TaskInfo
from corral.state import State
from corral.state.records import AGENTS, FRAMEWORKS, NODES, TASKS, AgentInfo, FrameworkRecord, Task
from corral.store import Event, EventType
from corral.types import DesiredState, TaskState

log = logging.getLogger(__name__)

DEFAULT_ALLOCATION_INTERVAL = 1.0
# Mesos's --offer_timeout has no default, so offers never expire there. corral
# rescinds an offer left unanswered for a minute, so that a framework that
# sits on offers cannot keep others from the resources for long.
DEFAULT_OFFER_TIMEOUT = 60.0
DEFAULT_STATUS_RETRY_INTERVAL = 10.0
# Mesos's scheduler API sends a HEARTBEAT every 15 seconds.
DEFAULT_HEARTBEAT_INTERVAL = 15.0
DEFAULT_ROLE = "*"
# Seconds that the frameworks stored by an earlier run of the server get to subscribe
# again after a restart, even when their failover_timeout is shorter.
RESUBSCRIBE_GRACE = 60.0

# CPython's garbage-collector thresholds (generation 0, 1, 2) for a process
# that runs the master. The default (700, 10, 10) starts a young collection
# every 700 new container objects, so an allocation cycle that makes 10,000
# offers runs at least 14 of them. In bench/allocator/run on a 2-CPU machine,
# a full collection of a heap that contains the objects of 100,000 tasks took
# 200 ms or more. With these thresholds, offers accepted or declined before
# the next collection are never scanned, and no full collection happened there
# while the tasks were placed. A higher first threshold makes each young
# collection longer: 50,000 gave young pauses of up to 116 ms there, 20,000 up
# to 24 ms.
# bench/allocator/run --gc default measures CPython's defaults instead.
GC_THRESHOLDS = (20_000, 10, 10)

# The internal framework of the job scheduler, whose tasks run corral's jobs.
JOBS_FRAMEWORK_ID = "corral-jobs"
JOBS_ROLE = "corral-jobs"

_SUPPORTED_OPERATIONS = ("LAUNCH",)

# The maximum number of framework messages one task record keeps for its executor. The oldest are dropped first.
MAX_EXECUTOR_MESSAGES = 100

TASK_KILLING_STATE = "TASK_KILLING_STATE"


class FrameworkRejected(ProtocolError):
    """A valid FrameworkInfo that the master does not accept, such as one with several roles.

    Mesos responds to such a SUBSCRIBE with 200, an ERROR event and the end
    of the stream (Master::subscribe in src/master/master.cpp), not with 400.
    """


class CallError(Exception):
    """A call the master rejects. `status` is the HTTP status the scheduler API returns for it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def tune_garbage_collector() -> None:
    """Raise the process's garbage-collector thresholds to GC_THRESHOLDS, keeping any already higher.

    The thresholds apply to the whole process, so the HTTP and DNS servers
    beside the master get them too.
    """
    current = gc.get_threshold()
    raised = tuple(max(have, minimum) for have, minimum in zip(current, GC_THRESHOLDS))
    if raised != current:
        gc.set_threshold(*raised)
        log.info("garbage collector thresholds raised from=%s to=%s", current, raised)


@dataclass
class MasterConfig:
    # Seconds between allocation cycles. A change also starts a cycle at once.
    allocation_interval: float = DEFAULT_ALLOCATION_INTERVAL
    # Seconds after which an offer not accepted or declined is rescinded. None keeps offers until the framework replies.
    offer_timeout: float | None = DEFAULT_OFFER_TIMEOUT
    # Seconds between resends of a status update that the framework has not acknowledged.
    status_retry_interval: float = DEFAULT_STATUS_RETRY_INTERVAL
    # Seconds between HEARTBEAT events on a subscription stream.
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    # Weight of each role in the DRF order. Roles not listed have weight 1.
    role_weights: dict[str, float] = field(default_factory=dict)
    # Quota limits by role: offers never take a role's consumption over them.
    role_quotas: dict[str, Quota] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("allocation_interval", "status_retry_interval", "heartbeat_interval"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"invalid {name} {value!r}: expected seconds > 0")
        if self.offer_timeout is not None and not self.offer_timeout > 0:
            raise ValueError(f"invalid offer_timeout {self.offer_timeout!r}: expected seconds > 0 or None")
        for role, weight in self.role_weights.items():
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
                raise ValueError(f"invalid weight {weight!r} of role {role!r}: expected a number > 0")


class Subscription(EventQueue):
    """The event stream of one subscribed framework.

    The master puts events in, and the scheduler API (or an in-process framework)
    takes them out with `next`. `close` ends the stream after the events queued,
    and after an ERROR event when given an error.
    """

    def __init__(self, framework_id: str):
        super().__init__()
        self.framework_id = framework_id
        self.stream_id = str(uuid.uuid4())


@dataclass
class _Framework:
    record: FrameworkRecord
    subscription: Subscription | None = None
    suppressed: bool = False
    # Monotonic time at which a disconnected framework is removed.
    failover_deadline: float | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def connected(self) -> bool:
        return self.subscription is not None

    @property
    def partition_aware(self) -> bool:
        return PARTITION_AWARE in self.record.capabilities

    def send(self, event: dict[str, Any]) -> None:
        if self.subscription is not None:
            self.subscription.send(event)


@dataclass
class MasterCounters:
    """Counts of the offer cycle since the master started, for the metrics endpoint."""

    offers_made: int = 0
    offers_accepted: int = 0
    offers_declined: int = 0
    offers_rescinded: int = 0
    tasks_launched: int = 0
    # Wall-clock times of the latest launches, for the allocation rate.
    launch_times: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    # Cycles per bucket of ALLOCATION_CYCLE_BUCKETS (the last one counts slower cycles).
    cycle_buckets: list[int] = field(default_factory=lambda: [0] * (len(ALLOCATION_CYCLE_BUCKETS) + 1))
    cycle_count: int = 0
    cycle_seconds_total: float = 0.0

    def observe_cycle(self, seconds: float) -> None:
        self.cycle_count += 1
        self.cycle_seconds_total += seconds
        index = next((i for i, bound in enumerate(ALLOCATION_CYCLE_BUCKETS) if seconds <= bound),
                     len(ALLOCATION_CYCLE_BUCKETS))
        self.cycle_buckets[index] += 1


class Master:
    """The offer cycle over the state's agents and tasks, and the frameworks it serves."""

    def __init__(
        self,
        state: State,
        config: MasterConfig | None = None,
        monitor: AgentMonitor | None = None,
        clock: Callable[[], float] = time.monotonic,
        master_info: dict[str, Any] | None = None,
    ):
        self.state = state
        self.config = config or MasterConfig()
        self.monitor = monitor
        self.clock = clock
        self.master_info = master_info or {"id": str(uuid.uuid4()), "ip": 0, "port": 0, "hostname": ""}
        self.allocator = Allocator(offer_timeout=self.config.offer_timeout)
        self.frameworks: dict[str, _Framework] = {}
        self.counters = MasterCounters()
        # Task id -> the resources the allocator counts as used by it.
        self._allocations: dict[str, Allocation] = {}
        # Agents in the allocator, by node, with their hostname for offers.
        self._agents: dict[str, AgentInfo] = {}
        self._known_attributes: dict[str, dict[str, str]] = {}
        # Frameworks removed while this server runs, so that a resubscription is turned away.
        self._removed: set[str] = set()
        # Task id -> monotonic time its pending status update was last sent.
        self._status_sent: dict[str, float] = {}
        # The sequence number of the latest framework message recorded for an executor.
        self._executor_message_seq = 0
        self._changes: deque[list[Event]] = deque()
        # The event stream of corral's own job scheduler, when it places through offers.
        self._jobs_subscription: Subscription | None = None
        self._jobs_subscribed_at = 0.0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    # --- Lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load agents, frameworks and tasks from the state, then run the allocation loop."""
        if self._task is not None:
            return
        tune_garbage_collector()
        for role, weight in self.config.role_weights.items():
            self.allocator.update_weight(role, weight)
        for role, quota in self.config.role_quotas.items():
            self.allocator.update_quota(role, quota)
        self.allocator.add_framework(JOBS_FRAMEWORK_ID, JOBS_ROLE, active=False)
        now = self.clock()
        for record in self.state.frameworks():
            deadline = now + max(record.failover_timeout, RESUBSCRIBE_GRACE)
            framework = _Framework(record, failover_deadline=deadline)
            self.frameworks[record.id] = framework
            self.allocator.add_framework(record.id, record.role, active=False)
        for agent in self.state.agents():
            self._add_agent(agent)
        self.state.view.add_listener(self._on_change)
        self._task = asyncio.create_task(self._run(), name="master")
        log.info(
            "master started agents=%d frameworks=%d allocation_interval=%gs offer_timeout=%s",
            len(self._agents), len(self.frameworks), self.config.allocation_interval,
            "off" if self.config.offer_timeout is None else f"{self.config.offer_timeout:g}s",
        )

    async def stop(self) -> None:
        if self._task is None:
            return
        self.state.view.remove_listener(self._on_change)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        for framework in self.frameworks.values():
            if framework.subscription is not None:
                # No ERROR event: frameworks reconnect to a restarted master and resubscribe.
                framework.subscription.close()
                framework.subscription = None
        log.info("master stopped")

    def _on_change(self, batch: list[Event]) -> None:
        if any(event.kv.key.startswith((AGENTS, TASKS, NODES)) for event in batch):
            self._changes.append(batch)
            self._wakeup.set()

    def wake(self) -> None:
        """Run an allocation cycle soon instead of at the next interval."""
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.config.allocation_interval):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("master cycle failed; retrying in %gs", self.config.allocation_interval)

    async def run_once(self) -> None:
        """Apply the store's changes, remove frameworks past their failover timeout, allocate, resend updates."""
        while self._changes:
            await self._apply_changes(self._changes.popleft())
        now = self.clock()
        await self._expire_frameworks(now)
        self.allocate(now)
        self._resend_updates(now)

    # --- Allocation -----------------------------------------------------------------------

    def allocate(self, now: float | None = None) -> list[Offer]:
        """Run one allocation cycle: send RESCIND for the offers it timed out, then send its new offers."""
        now = self.clock() if now is None else now
        cycle = self.allocator.allocate(now)
        self.counters.observe_cycle(cycle.seconds)
        self._send_rescinds(cycle.rescinded)
        by_framework: dict[str, list[dict]] = {}
        for offer in cycle.offers:
            # Mesos sends the agent's hostname. An agent's node name defaults to its host
            # name, and several agents on one machine differ only by node name.
            by_framework.setdefault(offer.framework_id, []).append(protocol.offer_to_json(offer, offer.agent_id))
        for framework_id, offers in by_framework.items():
            if framework_id == JOBS_FRAMEWORK_ID and self._jobs_subscription is not None:
                self._jobs_subscription.send(protocol.offers_event(offers))
                log.debug("offers sent to the job scheduler offers=%d", len(offers))
                continue
            framework = self.frameworks.get(framework_id)
            if framework is not None:
                framework.send(protocol.offers_event(offers))
                log.info("offers sent framework=%s offers=%d agents=%s", framework_id, len(offers),
                         ",".join(sorted({offer["agent_id"]["value"] for offer in offers})))
        self.counters.offers_made += len(cycle.offers)
        return cycle.offers

    def _send_rescinds(self, rescinded: Iterable[Rescinded]) -> None:
        for item in rescinded:
            self.counters.offers_rescinded += 1
            framework = self.frameworks.get(item.offer.framework_id)
            if framework is not None:
                framework.send(protocol.rescind_event(item.offer.id))
            elif item.offer.framework_id == JOBS_FRAMEWORK_ID and self._jobs_subscription is not None:
                self._jobs_subscription.send(protocol.rescind_event(item.offer.id))
            log.info("offer rescinded offer=%s framework=%s agent=%s reason=%s",
                     item.offer.id, item.offer.framework_id, item.offer.agent_id, item.reason.value)

    # --- Agents -----------------------------------------------------------------------------

    def _agent_resources(self, agent: AgentInfo) -> Resources:
        return Resources(cpus=agent.cpus, mem=agent.memory, disk=agent.disk, ports=agent.port_ranges)

    def _agent_reserved(self, agent: AgentInfo) -> dict[str, Resources]:
        try:
            return agent_reserved_resources(agent)
        except ValueError as exc:
            # The register endpoint validates reservations, so only a record written otherwise gets here.
            log.error("agent reservations ignored agent=%s: %s", agent.node, exc)
            return {}

    def _attributes(self, node: str) -> dict[str, str]:
        record = self.state.node(node)
        return dict(record.meta) if record is not None else {}

    def _add_agent(self, agent: AgentInfo) -> None:
        attributes = self._attributes(agent.node)
        self.allocator.add_agent(agent.node, self._agent_resources(agent), reserved=self._agent_reserved(agent),
                                 attributes=attributes)
        self._known_attributes[agent.node] = attributes
        self._agents[agent.node] = agent
        for task in self.state.tasks(node=agent.node):
            self._sync_allocation(task)
        log.info("agent added to the allocator agent=%s cpus=%g mem=%d disk=%d reserved_roles=%s",
                 agent.node, agent.cpus, agent.memory, agent.disk, ",".join(sorted(agent.reserved)) or "-")

    def _update_agent(self, agent: AgentInfo) -> None:
        previous = self._agents[agent.node]
        self._agents[agent.node] = agent
        if self._agent_resources(previous) == self._agent_resources(agent) and previous.reserved == agent.reserved:
            return
        try:
            rescinded = self.allocator.update_agent(
                agent.node, self._agent_resources(agent), reserved=self._agent_reserved(agent),
                attributes=self._attributes(agent.node),
            )
        except InvalidRequestError as exc:
            log.error("agent resources not updated agent=%s: %s", agent.node, exc)
            return
        self._send_rescinds(rescinded)

    async def _remove_agent(self, node: str) -> None:
        self._agents.pop(node, None)
        self._known_attributes.pop(node, None)
        self._send_rescinds(self.allocator.remove_agent(node))
        for task_id in [task_id for task_id, allocation in self._allocations.items() if allocation.agent_id == node]:
            del self._allocations[task_id]
        failed = self.monitor is not None and node in self.monitor.failed
        if failed:
            for framework in self.frameworks.values():
                framework.send(protocol.failure_event(node))
            log.info("agent failure sent to frameworks agent=%s frameworks=%d", node,
                     sum(1 for framework in self.frameworks.values() if framework.connected))
        else:
            await self._mark_tasks_gone(node)

    async def _mark_tasks_gone(self, node: str) -> None:
        """End the framework tasks of an agent that left for good: GONE, or LOST for frameworks not partition-aware."""
        for task in self.state.tasks(node=node):
            framework = self.frameworks.get(task.framework_id)
            if framework is None or task.ended:
                continue
            state = TaskState.GONE if framework.partition_aware else TaskState.LOST

            def end(record: Task, state: TaskState = state) -> None:
                if not record.ended:
                    record.state = state
                    record.desired = DesiredState.STOP
                    record.message = f"agent on node {node} left the cluster"

            await self.state.update_task(task.id, end)

    # --- Store changes ------------------------------------------------------------------------

    async def _apply_changes(self, batch: list[Event]) -> None:
        for event in batch:
            key = event.kv.key
            if key.startswith(AGENTS):
                await self._apply_agent_change(event)
            elif key.startswith(TASKS):
                await self._apply_task_change(event)
            elif key.startswith(NODES) and event.type is EventType.PUT:
                self._apply_node_change(event)

    async def _apply_agent_change(self, event: Event) -> None:
        node = event.kv.key[len(AGENTS):].decode()
        if event.type is EventType.DELETE:
            if node in self._agents:
                await self._remove_agent(node)
            return
        agent = AgentInfo.decode(event.kv.value)
        if node in self._agents:
            self._update_agent(agent)
        else:
            self._add_agent(agent)
            await self._reach_tasks_again(node)

    async def _reach_tasks_again(self, node: str) -> None:
        """Turn the UNREACHABLE tasks of a returning agent that should still run back to RUNNING.

        Their frameworks are partition-aware (corral.master.agents) and get
        TASK_RUNNING, as Mesos sends when the agent registers again. The agent
        kills those with desired STOP and reports them KILLED itself.
        """
        # NOTE: the agent's registration does not list the tasks it runs, so a task whose
        # process ended during the partition is RUNNING until the agent reports its end.
        message = f"agent on node {node} registered again"
        for task in self.state.tasks(node=node):
            if task.state is not TaskState.UNREACHABLE or task.desired is not DesiredState.RUN:
                continue

            def reach(record: Task) -> None:
                if record.state is TaskState.UNREACHABLE and record.desired is DesiredState.RUN:
                    record.state = TaskState.RUNNING
                    record.message = message

            updated = await self.state.update_task(task.id, reach)
            if updated is not None and updated.state is TaskState.RUNNING:
                log.info("task state changed task=%s framework=%s agent=%s from=UNREACHABLE to=RUNNING: %s",
                         task.framework_task_id, task.framework_id, node, message)

    def _apply_node_change(self, event: Event) -> None:
        # Attributes come from the node's meta, which the agent may write after its agent record.
        node = event.kv.key[len(NODES):].decode()
        agent = self._agents.get(node)
        attributes = self._attributes(node)
        if agent is None or self._known_attributes.get(node) == attributes:
            return
        self._known_attributes[node] = attributes
        try:
            rescinded = self.allocator.update_agent(node, self._agent_resources(agent),
                                                    reserved=self._agent_reserved(agent), attributes=attributes)
        except InvalidRequestError as exc:
            log.error("agent attributes not updated agent=%s: %s", node, exc)
            return
        self._send_rescinds(rescinded)

    async def _apply_task_change(self, event: Event) -> None:
        task_id = event.kv.key[len(TASKS):].decode()
        if event.type is EventType.DELETE:
            allocation = self._allocations.pop(task_id, None)
            if allocation is not None:
                self._recover(allocation)
            self._status_sent.pop(task_id, None)
            return
        task = Task.decode(event.kv.value)
        previous = Task.decode(event.prev_kv.value) if event.prev_kv is not None else None
        self._sync_allocation(task)
        if not task.framework_id or task.state is TaskState.STAGING:
            return
        if previous is not None and (previous.state is task.state or previous.ended):
            return
        framework = self.frameworks.get(task.framework_id)
        if framework is None:
            return
        if task.state is TaskState.KILLING and TASK_KILLING_STATE not in framework.record.capabilities:
            # Mesos sends TASK_KILLING only to frameworks that ask for it.
            return
        await self._send_task_update(framework, task)

    # --- Resources held by tasks ---------------------------------------------------------------------

    def _task_resources(self, task: Task) -> Resources:
        ports = [(port, port) for port in task.ports.values()]
        return Resources(cpus=task.cpus, mem=task.memory, disk=task.disk, ports=ports)

    def _sync_allocation(self, task: Task) -> None:
        """Make the allocator hold the task's resources while it has not ended, and release them after."""
        current = self._allocations.get(task.id)
        held = task.holds_resources and task.node in self._agents
        if not held:
            if current is not None:
                del self._allocations[task.id]
                self._recover(current)
            return
        if current is not None:
            # A job task's ports are chosen by its agent after placement.
            if task.framework_id or set(current.resources.ports) == set(self._task_resources(task).ports):
                return
            del self._allocations[task.id]
            self._recover(current)
        framework_id = task.framework_id if task.framework_id in self.frameworks else JOBS_FRAMEWORK_ID
        resources = self._task_resources(task)
        try:
            self._allocations[task.id] = self._add_task_allocation(framework_id, task.node, resources)
            return
        except InvalidRequestError:
            pass
        # The resources are offered: take those offers back, then count the task.
        offered = [offer.id for offer in self.allocator.outstanding_offers() if offer.agent_id == task.node]
        self._send_rescinds(self.allocator.rescind(offer_id) for offer_id in offered)
        try:
            self._allocations[task.id] = self._add_task_allocation(framework_id, task.node, resources)
        except InvalidRequestError as exc:
            # NOTE: a job task's agent chooses its ports after the offer was accepted. A framework
            # can therefore launch on one of those ports at the same moment, and both tasks then run.
            log.warning("task resources not counted task=%s agent=%s: %s", task.id, task.node, exc)

    def _add_task_allocation(self, framework_id: str, node: str, resources: Resources) -> Allocation:
        """Count a running task's resources, taking them from its role's free reservation first, as launches do."""
        role = self.frameworks[framework_id].record.role if framework_id in self.frameworks else JOBS_ROLE
        _, free_reserved = self.allocator.free_resources(node)
        reserved = resources.intersection(free_reserved.get(role, EMPTY))
        return self.allocator.add_allocation(framework_id, node, resources - reserved, reserved)

    def _recover(self, allocation: Allocation) -> None:
        try:
            if self.allocator.recover_resources(allocation):
                self.wake()
        except InvalidRequestError as exc:
            log.warning("task resources not recovered agent=%s framework=%s: %s",
                        allocation.agent_id, allocation.framework_id, exc)

    # --- Subscriptions -------------------------------------------------------------------------------

    async def subscribe(self, framework_info: Any) -> Subscription:
        """Subscribe a framework (new, or resuming with framework_info.id) and return its event stream.

        The first event is SUBSCRIBED, followed by the unacknowledged status
        updates of its tasks. A resumed framework's previous stream gets an
        ERROR event and ends. Raises ProtocolError for an invalid FrameworkInfo
        and CallError for a framework that was removed.
        """
        try:
            info = _parse_framework_info(framework_info)
        except FrameworkRejected as exc:
            rejected = Subscription(_framework_info_id(framework_info))
            rejected.close(str(exc))
            log.warning("framework subscription rejected framework=%s: %s", rejected.framework_id or "-", exc)
            return rejected
        framework_id = info.id or str(uuid.uuid4())
        if framework_id in self._removed:
            raise CallError(403, f"Framework {framework_id} has been removed; subscribe without an id")
        subscription = Subscription(framework_id)
        framework = self.frameworks.get(framework_id)
        if framework is None:
            info.id = framework_id
            info.registered_at = time.time()
            await self.state.put_framework(info)
            framework = _Framework(info)
            self.frameworks[framework_id] = framework
            self.allocator.add_framework(framework_id, info.role)
            log.info("framework subscribed framework=%s name=%s role=%s failover_timeout=%gs",
                     framework_id, info.name, info.role, info.failover_timeout)
        else:
            if info.role != framework.record.role:
                raise CallError(400, f"Framework {framework_id} has role {framework.record.role!r}; "
                                     f"changing it to {info.role!r} is not supported")
            if framework.subscription is not None:
                framework.subscription.close("Framework failed over")
            info.registered_at = framework.record.registered_at
            framework.record = info
            await self.state.put_framework(info)
            framework.failover_deadline = None
            self.allocator.activate_framework(framework_id)
            log.info("framework resubscribed framework=%s name=%s", framework_id, info.name)
        framework.subscription = subscription
        subscription.send(protocol.subscribed_event(framework_id, self.config.heartbeat_interval, self.master_info))
        for task in self._framework_tasks(framework_id):
            if task.status is not None and not task.status_acknowledged:
                subscription.send(protocol.update_event(task.status))
                self._status_sent[task.id] = self.clock()
        self.wake()
        return subscription

    # --- corral's own job scheduler as a framework -------------------------------------------------

    def subscribe_jobs(self) -> Subscription:
        """Connect the job scheduler as the internal framework JOBS_FRAMEWORK_ID and return its event stream.

        It starts suppressed: the job scheduler revives it while instances wait for resources.
        """
        if self._jobs_subscription is not None:
            self._jobs_subscription.close()
        subscription = Subscription(JOBS_FRAMEWORK_ID)
        self._jobs_subscription = subscription
        self._jobs_subscribed_at = time.time()
        self.allocator.suppress(JOBS_FRAMEWORK_ID)
        self.allocator.activate_framework(JOBS_FRAMEWORK_ID)
        subscription.send(protocol.subscribed_event(JOBS_FRAMEWORK_ID, self.config.heartbeat_interval,
                                                    self.master_info))
        log.info("job scheduler subscribed framework=%s role=%s", JOBS_FRAMEWORK_ID, JOBS_ROLE)
        return subscription

    def unsubscribe_jobs(self) -> None:
        if self._jobs_subscription is None:
            return
        self._jobs_subscription.close()
        self._jobs_subscription = None
        self._send_rescinds(self.allocator.deactivate_framework(JOBS_FRAMEWORK_ID))

    def set_jobs_wanting_offers(self, wanted: bool) -> None:
        """Revive the job scheduler's offers while it has instances to place, and suppress them otherwise."""
        if wanted:
            self.allocator.revive(JOBS_FRAMEWORK_ID)
            self.wake()
        else:
            self.allocator.suppress(JOBS_FRAMEWORK_ID)

    async def accept_job_tasks(self, offer_id: str, tasks: list[Task]) -> bool:
        """Launch job tasks on one of the job scheduler's offers. Return False when the offer is gone.

        The rest of the offer returns at once, with no refuse filter. Job tasks
        take no ports from the offer: their agent picks them, and the allocator
        counts them when the task record shows them.
        """
        try:
            offer = self.allocator.offer(offer_id)
        except NotFoundError:
            return False
        if offer.framework_id != JOBS_FRAMEWORK_ID:
            raise InvalidRequestError(f"offer {offer_id} is not offered to the job scheduler")
        resources = [self._task_resources(task) for task in tasks]
        allocations = self.allocator.accept(offer_id, resources, self.clock(), refuse_seconds=0)
        for task, allocation in zip(tasks, allocations, strict=True):
            self._allocations[task.id] = allocation
        await self.state.put_tasks(tasks)
        if tasks:
            self.counters.offers_accepted += 1
            self.counters.tasks_launched += len(tasks)
            self.counters.launch_times.extend([time.time()] * len(tasks))
        else:
            self.counters.offers_declined += 1
        self.wake()
        return True

    def decline_job_offers(self, offer_ids: Iterable[str]) -> None:
        """Return offers the job scheduler did not use, with no refuse filter."""
        now = self.clock()
        for offer_id in offer_ids:
            try:
                self.allocator.decline(offer_id, now, refuse_seconds=0)
            except NotFoundError:
                continue
            self.counters.offers_declined += 1

    def disconnected(self, subscription: Subscription) -> None:
        """Deactivate the framework of a stream that dropped and start its failover timeout."""
        subscription.close()
        framework = self.frameworks.get(subscription.framework_id)
        if framework is None or framework.subscription is not subscription:
            return
        framework.subscription = None
        framework.failover_deadline = self.clock() + framework.record.failover_timeout
        self._send_rescinds(self.allocator.deactivate_framework(framework.id))
        log.info("framework disconnected framework=%s failover_timeout=%gs", framework.id,
                 framework.record.failover_timeout)
        if framework.record.failover_timeout == 0:
            self.wake()

    async def _expire_frameworks(self, now: float) -> None:
        for framework in list(self.frameworks.values()):
            deadline = framework.failover_deadline
            if framework.connected or deadline is None or deadline > now:
                continue
            log.info("framework failover timeout passed framework=%s: removing it and killing its tasks",
                     framework.id)
            await self.remove_framework(framework.id)

    async def remove_framework(self, framework_id: str) -> None:
        """Remove a framework: close its stream, kill its tasks and forget it (TEARDOWN, failover timeout)."""
        framework = self.frameworks.pop(framework_id, None)
        if framework is None:
            return
        self._removed.add(framework_id)
        if framework.subscription is not None:
            framework.subscription.close("Framework has been removed")
        tasks = self._framework_tasks(framework_id)
        for task in tasks:
            if not task.ended and task.desired is DesiredState.RUN:
                await self.state.set_desired([task.id], DesiredState.STOP)
        self.counters.offers_rescinded += len(self.allocator.remove_framework(framework_id))
        # The allocator released the resources the tasks used. Until their agents stop them, the
        # internal jobs framework counts those resources as used, so that offers leave them out.
        for task in tasks:
            self._allocations.pop(task.id, None)
            self._sync_allocation(self.state.task(task.id) or task)
        await self.state.delete_framework(framework_id)
        log.info("framework removed framework=%s", framework_id)
        self.wake()

    def framework_for_call(self, framework_id: str, stream_id: str | None) -> _Framework:
        """Return the framework a call comes from, or raise CallError with the status Mesos returns."""
        framework = self.frameworks.get(framework_id)
        if framework is None:
            # Mesos returns 400 with this text (src/master/http.cpp, Master::Http::scheduler).
            raise CallError(400, "Framework cannot be found")
        if framework.subscription is None:
            raise CallError(403, "Framework is not subscribed")
        if not stream_id:
            raise CallError(400, "All non-subscribe calls should include the 'Mesos-Stream-Id' header")
        if stream_id != framework.subscription.stream_id:
            raise CallError(
                400,
                f"The stream ID '{stream_id}' included in this request didn't match the stream ID "
                f"currently associated with framework ID {framework_id}",
            )
        return framework

    # --- Calls ------------------------------------------------------------------------------------------

    async def accept(self, framework_id: str, call: dict[str, Any]) -> None:
        """ACCEPT: launch tasks on offers of one agent, and return the rest with the call's filters."""
        framework = self.frameworks[framework_id]
        offer_ids = [protocol.read_id(item, "accept.offer_ids[]")
                     for item in protocol.read_list(call.get("offer_ids", []), "accept.offer_ids")]
        refuse_seconds = _refuse_seconds(call.get("filters"), "accept.filters")
        infos = _launch_task_infos(call.get("operations", []))
        now = self.clock()
        offers, problem = self._offers_for_accept(framework_id, offer_ids)
        if problem:
            for offer in offers:
                self.allocator.decline(offer.id, now, refuse_seconds=0)
            state = protocol.TASK_DROPPED if framework.partition_aware else protocol.state_name(TaskState.LOST)
            for raw in infos:
                task_id = _raw_task_id(raw)
                if task_id:
                    await self._send_master_update(framework, task_id, state, protocol.REASON_INVALID_OFFERS,
                                                   problem)
            log.warning("accept rejected framework=%s offers=%s: %s", framework_id, ",".join(offer_ids), problem)
            return
        launches, tasks = await self._validate_launches(framework, offers, infos)
        allocations: list[Allocation] = []
        for offer in offers:
            resources = [info.held_resources for info in launches[offer.id]]
            allocations += self.allocator.accept(offer.id, resources, now, refuse_seconds=refuse_seconds)
            if resources:
                self.counters.offers_accepted += 1
            else:
                self.counters.offers_declined += 1
        for task, allocation in zip(tasks, allocations, strict=True):
            self._allocations[task.id] = allocation
        await self.state.put_tasks(tasks)
        self.counters.tasks_launched += len(tasks)
        now_wall = time.time()
        self.counters.launch_times.extend([now_wall] * len(tasks))
        for task in tasks:
            log.info("task launched task=%s framework=%s agent=%s cpus=%g mem=%d ports=%s",
                     task.framework_task_id, framework_id, task.node, task.cpus, task.memory,
                     ",".join(str(port) for port in task.ports.values()) or "-")
        self.wake()

    def _offers_for_accept(self, framework_id: str, offer_ids: list[str]) -> tuple[list[Offer], str]:
        """Return the valid offers of an ACCEPT and, when the call is invalid, why."""
        offers: list[Offer] = []
        problem = ""
        for offer_id in offer_ids:
            try:
                offer = self.allocator.offer(offer_id)
            except NotFoundError:
                problem = problem or f"Offer {offer_id} is no longer valid"
                continue
            if offer.framework_id != framework_id:
                problem = problem or f"Offer {offer_id} is not offered to framework {framework_id}"
                continue
            offers.append(offer)
        if not offer_ids:
            problem = "No offer ids in the ACCEPT call"
        if len({offer.agent_id for offer in offers}) > 1:
            problem = problem or "Aggregated offers must belong to one agent"
        if len(set(offer_ids)) != len(offer_ids):
            problem = problem or "Duplicate offer ids in the ACCEPT call"
        return offers, problem

    async def _validate_launches(
        self, framework: _Framework, offers: list[Offer], infos: list[Any]
    ) -> tuple[dict[str, list[TaskInfo]], list[Task]]:
        """Check each TaskInfo against the offers and reject invalid ones with a TASK_ERROR update.

        Returns the valid tasks grouped by the offer whose resources they
        use, and their Task records, in the order of the allocator's accepts.
        """
        remaining = {offer.id: offer.total for offer in offers}
        launches: dict[str, list[TaskInfo]] = {offer.id: [] for offer in offers}
        seen: set[str] = set()
        # ExecutorInfo JSON of the custom executors that this call starts, by executor id.
        starting: dict[str, dict[str, Any]] = {}
        agent_id = offers[0].agent_id
        for index, raw in enumerate(infos):
            try:
                info = protocol.parse_task_info(raw, f"task_infos[{index}]")
            except ProtocolError as exc:
                task_id = _raw_task_id(raw)
                log.warning("task rejected framework=%s task=%s: %s", framework.id, task_id or "-", exc)
                if task_id:
                    await self._task_error(framework, task_id, str(exc))
                continue
            problem = self._task_problem(framework, info, agent_id, seen)
            if not problem and info.executor is not None:
                problem = self._executor_problem(framework, info, agent_id, starting)
            chosen = None
            if not problem:
                # NOTE: each task must fit in one of the offers. Mesos also accepts a task whose
                # resources come from several offers of the agent together.
                chosen = next((oid for oid, left in remaining.items() if left.contains(info.held_resources)), None)
                if chosen is None:
                    problem = (f"Task uses more resources {info.held_resources!r} than available in the offers "
                               f"({', '.join(repr(left) for left in remaining.values())})")
            if problem or chosen is None:
                log.warning("task rejected framework=%s task=%s: %s", framework.id, info.task_id, problem)
                await self._task_error(framework, info.task_id, problem)
                continue
            seen.add(info.task_id)
            if info.starts_executor and info.executor is not None:
                starting[info.executor.executor_id] = info.executor.raw
            remaining[chosen] = remaining[chosen] - info.held_resources
            launches[chosen].append(info)
        tasks = [
            self._task_record(framework, info, agent_id)
            for offer in offers
            for info in launches[offer.id]
        ]
        return launches, tasks

    def _task_problem(self, framework: _Framework, info: TaskInfo, agent_id: str, seen: set[str]) -> str:
        if info.agent_id != agent_id:
            return f"Agent {info.agent_id} in the task does not match agent {agent_id} of the offers"
        if info.task_id in seen:
            return f"Task has duplicate ID: {info.task_id}"
        existing = self.state.task(store_task_id(framework.id, info.task_id))
        if existing is not None and not existing.ended:
            return f"Task has duplicate ID: {info.task_id}"
        return ""

    async def _task_error(self, framework: _Framework, task_id: str, message: str) -> None:
        await self._send_master_update(framework, task_id, protocol.state_name(TaskState.ERROR),
                                       protocol.REASON_TASK_INVALID, message)

    def _task_record(self, framework: _Framework, info: TaskInfo, agent_id: str) -> Task:
        agent = self._agents[agent_id]
        ports: dict[str, int] = {}
        for begin, end in info.resources.ports:
            for port in range(begin, end + 1):
                ports[f"port{len(ports)}"] = port
        env = dict(info.env)
        env["MESOS_TASK_ID"] = info.task_id
        env["MESOS_FRAMEWORK_ID"] = framework.id
        env["MESOS_AGENT_ID"] = agent_id
        for index, port in enumerate(ports.values()):
            env[f"PORT{index}"] = str(port)
        # A task that requests no memory gets the agent's total as its limit, so it is not capped.
        memory = math.ceil(info.resources.mem) if info.resources.mem > 0 else agent.memory
        argv = protocol.argv_of(info.command if info.executor is None else info.executor.command)
        kill_timeout = info.kill_grace_seconds if info.kill_grace_seconds is not None else 5.0
        spec = {
            "name": "framework-task",
            "type": "service",
            "count": 1,
            "task": {
                "command": argv[0],
                "args": argv[1:],
                "kill_timeout": format_duration(max(kill_timeout, 0.001)),
                "ports": list(ports),
                "resources": {"cpus": max(info.resources.cpus, 0.001), "memory": memory},
                "env": env,
            },
        }
        held = info.held_resources
        now = time.time()
        task = Task(
            id=store_task_id(framework.id, info.task_id),
            job="",
            instance=0,
            node=agent_id,
            spec_version=0,
            desired=DesiredState.RUN,
            state=TaskState.STAGING,
            cpus=held.cpus,
            memory=math.ceil(held.mem),
            port_labels=list(ports),
            spec=spec,
            ports=ports,
            message="launched by its framework, waiting for the agent",
            created_at=now,
            framework_id=framework.id,
            name=info.name,
            framework_task_id=info.task_id,
            command=info.command,
            env=dict(info.env),
            disk=held.disk,
        )
        if info.executor is not None:
            self._add_executor_fields(task, framework, info, agent_id)
        return task

    def decline(self, framework_id: str, call: dict[str, Any]) -> None:
        """DECLINE: return offers behind a refuse filter (refuse_seconds, default 5)."""
        refuse_seconds = _refuse_seconds(call.get("filters"), "decline.filters")
        now = self.clock()
        for item in protocol.read_list(call.get("offer_ids", []), "decline.offer_ids"):
            offer_id = protocol.read_id(item, "decline.offer_ids[]")
            try:
                offer = self.allocator.offer(offer_id)
            except NotFoundError:
                log.info("decline of an unknown offer ignored framework=%s offer=%s", framework_id, offer_id)
                continue
            if offer.framework_id != framework_id:
                log.warning("decline of another framework's offer ignored framework=%s offer=%s",
                            framework_id, offer_id)
                continue
            self.allocator.decline(offer_id, now, refuse_seconds=refuse_seconds)
            self.counters.offers_declined += 1
            log.debug("offer declined framework=%s offer=%s refuse_seconds=%g", framework_id, offer_id,
                      refuse_seconds)
        self.wake()

    async def kill(self, framework_id: str, call: dict[str, Any]) -> None:
        """KILL: stop a task. An unknown task gets TASK_LOST, and an UNREACHABLE one its current status."""
        framework = self.frameworks[framework_id]
        task_id = protocol.read_id(call.get("task_id"), "kill.task_id")
        task = self.state.task(store_task_id(framework_id, task_id))
        if task is None:
            await self._send_master_update(framework, task_id, protocol.state_name(TaskState.LOST),
                                           protocol.REASON_RECONCILIATION, "Attempted to kill an unknown task")
            return
        if task.ended:
            framework.send(protocol.update_event(self._status_without_uuid(task, framework)))
            return
        if task.desired is not DesiredState.STOP:
            await self.state.set_desired([task.id], DesiredState.STOP)
            log.info("task kill requested task=%s framework=%s agent=%s", task_id, framework_id, task.node)
        if task.state is TaskState.UNREACHABLE:
            # The framework gets the task's current status, TASK_UNREACHABLE, as a reconciliation
            # update. The kill takes effect when the agent registers again and reads desired STOP.
            framework.send(protocol.update_event(self._status_without_uuid(task, framework)))
            log.info("task kill deferred task=%s framework=%s agent=%s: the task is unreachable; its agent kills it "
                     "if it registers again", task_id, framework_id, task.node)

    async def acknowledge(self, framework_id: str, call: dict[str, Any]) -> None:
        """ACKNOWLEDGE: stop resending a status update whose uuid the framework received."""
        task_id = protocol.read_id(call.get("task_id"), "acknowledge.task_id")
        ack_uuid = call.get("uuid")
        if not isinstance(ack_uuid, str) or not ack_uuid:
            raise ProtocolError(f"invalid 'acknowledge.uuid': expected the update's base64 uuid, got {ack_uuid!r}")
        store_id = store_task_id(framework_id, task_id)
        task = self.state.task(store_id)
        if task is None or task.status is None or task.status.get("uuid") != ack_uuid:
            log.info("acknowledgement ignored framework=%s task=%s: no pending update with that uuid",
                     framework_id, task_id)
            return

        def acknowledged(record: Task) -> None:
            if record.status is not None and record.status.get("uuid") == ack_uuid:
                record.status_acknowledged = True

        await self.state.update_task(store_id, acknowledged)
        self._status_sent.pop(store_id, None)
        log.debug("status update acknowledged framework=%s task=%s state=%s", framework_id, task_id,
                  task.status.get("state"))

    def reconcile(self, framework_id: str, call: dict[str, Any]) -> None:
        """RECONCILE: send the latest state of the listed tasks, or of all the framework's tasks when none are listed."""
        framework = self.frameworks[framework_id]
        listed = protocol.read_list(call.get("tasks", []), "reconcile.tasks")
        if not listed:
            count = 0
            for task in self._framework_tasks(framework_id):
                if task.ended and task.status_acknowledged:
                    continue
                framework.send(protocol.update_event(self._status_without_uuid(task, framework)))
                count += 1
            log.info("implicit reconciliation framework=%s tasks=%d", framework_id, count)
            return
        for index, item in enumerate(listed):
            entry = protocol.read_object(item, f"reconcile.tasks[{index}]")
            task_id = protocol.read_id(entry.get("task_id"), f"reconcile.tasks[{index}].task_id")
            task = self.state.task(store_task_id(framework_id, task_id))
            if task is not None:
                framework.send(protocol.update_event(self._status_without_uuid(task, framework)))
                continue
            state = protocol.TASK_UNKNOWN if framework.partition_aware else protocol.state_name(TaskState.LOST)
            agent_id = ""
            if "agent_id" in entry:
                agent_id = protocol.read_id(entry["agent_id"], f"reconcile.tasks[{index}].agent_id")
            framework.send(protocol.update_event(protocol.task_status(
                task_id, state, agent_id=agent_id, reason=protocol.REASON_RECONCILIATION,
                message="Reconciliation: task is unknown",
            )))
        log.info("explicit reconciliation framework=%s tasks=%d", framework_id, len(listed))

    def suppress(self, framework_id: str, call: dict[str, Any]) -> None:
        """SUPPRESS: stop offers to the framework (for its role, when roles are listed)."""
        framework = self.frameworks[framework_id]
        if not _names_role(call, framework.record.role, "suppress"):
            return
        framework.suppressed = True
        self.allocator.suppress(framework_id)

    def revive(self, framework_id: str, call: dict[str, Any]) -> None:
        """REVIVE: resume offers and clear the framework's refuse filters."""
        framework = self.frameworks[framework_id]
        if not _names_role(call, framework.record.role, "revive"):
            return
        framework.suppressed = False
        self.allocator.revive(framework_id)
        self.wake()

    async def teardown(self, framework_id: str) -> None:
        """TEARDOWN: kill all the framework's tasks and remove it."""
        log.info("framework teardown requested framework=%s", framework_id)
        await self.remove_framework(framework_id)

    # --- Custom executors ---------------------------------------------------------------------------------

    def _executor_problem(
        self, framework: _Framework, info: TaskInfo, agent_id: str, starting: dict[str, dict[str, Any]]
    ) -> str:
        """Check a task's ExecutorInfo against the executor's other tasks, and mark it when it starts the executor.

        As in Mesos, every task of one executor on one agent names the same
        ExecutorInfo. The task that starts the executor also uses the executor's resources.
        """
        assert info.executor is not None
        executor_id = info.executor.executor_id
        running = self._executor_tasks(framework.id, agent_id, executor_id)
        known = running[0].task_info.get("executor") if running else starting.get(executor_id)
        if known is not None:
            if known.get("command") != info.executor.raw.get("command"):
                return (f"ExecutorInfo of executor {executor_id} differs from the one its running tasks "
                        f"on agent {agent_id} were launched with")
            return ""
        # NOTE: the executor's resources stay with the task that started it, so they are released
        # when that task ends even though the executor may still run its other tasks.
        info.starts_executor = True
        return ""

    def _executor_tasks(self, framework_id: str, agent_id: str, executor_id: str) -> list[Task]:
        """Return the tasks of one custom executor that have not ended, oldest first."""
        tasks = [
            task for task in self.state.tasks(node=agent_id)
            if task.framework_id == framework_id and task.executor_id == executor_id and not task.ended
        ]
        return sorted(tasks, key=lambda task: (task.created_at, task.id))

    def _add_executor_fields(self, task: Task, framework: _Framework, info: TaskInfo, agent_id: str) -> None:
        """Fill in what the agent sends a custom executor: the TaskInfo for LAUNCH and the FrameworkInfo."""
        assert info.executor is not None
        record = framework.record
        task.executor_id = info.executor.executor_id
        task.command = dict(info.executor.command)
        task.env = dict(info.executor.env)
        task.task_info = {
            "name": info.name,
            "task_id": protocol.id_message(info.task_id),
            "agent_id": protocol.id_message(agent_id),
            "resources": protocol.resources_to_json(info.resources),
            "executor": {**info.executor.raw, "framework_id": protocol.id_message(framework.id)},
            "data": info.data,
        }
        if info.kill_grace_seconds is not None:
            task.task_info["kill_policy"] = {"grace_period": {"nanoseconds": int(info.kill_grace_seconds * 1e9)}}
        task.framework_info = {
            "id": protocol.id_message(record.id),
            "name": record.name,
            "user": record.user,
            "role": record.role,
            "failover_timeout": record.failover_timeout,
            "capabilities": [{"type": capability} for capability in record.capabilities],
            "hostname": record.hostname,
        }

    async def message(self, framework_id: str, call: dict[str, Any]) -> None:
        """MESSAGE: record data for an executor, for its agent to deliver.

        The data is dropped when the executor has no live task.
        Delivery is at most once, as in Mesos. The agent (corral.agent.custom_executor)
        skips messages whose seq it has already delivered. A task record keeps only
        its latest MAX_EXECUTOR_MESSAGES messages, so a burst that the agent has
        not read yet loses its oldest messages.
        """
        agent_id = protocol.read_id(call.get("agent_id"), "message.agent_id")
        executor_id = protocol.read_id(call.get("executor_id"), "message.executor_id")
        data = protocol.read_base64(call.get("data"), "message.data")
        tasks = self._executor_tasks(framework_id, agent_id, executor_id)
        if not tasks:
            log.warning("framework message dropped framework=%s executor=%s agent=%s: the executor has no live task",
                        framework_id, executor_id, agent_id)
            return
        self._executor_message_seq = max(time.time_ns(), self._executor_message_seq + 1)
        entry = {"seq": self._executor_message_seq, "data": data}

        def add(record: Task) -> None:
            record.executor_messages = [*record.executor_messages, entry][-MAX_EXECUTOR_MESSAGES:]

        await self.state.update_task(tasks[0].id, add)
        log.info("framework message recorded framework=%s executor=%s agent=%s bytes=%d",
                 framework_id, executor_id, agent_id, len(data) * 3 // 4)

    async def shutdown(self, framework_id: str, call: dict[str, Any]) -> None:
        """SHUTDOWN: have the agent shut an executor down, which kills its tasks that have not ended."""
        agent_id = protocol.read_id(call.get("agent_id"), "shutdown.agent_id")
        executor_id = protocol.read_id(call.get("executor_id"), "shutdown.executor_id")
        tasks = self._executor_tasks(framework_id, agent_id, executor_id)

        def shut_down(record: Task) -> None:
            record.executor_shutdown = True
            record.desired = DesiredState.STOP

        for task in tasks:
            await self.state.update_task(task.id, shut_down)
        log.info("executor shutdown requested framework=%s executor=%s agent=%s tasks=%d",
                 framework_id, executor_id, agent_id, len(tasks))

    def executor_message(self, framework_id: str, agent_id: str, executor_id: str, data: str) -> bool:
        """Send an executor's message to its framework as a MESSAGE event.

        Return False when the framework is not connected.
        """
        framework = self.frameworks.get(framework_id)
        if framework is None or not framework.connected:
            log.warning("executor message dropped framework=%s executor=%s agent=%s: the framework is not connected",
                        framework_id, executor_id, agent_id)
            return False
        framework.send(protocol.message_event(agent_id, executor_id, data))
        log.debug("executor message sent framework=%s executor=%s agent=%s", framework_id, executor_id, agent_id)
        return True

    def executor_exited(self, framework_id: str, agent_id: str, executor_id: str, status: int | None) -> None:
        """Tell a framework that one of its executors exited, with a FAILURE event."""
        framework = self.frameworks.get(framework_id)
        if framework is None:
            return
        framework.send(protocol.executor_failure_event(agent_id, executor_id, status))
        log.info("executor exit sent to framework framework=%s executor=%s agent=%s status=%s",
                 framework_id, executor_id, agent_id, status)

    # --- Status updates ----------------------------------------------------------------------------------

    async def _send_task_update(self, framework: _Framework, task: Task) -> None:
        """Send an UPDATE for a task's new state, and keep it in the record until acknowledged."""
        state = task.state
        reason = _reason_of(task)
        status = protocol.task_status(
            task.framework_task_id, protocol.state_name(state), agent_id=task.node,
            source=_source_of(task.state), reason=reason, message=task.message, with_uuid=True,
            executor_id=_executor_id_of(task),
        )

        def record_status(record: Task) -> None:
            record.status = status
            record.status_acknowledged = False

        updated = await self.state.update_task(task.id, record_status)
        if updated is None:
            return
        framework.send(protocol.update_event(status))
        self._status_sent[task.id] = self.clock()
        log.info("status update sent task=%s framework=%s agent=%s state=%s", task.framework_task_id,
                 framework.id, task.node, status["state"])

    async def _send_master_update(
        self, framework: _Framework, task_id: str, state: str, reason: str, message: str
    ) -> None:
        """Send an update about a task that has no record, such as an invalid launch.

        The update needs no acknowledgement.
        """
        framework.send(protocol.update_event(protocol.task_status(
            task_id, state, reason=reason, message=message,
        )))
        log.info("status update sent task=%s framework=%s state=%s reason=%s", task_id, framework.id, state, reason)

    def _status_without_uuid(self, task: Task, framework: _Framework) -> dict[str, Any]:
        """Return a task's latest status for reconciliation: no uuid, so no acknowledgement.

        A KILLING task is reported RUNNING to a framework without the
        TASK_KILLING_STATE capability, as Mesos does.
        """
        state = _reported_state(task)
        if task.state is TaskState.KILLING and TASK_KILLING_STATE not in framework.record.capabilities:
            state = protocol.state_name(TaskState.RUNNING)
        if task.status is not None and task.status.get("state") == state:
            status = dict(task.status)
            status.pop("uuid", None)
            status["reason"] = protocol.REASON_RECONCILIATION
            return status
        return protocol.task_status(
            task.framework_task_id, state, agent_id=task.node,
            reason=protocol.REASON_RECONCILIATION, message=task.message,
            executor_id=_executor_id_of(task),
        )

    def _resend_updates(self, now: float) -> None:
        interval = self.config.status_retry_interval
        for task_id, sent_at in list(self._status_sent.items()):
            if now - sent_at < interval:
                continue
            task = self.state.task(task_id)
            framework = self.frameworks.get(task.framework_id) if task is not None else None
            if task is None or framework is None or task.status_acknowledged or task.status is None:
                del self._status_sent[task_id]
                continue
            if framework.connected:
                framework.send(protocol.update_event(task.status))
                self._status_sent[task_id] = now
                log.info("status update resent task=%s framework=%s state=%s", task.framework_task_id,
                         framework.id, task.status.get("state"))

    def _framework_tasks(self, framework_id: str) -> list[Task]:
        return [task for task in self.state.tasks() if task.framework_id == framework_id]

    # --- Operator views -------------------------------------------------------------------------------------

    def frameworks_view(self) -> list[dict[str, Any]]:
        """Return the frameworks as GET /v1/frameworks lists them, corral's job scheduler first while it runs."""
        offered: dict[str, Resources] = {}
        for offer in self.allocator.outstanding_offers():
            offered[offer.framework_id] = offered.get(offer.framework_id, EMPTY) + offer.total
        tasks: dict[str, int] = {}
        for task in self.state.tasks():
            if not task.ended:
                # Job tasks carry no framework id: they are the job scheduler's.
                owner = task.framework_id or JOBS_FRAMEWORK_ID
                tasks[owner] = tasks.get(owner, 0) + 1
        # (id, name, role, connected, suppressed, registered at, failover timeout, user, capabilities)
        entries = []
        if self._jobs_subscription is not None:
            entries.append((JOBS_FRAMEWORK_ID, JOBS_FRAMEWORK_ID, JOBS_ROLE, True,
                            self.allocator.framework_suppressed(JOBS_FRAMEWORK_ID), self._jobs_subscribed_at,
                            0.0, "", []))
        for framework in sorted(self.frameworks.values(), key=lambda item: item.record.registered_at):
            record = framework.record
            entries.append((record.id, record.name, record.role, framework.connected, framework.suppressed,
                            record.registered_at, record.failover_timeout, record.user, list(record.capabilities)))
        result = []
        for framework_id, name, role, connected, suppressed, registered_at, failover, user, capabilities in entries:
            result.append({
                "ID": framework_id,
                "Name": name,
                "Role": role,
                "Active": connected,
                "Connected": connected,
                "Suppressed": suppressed,
                "Tasks": tasks.get(framework_id, 0),
                "Used": protocol.resources_summary(self.allocator.used_resources(framework_id)),
                "Offered": protocol.resources_summary(offered.get(framework_id, EMPTY)),
                "DominantShare": self.allocator.framework_dominant_share(framework_id),
                "RegisteredAt": registered_at,
                "FailoverTimeout": failover,
                "User": user,
                "Capabilities": capabilities,
            })
        return result

    def roles_view(self) -> list[dict[str, Any]]:
        """Return the roles of the frameworks and of the configured weights, as GET /v1/roles lists them."""
        shares = self.allocator.dominant_shares()
        members: dict[str, list[str]] = {}
        if self._jobs_subscription is not None:
            members[JOBS_ROLE] = [JOBS_FRAMEWORK_ID]
        for framework in self.frameworks.values():
            members.setdefault(framework.record.role, []).append(framework.id)
        used: dict[str, Resources] = {}
        offered: dict[str, Resources] = {}
        for role, ids in members.items():
            used[role] = sum((self.allocator.used_resources(fid) for fid in ids), EMPTY)
        for offer in self.allocator.outstanding_offers():
            offered[offer.role] = offered.get(offer.role, EMPTY) + offer.total
        reserved = self.allocator.reservations()
        quotas = self.config.role_quotas
        result = []
        for role in sorted(set(members) | set(self.config.role_weights) | set(quotas) | set(reserved)):
            result.append({
                "Role": role,
                "Weight": self.config.role_weights.get(role, 1.0),
                "Frameworks": sorted(members.get(role, [])),
                "Used": protocol.resources_summary(used.get(role, EMPTY)),
                "Offered": protocol.resources_summary(offered.get(role, EMPTY)),
                "Reserved": protocol.resources_summary(reserved.get(role, EMPTY)),
                "Quota": _quota_summary(quotas[role]) if role in quotas else None,
                "DominantShare": shares.get(role, 0.0),
            })
        return result

    def allocator_figures(self) -> AllocatorFigures:
        """Return the offer cycle's figures for the metrics endpoint."""
        counters = self.counters
        shares = {role: share for role, share in self.allocator.dominant_shares().items() if role != JOBS_ROLE}
        return AllocatorFigures(
            offers_made=counters.offers_made,
            offers_accepted=counters.offers_accepted,
            offers_declined=counters.offers_declined,
            offers_rescinded=counters.offers_rescinded,
            launches_per_second=self.allocation_rate(),
            cycle_bucket_counts=counters.cycle_buckets[:-1],
            cycle_count=counters.cycle_count,
            cycle_seconds_total=counters.cycle_seconds_total,
            dominant_shares=shares,
        )

    def allocation_rate(self, window: float = 60.0) -> float:
        """Return the tasks launched per second over the last `window` seconds."""
        cutoff = time.time() - window
        times = self.counters.launch_times
        while times and times[0] < cutoff:
            times.popleft()
        return len(times) / window


def _quota_summary(quota: Quota) -> dict[str, float]:
    """Return the limited kinds of a quota, such as {"cpus": 2, "mem": 1024}."""
    limits = {"cpus": quota.cpus, "mem": quota.mem, "disk": quota.disk}
    return {kind: limit for kind, limit in limits.items() if limit is not None}


def store_task_id(framework_id: str, task_id: str) -> str:
    """Return the id of a framework's task in the store: task ids are unique only within a framework."""
    return f"{task_id}@{framework_id}"


def _parse_framework_info(value: Any) -> FrameworkRecord:
    info = protocol.read_object(value, "subscribe.framework_info")
    name = info.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"invalid 'framework_info.name': expected a non-empty string, got {name!r}")
    user = info.get("user", "")
    if not isinstance(user, str):
        raise ProtocolError(f"invalid 'framework_info.user': expected a string, got {user!r}")
    roles = info.get("roles")
    role = info.get("role")
    if roles is not None:
        roles = protocol.read_list(roles, "framework_info.roles")
        if len(roles) > 1:
            raise FrameworkRejected(
                f"FrameworkInfo.roles {roles!r} names {len(roles)} roles, but corral supports one role "
                "per framework: subscribe with one role, or with one framework per role"
            )
        role = roles[0] if roles else role
    role = DEFAULT_ROLE if role is None else role
    _check_role(role)
    failover = protocol.read_number(info.get("failover_timeout", 0.0), "framework_info.failover_timeout")
    capabilities = []
    for index, item in enumerate(protocol.read_list(info.get("capabilities", []), "framework_info.capabilities")):
        capability = protocol.read_object(item, f"framework_info.capabilities[{index}]").get("type")
        if not isinstance(capability, str):
            raise ProtocolError(f"invalid 'framework_info.capabilities[{index}].type': expected a string")
        capabilities.append(capability)
    framework_id = ""
    if info.get("id") is not None:
        framework_id = protocol.read_id(info["id"], "framework_info.id")
    return FrameworkRecord(
        id=framework_id,
        name=name,
        user=user,
        role=role,
        failover_timeout=failover,
        capabilities=capabilities,
        hostname=str(info.get("hostname", "")),
        principal=str(info.get("principal", "")),
        webui_url=str(info.get("webui_url", "")),
    )


def _framework_info_id(framework_info: Any) -> str:
    framework_id = framework_info.get("id") if isinstance(framework_info, dict) else None
    value = framework_id.get("value") if isinstance(framework_id, dict) else None
    return value if isinstance(value, str) else ""


def _check_role(role: Any) -> None:
    # Mesos's role names: not empty, not "." or "..", no "/", no whitespace, not starting with "-".
    if not isinstance(role, str) or not role or role in (".", "..") or role.startswith("-"):
        raise ProtocolError(f"invalid role {role!r}: expected a name such as 'web' or '*'")
    if "/" in role or any(character.isspace() for character in role) or role == JOBS_ROLE:
        raise ProtocolError(f"invalid role {role!r}: no '/', whitespace or reserved name {JOBS_ROLE!r}")


def _refuse_seconds(filters: Any, path: str) -> float:
    if filters is None:
        return DEFAULT_REFUSE_SECONDS
    value = protocol.read_object(filters, path).get("refuse_seconds", DEFAULT_REFUSE_SECONDS)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"invalid '{path}.refuse_seconds': expected a number, got {value!r}")
    return float(value)


def _launch_task_infos(operations: Any) -> list[Any]:
    infos: list[Any] = []
    for index, item in enumerate(protocol.read_list(operations, "accept.operations")):
        operation = protocol.read_object(item, f"accept.operations[{index}]")
        kind = operation.get("type")
        if kind not in _SUPPORTED_OPERATIONS:
            raise ProtocolError(
                f"invalid 'accept.operations[{index}].type' {kind!r}: only LAUNCH is supported"
            )
        launch = protocol.read_object(operation.get("launch"), f"accept.operations[{index}].launch")
        infos += protocol.read_list(launch.get("task_infos", []), f"accept.operations[{index}].launch.task_infos")
    return infos


def _raw_task_id(raw: Any) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("task_id"), dict):
        value = raw["task_id"].get("value")
        if isinstance(value, str):
            return value
    return ""


def _names_role(call: dict[str, Any], role: str, what: str) -> bool:
    roles = call.get("roles")
    if roles is None:
        return True
    return role in protocol.read_list(roles, f"{what}.roles")


def _reported_state(task: Task) -> str:
    return protocol.state_name(task.state)


def _executor_id_of(task: Task) -> str:
    """Return the ExecutorID for a task's statuses: Mesos's command executor has its task's id."""
    return task.executor_id or task.framework_task_id


def _source_of(state: TaskState) -> str:
    if state in (TaskState.LOST, TaskState.UNREACHABLE, TaskState.GONE):
        return protocol.SOURCE_MASTER
    return protocol.SOURCE_EXECUTOR


def _reason_of(task: Task) -> str:
    state = task.state
    if state is TaskState.FAILED:
        if task.executor_id:
            # The agent's own messages about a custom executor's tasks start with "executor ".
            return protocol.REASON_EXECUTOR_TERMINATED if task.message.startswith("executor ") else ""
        if "memory" in task.message.lower():
            return protocol.REASON_MEMORY_LIMIT
        return protocol.REASON_COMMAND_EXECUTOR_FAILED
    if state in (TaskState.LOST, TaskState.UNREACHABLE, TaskState.GONE):
        return protocol.REASON_AGENT_REMOVED
    return ""


__all__ = [
    "AllocatorError",
    "CallError",
    "Master",
    "MasterConfig",
    "Subscription",
    "store_task_id",
]
