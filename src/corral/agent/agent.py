"""The agent: registers its node and resources, and runs the tasks placed on it.

Its loop compares the tasks assigned to its node with the runners it has:
a task the scheduler wants running gets a runner, a task it wants stopped
has its runner stopped. The agent's local registry (corral.agent.registry)
contains the services and checks of its node, from its runners and from
the /v1/agent HTTP API. It runs the checks and is the truth for the node's
catalog entries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from corral.agent.connection import ServerConnection
from corral.agent.process import kill_process_group
from corral.agent.registry import LocalRegistry, RegistryConfig, serf_health_check
from corral.agent.resources import AgentResources, PortAllocator, PortsExhausted, detect_resources, ephemeral_port_overlap
from corral.agent.runner import AgentContext, TaskRunner
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
    ):
        self.connection = connection
        self.node = node
        self.address = address
        self.datacenter = datacenter
        self.data_dir = Path(data_dir)
        self.port_range = port_range
        self._resources_override = resources_override
        self.runners: dict[str, TaskRunner] = {}
        self._loop_task: asyncio.Task | None = None
        self._http: aiohttp.ClientSession | None = None
        self._context: AgentContext | None = None
        self._pending: set[asyncio.Task] = set()
        self.registry = LocalRegistry(
            connection, Node(node, address, datacenter), registry_config, persist_path=self.data_dir / "registry.json"
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
        )
        await self.connection.register(info, self.registry.node, [serf_health_check(self.node)])
        self._http = aiohttp.ClientSession()
        self._context = AgentContext(
            node=self.node,
            address=self.address,
            datacenter=self.datacenter,
            sandboxes=self.data_dir / "sandboxes",
            connection=self.connection,
            ports=PortAllocator(resources.ports, host=self.address),
            registry=self.registry,
        )
        await self._recover()
        # The registry has no task service yet, so its first sync also removes the catalog
        # services of this node that an earlier run left behind.
        await self.registry.start(self._http)
        self._loop_task = asyncio.create_task(self._run(), name="agent-loop")
        log.info(
            "agent started node=%s address=%s cpus=%g memory=%dMB ports=%d-%d",
            self.node, self.address, info.cpus, info.memory, *self.port_range,
        )

    async def stop(self) -> None:
        """Stop every task this agent runs, then the agent itself; safe to call twice."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        if self.runners:
            log.info("agent stopping tasks node=%s count=%d", self.node, len(self.runners))
            await asyncio.gather(*(runner.stop("stopped with the agent") for runner in self.runners.values()))
            self.runners.clear()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.registry.stop()
        if self._http is not None:
            await self._http.close()
            self._http = None
            log.info("agent stopped node=%s", self.node)

    async def _recover(self) -> None:
        """Settle what an earlier run of this agent left behind.

        The dev agent stops its tasks when it exits, so a task that is still
        marked as started belongs to a run that ended without cleaning up:
        kill any process of it that is still alive and mark it LOST, so that
        the scheduler replaces it.
        """
        tasks, _ = await self.connection.assigned_tasks(self.node)
        for task in tasks:
            if task.state.is_terminal or task.state is TaskState.STAGING:
                continue
            killed = False
            if task.pid is not None:
                killed = await asyncio.to_thread(kill_process_group, task.pid, task.pid_create_time, 5.0)
            message = "agent restarted; " + (
                "killed the process left from its earlier run" if killed else "its process was gone"
            )

            def lose(record: Task, message=message) -> None:
                record.state = TaskState.LOST
                record.message = message

            await self.connection.update_task(task.id, lose)
            log.info("task state changed task=%s job=%s node=%s from=%s to=LOST: %s",
                     task.id, task.job, self.node, task.state.value, message)

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
        for task in tasks:
            runner = self.runners.get(task.id)
            if task.desired is DesiredState.STOP:
                if runner is not None and not runner.stopping:
                    self._background(runner.stop("stopped by the scheduler"))
                elif runner is None and not task.state.is_terminal:
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
