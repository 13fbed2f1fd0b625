"""The job loop: evaluates every job against its tasks and writes the plan to the state.

The loop runs whenever a job, task or agent changes, and once a second so
that instances which did not fit are retried as resources free up.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from corral.jobspec import parse_job
from corral.scheduler.service import (
    BinPackPlacer,
    Placer,
    TaskRequest,
    agent_snapshots,
    reconcile_service,
)
from corral.state import State
from corral.state.records import AGENTS, JOBS, TASKS, JobRecord, JobStatus, Task
from corral.store import Event, StoreError
from corral.types import DesiredState, TaskState

log = logging.getLogger(__name__)

# Ended tasks are kept this long for `corral job status`, then removed.
TERMINAL_TASK_RETENTION = 3600.0


class JobScheduler:
    def __init__(self, state: State, placer: Placer | None = None, interval: float = 1.0):
        self.state = state
        self.placer = placer or BinPackPlacer()
        self.interval = interval
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is not None:
            return
        self.state.view.add_listener(self._on_change)
        self._task = asyncio.create_task(self._run(), name="job-scheduler")
        log.info("job scheduler started interval=%.1fs", self.interval)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        log.info("job scheduler stopped")

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
        for record in self.state.jobs():
            await self._evaluate_job(record)
        await self._collect_ended_tasks()

    async def _evaluate_job(self, record: JobRecord) -> None:
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
        now = time.time()
        new_tasks = []
        unplaced: dict[str, str] = {}
        for placement in placements:
            if placement.node is None:
                unplaced[str(placement.request.instance)] = placement.reason
                continue
            instance = placement.request.instance
            new_tasks.append(
                Task(
                    id=f"{job.name}.{instance}.{uuid.uuid4().hex[:8]}",
                    job=job.name,
                    instance=instance,
                    node=placement.node,
                    spec_version=record.task_version,
                    desired=DesiredState.RUN,
                    state=TaskState.STAGING,
                    cpus=job.task.resources.cpus,
                    memory=job.task.resources.memory,
                    port_labels=list(job.task.ports),
                    spec=record.spec,
                    message="placed, waiting for the agent",
                    created_at=now,
                )
            )
        await self.state.put_tasks(new_tasks)
        status_changed = await self.state.put_job_status(JobStatus(job.name, unplaced))
        if plan.stop or new_tasks or status_changed:
            log.info(
                "job evaluated job=%s version=%d placed=%d stopped=%d unplaced=%d",
                job.name, record.version, len(new_tasks), len(plan.stop), len(unplaced),
            )
        for task in new_tasks:
            log.info("task placed task=%s job=%s node=%s", task.id, task.job, task.node)
        # Unplaced instances are retried every cycle; log them only when the reasons change.
        for instance, reason in unplaced.items() if status_changed else ():
            log.warning("instance not placed job=%s instance=%s: %s", job.name, instance, reason)

    async def _collect_ended_tasks(self) -> None:
        cutoff = time.time() - TERMINAL_TASK_RETENTION
        ended = [task.id for task in self.state.tasks() if task.state.is_terminal and task.updated_at < cutoff]
        if ended:
            await self.state.delete_tasks(ended)
            log.info("ended tasks removed count=%d", len(ended))
