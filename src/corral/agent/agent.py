"""The agent: registers its node and resources, and runs the tasks placed on it.

Its loop compares the tasks assigned to its node with the runners it has:
a task the scheduler wants running gets a runner, a task it wants stopped
has its runner stopped. The agent's local registry (corral.agent.registry)
contains the services and checks of its node, from its runners and from
the /v1/agent HTTP API. It runs the checks and is the truth for the node's
catalog entries.

Tasks run under executors that outlive the agent (corral.agent.executor).
stop(stop_tasks=False) leaves them running, and the next start on the same
data folder adopts them again (same pids, same service registrations),
records how the tasks that ended meanwhile ended, and never starts those
again: the scheduler replaces them, as Mesos does with tasks that exit
while its agent is down. A background pass removes the sandboxes of ended
tasks (corral.agent.sandbox).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from corral.agent.connection import ServerConnection
from corral.agent.custom_executor import ExecutorManager, HttpExecutorReporter
from corral.agent.executor import ExecutorFiles
from corral.agent.process import RecoveredTask, kill_process_group, recover_task_process
from corral.agent.registry import LocalRegistry, RegistryConfig, serf_health_check
from corral.agent.resources import AgentResources, PortAllocator, PortsExhausted, detect_resources, ephemeral_port_overlap
from corral.agent.runner import AgentContext, TaskRunner
from corral.agent.sandbox import SandboxRetention, collect_sandboxes, executor_running, sandbox_path
from corral.state.records import AgentInfo, Node, Task
from corral.types import DesiredState, TaskState

log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self,
        connection: ServerConnection,
        node: str,
        address: str,
        datacenter: str,
        data_dir: Path,
        port_range: tuple[int, int] = (20000, 32000),
        resources_override: Callable[[AgentResources], AgentResources] | None = None,
        registry_config: RegistryConfig | None = None,
        use_cgroups: bool = True,
        cpu_hard_limit: bool = False,
        sandbox_retention: SandboxRetention | None = None,
    ):
        self.connection = connection
        self.node = node
        self.address = address
        self.datacenter = datacenter
        self.data_dir = Path(data_dir)
        self.sandboxes = self.data_dir / "sandboxes"
        self.port_range = port_range
        self.use_cgroups = use_cgroups
        self.cpu_hard_limit = cpu_hard_limit
        self.sandbox_retention = sandbox_retention or SandboxRetention()
        self._resources_override = resources_override
        self.runners: dict[str, TaskRunner] = {}
        self._loop_task: asyncio.Task | None = None
        self._gc_task: asyncio.Task | None = None
        self._http: aiohttp.ClientSession | None = None
        self._context: AgentContext | None = None
        self._pending: set[asyncio.Task] = set()
        self.registry = LocalRegistry(
            connection, Node(node, address, datacenter), registry_config, persist_path=self.data_dir / "registry.json"
        )
        # Custom executors of framework tasks. The process that serves the agent's HTTP API sets
        # their endpoint, and `corral dev` replaces the reporter with one that calls its master directly.
        base_url = getattr(connection, "base_url", None)
        self.executors = ExecutorManager(
            connection, node, address, self.data_dir / "executors",
            reporter=HttpExecutorReporter(base_url) if base_url else None, use_cgroups=use_cgroups,
        )

    async def start(self) -> None:
        if self._loop_task is not None:
            return
        resources = detect_resources(self.data_dir, self.port_range)
        if self._resources_override is not None:
            resources = self._resources_override(resources)
        overlap = ephemeral_port_overlap(resources.ports)
        if overlap is not None:
            log.warning(
                "dynamic port range overlaps the kernel's ephemeral ports %d-%d; "
                "a task port may collide with an outgoing connection",
                *overlap,
            )
        info = AgentInfo(
            node=self.node,
            address=self.address,
            cpus=resources.cpus,
            memory=resources.memory,
            disk=resources.disk,
            port_ranges=[list(r) for r in resources.ports],
            registered_at=time.time(),
            reserved={role: reservation.to_dict() for role, reservation in resources.reserved.items()},
        )
        await self.connection.register(info, self.registry.node, [serf_health_check(self.node)])
        self._http = aiohttp.ClientSession()
        self._context = AgentContext(
            node=self.node,
            address=self.address,
            datacenter=self.datacenter,
            sandboxes=self.sandboxes,
            connection=self.connection,
            ports=PortAllocator(resources.ports, host=self.address),
            registry=self.registry,
            use_cgroups=self.use_cgroups,
            cpu_hard_limit=self.cpu_hard_limit,
        )
        await self._recover()
        # The registry holds only the services of adopted tasks, so its first sync also
        # removes the catalog services of this node that an earlier run left behind.
        await self.registry.start(self._http)
        self._loop_task = asyncio.create_task(self._run(), name="agent-loop")
        self._gc_task = asyncio.create_task(self._collect_sandboxes_loop(), name="agent-sandbox-gc")
        log.info(
            "agent started node=%s address=%s cpus=%g memory=%dMB ports=%d-%d",
            self.node, self.address, info.cpus, info.memory, *self.port_range,
        )

    async def stop(self, stop_tasks: bool = True) -> None:
        """Stop the agent; safe to call twice.

        With stop_tasks (the default) every task is stopped first and marked
        KILLED. Without, the tasks keep running under their executors, their
        records and catalog entries stay as they are, and the next start on
        the same data folder adopts them.
        """
        for name in ("_loop_task", "_gc_task"):
            task = getattr(self, name)
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                setattr(self, name, None)
        if stop_tasks:
            await self.executors.stop()
        else:
            await self.executors.detach()
        if self.runners:
            if stop_tasks:
                log.info("agent stopping tasks node=%s count=%d", self.node, len(self.runners))
                await asyncio.gather(*(runner.stop("stopped with the agent") for runner in self.runners.values()))
            else:
                log.info("agent leaving tasks running node=%s count=%d", self.node, len(self.runners))
                await asyncio.gather(*(runner.detach() for runner in self.runners.values()))
            self.runners.clear()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.registry.stop()
        if self._http is not None:
            await self._http.close()
            self._http = None
            log.info("agent stopped node=%s", self.node)

    def sandbox_path(self, task_id: str) -> Path:
        """Return the sandbox folder of a task on this agent; raise ValueError for an invalid id."""
        return sandbox_path(self.sandboxes, task_id)

    # Recovery

    async def _recover(self) -> None:
        """Settle what an earlier run of this agent left behind, before the loop starts.

        A task whose executor still runs is adopted. A started task whose
        process ended meanwhile is marked FINISHED (exit code 0), KILLED (when
        the scheduler wanted it stopped) or LOST, with its exit status, and is
        not started again. A started task without a usable executor has any
        process of it killed and is marked LOST. Executors of tasks that are
        not assigned here any more, or already ended, are stopped.
        """
        assert self._context is not None
        tasks, _ = await self.connection.assigned_tasks(self.node)
        await self.executors.recover(tasks)
        live = set()
        for task in tasks:
            if task.ended or task.executor_id:
                continue
            live.add(task.id)
            recovered = await recover_task_process(task.id, self.sandbox_path(task.id))
            if recovered.process is not None:
                runner = TaskRunner(self._context, task, dict(task.ports))
                self.runners[task.id] = runner
                await runner.adopt(recovered.process)
            elif task.state is not TaskState.STAGING:
                # A STAGING task never started (or waits to start again): the loop launches it.
                await self._settle_unrecovered(task, recovered)
        self._background(self._stop_orphan_executors(live))

    async def _settle_unrecovered(self, task: Task, recovered: RecoveredTask) -> None:
        status = recovered.exit_status
        if status is not None:
            state = TaskState.FINISHED if status.success else TaskState.LOST
            if task.desired is DesiredState.STOP:
                state = TaskState.KILLED
            message = f"agent restarted; the task's process had ended ({status.describe()}), so it was not restarted"
        else:
            killed = False
            if task.pid is not None:
                # A process from before executors, or one whose executor died.
                killed = await asyncio.to_thread(kill_process_group, task.pid, task.pid_create_time, 5.0)
            state = TaskState.LOST
            message = f"agent restarted; {recovered.problem}" + (
                "; killed the process left from its earlier run" if killed else ""
            )

        def settle(record: Task) -> None:
            record.state = state
            record.message = message

        await self.connection.update_task(task.id, settle)
        log.info("task state changed task=%s job=%s node=%s from=%s to=%s: %s",
                 task.id, task.job, self.node, task.state.value, state.value, message)

    async def _stop_orphan_executors(self, live: set[str]) -> None:
        """Stop the executors whose tasks are not live on this node any more."""
        try:
            entries = await asyncio.to_thread(lambda: [path for path in self.sandboxes.iterdir() if path.is_dir()])
        except FileNotFoundError:
            return
        for path in entries:
            if path.name in live or not executor_running(ExecutorFiles(path)):
                continue
            recovered = await recover_task_process(path.name, path)
            if recovered.process is None:
                continue
            log.warning("stopping executor of a task that is not live on this node node=%s task=%s pid=%s",
                        self.node, path.name, recovered.process.pid)
            await recovered.process.stop()

    # Sandboxes

    async def collect_sandboxes(self) -> list[str]:
        """Remove the sandboxes of ended tasks that the retention policy no longer keeps; return their ids."""
        tasks, _ = await self.connection.assigned_tasks(self.node)
        keep = {task.id for task in tasks if not task.ended} | set(self.runners)
        removed = await asyncio.to_thread(
            collect_sandboxes, self.sandboxes, keep, self.sandbox_retention, self.node
        )
        removed += await self.executors.collect_sandboxes(self.sandbox_retention)
        if removed:
            log.info("sandboxes collected node=%s removed=%d", self.node, len(removed))
        return removed

    async def _collect_sandboxes_loop(self) -> None:
        while True:
            try:
                await self.collect_sandboxes()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sandbox collection failed node=%s; retrying in %gs",
                              self.node, self.sandbox_retention.interval)
            await asyncio.sleep(self.sandbox_retention.interval)

    async def _run(self) -> None:
        index = 0
        while True:
            try:
                tasks, index = await self.connection.assigned_tasks(self.node)
                await self._sync(tasks)
                await self.connection.wait_for_assignments(self.node, index, 30.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("agent sync failed node=%s; retrying in 1s", self.node)
                await asyncio.sleep(1.0)

    async def _sync(self, tasks: list[Task]) -> None:
        assert self._context is not None
        for task_id in [task_id for task_id, runner in self.runners.items() if runner.done]:
            del self.runners[task_id]
        taken_ports = {
            port for task in tasks if task.holds_resources for port in task.ports.values()
        }
        await self.executors.sync([task for task in tasks if task.executor_id])
        for task in tasks:
            if task.executor_id:
                continue
            runner = self.runners.get(task.id)
            if task.desired is DesiredState.STOP:
                if runner is not None and not runner.stopping:
                    self._background(runner.stop("stopped by the scheduler"))
                elif runner is None and not task.ended:
                    await self._mark_killed(task)
                continue
            if runner is None and task.state is TaskState.STAGING:
                ports = self._choose_ports(task, taken_ports)
                if ports is None:
                    continue
                runner = TaskRunner(self._context, task, ports)
                self.runners[task.id] = runner
                runner.start()

    def _choose_ports(self, task: Task, taken: set[int]) -> dict[str, int] | None:
        """Pick the task's ports (kept from an earlier assignment when it has one) and mark them taken."""
        assert self._context is not None
        if task.ports or not task.port_labels:
            return dict(task.ports)
        try:
            numbers = self._context.ports.allocate(len(task.port_labels), taken)
        except PortsExhausted as exc:
            log.error("task ports not assigned task=%s job=%s node=%s: %s", task.id, task.job, self.node, exc)
            self._background(self._mark_failed_to_start(task, str(exc)))
            return None
        taken.update(numbers)
        return dict(zip(task.port_labels, numbers))

    def _background(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _mark_failed_to_start(self, task: Task, message: str) -> None:
        def fail(record: Task) -> None:
            record.state = TaskState.ERROR
            record.message = message

        await self.connection.update_task(task.id, fail)

    async def _mark_killed(self, task: Task) -> None:
        def kill(record: Task) -> None:
            record.state = TaskState.KILLED
            record.message = "stopped before it started"

        await self.connection.update_task(task.id, kill)
