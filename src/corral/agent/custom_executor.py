"""Custom executors on an agent: their processes, and the agent side of Mesos's v1 executor API.

A framework task that names an ExecutorInfo instead of a command runs
inside that executor. All tasks of one framework with the same executor id
on one agent share one executor process, which the agent starts with the
first of them. The process is supervised like a task's
(corral.agent.process): it runs under corral's per-task supervisor in its
own process group, outlives the agent, and a restarted agent adopts it
again. Its sandbox is <agent data>/executors/<executor id>@<framework id>.

The executor talks to the agent over `POST /api/v1/executor`
(corral.api.executor), with the environment that Mesos gives executors
(MESOS_AGENT_ENDPOINT, MESOS_FRAMEWORK_ID, MESOS_EXECUTOR_ID,
MESOS_DIRECTORY, MESOS_SANDBOX, ...). After it subscribes, the agent sends
it SUBSCRIBED, a LAUNCH for each of its tasks, KILL, MESSAGE (data from
the framework), SHUTDOWN and HEARTBEAT events. The executor sends UPDATE
calls with TaskStatus, which the agent stores in the task record (the
master then sends the framework an UPDATE) before it responds with an
ACKNOWLEDGED event. The executor's MESSAGE calls reach the framework as
MESSAGE events through an ExecutorReporter.

Framework messages and the framework's SHUTDOWN reach the agent through
the task records, like task assignments (Task.executor_messages and
Task.executor_shutdown, written by the master).

Faults, as in Mesos: a task whose kill the executor does not finish
within the task's kill grace period (plus KILL_MARGIN) ends FAILED. When
the executor process exits, its tasks that have not ended become KILLED
(when a kill or shutdown was requested) or FAILED, and the framework gets
a FAILURE event naming the executor. An executor with no task left is sent
SHUTDOWN and, after SHUTDOWN_GRACE seconds, killed.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from corral.agent.connection import ServerConnection
from corral.agent.executor import ExecutorStateError, read_json, write_json
from corral.agent.process import ExitStatus, LaunchError, LaunchSpec, TaskProcess, recover_task_process
from corral.agent.runner import INHERITED_ENV
from corral.agent.sandbox import SandboxRetention, collect_sandboxes
from corral.events import EventQueue
from corral.master import protocol
from corral.master.protocol import ProtocolError
from corral.state.records import Task
from corral.types import DesiredState, TaskState

log = logging.getLogger(__name__)

# Seconds an executor gets to subscribe after it starts, or to subscribe again after its
# connection dropped (Mesos's --executor_registration_timeout is one minute).
REGISTRATION_TIMEOUT = 60.0
# Seconds between SHUTDOWN and killing the executor's process (Mesos's --executor_shutdown_grace_period).
SHUTDOWN_GRACE = 5.0
# Seconds between SIGTERM and SIGKILL when the agent kills an executor's process group.
PROCESS_KILL_TIMEOUT = 3.0
# Seconds past a task's kill grace period before the agent gives up on the executor ending it.
KILL_MARGIN = 2.0
# Kill grace period of a task whose TaskInfo has no kill_policy, as for command tasks.
DEFAULT_KILL_GRACE = 5.0
# Seconds between HEARTBEAT events on an executor's subscription.
HEARTBEAT_INTERVAL = 15.0
# How long an executor waits for a restarted agent, passed in MESOS_RECOVERY_TIMEOUT (Mesos's default).
RECOVERY_TIMEOUT = 15 * 60.0
# The maximum wait between two subscription attempts, passed in MESOS_SUBSCRIPTION_BACKOFF_MAX.
SUBSCRIPTION_BACKOFF_MAX = 2.0

# The file in an executor's sandbox that names its framework and executor, for recovery.
RUN_FILE = "executor-run.json"
# The sandboxes of executors count as this job for garbage collection.
SANDBOX_JOB = "custom-executors"

# States an executor may report. STAGING is the agent's, and UNREACHABLE and GONE are the master's.
_EXECUTOR_STATES = frozenset({
    TaskState.STARTING, TaskState.RUNNING, TaskState.KILLING, TaskState.FINISHED,
    TaskState.FAILED, TaskState.KILLED, TaskState.ERROR, TaskState.LOST,
})


class ExecutorCallError(Exception):
    """An executor call that the agent rejects. `status` is the HTTP status to respond with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --- Reports to the master ----------------------------------------------------------------------


