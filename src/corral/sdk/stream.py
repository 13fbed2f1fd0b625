"""The event-stream machinery that the scheduler and executor drivers share.

Both drivers hold one long-lived SUBSCRIBE request whose response is a
RecordIO stream of JSON events. When the stream drops they subscribe again,
waiting with a doubling backoff and jitter. Every other call is a separate
POST sent in the background. `StreamDriver` contains that shared part, and
each driver supplies the peer it talks to (master or agent), the name it logs
under (framework or executor id), its subscription request, its event
handlers and its own rules for giving up.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import random
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp
import orjson

from corral.sdk.recordio import RecordIODecoder, RecordIOError


class DriverStatus(enum.Enum):
    """The driver's life cycle, after Mesos's driver Status."""

    NOT_STARTED = "DRIVER_NOT_STARTED"
    RUNNING = "DRIVER_RUNNING"
    ABORTED = "DRIVER_ABORTED"
    STOPPED = "DRIVER_STOPPED"


class CallError(Exception):
    """The master (or agent) rejected a call, or the call could not reach it."""

    def __init__(self, call_type: str, message: str, status: int | None = None):
        super().__init__(f"{call_type} call failed: {message}")
        self.call_type = call_type
        self.status = status


class NotSubscribedError(CallError):
    """A call was made while the driver had no subscription (before SUBSCRIBED, or while reconnecting)."""


class StreamLost(Exception):
    """The event stream ended or broke, so the driver subscribes again."""


class Aborted(Exception):
    """The master or agent rejected the subscription, so retrying would not help."""


def decode_events(decoder: RecordIODecoder, chunk: bytes) -> Iterator[dict[str, Any]]:
    """Feed `chunk` to `decoder` and yield each completed record as a JSON object.

    Raises StreamLost for a record that is not JSON or not an object.
    """
    for record in decoder.feed(chunk):
        try:
            event = orjson.loads(record)
        except orjson.JSONDecodeError as error:
            raise StreamLost(f"invalid JSON in an event record: {error}: {record[:200]!r}") from None
        if not isinstance(event, dict):
            raise StreamLost(f"invalid event record: expected a JSON object, got {record[:200]!r}")
        yield event


class StreamDriver:
    """The run loop, stopping, callbacks and background calls of a v1 HTTP API driver.

    A subclass sets `_log` (its module's logger), `_peer` ("master" or
    "agent"), `_stream_task_name`, `_callback_label` and the object that
    receives callbacks (`_callbacks`), and implements `_stream_once`,
    `_request_stop`, `_drop_subscription` and `_stream_lost`. The hooks
    `_end_stream`, `_give_up` and `_log_retry` have defaults it may override.
    """

    _log: logging.Logger
    _peer: str
    _stream_task_name: str
    _callback_label: str = "callback"
    # Whether `run`, when cancelled, still gives the calls already made their time to finish.
    _drain_calls_on_cancel: bool = False
    _retry_min: float
    _retry_max: float

    call_timeout: float
    subscribed: bool

    def __init__(self) -> None:
        self.status = DriverStatus.NOT_STARTED
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._stop_requested: asyncio.Event | None = None
        self._abort_message: str | None = None
        self._pending_calls: set[asyncio.Task] = set()
        # When the driver last lost its subscription, or started its run.
        self._lost_at = time.monotonic()

    # What each driver supplies

    @property
    def _log_name(self) -> str:
        """How log lines name this driver, such as 'framework ID' or 'executor ID'."""
        raise NotImplementedError

    @property
    def _callbacks(self) -> Any:
        """The Scheduler or Executor whose callbacks the driver calls."""
        raise NotImplementedError

    async def _stream_once(self) -> None:
        """Subscribe once and dispatch the events until the stream ends."""
        raise NotImplementedError

    def _request_stop(self, *args: Any) -> None:
        raise NotImplementedError

    def _drop_subscription(self) -> bool:
        """Forget the current subscription and return whether there was one."""
        raise NotImplementedError

    async def _stream_lost(self, reason: str) -> None:
        """Log that the subscription was lost and call `disconnected`."""
        raise NotImplementedError

    def _prepare_run(self) -> None:
        """Set up what a run needs in the running event loop."""

    async def _end_stream(self, stream: asyncio.Task) -> None:
        """End the stream after a stop was requested."""
        stream.cancel()
        await asyncio.gather(stream, return_exceptions=True)

    def _give_up(self, reason: str) -> str | None:
        """Return why the driver aborts instead of subscribing again, or None to retry."""
        return None

    def _log_retry(self, pause: float, reason: str) -> None:
        self._log.info("%s: subscribing again in %.2fs after: %s", self._log_name, pause, reason)

    # Running and stopping

    def run_forever(self) -> DriverStatus:
        """Run the driver in a new event loop until it stops or aborts, and return its status."""
        return asyncio.run(self.run())

    async def _run(self) -> DriverStatus:
        if self.status is DriverStatus.RUNNING:
            raise RuntimeError("the driver is already running")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._prepare_run()
        self._stop_requested = asyncio.Event()
        self._abort_message = None
        self.status = DriverStatus.RUNNING
        self._session = aiohttp.ClientSession(headers={"Accept": "application/json"})

        cancelled = False
        try:
            await self._run_streams()
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self._drop_subscription()
            # Calls already made (a TEARDOWN, the last acknowledgements or updates) get
            # their time to finish before the session closes.
            if self._pending_calls and (self._drain_calls_on_cancel or not cancelled):
                await asyncio.wait(set(self._pending_calls), timeout=self.call_timeout)
            for task in list(self._pending_calls):
                task.cancel()
            await asyncio.gather(*self._pending_calls, return_exceptions=True)
            await self._session.close()
            self._session = None

        self.status = DriverStatus.ABORTED if self._abort_message is not None else DriverStatus.STOPPED
        self._log.info("%s: driver %s", self._log_name, self.status.value)
        return self.status

    def _stop_soon(self, *args: Any) -> None:
        """Ask the run loop to stop, from its own thread or any other."""
        if self._loop is None or self.status is not DriverStatus.RUNNING:
            self.status = DriverStatus.STOPPED
            return
        if threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(self._request_stop, *args)
        else:
            self._request_stop(*args)

    async def _run_streams(self) -> None:
        assert self._stop_requested is not None
        delay = self._retry_min
        self._lost_at = time.monotonic()
        while True:
            stream = asyncio.create_task(self._stream_once(), name=self._stream_task_name)
            stopper = asyncio.create_task(self._stop_requested.wait())
            try:
                await asyncio.wait({stream, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if asyncio.current_task().cancelling():
                    stream.cancel()
            if self._stop_requested.is_set():
                await self._end_stream(stream)
                return
            reason = self._stream_outcome(stream)
            if self._abort_message is not None:
                await self._invoke("error", self._abort_message)
                return
            if self._drop_subscription():
                self._lost_at = time.monotonic()
                delay = self._retry_min
                await self._stream_lost(reason)
            abort = self._give_up(reason)
            if abort is not None:
                self._abort_message = abort
                await self._invoke("error", self._abort_message)
                return
            pause = delay * random.uniform(0.5, 1.0)
            self._log_retry(pause, reason)
            try:
                await asyncio.wait_for(self._stop_requested.wait(), pause)
            except TimeoutError:
                pass
            if self._stop_requested.is_set():
                return
            delay = min(delay * 2, self._retry_max)

    def _stream_outcome(self, stream: asyncio.Task) -> str:
        """Return why the stream ended. An Aborted error also sets the abort message."""
        error = stream.exception()
        if error is None:
            return f"the {self._peer} closed the event stream"
        if isinstance(error, Aborted):
            self._abort_message = str(error)
            return str(error)
        if isinstance(error, StreamLost):
            return str(error)
        if isinstance(error, (RecordIOError, aiohttp.ClientError, OSError, TimeoutError)):
            return f"{type(error).__name__}: {error}"
        self._log.error("%s: event stream failed unexpectedly", self._log_name, exc_info=error)
        return f"unexpected {type(error).__name__}: {error}"

    # Callbacks

    async def _invoke(self, callback: str, *args: Any) -> bool:
        """Call a callback and await it if it is a coroutine. Return False if it raised."""
        try:
            result = getattr(self._callbacks, callback)(self, *args)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log.exception("%s: %s %s raised", self._log_name, self._callback_label, callback)
            return False
        return True

    # Calls

    def _start_call(self, coroutine, name: str):
        """Run a call's coroutine in the background: a task, or from another thread a concurrent future."""
        assert self._loop is not None
        if threading.get_ident() != self._thread:
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        task = asyncio.create_task(coroutine, name=name)
        self._pending_calls.add(task)
        task.add_done_callback(self._call_done)
        return task

    def _call_done(self, task: asyncio.Task) -> None:
        self._pending_calls.discard(task)
        if task.cancelled():
            return
        # Reading the exception here marks it retrieved, so a call that no one
        # awaits is logged once (in _send_call) and not again by the event loop.
        task.exception()

    async def _send_call(self, url: str, call: Mapping[str, Any], headers: Mapping[str, str]) -> int:
        """POST one call and return its 2xx status. On any other outcome, log and raise CallError."""
        assert self._session is not None
        kind = call["type"]
        try:
            async with self._session.post(
                url, data=orjson.dumps(call), headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.call_timeout),
            ) as response:
                if 200 <= response.status < 300:
                    return response.status
                text = (await response.text(errors="replace"))[:500].strip()
                error = CallError(kind, f"HTTP {response.status}: {text or response.reason}", response.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = CallError(kind, f"{type(exc).__name__}: {exc or 'timed out'}")
        self._log.warning("%s: %s", self._log_name, error)
        raise error
