"""A custom executor and its driver for an agent's v1 executor HTTP API.

An agent starts a custom executor for the first task that names its
ExecutorInfo, with the environment Mesos gives executors: MESOS_AGENT_ENDPOINT
(the agent's HOST:PORT), MESOS_FRAMEWORK_ID, MESOS_EXECUTOR_ID,
MESOS_DIRECTORY and MESOS_SANDBOX (its sandbox folder), MESOS_CHECKPOINT,
MESOS_RECOVERY_TIMEOUT and MESOS_SUBSCRIPTION_BACKOFF_MAX. The driver reads
them, opens one long-lived SUBSCRIBE request to `POST /api/v1/executor`,
whose response is a RecordIO stream of events (SUBSCRIBED, LAUNCH, KILL,
ACKNOWLEDGED, MESSAGE, SHUTDOWN, ERROR, HEARTBEAT), and turns each event
into a call of an `Executor` callback. UPDATE and MESSAGE calls are
separate POSTs, and the agent responds to each with 202 Accepted.

Each status update carries a uuid, and the driver keeps it until the agent
responds with ACKNOWLEDGED. When the connection drops (the agent restarted),
the driver subscribes again, within MESOS_RECOVERY_TIMEOUT, and resends the
updates not acknowledged and the tasks launched without any update yet, as
Mesos's executor library does. After SHUTDOWN it calls `shutdown` and stops.

A minimal executor::

    from corral.sdk import Executor, ExecutorDriver

    class Echo(Executor):
        def launch_task(self, driver, task):
            driver.send_status_update(task["task_id"], "TASK_RUNNING")
            driver.send_framework_message(b"hello from " + driver.executor_id.encode())
            driver.send_status_update(task["task_id"], "TASK_FINISHED")

    ExecutorDriver(Echo()).run_forever()
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import orjson

from corral.sdk.messages import TaskState
from corral.sdk.recordio import DEFAULT_MAX_RECORD_SIZE, RecordIODecoder
from corral.sdk.resources import Offer, id_json, id_value, scalar
from corral.sdk.stream import (
    Aborted,
    CallError,
    DriverStatus,
    NotSubscribedError,
    StreamDriver,
    StreamLost,
    decode_events,
)

log = logging.getLogger(__name__)

EXECUTOR_PATH = "/api/v1/executor"

# Mesos's defaults, used when the agent does not set the variables.
DEFAULT_RECOVERY_TIMEOUT = 15 * 60.0
DEFAULT_SUBSCRIPTION_BACKOFF_MAX = 2.0
# The first wait between two subscription attempts, doubled up to the backoff maximum.
_SUBSCRIPTION_BACKOFF_MIN = 0.1

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*(ns|us|ms|secs|mins|hrs|days|weeks)\s*")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "ms": 1e-3, "secs": 1.0, "mins": 60.0, "hrs": 3600.0, "days": 86400.0,
    "weeks": 604800.0,
}


def parse_mesos_duration(text: str, name: str) -> float:
    """Return the seconds of a duration in Mesos's notation, such as '15mins' or '500ms'."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid {name} {text!r}: expected a number and a unit of "
                         f"{', '.join(_DURATION_UNITS)}, such as '15mins'")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


# --- Building tasks for a custom executor (the framework side) ---------------------------------------


