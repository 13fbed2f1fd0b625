"""The job loop: evaluates every job against its tasks and writes the plan to the state.

The loop runs whenever a job, task or agent changes, and once a second so
that instances which did not fit are retried as resources free up.

With a Master, the job scheduler is a framework of the offer cycle: it
subscribes in-process, and places instances only on the offers it holds,
so that job tasks and the tasks of other frameworks do not take the same
cpus and memory. An instance that fits no agent at all is reported
unplaced, with the reason, from the state's view of the agents. An
instance that fits an agent but none of the offers held waits for the
next offers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.jobspec import Job, parse_job
from corral.master import protocol
from corral.master.allocator import Resources
from corral.scheduler.service import (
    AgentSnapshot,
    BinPackPlacer,
    Placement,
    Placer,
    TaskRequest,
    agent_snapshots,
    reconcile_service,
)
from corral.state import State
from corral.state.records import AGENTS, JOBS, TASKS, JobRecord, JobStatus, Task
from corral.store import Event, StoreError
from corral.types import DesiredState, TaskState

if TYPE_CHECKING:
    from corral.master.master import Master, Subscription

log = logging.getLogger(__name__)

# Ended tasks are kept this long for `corral job status`, then removed.
TERMINAL_TASK_RETENTION = 3600.0


@dataclass(slots=True)
class _HeldOffer:
    """An offer the job scheduler holds: its agent and what is left of its resources."""

    id: str
    agent: str
    resources: Resources


class JobScheduler:
    def __init__(
        self, state: State, placer: Placer | None = None, interval: float = 1.0, master: Master | None = None
    ):
        self.state = state
        self.placer = placer or BinPackPlacer()
        self.interval = interval
        self.master = master
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._events: asyncio.Task | None = None
        self._subscription: Subscription | None = None
        self._offers: dict[str, _HeldOffer] = {}
        self._wants_offers = False

    def start(self) -> None:
        if self._task is not None:
            return
        self.state.view.add_listener(self._on_change)
        if self.master is not None:
            self._subscription = self.master.subscribe_jobs()
            self._events = asyncio.create_task(self._read_events(self._subscription), name="job-scheduler-offers")
        self._task = asyncio.create_task(self._run(), name="job-scheduler")
        log.info("job scheduler started interval=%.1fs placement=%s", self.interval,
                 "offers" if self.master is not None else "direct")

    async def stop(self) -> None:
        if self._task is None:
            return
        self.state.view.remove_listener(self._on_change)
        for task in (self._task, self._events):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._task = None
        self._events = None
        if self.master is not None:
            self.master.unsubscribe_jobs()
        self._offers.clear()
        log.info("job scheduler stopped")

    async def _read_events(self, subscription: Subscription) -> None:
        """Keep the offers the master sends current, and evaluate the jobs when new ones arrive."""
        while True:
            try:
                event = await subscription.next(3600)
            except TimeoutError:
                continue
            if event is None:
                return
            if event["type"] == "OFFERS":
                for offer in event["offers"]["offers"]:
                    offer_id = offer["id"]["value"]
                    resources = protocol.resources_from_json(offer["resources"], "offer.resources")
                    self._offers[offer_id] = _HeldOffer(offer_id, offer["agent_id"]["value"], resources)
                self._wakeup.set()
            elif event["type"] == "RESCIND":
                self._offers.pop(event["rescind"]["offer_id"]["value"], None)

    def _on_change(self, batch: list[Event]) -> None:
        for event in batch:
            if event.kv.key.startswith((JOBS, TASKS, AGENTS)):
                self._wakeup.set()
                return

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.interval):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                await self.evaluate()
            except StoreError as exc:
                log.error("job evaluation failed: %s", exc)
            except Exception:
                log.exception("job evaluation failed unexpectedly")

    async def evaluate(self) -> None:
        """Run one evaluation of every job."""
        waiting = 0
        for record in self.state.jobs():
            waiting += await self._evaluate_job(record)
        if self.master is not None:
            self._settle_offers(waiting)
        await self._collect_ended_tasks()

    def _settle_offers(self, waiting: int) -> None:
        """Return the offers no instance used, and ask for offers only while instances wait for them."""
        assert self.master is not None
        self.master.decline_job_offers(list(self._offers))
        self._offers.clear()
        wants = waiting > 0
        if wants != self._wants_offers:
            self.master.set_jobs_wanting_offers(wants)
            self._wants_offers = wants
            log.info("job scheduler %s offers instances_waiting=%d", "requests" if wants else "suppresses", waiting)

    async def _evaluate_job(self, record: JobRecord) -> int:
        """Evaluate one job; return how many of its instances fit an agent but wait for an offer."""
        job = parse_job(record.spec)
        tasks = self.state.tasks(job=record.name)
        plan = reconcile_service(job.count, record.task_version, record.stopped, tasks)
        if plan.stop:
            await self.state.set_desired(plan.stop, DesiredState.STOP)
        requests = [
            TaskRequest(job.name, instance, job.task.resources.cpus, job.task.resources.memory, len(job.task.ports))
            for instance in plan.start
        ]
        snapshots = agent_snapshots(self.state.agents(), self.state.tasks())
        placements = self.placer.place(requests, snapshots) if requests else []
        unplaced = {
            str(placement.request.instance): placement.reason for placement in placements if placement.node is None
        }
        placed = [placement for placement in placements if placement.node is not None]
        waiting = 0
        if self.master is None:
            new_tasks = [self._new_task(job, record, placement) for placement in placed]
            await self.state.put_tasks(new_tasks)
        else:
            new_tasks, waiting = await self._launch_on_offers(job, record, [p.request for p in placed])
        status_changed = await self.state.put_job_status(JobStatus(job.name, unplaced))
        if plan.stop or new_tasks or status_changed:
            log.info(
                "job evaluated job=%s version=%d placed=%d stopped=%d unplaced=%d waiting_for_offers=%d",
                job.name, record.version, len(new_tasks), len(plan.stop), len(unplaced), waiting,
            )
        for task in new_tasks:
            log.info("task placed task=%s job=%s node=%s", task.id, task.job, task.node)
        # Unplaced instances are retried every cycle; log them only when the reasons change.
        for instance, reason in unplaced.items() if status_changed else ():
            log.warning("instance not placed job=%s instance=%s: %s", job.name, instance, reason)
        return waiting

    def _new_task(self, job: Job, record: JobRecord, placement: Placement) -> Task:
        instance = placement.request.instance
        return Task(
            id=f"{job.name}.{instance}.{uuid.uuid4().hex[:8]}",
            job=job.name,
            instance=instance,
            node=placement.node or "",
            spec_version=record.task_version,
            desired=DesiredState.RUN,
            state=TaskState.STAGING,
            cpus=job.task.resources.cpus,
            memory=job.task.resources.memory,
            port_labels=list(job.task.ports),
            spec=record.spec,
            message="placed, waiting for the agent",
            created_at=time.time(),
        )

    async def _launch_on_offers(
        self, job: Job, record: JobRecord, requests: list[TaskRequest]
    ) -> tuple[list[Task], int]:
        """Place requests on the offers held and launch them; return the tasks and how many still wait."""
        assert self.master is not None
        if not requests:
            return [], 0
        placements = self.placer.place(requests, self._offer_snapshots())
        by_offer: dict[str, list[Task]] = {}
        waiting = 0
        for placement in placements:
            offer = self._offer_for(placement)
            if offer is None:
                waiting += 1
                continue
            task = self._new_task(job, record, placement)
            offer.resources = offer.resources - Resources(cpus=task.cpus, mem=task.memory)
            by_offer.setdefault(offer.id, []).append(task)
        launched: list[Task] = []
        for offer_id, tasks in by_offer.items():
            self._offers.pop(offer_id, None)
            if await self.master.accept_job_tasks(offer_id, tasks):
                launched += tasks
            else:
                waiting += len(tasks)
        return launched, waiting

    def _offer_snapshots(self) -> list[AgentSnapshot]:
        """Describe each agent by what the offers held on it contain: capacity minus what is not offered."""
        free: dict[str, list[float]] = {}
        for offer in self._offers.values():
            totals = free.setdefault(offer.agent, [0.0, 0.0, 0])
            totals[0] += offer.resources.cpus
            totals[1] += offer.resources.mem
            totals[2] += offer.resources.port_count
        snapshots = []
        for agent in self.state.agents():
            cpus, memory, ports = free.get(agent.node, [0.0, 0.0, 0])
            port_total = sum(high - low + 1 for low, high in agent.port_ranges)
            snapshots.append(AgentSnapshot(
                agent.node, agent.cpus, agent.memory, port_total,
                max(agent.cpus - cpus, 0.0), max(agent.memory - int(memory), 0), max(port_total - int(ports), 0),
            ))
        return snapshots

    def _offer_for(self, placement: Placement) -> _HeldOffer | None:
        """Return a held offer on the placement's agent with room for its request."""
        if placement.node is None:
            return None
        request = placement.request
        wanted = Resources(cpus=request.cpus, mem=request.memory)
        for offer in self._offers.values():
            if offer.agent == placement.node and offer.resources.contains(wanted) \
                    and offer.resources.port_count >= request.ports:
                return offer
        return None

    async def _collect_ended_tasks(self) -> None:
        cutoff = time.time() - TERMINAL_TASK_RETENTION
        ended = [task.id for task in self.state.tasks() if task.ended and task.updated_at < cutoff]
        if ended:
            await self.state.delete_tasks(ended)
            log.info("ended tasks removed count=%d", len(ended))