class ExecutorReporter(abc.ABC):
    """The channel through which an agent passes an executor's messages and exits to the master."""

    @abc.abstractmethod
    async def framework_message(self, framework_id: str, agent_id: str, executor_id: str, data: str) -> bool:
        """Send base64 `data` to the framework as a MESSAGE event. Return whether the framework was connected."""

    @abc.abstractmethod
    async def executor_exited(self, framework_id: str, agent_id: str, executor_id: str, status: int | None) -> None:
        """Send the framework a FAILURE event for an executor that exited with wait status `status`."""

    async def close(self) -> None:
        """Release what the reporter holds."""


class HttpExecutorReporter(ExecutorReporter):
    """Reports to a server over its HTTP API (corral.api.scheduler), for agents in their own process."""

    def __init__(self, base_url: str, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.post(
            self.base_url + path, json=body, timeout=aiohttp.ClientTimeout(total=self.timeout)
        ) as response:
            text = await response.text()
            if response.status != 200:
                raise ExecutorCallError(503, f"server {self.base_url} rejected {path} with HTTP {response.status}: "
                                             f"{text.strip()[:300]}")
            return await response.json(content_type=None)

    async def framework_message(self, framework_id: str, agent_id: str, executor_id: str, data: str) -> bool:
        body = {"AgentID": agent_id, "ExecutorID": executor_id, "Data": data}
        try:
            answer = await self._post(f"/v1/frameworks/{framework_id}/executor-messages", body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ExecutorCallError(503, f"server {self.base_url} is unreachable: {exc or type(exc).__name__}") from None
        return bool(answer.get("Delivered"))

    async def executor_exited(self, framework_id: str, agent_id: str, executor_id: str, status: int | None) -> None:
        body = {"AgentID": agent_id, "ExecutorID": executor_id, "Status": status}
        try:
            await self._post(f"/v1/frameworks/{framework_id}/executor-exits", body)
        except (aiohttp.ClientError, TimeoutError, ExecutorCallError) as exc:
            log.warning("executor exit not reported framework=%s executor=%s: %s", framework_id, executor_id, exc)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class LocalExecutorReporter(ExecutorReporter):
    """Reports to a Master in the same process, for `corral dev`."""

    def __init__(self, master: Any):
        self.master = master

    async def framework_message(self, framework_id: str, agent_id: str, executor_id: str, data: str) -> bool:
        return self.master.executor_message(framework_id, agent_id, executor_id, data)

    async def executor_exited(self, framework_id: str, agent_id: str, executor_id: str, status: int | None) -> None:
        self.master.executor_exited(framework_id, agent_id, executor_id, status)


# --- One subscription --------------------------------------------------------------------------------


class ExecutorStream(EventQueue):
    """The event stream of one SUBSCRIBE call. The HTTP handler writes what `next` returns."""


@dataclass
class _TaskEntry:
    """A task that an executor runs or is about to run."""

    task: Task
    # Whether the current executor process was sent its LAUNCH.
    launched: bool = False
    kill_requested: bool = False
    kill_timer: asyncio.Task | None = None


@dataclass
class ExecutorRun:
    """One executor process and the tasks it runs."""

    framework_id: str
    executor_id: str
    info: dict[str, Any]
    framework_info: dict[str, Any]
    sandbox: Path
    process: TaskProcess | None = None
    tasks: dict[str, _TaskEntry] = field(default_factory=dict)
    # Store ids of this run's tasks that ended, so that a repeated update is acknowledged again.
    ended_tasks: set[str] = field(default_factory=set)
    stream: ExecutorStream | None = None
    subscriptions: int = 0
    # The seq of the latest framework message delivered to the executor.
    delivered_seq: int = 0
    shutting_down: bool = False
    # Whether tasks left when the process exits end KILLED (a requested shutdown) instead of FAILED.
    kill_tasks_on_exit: bool = False
    # Tasks launched while this run shuts down. A new run starts them once this one has exited.
    pending: dict[str, Task] = field(default_factory=dict)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    registration_timer: asyncio.Task | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.framework_id, self.executor_id

    @property
    def container_id(self) -> str:
        return self.sandbox.name

    def send(self, event: dict[str, Any]) -> bool:
        """Send an event to the subscribed executor. Return False when it is not subscribed."""
        if self.stream is None or self.stream.closed:
            return False
        self.stream.send(event)
        return True


def run_folder_name(framework_id: str, executor_id: str) -> str:
    """Return the sandbox folder name of an executor. Ids are validated, so neither contains '/'.

    NOTE: the tasks of a custom executor have no sandbox of their own, so
    GET /v1/tasks/ID/logs does not find their output. The executor writes it
    to this folder's stdout and stderr.
    """
    name = f"{executor_id}@{framework_id}"
    if "/" in name or name.startswith("."):
        raise ValueError(f"invalid executor id {executor_id!r} or framework id {framework_id!r} for a folder name")
    return name


def _unacknowledged_task_ids(body: dict[str, Any]) -> set[str]:
    """Return the ids of the tasks that a SUBSCRIBE lists as launched without a status update yet."""
    tasks = protocol.read_list(body.get("unacknowledged_tasks", []), "subscribe.unacknowledged_tasks")
    known = set()
    for index, item in enumerate(tasks):
        task = protocol.read_object(item, f"subscribe.unacknowledged_tasks[{index}]")
        known.add(protocol.read_id(task.get("task_id"), f"subscribe.unacknowledged_tasks[{index}].task_id"))
    return known


def kill_grace_of(task: Task) -> float:
    """Return the kill grace period of a task in seconds, from its TaskInfo's kill_policy."""
    policy = task.task_info.get("kill_policy") or {}
    nanoseconds = (policy.get("grace_period") or {}).get("nanoseconds")
    if isinstance(nanoseconds, (int, float)) and not isinstance(nanoseconds, bool) and nanoseconds >= 0:
        return nanoseconds / 1e9
    return DEFAULT_KILL_GRACE


def wait_status(status: ExitStatus) -> int | None:
    """Encode an exit status as a POSIX wait status (exit code << 8, or the signal), as Mesos reports it."""
    if status.signal is not None:
        return status.signal
    if status.code is not None:
        return status.code << 8
    return None


# --- The manager -----------------------------------------------------------------------------------------


class ExecutorManager:
    """The custom executors of one agent: starts, supervises, recovers and talks to them."""

    def __init__(
        self,
        connection: ServerConnection,
        node: str,
        address: str,
        root: Path,
        reporter: ExecutorReporter | None = None,
        use_cgroups: bool = True,
    ):
        self.connection = connection
        self.node = node
        self.address = address
        self.root = Path(root)
        self.reporter = reporter
        self.use_cgroups = use_cgroups
        # HOST:PORT where the agent serves /api/v1/executor, set by the code that starts its HTTP listener.
        self.endpoint: str | None = None
        self.heartbeat_interval = HEARTBEAT_INTERVAL
        self.registration_timeout = REGISTRATION_TIMEOUT
        self.shutdown_grace = SHUTDOWN_GRACE
        self.runs: dict[tuple[str, str], ExecutorRun] = {}
        self._background_tasks: set[asyncio.Task] = set()
        self._stopping = False

    def find(self, framework_id: str, executor_id: str) -> ExecutorRun | None:
        return self.runs.get((framework_id, executor_id))

    def _background(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.create_task(self._logged(coroutine, name), name=name)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)
        return task

    async def _logged(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        try:
            await coroutine
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("executor work failed node=%s work=%s", self.node, name)

    # --- Assignments ---------------------------------------------------------------------------------

    async def sync(self, tasks: Iterable[Task]) -> None:
        """Converge the executors on the node's custom-executor tasks, as the agent loop reads them."""
        messages: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for task in tasks:
            key = (task.framework_id, task.executor_id)
            messages.setdefault(key, []).extend(task.executor_messages)
            run = self.runs.get(key)
            entry = run.tasks.get(task.id) if run is not None else None
            if entry is not None:
                entry.task = task
            if task.ended:
                if run is not None and entry is not None:
                    self._forget_task(run, task.id)
                continue
            if task.executor_shutdown and run is not None and entry is not None:
                self._background(self.shutdown(run, "shut down by its framework", kill_tasks=True),
                                 f"shutdown {run.container_id}")
                continue
            if task.desired is DesiredState.STOP:
                await self._stop_task(run, entry, task)
                continue
            if entry is None and task.state is TaskState.STAGING and not self._stopping:
                self._launch(task)
        for key, entries in messages.items():
            run = self.runs.get(key)
            if run is not None:
                self._deliver_messages(run, entries)

    def _launch(self, task: Task) -> None:
        key = (task.framework_id, task.executor_id)
        run = self.runs.get(key)
        if run is not None and run.shutting_down:
            run.pending[task.id] = task
            return
        if run is None:
            run = self._new_run(task)
            self.runs[key] = run
            self._background(self._start(run), f"start {run.container_id}")
        entry = _TaskEntry(task)
        run.tasks[task.id] = entry
        run.ended_tasks.discard(task.id)
        if run.stream is not None:
            self._send_launch(run, entry)

    def _new_run(self, task: Task) -> ExecutorRun:
        info = dict(task.task_info.get("executor") or {})
        sandbox = self.root / run_folder_name(task.framework_id, task.executor_id)
        return ExecutorRun(task.framework_id, task.executor_id, info, dict(task.framework_info), sandbox)

    def _send_launch(self, run: ExecutorRun, entry: _TaskEntry) -> None:
        if run.send({"type": "LAUNCH", "launch": {"task": entry.task.task_info}}):
            entry.launched = True
            log.info("task sent to its executor task=%s executor=%s framework=%s node=%s",
                     entry.task.framework_task_id, run.executor_id, run.framework_id, self.node)

    async def _stop_task(self, run: ExecutorRun | None, entry: _TaskEntry | None, task: Task) -> None:
        if run is not None and task.id in run.pending:
            del run.pending[task.id]
        if entry is None or run is None:
            await self._end_task(task.id, TaskState.KILLED, "killed before its executor received it")
            return
        if entry.kill_requested:
            return
        entry.kill_requested = True
        if not entry.launched:
            await self._end_task(task.id, TaskState.KILLED, "killed before its executor received it")
            self._forget_task(run, task.id)
            return
        self._send_kill(run, entry)
        grace = kill_grace_of(task)
        entry.kill_timer = self._background(self._kill_deadline(run, entry, grace), f"kill {task.id}")

    def _send_kill(self, run: ExecutorRun, entry: _TaskEntry) -> None:
        kill: dict[str, Any] = {"task_id": protocol.id_message(entry.task.framework_task_id)}
        if "kill_policy" in entry.task.task_info:
            kill["kill_policy"] = entry.task.task_info["kill_policy"]
        if run.send({"type": "KILL", "kill": kill}):
            log.info("task kill sent to its executor task=%s executor=%s framework=%s node=%s",
                     entry.task.framework_task_id, run.executor_id, run.framework_id, self.node)

    async def _kill_deadline(self, run: ExecutorRun, entry: _TaskEntry, grace: float) -> None:
        await asyncio.sleep(grace + KILL_MARGIN)
        if run.tasks.get(entry.task.id) is not entry:
            return
        message = (f"executor {run.executor_id} did not end the task within its kill grace period "
                   f"of {grace:g}s")
        log.warning("task kill timed out task=%s executor=%s framework=%s node=%s: %s",
                    entry.task.framework_task_id, run.executor_id, run.framework_id, self.node, message)
        entry.kill_timer = None
        await self._end_task(entry.task.id, TaskState.FAILED, message)
        self._forget_task(run, entry.task.id)

    def _deliver_messages(self, run: ExecutorRun, entries: list[dict[str, Any]]) -> None:
        if run.stream is None:
            return
        for entry in sorted(entries, key=lambda item: item.get("seq", 0)):
            seq = entry.get("seq", 0)
            if seq <= run.delivered_seq:
                continue
            run.send({"type": "MESSAGE", "message": {"data": entry.get("data", "")}})
            run.delivered_seq = seq
            log.info("framework message sent to its executor executor=%s framework=%s node=%s",
                     run.executor_id, run.framework_id, self.node)

    def _forget_task(self, run: ExecutorRun, task_id: str) -> None:
        """Drop an ended task from its run, and shut the executor down when it has no task left."""
        entry = run.tasks.pop(task_id, None)
        run.ended_tasks.add(task_id)
        if entry is not None and entry.kill_timer is not None and entry.kill_timer is not asyncio.current_task():
            entry.kill_timer.cancel()
        if not run.tasks and not run.shutting_down and not self._stopping:
            self._background(self.shutdown(run, "it has no task left"), f"shutdown {run.container_id}")

    async def _end_task(self, task_id: str, state: TaskState, message: str) -> Task | None:
        def end(record: Task) -> None:
            if not record.ended:
                record.state = state
                record.message = message

        updated = await self.connection.update_task(task_id, end)
        log.info("task state changed task=%s node=%s to=%s: %s", task_id, self.node, state.value, message)
        return updated

    # --- The process -----------------------------------------------------------------------------------

    def _environment(self, run: ExecutorRun) -> dict[str, str]:
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        command = run.info.get("command") or {}
        for variable in (command.get("environment") or {}).get("variables", []):
            env[variable["name"]] = variable.get("value", "")
        sandbox = str(run.sandbox.resolve())
        env.update({
            "MESOS_FRAMEWORK_ID": run.framework_id,
            "MESOS_EXECUTOR_ID": run.executor_id,
            "MESOS_AGENT_ID": self.node,
            "MESOS_DIRECTORY": sandbox,
            "MESOS_SANDBOX": sandbox,
            "MESOS_CHECKPOINT": "1",
            "MESOS_RECOVERY_TIMEOUT": f"{RECOVERY_TIMEOUT:g}secs",
            "MESOS_SUBSCRIPTION_BACKOFF_MAX": f"{SUBSCRIPTION_BACKOFF_MAX:g}secs",
            "MESOS_EXECUTOR_SHUTDOWN_GRACE_PERIOD": f"{self.shutdown_grace:g}secs",
            "CORRAL_NODE": self.node,
            "CORRAL_SANDBOX": sandbox,
            "CORRAL_FRAMEWORK_ID": run.framework_id,
            "CORRAL_EXECUTOR_ID": run.executor_id,
        })
        if self.endpoint:
            env["MESOS_AGENT_ENDPOINT"] = self.endpoint
        return env

    async def _start(self, run: ExecutorRun) -> None:
        """Start the executor's process, then watch it. Its tasks fail when it cannot start."""
        command = run.info.get("command") or {}
        try:
            if not self.endpoint:
                raise LaunchError("the agent does not serve the executor API (no HTTP address is set)")
            run.sandbox.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(write_json, run.sandbox / RUN_FILE, {
                "framework_id": run.framework_id, "executor_id": run.executor_id,
                "info": run.info, "framework_info": run.framework_info,
            })
            spec = LaunchSpec(
                task_id=f"executor-{run.container_id}",
                argv=protocol.argv_of(command),
                env=self._environment(run),
                cwd=None,
                sandbox=run.sandbox,
                kill_timeout=PROCESS_KILL_TIMEOUT,
                job=SANDBOX_JOB,
                # NOTE: the executor's process gets no CPU or memory limit. Mesos sizes an
                # executor's container to the resources of the executor and all its tasks.
                use_cgroups=self.use_cgroups,
            )
            run.process = TaskProcess(spec)
            pid = await run.process.start()
        except (LaunchError, OSError, KeyError) as exc:
            run.process = None
            await self._launch_failed(run, f"executor {run.executor_id} failed to start: {exc}")
            return
        log.info("executor started executor=%s framework=%s node=%s pid=%d sandbox=%s",
                 run.executor_id, run.framework_id, self.node, pid, run.sandbox)
        run.started.set()
        self._background(self._watch(run), f"watch {run.container_id}")
        self._restart_registration_timer(run)

    async def _launch_failed(self, run: ExecutorRun, message: str) -> None:
        log.error("executor launch failed executor=%s framework=%s node=%s: %s",
                  run.executor_id, run.framework_id, self.node, message)
        run.exited.set()
        if self.runs.get(run.key) is run:
            del self.runs[run.key]
        for task_id in list(run.tasks):
            await self._end_task(task_id, TaskState.FAILED, message)
        run.tasks.clear()
        self._start_pending(run)

    async def _watch(self, run: ExecutorRun) -> None:
        assert run.process is not None
        status = await run.process.wait()
        if run.process.released:
            return
        await self._executor_exited(run, status)

    async def _executor_exited(self, run: ExecutorRun, status: ExitStatus) -> None:
        """End the tasks of an executor whose process exited, and tell its framework."""
        run.exited.set()
        if run.registration_timer is not None:
            run.registration_timer.cancel()
        if run.stream is not None:
            run.stream.close()
            run.stream = None
        if self.runs.get(run.key) is run:
            del self.runs[run.key]
        log.info("executor exited executor=%s framework=%s node=%s: %s tasks_left=%d",
                 run.executor_id, run.framework_id, self.node, status.describe(), len(run.tasks))
        message = f"executor {run.executor_id} exited ({status.describe()})"
        for task_id, entry in list(run.tasks.items()):
            if entry.kill_timer is not None:
                entry.kill_timer.cancel()
            killed = run.kill_tasks_on_exit or entry.kill_requested
            await self._end_task(task_id, TaskState.KILLED if killed else TaskState.FAILED, message)
        run.tasks.clear()
        if self.reporter is not None:
            try:
                await self.reporter.executor_exited(run.framework_id, self.node, run.executor_id, wait_status(status))
            except Exception as exc:  # a report is best effort, as in Mesos
                log.warning("executor exit not reported executor=%s framework=%s: %s",
                            run.executor_id, run.framework_id, exc)
        self._start_pending(run)

    def _start_pending(self, run: ExecutorRun) -> None:
        if run.pending and not self._stopping:
            log.info("starting a new executor for tasks launched while the last one shut down "
                     "executor=%s framework=%s tasks=%d", run.executor_id, run.framework_id, len(run.pending))
            for task in run.pending.values():
                self._launch(task)
            run.pending.clear()

    def _restart_registration_timer(self, run: ExecutorRun) -> None:
        if run.registration_timer is not None:
            run.registration_timer.cancel()
        run.registration_timer = self._background(self._registration_deadline(run), f"register {run.container_id}")

    async def _registration_deadline(self, run: ExecutorRun) -> None:
        await asyncio.sleep(self.registration_timeout)
        if run.stream is not None or run.exited.is_set():
            return
        log.warning("executor did not subscribe within %gs executor=%s framework=%s node=%s; shutting it down",
                    self.registration_timeout, run.executor_id, run.framework_id, self.node)
        run.registration_timer = None
        await self.shutdown(run, f"it did not subscribe within {self.registration_timeout:g}s")

    async def shutdown(self, run: ExecutorRun, reason: str, kill_tasks: bool = False) -> None:
        """Send SHUTDOWN, and kill the executor's process if it has not exited after the shutdown grace period.

        With `kill_tasks`, its tasks that have not ended become KILLED, not FAILED.
        """
        if kill_tasks:
            run.kill_tasks_on_exit = True
        if run.shutting_down:
            return
        run.shutting_down = True
        log.info("executor shutting down executor=%s framework=%s node=%s: %s",
                 run.executor_id, run.framework_id, self.node, reason)
        run.send({"type": "SHUTDOWN"})
        await run.started.wait()
        try:
            async with asyncio.timeout(self.shutdown_grace):
                await run.exited.wait()
            return
        except TimeoutError:
            pass
        if run.process is not None and not run.exited.is_set():
            log.warning("executor still running %gs after SHUTDOWN executor=%s framework=%s node=%s; killing it",
                        self.shutdown_grace, run.executor_id, run.framework_id, self.node)
            await run.process.stop()

    # --- Executor calls -------------------------------------------------------------------------------------

    def run_for_call(self, framework_id: str, executor_id: str) -> ExecutorRun:
        run = self.find(framework_id, executor_id)
        if run is None or run.exited.is_set():
            raise ExecutorCallError(
                400, f"executor {executor_id} of framework {framework_id} is not running on agent {self.node}"
            )
        return run

    async def subscribe(self, run: ExecutorRun, body: dict[str, Any]) -> ExecutorStream:
        """Start a subscription: store the updates the executor resends, then send SUBSCRIBED and its work."""
        unacknowledged_updates = protocol.read_list(body.get("unacknowledged_updates", []),
                                                    "subscribe.unacknowledged_updates")
        known_tasks = _unacknowledged_task_ids(body)

        acknowledgements = []
        for index, item in enumerate(unacknowledged_updates):
            status = protocol.read_object(item, f"subscribe.unacknowledged_updates[{index}]")
            acknowledgements.append(await self._store_update(run, status.get("status", status)))
        if run.stream is not None:
            run.stream.send({"type": "ERROR", "error": {"message": "the executor subscribed again"}})
            run.stream.close()
        stream = ExecutorStream()
        run.stream = stream
        run.subscriptions += 1
        if run.registration_timer is not None:
            run.registration_timer.cancel()
            run.registration_timer = None
        stream.send({"type": "SUBSCRIBED", "subscribed": {
            "executor_info": run.info,
            "framework_info": run.framework_info,
            "agent_info": {"id": protocol.id_message(self.node), "hostname": self.address},
            "container_id": {"value": run.container_id},
        }})
        log.info("executor subscribed executor=%s framework=%s node=%s subscription=%d resent_updates=%d",
                 run.executor_id, run.framework_id, self.node, run.subscriptions, len(acknowledgements))
        for acknowledged in acknowledgements:
            stream.send(acknowledged)
        self._resend_work(run, known_tasks)
        return stream

    def _resend_work(self, run: ExecutorRun, known_tasks: set[str]) -> None:
        """Send a new subscription the LAUNCH, KILL, MESSAGE and SHUTDOWN events it may have missed.

        A task still STAGING that the executor does not list as launched gets
        its LAUNCH (again): the earlier one was lost, or never sent.
        """
        for entry in list(run.tasks.values()):
            if entry.task.framework_task_id in known_tasks or entry.task.state is not TaskState.STAGING:
                entry.launched = True
            elif not entry.kill_requested:
                entry.launched = False
                self._send_launch(run, entry)
            if entry.kill_requested and entry.launched:
                # The KILL may have been written to the connection that dropped.
                self._send_kill(run, entry)
        messages = [message for entry in run.tasks.values() for message in entry.task.executor_messages]
        self._deliver_messages(run, messages)
        if run.shutting_down:
            run.send({"type": "SHUTDOWN"})

    def unsubscribed(self, run: ExecutorRun, stream: ExecutorStream) -> None:
        """Forget a subscription whose connection closed.

        The executor gets the registration timeout to subscribe again.
        """
        stream.close()
        if run.stream is not stream:
            return
        run.stream = None
        if not run.exited.is_set() and not self._stopping:
            log.info("executor disconnected executor=%s framework=%s node=%s; waiting %gs for it to subscribe again",
                     run.executor_id, run.framework_id, self.node, self.registration_timeout)
            self._restart_registration_timer(run)

    async def update(self, run: ExecutorRun, status: dict[str, Any]) -> None:
        """UPDATE: store a task's status from its executor, then send the executor ACKNOWLEDGED."""
        acknowledged = await self._store_update(run, status)
        run.send(acknowledged)

    async def _store_update(self, run: ExecutorRun, status: dict[str, Any]) -> dict[str, Any]:
        task_id = protocol.read_id(status.get("task_id"), "update.status.task_id")
        state_text = status.get("state")
        try:
            state = TaskState(state_text[len("TASK_"):]) if isinstance(state_text, str) and \
                state_text.startswith("TASK_") else None
        except ValueError:
            state = None
        if state not in _EXECUTOR_STATES:
            allowed = ", ".join(sorted(protocol.state_name(item) for item in _EXECUTOR_STATES))
            raise ProtocolError(f"invalid 'update.status.state' {state_text!r}: expected one of {allowed}")
        status_uuid = status.get("uuid")
        if not isinstance(status_uuid, str) or not status_uuid:
            raise ProtocolError("invalid 'update.status.uuid': an executor's update needs a base64 uuid")
        message = status.get("message", "")
        if not isinstance(message, str):
            raise ProtocolError("invalid 'update.status.message': expected a string")
        store_id = f"{task_id}@{run.framework_id}"
        entry = run.tasks.get(store_id)
        if entry is None and store_id not in run.ended_tasks:
            raise ExecutorCallError(
                400, f"task {task_id} is not a task of executor {run.executor_id} on agent {self.node}"
            )
        if entry is not None:
            def apply(record: Task) -> None:
                if not record.ended:
                    record.state = state
                    record.message = message or f"reported {state_text} by executor {run.executor_id}"

            updated = await self.connection.update_task(store_id, apply)
            if updated is not None:
                entry.task = updated
            log.info("task status from its executor task=%s executor=%s framework=%s node=%s state=%s",
                     task_id, run.executor_id, run.framework_id, self.node, state_text)
            if updated is None or updated.ended:
                self._forget_task(run, store_id)
        return {"type": "ACKNOWLEDGED", "acknowledged": {"task_id": protocol.id_message(task_id),
                                                         "uuid": status_uuid}}

    async def message(self, run: ExecutorRun, data: str) -> None:
        """MESSAGE: pass base64 `data` from the executor to its framework."""
        if self.reporter is None:
            raise ExecutorCallError(503, f"agent {self.node} has no connection to the master for messages")
        delivered = await self.reporter.framework_message(run.framework_id, self.node, run.executor_id, data)
        log.info("executor message passed to the master executor=%s framework=%s node=%s delivered=%s",
                 run.executor_id, run.framework_id, self.node, delivered)

    # --- Agent restarts and stops ----------------------------------------------------------------------------

    async def recover(self, tasks: Iterable[Task]) -> None:
        """Adopt the executors that an earlier run of the agent left running, and settle the rest.

        An executor whose process still runs gets its tasks back and the
        registration timeout to subscribe again. The tasks of an executor
        that exited meanwhile end FAILED, as do started tasks whose executor
        left no sandbox. Tasks still STAGING are left for `sync` to launch.
        """
        live: dict[tuple[str, str], list[Task]] = {}
        for task in tasks:
            if task.executor_id and not task.ended:
                live.setdefault((task.framework_id, task.executor_id), []).append(task)
        try:
            folders = await asyncio.to_thread(lambda: sorted(path for path in self.root.iterdir() if path.is_dir()))
        except FileNotFoundError:
            folders = []
        for folder in folders:
            try:
                record = await asyncio.to_thread(read_json, folder / RUN_FILE)
            except ExecutorStateError as exc:
                log.warning("executor sandbox skipped node=%s path=%s: %s", self.node, folder, exc)
                continue
            if record is None:
                continue
            key = (record["framework_id"], record["executor_id"])
            recovered = await recover_task_process(folder.name, folder)
            if recovered.process is None:
                ending = recovered.exit_status.describe() if recovered.exit_status is not None else recovered.problem
                for task in live.pop(key, []):
                    if task.state is not TaskState.STAGING:
                        await self._end_task(task.id, TaskState.FAILED,
                                             f"executor {key[1]} exited while the agent was down ({ending})")
                continue
            run = ExecutorRun(key[0], key[1], record.get("info", {}), record.get("framework_info", {}), folder)
            run.process = recovered.process
            run.started.set()
            self.runs[key] = run
            for task in live.pop(key, []):
                run.tasks[task.id] = _TaskEntry(task, launched=task.state is not TaskState.STAGING)
                run.delivered_seq = max([run.delivered_seq, *(item.get("seq", 0) for item in task.executor_messages)])
            log.info("executor adopted after an agent restart executor=%s framework=%s node=%s pid=%s tasks=%d",
                     run.executor_id, run.framework_id, self.node, run.process.pid, len(run.tasks))
            self._background(self._watch(run), f"watch {run.container_id}")
            if run.tasks:
                self._restart_registration_timer(run)
            else:
                self._background(self.shutdown(run, "it has no task left"), f"shutdown {run.container_id}")
        for key, remaining in live.items():
            for task in remaining:
                if task.state is not TaskState.STAGING:
                    await self._end_task(task.id, TaskState.FAILED,
                                         f"executor {key[1]} was not found after the agent restarted")

    async def detach(self) -> None:
        """Stop supervising the executors and leave them running, for the next run of the agent to adopt."""
        self._stopping = True
        for run in self.runs.values():
            if run.process is not None and run.started.is_set():
                run.process.release()
            if run.stream is not None:
                run.stream.close()
        await self._cancel_background()
        self.runs.clear()
        await self._close_reporter()

    async def stop(self) -> None:
        """Shut every executor down. Their tasks that have not ended become KILLED."""
        self._stopping = True
        runs = list(self.runs.values())
        if runs:
            log.info("stopping custom executors node=%s count=%d", self.node, len(runs))
        await asyncio.gather(*(self.shutdown(run, "stopped with the agent", kill_tasks=True) for run in runs),
                             return_exceptions=True)
        # The watchers end the tasks of the executors that exited.
        for run in runs:
            try:
                async with asyncio.timeout(PROCESS_KILL_TIMEOUT + 5.0):
                    while self.runs.get(run.key) is run:
                        await asyncio.sleep(0.05)
            except TimeoutError:
                log.error("executor did not end executor=%s framework=%s node=%s",
                          run.executor_id, run.framework_id, self.node)
        await self._cancel_background()
        self.runs.clear()
        await self._close_reporter()

    async def _cancel_background(self) -> None:
        for task in list(self._background_tasks):
            task.cancel()
        await asyncio.gather(*self._background_tasks, return_exceptions=True)

    async def _close_reporter(self) -> None:
        if self.reporter is not None:
            await self.reporter.close()

    async def collect_sandboxes(self, retention: SandboxRetention) -> list[str]:
        """Remove the sandboxes of exited executors that the retention policy no longer keeps."""
        keep = {run.container_id for run in self.runs.values()}
        if not self.root.is_dir():
            return []
        return await asyncio.to_thread(collect_sandboxes, self.root, keep, retention, self.node)