def executor_info(
    executor_id: str,
    command: str | Sequence[str],
    *,
    name: str | None = None,
    cpus: float = 0.0,
    mem: float = 0.0,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Build an ExecutorInfo: `command` as a string runs through `/bin/sh -c`, as a list it runs directly.

    `cpus` and `mem` (MB) are the executor's own resources, which the task
    that starts it takes from its offer in addition to the task's.
    """
    if isinstance(command, str):
        if not command.strip():
            raise ValueError(f"executor {executor_id!r}: the shell command is empty")
        command_info: dict[str, Any] = {"shell": True, "value": command}
    else:
        argv = list(command)
        if not argv or not all(isinstance(part, str) for part in argv):
            raise ValueError(f"executor {executor_id!r}: invalid command {command!r}: "
                             "expected a string or a non-empty list of strings")
        command_info = {"shell": False, "value": argv[0], "arguments": argv}
    if env:
        command_info["environment"] = {"variables": [{"name": key, "value": str(value)} for key, value in env.items()]}
    resources = [scalar(resource, amount) for resource, amount in (("cpus", cpus), ("mem", mem)) if amount > 0]
    info: dict[str, Any] = {
        "executor_id": id_json(executor_id),
        "type": "CUSTOM",
        "name": name or executor_id,
        "command": command_info,
    }
    if resources:
        info["resources"] = resources
    return info


def executor_task(
    offer: Offer,
    name: str,
    executor: Mapping[str, Any],
    *,
    cpus: float,
    mem: float,
    data: bytes | str = b"",
    task_id: str | None = None,
    kill_grace_seconds: float | None = None,
) -> dict[str, Any]:
    """Allocate a task's resources from `offer` and return a TaskInfo run by `executor` (see `executor_info`).

    `data` reaches the executor in the task's `data` field. The caller keeps
    room in the offer for the executor's own resources when this task
    starts the executor. Raises InsufficientResources when the offer cannot
    cover the task.
    """
    if not name:
        raise ValueError("a task name must be a non-empty string")
    resources = offer.allocate(cpus=cpus, mem=mem)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    info: dict[str, Any] = {
        "name": name,
        "task_id": {"value": task_id or f"{name}-{uuid.uuid4().hex[:12]}"},
        "agent_id": id_json(offer.agent_id),
        "resources": resources,
        "executor": dict(executor),
        "data": base64.b64encode(raw).decode(),
    }
    if kill_grace_seconds is not None:
        info["kill_policy"] = {"grace_period": {"nanoseconds": int(kill_grace_seconds * 1e9)}}
    return info


def task_data(task: Mapping[str, Any]) -> bytes:
    """Return the decoded `data` of a TaskInfo that an executor received in LAUNCH."""
    return base64.b64decode(task.get("data", "") or "")


# --- The executor side -----------------------------------------------------------------------------------


class Executor:
    """Callbacks of a custom executor; override those the executor needs.

    Each may be a plain method or a coroutine. The driver calls them one at a
    time, in the order of the events, and a callback that raises is logged
    without stopping the driver. Long work (a task's run) belongs in a
    thread or an asyncio task, so that the next events keep coming.
    """

    def registered(self, driver: ExecutorDriver, executor_info: Mapping[str, Any],
                   framework_info: Mapping[str, Any], agent_info: Mapping[str, Any]) -> None:
        """Called on the first SUBSCRIBED event."""

    def reregistered(self, driver: ExecutorDriver, agent_info: Mapping[str, Any]) -> None:
        """Called on each later SUBSCRIBED event, after the driver reconnected to a restarted agent."""

    def disconnected(self, driver: ExecutorDriver) -> None:
        """Called when the connection to the agent is lost; the driver then subscribes again by itself."""

    def launch_task(self, driver: ExecutorDriver, task: Mapping[str, Any]) -> None:
        """Called with a TaskInfo (JSON) to run; report its progress with `send_status_update`."""

    def kill_task(self, driver: ExecutorDriver, task_id: str) -> None:
        """Called when the framework kills a task; end it and report TASK_KILLED within its kill grace period."""

    def framework_message(self, driver: ExecutorDriver, data: bytes) -> None:
        """Called with a message from the framework."""

    def shutdown(self, driver: ExecutorDriver) -> None:
        """Called when the agent shuts the executor down; end every task. The driver stops afterwards."""

    def error(self, driver: ExecutorDriver, message: str) -> None:
        """Called on an ERROR event or a subscription the agent rejected; the driver then aborts."""
        log.error("executor %s: agent reported an error: %s", driver.executor_id, message)


class ExecutorDriver(StreamDriver):
    """Connects an `Executor` to its agent and keeps it connected.

    `environment` defaults to os.environ; a missing MESOS_AGENT_ENDPOINT,
    MESOS_FRAMEWORK_ID or MESOS_EXECUTOR_ID raises ValueError naming it.
    """

    _log = log
    _peer = "agent"
    _stream_task_name = "corral-sdk-executor-stream"
    _drain_calls_on_cancel = True
    _retry_min = _SUBSCRIPTION_BACKOFF_MIN

    def __init__(
        self,
        executor: Executor,
        environment: Mapping[str, str] | None = None,
        *,
        call_timeout: float = 30.0,
        max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
    ):
        super().__init__()
        env = os.environ if environment is None else environment
        self.executor = executor
        self.agent_endpoint = _required(env, "MESOS_AGENT_ENDPOINT")
        self.framework_id = _required(env, "MESOS_FRAMEWORK_ID")
        self.executor_id = _required(env, "MESOS_EXECUTOR_ID")
        self.sandbox = env.get("MESOS_SANDBOX") or env.get("MESOS_DIRECTORY") or os.getcwd()
        self.checkpoint = env.get("MESOS_CHECKPOINT", "0").lower() in ("1", "true")
        self.recovery_timeout = _duration(env, "MESOS_RECOVERY_TIMEOUT", DEFAULT_RECOVERY_TIMEOUT)
        self.backoff_max = _duration(env, "MESOS_SUBSCRIPTION_BACKOFF_MAX", DEFAULT_SUBSCRIPTION_BACKOFF_MAX)
        self.call_timeout = call_timeout
        self.max_record_size = max_record_size
        endpoint = self.agent_endpoint if "://" in self.agent_endpoint else f"http://{self.agent_endpoint}"
        self._url = endpoint.rstrip("/") + EXECUTOR_PATH

        self.subscriptions = 0
        self.subscribed = False
        self.executor_info: Mapping[str, Any] = {}
        self.framework_info: Mapping[str, Any] = {}
        self.agent_info: Mapping[str, Any] = {}
        # Status updates sent and not yet acknowledged, by uuid, oldest first.
        self.unacknowledged_updates: dict[str, dict[str, Any]] = {}
        # Tasks launched here with no status update sent yet, by task id.
        self.unacknowledged_tasks: dict[str, Mapping[str, Any]] = {}

    @property
    def _retry_max(self) -> float:
        return self.backoff_max

    @property
    def _log_name(self) -> str:
        return f"executor {self.executor_id}"

    @property
    def _callbacks(self) -> Executor:
        return self.executor

    # Running and stopping

    async def run(self) -> DriverStatus:
        """Subscribe, dispatch events to the executor and resubscribe, until `stop`, SHUTDOWN or an abort."""
        return await self._run()

    def stop(self) -> None:
        """Stop the driver once the calls already made are sent; safe from any thread and from callbacks."""
        self._stop_soon()

    def _request_stop(self) -> None:
        assert self._stop_requested is not None
        self._stop_requested.set()

    def _drop_subscription(self) -> bool:
        was_subscribed = self.subscribed
        self.subscribed = False
        return was_subscribed

    async def _stream_lost(self, reason: str) -> None:
        log.warning("executor %s: connection to the agent lost (%s)", self.executor_id, reason)
        await self._invoke("disconnected")

    def _give_up(self, reason: str) -> str | None:
        if not self.checkpoint and self.subscriptions:
            return f"connection to the agent lost ({reason}) and MESOS_CHECKPOINT is off"
        if time.monotonic() - self._lost_at > self.recovery_timeout:
            return (f"no subscription to the agent at {self.agent_endpoint} within "
                    f"MESOS_RECOVERY_TIMEOUT of {self.recovery_timeout:g}s; last error: {reason}")
        return None

    # The event stream

    def _call_body(self, kind: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "type": kind,
            "framework_id": id_json(self.framework_id),
            "executor_id": id_json(self.executor_id),
        }
        if body is not None:
            call[kind.lower()] = body
        return call

    async def _stream_once(self) -> None:
        assert self._session is not None
        subscribe = {
            "unacknowledged_tasks": [dict(task) for task in self.unacknowledged_tasks.values()],
            "unacknowledged_updates": [{"status": status} for status in self.unacknowledged_updates.values()],
        }
        log.info("executor %s: subscribing to %s (unacknowledged: %d tasks, %d updates)", self.executor_id,
                 self._url, len(subscribe["unacknowledged_tasks"]), len(subscribe["unacknowledged_updates"]))
        response = await self._session.post(
            self._url, data=orjson.dumps(self._call_body("SUBSCRIBE", subscribe)),
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=None, connect=self.call_timeout, sock_connect=self.call_timeout),
        )
        try:
            if response.status != 200:
                text = (await response.text(errors="replace"))[:500].strip()
                detail = f"SUBSCRIBE returned HTTP {response.status}: {text or response.reason}"
                # A restarted agent may not know the executor yet, so only a first subscription gives up.
                if response.status >= 500 or self.subscriptions:
                    raise StreamLost(detail)
                raise Aborted(detail)
            await self._read_events(response)
        finally:
            response.close()

    async def _read_events(self, response: aiohttp.ClientResponse) -> None:
        assert self._stop_requested is not None
        decoder = RecordIODecoder(self.max_record_size)
        while True:
            chunk = await response.content.readany()
            if not chunk:
                decoder.close()
                return
            for event in decode_events(decoder, chunk):
                await self._dispatch(event)
                if self._stop_requested.is_set():
                    return
            if decoder.error is not None:
                raise decoder.error

    async def _dispatch(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            log.warning("executor %s: ignoring event of unknown type %r", self.executor_id, kind)
            return
        await handler(self, event.get(kind.lower(), {}) or {})

    async def _on_subscribed(self, body: Mapping[str, Any]) -> None:
        self.subscribed = True
        self.subscriptions += 1
        self.executor_info = body.get("executor_info", {})
        self.framework_info = body.get("framework_info", {})
        self.agent_info = body.get("agent_info", {})
        log.info("executor %s: subscribed to agent %s", self.executor_id,
                 self.agent_info.get("id", {}).get("value", "?"))
        if self.subscriptions == 1:
            await self._invoke("registered", self.executor_info, self.framework_info, self.agent_info)
        else:
            await self._invoke("reregistered", self.agent_info)

    async def _on_launch(self, body: Mapping[str, Any]) -> None:
        task = body.get("task", {})
        task_id = id_value(task["task_id"])
        self.unacknowledged_tasks[task_id] = task
        log.info("executor %s: launching task %s", self.executor_id, task_id)
        await self._invoke("launch_task", task)

    async def _on_kill(self, body: Mapping[str, Any]) -> None:
        await self._invoke("kill_task", id_value(body["task_id"]))

    async def _on_acknowledged(self, body: Mapping[str, Any]) -> None:
        acknowledged = body.get("uuid")
        if self.unacknowledged_updates.pop(acknowledged, None) is None:
            log.debug("executor %s: acknowledgement of an unknown update %r", self.executor_id, acknowledged)

    async def _on_message(self, body: Mapping[str, Any]) -> None:
        try:
            data = base64.b64decode(body.get("data", ""), validate=True)
        except (binascii.Error, ValueError):
            log.warning("executor %s: framework message with invalid base64 data", self.executor_id)
            return
        await self._invoke("framework_message", data)

    async def _on_shutdown(self, body: Mapping[str, Any]) -> None:
        log.info("executor %s: shutdown requested by the agent", self.executor_id)
        await self._invoke("shutdown")
        self.stop()

    async def _on_error(self, body: Mapping[str, Any]) -> None:
        raise Aborted(body.get("message", "the agent sent an ERROR event without a message"))

    async def _on_heartbeat(self, body: Mapping[str, Any]) -> None:
        log.debug("executor %s: heartbeat", self.executor_id)

    async def _on_launch_group(self, body: Mapping[str, Any]) -> None:
        # NOTE: task groups (LAUNCH_GROUP) have no callback; corral's agent does not send them.
        log.warning("executor %s: ignoring LAUNCH_GROUP, which the SDK does not handle", self.executor_id)

    _handlers = {
        "SUBSCRIBED": _on_subscribed,
        "LAUNCH": _on_launch,
        "LAUNCH_GROUP": _on_launch_group,
        "KILL": _on_kill,
        "ACKNOWLEDGED": _on_acknowledged,
        "MESSAGE": _on_message,
        "SHUTDOWN": _on_shutdown,
        "ERROR": _on_error,
        "HEARTBEAT": _on_heartbeat,
    }

    # Calls

    def send_status_update(
        self,
        task_id: str,
        state: TaskState | str,
        message: str = "",
        *,
        data: bytes | None = None,
        reason: str | None = None,
        healthy: bool | None = None,
    ):
        """Report a task's state (TASK_RUNNING, TASK_FINISHED, ...) to the agent; safe from any thread.

        The update is kept until the agent acknowledges it and resent after a
        reconnection. Returns the asyncio task that sends it (a concurrent
        future when called from another thread).
        """
        task_id = id_value(task_id)
        state = TaskState(state)
        if state is TaskState.TASK_STAGING:
            raise ValueError(f"task {task_id}: executors may not send TASK_STAGING")
        status: dict[str, Any] = {
            "task_id": id_json(task_id),
            "state": state.value,
            "source": "SOURCE_EXECUTOR",
            "executor_id": id_json(self.executor_id),
            "uuid": base64.b64encode(uuid.uuid4().bytes).decode(),
            "timestamp": time.time(),
        }
        if message:
            status["message"] = message
        if data is not None:
            status["data"] = base64.b64encode(data).decode()
        if reason:
            status["reason"] = reason
        if healthy is not None:
            status["healthy"] = healthy
        if self.agent_info.get("id"):
            status["agent_id"] = self.agent_info["id"]
        return self._submit(self._update(status), "UPDATE")

    async def _update(self, status: dict[str, Any]) -> None:
        self.unacknowledged_updates[status["uuid"]] = status
        self.unacknowledged_tasks.pop(status["task_id"]["value"], None)
        if not self.subscribed:
            log.info("executor %s: update of task %s to %s kept until the driver subscribes again",
                     self.executor_id, status["task_id"]["value"], status["state"])
            return
        try:
            await self._post(self._call_body("UPDATE", {"status": status}))
        except CallError as error:
            # It stays unacknowledged, so the next SUBSCRIBE sends it again.
            log.warning("executor %s: %s; the update is resent after the next subscription", self.executor_id, error)

    def send_framework_message(self, data: bytes | str):
        """Send data to the framework, which receives a MESSAGE event; safe from any thread.

        Delivery is not guaranteed, as in Mesos. Raises NotSubscribedError
        while the driver has no subscription.
        """
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if not self.subscribed:
            raise NotSubscribedError("MESSAGE", "the executor driver has no subscription to its agent")
        call = self._call_body("MESSAGE", {"data": base64.b64encode(raw).decode()})
        return self._submit(self._post(call), "MESSAGE")

    def _submit(self, coroutine, kind: str):
        if self._loop is None or self.status is not DriverStatus.RUNNING:
            coroutine.close()
            raise NotSubscribedError(kind, "the executor driver is not running")
        return self._start_call(coroutine, f"corral-sdk-executor-{kind}")

    async def _post(self, call: dict[str, Any]) -> None:
        await self._send_call(self._url, call, {"Content-Type": "application/json"})


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise ValueError(f"missing environment variable {name}: the executor must be started by an agent "
                         "(or given MESOS_AGENT_ENDPOINT, MESOS_FRAMEWORK_ID and MESOS_EXECUTOR_ID)")
    return value


def _duration(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name)
    return default if not text else parse_mesos_duration(text, name)
