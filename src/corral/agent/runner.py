"""The supervision of one task on its agent, from its ports and environment to its exit.

One TaskRunner per task: it records the task's ports, renders its
environment from the KV store (waiting while a key is missing) and
launches the process through its executor (corral.agent.process). It
registers the service instance and its check with the agent's local
registry, which runs the check, and restarts the process in place with a
growing delay when it exits. The same task id, instance and service ID
survive every restart.

A runner can also adopt the process of a task that a previous run of the
agent started (after an agent restart), and detach from its process
without stopping it (when the agent stops but leaves its tasks running).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from corral.agent.cgroups import Limits
from corral.agent.connection import ServerConnection
from corral.agent.process import ExitStatus, LaunchError, LaunchSpec, RestartBackoff, TaskProcess
from corral.agent.registry import CheckDefinition, CheckKind, CheckRequest, ConfigSource, LocalRegistry, LocalService
from corral.agent.resources import PortAllocator
from corral.duration import format_duration
from corral.jobspec import CheckKind as JobCheckKind
from corral.jobspec import Job, parse_job
from corral.state.records import Task
from corral.types import TaskState

log = logging.getLogger(__name__)

# Variables passed through from the agent's own environment to every task.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME")


@dataclass(frozen=True, slots=True)
class AgentContext:
    """The settings and services that every runner on one agent shares."""

    node: str
    address: str
    datacenter: str
    sandboxes: Path
    connection: ServerConnection
    ports: PortAllocator
    registry: LocalRegistry
    # Limit tasks through cgroups where the kernel allows it (rlimits otherwise).
    use_cgroups: bool = True
    # Cap each task's CPU time at its cpus with a CFS quota, not only weigh it with shares.
    cpu_hard_limit: bool = False


def port_env_name(label: str) -> str:
    return "CORRAL_PORT_" + label.upper().replace("-", "_")


class TaskRunner:
    def __init__(self, context: AgentContext, task: Task, ports: dict[str, int]):
        self.context = context
        self.task = task
        self.job: Job = parse_job(task.spec)
        self._ports = ports
        self._stop_requested = asyncio.Event()
        self._stop_reason = ""
        self._process: TaskProcess | None = None
        self._registered = False
        self._backoff = RestartBackoff()
        self._runner: asyncio.Task | None = None
        self._detached = False
        # How the process last exited; None before the first exit and after a failed launch.
        self._exit: ExitStatus | None = None

    @property
    def task_id(self) -> str:
        return self.task.id

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    @property
    def done(self) -> bool:
        return self._runner is not None and self._runner.done()

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name=f"task {self.task_id}")

    async def adopt(self, process: TaskProcess) -> None:
        """Supervise a process that an earlier run of the agent started, as if this runner had.

        Registers the task's service again (same ID, port and check) before
        returning, so that the agent's first catalog sync keeps it.
        NOTE: the check starts critical, as on any registration, so the
        instance drops out of DNS and ?passing reads until its first probe
        passes. Keeping the catalog's status needs a read of the node's
        checks, which ServerConnection does not offer yet.
        """
        self._process = process
        await self._transition(
            TaskState.RUNNING,
            f"running as pid {process.pid}; adopted after an agent restart",
            pid=process.pid,
            pid_create_time=process.create_time,
        )
        await self._register_service()
        log.info("task adopted task=%s job=%s node=%s pid=%s executor_pid=%s",
                 self.task_id, self.task.job, self.context.node, process.pid, process.executor_pid)
        self._runner = asyncio.create_task(self._run(adopted=process), name=f"task {self.task_id}")

    async def stop(self, reason: str) -> None:
        """Stop the task's process, deregister its service and mark it KILLED with `reason`."""
        if not self._stop_requested.is_set():
            self._stop_reason = reason
        self._stop_requested.set()
        if self._runner is not None:
            await self._runner

    async def detach(self) -> None:
        """Stop supervising and leave the process running under its executor.

        The task record, the service and its catalog entries stay as they
        are, for a restarted agent to adopt. Does nothing once the runner ended.
        """
        self._detached = True
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._process is not None:
            self._process.release()
            self._process = None

    async def _run(self, adopted: TaskProcess | None = None) -> None:
        try:
            await self._supervise(adopted)
        except asyncio.CancelledError:
            if not self._detached:
                raise
        except Exception as exc:
            log.exception("task supervision failed task=%s job=%s", self.task_id, self.task.job)
            await self._cleanup()
            await self._transition(TaskState.ERROR, f"supervision failed: {exc}")

    async def _supervise(self, adopted: TaskProcess | None = None) -> None:
        await self._assign_ports()
        while not self._stop_requested.is_set():
            started_at = time.monotonic()
            if adopted is not None:
                exit_status = await self._watch(adopted)
                adopted = None
            else:
                env = await self._render_env()
                if env is None:
                    break
                started_at = time.monotonic()
                exit_status = await self._run_once(env)
            if exit_status is None:
                break
            await self._cleanup()
            if self._stop_requested.is_set():
                break
            if self.task.framework_id:
                # A framework's task runs once, as in Mesos: its framework decides what comes next.
                await self._finish(exit_status)
                return
            delay = self._backoff.next_delay(time.monotonic(), started_at)
            restarts = self.task.restarts + 1
            await self._transition(
                TaskState.FAILED,
                f"{exit_status}; restarting in {format_duration(delay)} (restart {restarts})",
            )
            if await self._sleep_unless_stopped(delay):
                break
            await self._update(restarts=restarts)
        await self._cleanup()
        await self._transition(TaskState.KILLED, self._stop_reason)

    async def _finish(self, exit_status: str) -> None:
        """End a framework's task: FINISHED after exit code 0, FAILED otherwise (a failed launch included)."""
        exited = self._exit
        state = TaskState.FINISHED if exited is not None and exited.success else TaskState.FAILED
        await self._transition(state, exit_status)

    async def _run_once(self, env: dict[str, str]) -> str | None:
        """Run the process once; return how it ended or failed to launch, or None when stopped."""
        await self._transition(TaskState.STARTING, "launching")
        context = self.context
        resources = self.job.task.resources
        spec = LaunchSpec(
            task_id=self.task_id,
            argv=[self.job.task.command, *self.job.task.args],
            env=env,
            cwd=self.job.task.workdir,
            sandbox=context.sandboxes / self.task_id,
            kill_timeout=self.job.task.kill_timeout,
            job=self.task.job,
            limits=Limits(cpus=resources.cpus, memory_mb=resources.memory, cpu_hard_limit=context.cpu_hard_limit),
            use_cgroups=context.use_cgroups,
        )
        self._process = TaskProcess(spec)
        try:
            pid = await self._process.start()
        except LaunchError as exc:
            self._process = None
            return str(exc)
        await self._transition(
            TaskState.RUNNING,
            f"running as pid {pid}",
            pid=pid,
            pid_create_time=self._process.create_time,
        )
        await self._register_service()
        return await self._watch(self._process)

    async def _watch(self, process: TaskProcess) -> str | None:
        """Wait for the process to exit or a stop request; return how it ended, or None when stopped."""
        wait_exit = asyncio.ensure_future(process.wait())
        wait_stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({wait_exit, wait_stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wait_stop.cancel()
            stopped = not wait_exit.done()
            if stopped:
                wait_exit.cancel()
        if stopped:
            # Deregister first, so that clients stop finding the instance before it goes away.
            await self._deregister_service()
            await self._transition(TaskState.KILLING, "stopping")
            await process.stop()
            return None
        status: ExitStatus = wait_exit.result()
        self._exit = status
        if status.oom_killed:
            log.warning("task ran out of memory task=%s job=%s node=%s: %s",
                        self.task_id, self.task.job, self.context.node, status.describe())
        return status.describe()

    async def _cleanup(self) -> None:
        """Deregister the service with its check, and kill what is left of the process group."""
        await self._deregister_service()
        if self._process is not None and self._process.pid is not None:
            await self._process.stop()
        self._process = None

    async def _sleep_unless_stopped(self, delay: float) -> bool:
        """Sleep `delay` seconds; return True early if a stop was requested."""
        try:
            async with asyncio.timeout(delay):
                await self._stop_requested.wait()
        except TimeoutError:
            return False
        return True

    # Ports and environment

    async def _assign_ports(self) -> None:
        if self._ports != self.task.ports:
            await self._update(ports=self._ports)

    async def _render_env(self) -> dict[str, str] | None:
        """Build the process environment; wait while a KV key it reads is missing.

        Returns None when a stop is requested while waiting.
        """
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        for variable in self.job.task.env:
            if variable.key is None:
                env[variable.name] = variable.value or ""
                continue
            value = await self._wait_for_key(variable.key, variable.name)
            if value is None:
                return None
            env[variable.name] = value
        for label, port in self.task.ports.items():
            env[port_env_name(label)] = str(port)
        if len(self.task.ports) == 1:
            env["PORT"] = str(next(iter(self.task.ports.values())))
        env["CORRAL_TASK_ID"] = self.task_id
        env["CORRAL_JOB"] = self.task.job
        env["CORRAL_NODE"] = self.context.node
        env["CORRAL_INSTANCE"] = str(self.task.instance)
        env["CORRAL_SANDBOX"] = str(self.context.sandboxes / self.task_id)
        return env

    async def _wait_for_key(self, key: str, variable: str) -> str | None:
        waiting_logged = False
        while not self._stop_requested.is_set():
            entry, index = await self.context.connection.kv_get(key)
            if entry is not None:
                return entry.value.decode("utf-8", errors="replace")
            if not waiting_logged:
                await self._transition(
                    TaskState.STAGING, f"waiting for KV key {key!r} (for environment variable {variable})"
                )
                waiting_logged = True
            wait = asyncio.ensure_future(self.context.connection.wait_for_kv(key, index, 30.0))
            stop = asyncio.ensure_future(self._stop_requested.wait())
            await asyncio.wait({wait, stop}, return_when=asyncio.FIRST_COMPLETED)
            wait.cancel()
            stop.cancel()
        return None

    # Service and check

    def _service_port(self) -> int | None:
        service = self.job.service
        if service is None:
            return None
        return self.task.ports.get(service.port)

    async def _register_service(self) -> None:
        spec = self.job.service
        port = self._service_port()
        if spec is None or port is None:
            return
        ctx = self.context
        service = LocalService(
            id=self.task_id,
            name=spec.name,
            address=ctx.address,
            port=port,
            tags=list(spec.tags),
            meta={"corral-job": self.task.job, "corral-task": self.task_id},
            task_id=self.task_id,
            source=ConfigSource.LOCAL,
        )
        checks = []
        if spec.check is not None:
            # Consul names a service's own check "service:<service id>".
            checks.append(CheckRequest(self._check_definition(port), id=f"service:{self.task_id}"))
        await ctx.registry.add_service(service, checks)
        self._registered = True
        await ctx.registry.sync()

    def _check_definition(self, port: int) -> CheckDefinition:
        check = self.job.service.check
        address = self.context.address
        host = f"[{address}]" if ":" in address else address
        definition = CheckDefinition(
            CheckKind.HTTP if check.kind is JobCheckKind.HTTP else CheckKind.TCP,
            interval=check.interval,
            timeout=check.timeout,
        )
        if check.kind is JobCheckKind.HTTP:
            definition.http = f"http://{host}:{port}{check.path}"
        else:
            definition.tcp = f"{host}:{port}"
        return definition

    async def _deregister_service(self) -> None:
        if not self._registered:
            return
        self._registered = False
        registry = self.context.registry
        # A client may have removed the instance already through /v1/agent/service/deregister.
        if registry.service(self.task_id) is not None:
            await registry.remove_service(self.task_id)
            await registry.sync()

    # Task record

    async def _update(self, **fields) -> None:
        def apply(task: Task) -> None:
            for name, value in fields.items():
                setattr(task, name, value)

        updated = await self.context.connection.update_task(self.task_id, apply)
        if updated is not None:
            self.task = updated

    async def _transition(self, state: TaskState, message: str, **fields) -> None:
        previous = self.task.state
        await self._update(state=state, message=message, **fields)
        if previous is not state:
            log.info(
                "task state changed task=%s job=%s node=%s from=%s to=%s: %s",
                self.task_id, self.task.job, self.context.node, previous.value, state.value, message,
            )
