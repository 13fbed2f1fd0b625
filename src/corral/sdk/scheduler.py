"""A framework scheduler and its driver for the master's v1 scheduler HTTP API.

The driver opens one long-lived SUBSCRIBE request to `POST /api/v1/scheduler`,
whose response is a RecordIO stream of events (SUBSCRIBED, OFFERS, RESCIND,
UPDATE, MESSAGE, FAILURE, ERROR, HEARTBEAT), and turns each event into a call
of a `Scheduler` callback. Every other call (ACCEPT, DECLINE, KILL, ...) is a
separate POST that carries the `Mesos-Stream-Id` header of the current
subscription, and the master responds to it with 202 Accepted.

The driver runs on asyncio. `await driver.run()` runs it inside an event loop,
and `driver.run_forever()` runs it in a new loop for a plain script.
Callbacks may be plain functions or coroutines. Calls such as `launch` send
their request in the background and return an `asyncio.Task`, so a plain
callback calls them and moves on, while a coroutine can await the task to
learn whether the master accepted the call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from corral.sdk.messages import FrameworkInfo, TaskStatus
from corral.sdk.recordio import DEFAULT_MAX_RECORD_SIZE, RecordIODecoder
from corral.sdk.resources import Offer, id_json, id_value
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

SCHEDULER_PATH = "/api/v1/scheduler"
STREAM_ID_HEADER = "Mesos-Stream-Id"

# Mesos's default heartbeat interval, used when SUBSCRIBED does not name one.
DEFAULT_HEARTBEAT_INTERVAL = 15.0

class Scheduler:
    """Callbacks of a framework scheduler. Override those the framework needs.

    Each may be a plain method or a coroutine. The driver calls them one at a
    time, in the order of the events, and a callback that raises is logged
    without stopping the driver.
    """

    def registered(self, driver: SchedulerDriver, framework_id: str, master_info: Mapping[str, Any]) -> None:
        """Called on the driver's first SUBSCRIBED event, with the framework's id."""

    def reregistered(self, driver: SchedulerDriver, master_info: Mapping[str, Any]) -> None:
        """Called on each later SUBSCRIBED event, after the driver reconnected."""

    def disconnected(self, driver: SchedulerDriver) -> None:
        """Called when the event stream is lost. The driver then reconnects by itself."""

    def resource_offers(self, driver: SchedulerDriver, offers: list[Offer]) -> None:
        """Called with new offers. Use each with `launch`, or return it with `decline`."""

    def offer_rescinded(self, driver: SchedulerDriver, offer_id: str) -> None:
        """Called when the master withdraws an offer that the framework has not yet accepted or declined."""

    def status_update(self, driver: SchedulerDriver, status: TaskStatus) -> None:
        """Called for each task status update.

        With implicit acknowledgements (the default) the driver acknowledges
        the update after this returns, unless it raised.
        """

    def framework_message(self, driver: SchedulerDriver, executor_id: str, agent_id: str, data: bytes) -> None:
        """Called with a message that an executor sent to the framework."""

    def agent_lost(self, driver: SchedulerDriver, agent_id: str) -> None:
        """Called when the master declares an agent failed or removed."""

    def executor_lost(self, driver: SchedulerDriver, executor_id: str, agent_id: str, status: int | None) -> None:
        """Called when an executor exits or is lost. `status` is its exit status when known."""

    def error(self, driver: SchedulerDriver, message: str) -> None:
        """Called on an ERROR event or a subscription that the master rejected. The driver then aborts."""
        log.error("framework %s: master reported an error: %s", driver.framework_id, message)


def _normalize_master(master: str) -> str:
    url = master if "://" in master else f"http://{master}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"invalid master address {master!r}: expected http://HOST:PORT or HOST:PORT")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"invalid master address {master!r}: the port is not a number from 0 to 65535") from None
    return f"{parts.scheme}://{parts.netloc}"


def _offer_ids(offers: str | Offer | Mapping[str, Any] | Iterable[str | Offer | Mapping[str, Any]]) -> list[dict]:
    if isinstance(offers, (str, Offer, Mapping)):
        offers = [offers]
    ids = [id_json(offer.id if isinstance(offer, Offer) else offer) for offer in offers]
    if not ids:
        raise ValueError("no offer ids given: expected one or more offers or offer ids")
    return ids


def _filters(filters: Mapping[str, Any] | float | None) -> dict[str, Any] | None:
    if filters is None:
        return None
    if isinstance(filters, Mapping):
        seconds = filters.get("refuse_seconds")
        if seconds is not None:
            _check_refuse_seconds(seconds)
        return dict(filters)
    _check_refuse_seconds(filters)
    return {"refuse_seconds": float(filters)}


def _check_refuse_seconds(seconds: Any) -> None:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid refuse_seconds {seconds!r}: expected a finite number of seconds, 0 or more")


def _reconcile_entry(task: str | TaskStatus | tuple | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(task, TaskStatus):
        task_id, agent_id = task.task_id, task.agent_id
    elif isinstance(task, tuple):
        task_id, agent_id = task
    elif isinstance(task, Mapping) and "task_id" in task:
        task_id, agent_id = task["task_id"], task.get("agent_id")
    else:
        task_id, agent_id = task, None
    entry = {"task_id": id_json(task_id)}
    if agent_id:
        entry["agent_id"] = id_json(agent_id)
    return entry


class SchedulerDriver(StreamDriver):
    """Connects a `Scheduler` to a corral (or Mesos) master and keeps it connected.

    When the event stream drops, or no event arrives for `missed_heartbeats`
    heartbeat intervals, the driver calls `disconnected` and subscribes again
    with the same framework id, waiting between tries from `reconnect_min`
    seconds, doubled up to `reconnect_max`, with jitter. The master removes a
    framework whose failover_timeout is 0 as soon as its stream drops, and then
    rejects the new SUBSCRIBE, so the driver aborts. A framework that should
    survive a reconnect needs a failover_timeout longer than the outage.
    """

    _log = log
    _peer = "master"
    _stream_task_name = "corral-sdk-event-stream"
    _callback_label = "scheduler callback"

    def __init__(
        self,
        scheduler: Scheduler,
        framework: FrameworkInfo,
        master: str = "http://127.0.0.1:8500",
        *,
        implicit_acknowledgements: bool = True,
        missed_heartbeats: int = 5,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        call_timeout: float = 30.0,
        subscribe_timeout: float = 30.0,
        max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
    ):
        if missed_heartbeats < 1:
            raise ValueError(f"invalid missed_heartbeats {missed_heartbeats!r}: expected 1 or more")
        if not 0 < reconnect_min <= reconnect_max:
            raise ValueError(
                f"invalid reconnect delays {reconnect_min!r} and {reconnect_max!r}: expected 0 < min <= max seconds"
            )
        super().__init__()
        self.scheduler = scheduler
        self.framework = framework
        self.master = _normalize_master(master)
        self.implicit_acknowledgements = implicit_acknowledgements
        self.missed_heartbeats = missed_heartbeats
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.call_timeout = call_timeout
        self.subscribe_timeout = subscribe_timeout
        self.max_record_size = max_record_size

        self.stream_id: str | None = None
        self.heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self.master_info: Mapping[str, Any] = {}
        self.subscriptions = 0
        self._call_url = self.master + SCHEDULER_PATH
        self._call_lock: asyncio.Lock | None = None
        self._failover = False
        # True once teardown() has sent its TEARDOWN, so that stopping sends no second one.
        self._teardown_sent = False
        # Set while no callback runs; created in _prepare_run, in the driver's loop.
        self._callbacks_idle: asyncio.Event | None = None

    @property
    def framework_id(self) -> str | None:
        return self.framework.id

    @property
    def subscribed(self) -> bool:
        return self.stream_id is not None

    @property
    def _retry_min(self) -> float:
        return self.reconnect_min

    @property
    def _retry_max(self) -> float:
        return self.reconnect_max

    @property
    def _log_name(self) -> str:
        return f"framework {self.framework_id}"

    @property
    def _callbacks(self) -> Scheduler:
        return self.scheduler

    # Running and stopping

    async def run(self) -> DriverStatus:
        """Subscribe, dispatch events to the scheduler and reconnect, until `stop` or an abort."""
        return await self._run()

    def _prepare_run(self) -> None:
        self._call_lock = asyncio.Lock()
        self._callbacks_idle = asyncio.Event()
        self._callbacks_idle.set()

    def stop(self, failover: bool = False) -> None:
        """Stop the driver, after which `run` returns DriverStatus.STOPPED.

        With `failover=False` the driver first sends TEARDOWN, so the master
        kills the framework's tasks and removes it. With `failover=True` it
        only closes the stream, and the master keeps the tasks for the
        framework's failover_timeout, for a new scheduler to subscribe with
        the same framework id. Safe to call from any thread and from callbacks.
        """
        self._stop_soon(failover)

    def _request_stop(self, failover: bool) -> None:
        assert self._stop_requested is not None
        if not self._stop_requested.is_set():
            self._failover = failover
            self._stop_requested.set()

    def _drop_subscription(self) -> bool:
        was_subscribed = self.subscribed
        self.stream_id = None
        return was_subscribed

    async def _stream_lost(self, reason: str) -> None:
        log.warning("framework %s: event stream lost (%s)", self.framework_id, reason)
        await self._invoke("disconnected")

    def _log_retry(self, pause: float, reason: str) -> None:
        log.info("framework %s: subscribing to %s again in %.2fs after: %s",
                 self.framework_id, self.master, pause, reason)

    async def _end_stream(self, stream: asyncio.Task) -> None:
        """Let a running callback finish, send TEARDOWN unless failing over, then close the stream.

        The stream stays open until the master has the TEARDOWN, because a
        stream closed first is a disconnection. The master would then keep
        the framework for its failover timeout, or with a timeout of 0 remove
        it before the TEARDOWN and the calls queued ahead of it arrive.
        """
        assert self._callbacks_idle is not None
        if not stream.done():
            try:
                await asyncio.wait_for(self._callbacks_idle.wait(), self.call_timeout)
            except TimeoutError:
                log.warning("framework %s: stopping while a callback still runs, %gs after stop was requested",
                            self.framework_id, self.call_timeout)
        assert self._call_lock is not None
        if self._teardown_sent:
            # teardown() queued its TEARDOWN before requesting the stop, and calls
            # take the lock in order, so the TEARDOWN's response has come once it is free.
            async with self._call_lock:
                pass
        elif not self._failover and self.subscribed:
            try:
                await self._post({"type": "TEARDOWN"}, self.stream_id)
                log.info("framework %s: sent TEARDOWN", self.framework_id)
            except CallError as error:
                log.warning("framework %s: TEARDOWN failed, the master keeps the framework until its "
                            "failover timeout: %s", self.framework_id, error)
        if not stream.done():
            stream.cancel()
        await asyncio.gather(stream, return_exceptions=True)

    # The event stream

    async def _stream_once(self) -> None:
        assert self._session is not None and self._stop_requested is not None
        body = {"type": "SUBSCRIBE", "subscribe": {"framework_info": self.framework.to_json()}}
        if self.framework.id:
            body["framework_id"] = {"value": self.framework.id}
        url = self.master + SCHEDULER_PATH
        log.info("framework %s: subscribing to %s as %r", self.framework_id, url, self.framework.name)
        response = await asyncio.wait_for(
            self._session.post(
                url, data=orjson.dumps(body), headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=None, connect=self.subscribe_timeout),
            ),
            self.subscribe_timeout,
        )
        try:
            await self._check_subscribe_response(response)
            stream_id = response.headers[STREAM_ID_HEADER]
            # The master may have redirected the request to the leader, so calls go to the final URL.
            # NOTE: aiohttp follows the 307 of a non-leading Mesos master. corral has
            # one server, so no test covers a redirect.
            self._call_url = str(response.url.with_query(None))
            await self._read_events(response, stream_id)
        finally:
            response.close()

    async def _check_subscribe_response(self, response: aiohttp.ClientResponse) -> None:
        if response.status == 200:
            if not response.headers.get(STREAM_ID_HEADER):
                raise Aborted(f"the master at {self.master} responded to SUBSCRIBE without a {STREAM_ID_HEADER} header")
            return
        text = (await response.text(errors="replace"))[:500].strip()
        detail = f"SUBSCRIBE returned HTTP {response.status}: {text or response.reason}"
        if response.status >= 500 or response.status == 429:
            raise StreamLost(detail)
        raise Aborted(detail)

    async def _read_events(self, response: aiohttp.ClientResponse, stream_id: str) -> None:
        assert self._stop_requested is not None
        decoder = RecordIODecoder(self.max_record_size)
        timeout = self.subscribe_timeout
        while True:
            started = time.monotonic()
            try:
                chunk = await asyncio.wait_for(response.content.readany(), timeout)
            except TimeoutError:
                if self.subscribed:
                    limit = f"{self.missed_heartbeats} heartbeat intervals of {self.heartbeat_interval:g}s"
                else:
                    limit = f"subscribe_timeout {self.subscribe_timeout:g}s, waiting for SUBSCRIBED"
                raise StreamLost(f"no event for {time.monotonic() - started:.1f}s ({limit})") from None
            if not chunk:
                decoder.close()
                return
            for event in decode_events(decoder, chunk):
                if self._stop_requested.is_set():
                    if self._failover:
                        return
                    # Stopping without failover: _end_stream sends TEARDOWN and
                    # then cancels this task. Until then the stream is read and
                    # its events are dropped, so the master detects no disconnection.
                    continue
                if event.get("type") == "SUBSCRIBED":
                    self.stream_id = stream_id
                    timeout = self._heartbeat_timeout(event.get("subscribed", {}))
                await self._dispatch(event)
            if decoder.error is not None:
                raise decoder.error

    def _heartbeat_timeout(self, subscribed: Mapping[str, Any]) -> float:
        interval = subscribed.get("heartbeat_interval_seconds") or DEFAULT_HEARTBEAT_INTERVAL
        self.heartbeat_interval = float(interval)
        return self.heartbeat_interval * self.missed_heartbeats

    async def _dispatch(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        handler = self._handlers.get(kind)
        if handler is None:
            log.warning("framework %s: ignoring event of unknown type %r", self.framework_id, kind)
            return
        assert self._callbacks_idle is not None
        self._callbacks_idle.clear()
        try:
            await handler(self, event.get(kind.lower(), {}) if isinstance(kind, str) else {})
        finally:
            self._callbacks_idle.set()

    async def _on_subscribed(self, subscribed: Mapping[str, Any]) -> None:
        framework_id = id_value(subscribed["framework_id"])
        self.framework.id = framework_id
        self.master_info = subscribed.get("master_info", {})
        self.subscriptions += 1
        log.info("framework %s: subscribed, stream %s, heartbeat every %gs",
                 framework_id, self.stream_id, self.heartbeat_interval)
        if self.subscriptions == 1:
            await self._invoke("registered", framework_id, self.master_info)
        else:
            await self._invoke("reregistered", self.master_info)

    async def _on_offers(self, body: Mapping[str, Any]) -> None:
        offers = [Offer(raw) for raw in body.get("offers", [])]
        log.debug("framework %s: received %d offers", self.framework_id, len(offers))
        if offers:
            await self._invoke("resource_offers", offers)

    async def _on_rescind(self, body: Mapping[str, Any]) -> None:
        await self._invoke("offer_rescinded", id_value(body["offer_id"]))

    async def _on_update(self, body: Mapping[str, Any]) -> None:
        status = TaskStatus.from_json(body["status"])
        log.debug("framework %s: task %s is %s", self.framework_id, status.task_id, status.state)
        handled = await self._invoke("status_update", status)
        if not (self.implicit_acknowledgements and status.uuid):
            return
        if not handled:
            log.warning("framework %s: not acknowledging the update of task %s to %s because the "
                        "status_update callback raised; the agent will send it again",
                        self.framework_id, status.task_id, status.state)
            return
        tearing_down = self._stop_requested is not None and self._stop_requested.is_set() and not self._failover
        if self.subscribed and not tearing_down:
            self.acknowledge(status)

    async def _on_message(self, body: Mapping[str, Any]) -> None:
        try:
            data = base64.b64decode(body.get("data", ""))
        except binascii.Error:
            log.warning("framework %s: framework message with invalid base64 data", self.framework_id)
            return
        await self._invoke("framework_message", id_value(body["executor_id"]), id_value(body["agent_id"]), data)

    async def _on_failure(self, body: Mapping[str, Any]) -> None:
        agent_id = id_value(body["agent_id"]) if body.get("agent_id") else None
        if body.get("executor_id"):
            await self._invoke("executor_lost", id_value(body["executor_id"]), agent_id, body.get("status"))
        elif agent_id:
            log.info("framework %s: agent %s lost", self.framework_id, agent_id)
            await self._invoke("agent_lost", agent_id)

    async def _on_error(self, body: Mapping[str, Any]) -> None:
        # Mesos advises frameworks to abort on ERROR, so this raises Aborted and the run loop calls `error`.
        raise Aborted(body.get("message", "the master sent an ERROR event without a message"))

    async def _on_heartbeat(self, body: Mapping[str, Any]) -> None:
        log.debug("framework %s: heartbeat", self.framework_id)

    async def _on_unsupported(self, body: Mapping[str, Any]) -> None:
        # NOTE: inverse offers (maintenance) and operation status updates have no
        # callbacks yet, because corral's master does not send them.
        log.debug("framework %s: ignoring an event that the SDK does not handle: %s", self.framework_id, body)

    _handlers = {
        "SUBSCRIBED": _on_subscribed,
        "OFFERS": _on_offers,
        "INVERSE_OFFERS": _on_unsupported,
        "RESCIND_INVERSE_OFFER": _on_unsupported,
        "RESCIND": _on_rescind,
        "UPDATE": _on_update,
        "UPDATE_OPERATION_STATUS": _on_unsupported,
        "MESSAGE": _on_message,
        "FAILURE": _on_failure,
        "ERROR": _on_error,
        "HEARTBEAT": _on_heartbeat,
    }

    # Calls

    def launch(
        self,
        offer_ids: str | Offer | Iterable[str | Offer],
        tasks: Sequence[Mapping[str, Any]],
        filters: Mapping[str, Any] | float | None = None,
    ) -> asyncio.Task:
        """Accept offers with one LAUNCH operation of `tasks` (TaskInfo dicts, see `Offer.task`).

        `filters` is Mesos's Filters or a number of refuse_seconds for the
        resources left unused. Launching no tasks declines the offers.
        """
        for task in tasks:
            missing = [key for key in ("name", "task_id", "agent_id", "resources") if key not in task]
            if missing:
                raise ValueError(f"TaskInfo {task.get('name', task)!r} is missing {', '.join(missing)}")
        operations = [{"type": "LAUNCH", "launch": {"task_infos": [dict(task) for task in tasks]}}] if tasks else []
        return self.accept(offer_ids, operations, filters)

    def accept(
        self,
        offer_ids: str | Offer | Iterable[str | Offer],
        operations: Sequence[Mapping[str, Any]],
        filters: Mapping[str, Any] | float | None = None,
    ) -> asyncio.Task:
        """Accept offers with any offer operations, in Mesos's Offer.Operation JSON."""
        accept: dict[str, Any] = {"offer_ids": _offer_ids(offer_ids), "operations": list(operations)}
        filters_json = _filters(filters)
        if filters_json is not None:
            accept["filters"] = filters_json
        return self._call({"type": "ACCEPT", "accept": accept})

    def decline(self, offer_ids: str | Offer | Iterable[str | Offer], refuse_seconds: float | None = None) -> asyncio.Task:
        """Decline offers. The master offers the resources again after `refuse_seconds` (default 5)."""
        decline: dict[str, Any] = {"offer_ids": _offer_ids(offer_ids)}
        if refuse_seconds is not None:
            decline["filters"] = _filters(refuse_seconds)
        return self._call({"type": "DECLINE", "decline": decline})

    def kill(self, task_id: str, agent_id: str | None = None) -> asyncio.Task:
        """Ask the master to kill a task. Its terminal state arrives as a status update."""
        kill: dict[str, Any] = {"task_id": id_json(task_id)}
        if agent_id:
            kill["agent_id"] = id_json(agent_id)
        return self._call({"type": "KILL", "kill": kill})

    def acknowledge(self, status: TaskStatus | Mapping[str, Any]) -> asyncio.Task:
        """Acknowledge a status update, so that its agent stops sending it again.

        Needed only with `implicit_acknowledgements=False`. Updates without a
        uuid (the results of reconciliation) must not be acknowledged.
        """
        if not isinstance(status, TaskStatus):
            status = TaskStatus.from_json(status)
        if not status.uuid:
            raise ValueError(f"the update of task {status.task_id} has no uuid, so it must not be acknowledged")
        if not status.agent_id:
            raise ValueError(f"the update of task {status.task_id} has no agent_id to acknowledge it with")
        return self._call({"type": "ACKNOWLEDGE", "acknowledge": {
            "agent_id": id_json(status.agent_id), "task_id": id_json(status.task_id), "uuid": status.uuid,
        }})

    def reconcile(self, tasks: Iterable[str | TaskStatus | tuple | Mapping[str, Any]] = ()) -> asyncio.Task:
        """Ask for the latest state of `tasks` (task ids, `(task_id, agent_id)` or statuses).

        With no tasks this is implicit reconciliation: the master sends the
        state of every non-terminal task of the framework.
        """
        return self._call({"type": "RECONCILE", "reconcile": {"tasks": [_reconcile_entry(task) for task in tasks]}})

    def suppress(self, roles: Sequence[str] | None = None) -> asyncio.Task:
        """Stop receiving offers (for `roles`, or all the framework's roles) until `revive`."""
        call: dict[str, Any] = {"type": "SUPPRESS"}
        if roles:
            call["suppress"] = {"roles": list(roles)}
        return self._call(call)

    def revive(self, roles: Sequence[str] | None = None) -> asyncio.Task:
        """Receive offers again, and drop the filters set by earlier declines."""
        call: dict[str, Any] = {"type": "REVIVE"}
        if roles:
            call["revive"] = {"roles": list(roles)}
        return self._call(call)

    def message(self, agent_id: str, executor_id: str, data: bytes | str) -> asyncio.Task:
        """Send data to a custom executor on an agent, where it arrives as the executor's MESSAGE event.

        Delivery is not guaranteed, as in Mesos: the master drops a message for
        an executor that has no running task.
        """
        raw = data.encode() if isinstance(data, str) else bytes(data)
        return self._call({"type": "MESSAGE", "message": {
            "agent_id": id_json(agent_id), "executor_id": id_json(executor_id),
            "data": base64.b64encode(raw).decode(),
        }})

    def shutdown(self, executor_id: str, agent_id: str) -> asyncio.Task:
        """Shut a custom executor down: the agent sends it SHUTDOWN, and its tasks end TASK_KILLED."""
        return self._call({"type": "SHUTDOWN", "shutdown": {
            "executor_id": id_json(executor_id), "agent_id": id_json(agent_id),
        }})

    def teardown(self) -> asyncio.Task:
        """Remove the framework: the master kills its tasks and closes the stream, and the driver then stops."""
        task = self._call({"type": "TEARDOWN"})
        # The TEARDOWN is already on its way, so stopping must not send another.
        self._teardown_sent = True
        self.stop()
        return task

    def _call(self, call: dict[str, Any]):
        """Send `call` in the background and return the task (or, from another thread, a future)."""
        kind = call["type"]
        if self._loop is None or self.status is not DriverStatus.RUNNING:
            raise NotSubscribedError(kind, "the driver is not running")
        stream_id = self.stream_id
        if stream_id is None:
            raise NotSubscribedError(kind, "the driver has no subscription (it is reconnecting to the master)")
        return self._start_call(self._post(call, stream_id), f"corral-sdk-{kind}")

    async def _post(self, call: dict[str, Any], stream_id: str | None) -> None:
        assert self._session is not None and self._call_lock is not None
        kind = call["type"]
        if self.framework.id:
            call = {"framework_id": {"value": self.framework.id}, **call}
        headers = {"Content-Type": "application/json"}
        if stream_id:
            headers[STREAM_ID_HEADER] = stream_id
        # One call at a time, in the order they were made, as a Mesos driver
        # sends them over its one connection.
        # NOTE: a call that fails on the network is not sent again, because the
        # master may have applied it. Reconcile to learn what happened to a launch.
        async with self._call_lock:
            status = await self._send_call(self._call_url, call, headers)
        log.debug("framework %s: %s accepted with HTTP %d", self.framework_id, kind, status)
