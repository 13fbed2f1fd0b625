"""Health checks run by the agent: the probes, the loop that repeats one, and TTL timers.

The probes follow Consul's checks (agent/checks/check.go in hashicorp/consul):
HTTP, TCP, gRPC (the standard grpc.health.v1 protocol) and script checks, each
graded passing, warning or critical with a human-readable output.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corral.duration import format_duration
from corral.types import CheckStatus

logger = logging.getLogger(__name__)

# Consul's default OutputMaxSize: the most bytes of a probe's output that a check keeps.
OUTPUT_MAX_SIZE = 4096

_READ_CHUNK_SIZE = 65536

# Consul's User-Agent for HTTP checks, which some services recognize health probes by.
HTTP_USER_AGENT = "Consul Health Check"

# Consul's default timeout of a script check; other probes default to 10 s.
SCRIPT_DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one probe.

    output is a human-readable line. Any captured body in it is capped at
    OUTPUT_MAX_SIZE bytes, with a note of the full size when cut.
    """

    status: CheckStatus
    output: str


def cap_output(captured: bytes, total_size: int, limit: int = OUTPUT_MAX_SIZE) -> str:
    """Decode at most limit bytes of captured output as UTF-8, with a note when cut.

    total_size is the full size of the output, of which captured holds the start.
    A multi-byte character split by the limit is dropped, and other invalid bytes
    become U+FFFD.
    """
    kept = captured[:limit]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(kept, final=len(kept) == total_size)
    if total_size > len(kept):
        text += f"... (output truncated: {len(kept)} of {total_size} bytes captured)"
    return text


def _status_for_http(code: int) -> CheckStatus:
    # Consul's rule: any 2xx is passing, 429 Too Many Requests is warning, the rest critical.
    if 200 <= code <= 299:
        return CheckStatus.PASSING
    if code == 429:
        return CheckStatus.WARNING
    return CheckStatus.CRITICAL


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, int]:
    """Read the whole body, keeping its first limit bytes. Return them and the full size."""
    kept = bytearray()
    total = 0
    async for chunk in response.content.iter_chunked(_READ_CHUNK_SIZE):
        total += len(chunk)
        if len(kept) < limit:
            kept += chunk[: limit - len(kept)]
    return bytes(kept), total


async def http_check(
    session: aiohttp.ClientSession,
    url: str,
    timeout: float,
    method: str = "GET",
    headers: Mapping[str, list[str]] | None = None,
    body: str = "",
    tls_skip_verify: bool = False,
) -> CheckResult:
    """Send one HTTP request and grade the response status the way Consul does.

    2xx is passing, 429 is warning and any other status is critical, as is a
    connection error or going past timeout seconds, which covers reading the body.
    headers maps each name to its values, as in Consul's check definitions, and
    body is sent as the request body when not empty. tls_skip_verify turns off
    certificate verification for an https URL.
    """
    # A list of pairs, because aiohttp sends a name once per pair.
    request_headers = [
        (name, value) for name, values in (headers or {}).items() for value in values
    ]
    given = {name.lower() for name, _ in request_headers}
    if "user-agent" not in given:
        request_headers.append(("User-Agent", HTTP_USER_AGENT))
    if "accept" not in given:
        request_headers.append(("Accept", "text/plain, text/*, */*"))

    prefix = f"HTTP {method} {url}"
    try:
        async with session.request(
            method,
            url,
            headers=request_headers,
            data=body.encode() if body else None,
            ssl=False if tls_skip_verify else True,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            captured, body_size = await _read_capped(response, OUTPUT_MAX_SIZE)
    except TimeoutError:
        return CheckResult(CheckStatus.CRITICAL, f"{prefix}: timed out after {timeout:g} s")
    except aiohttp.ClientError as exc:
        reason = str(exc) or type(exc).__name__
        return CheckResult(CheckStatus.CRITICAL, f"{prefix}: request failed: {reason}")

    output = f"{prefix}: {response.status} {response.reason} Output: {cap_output(captured, body_size)}"
    return CheckResult(_status_for_http(response.status), output)


async def tcp_check(host: str, port: int, timeout: float) -> CheckResult:
    """Open a TCP connection and close it again: passing if connecting succeeds."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    prefix = f"TCP connect {address}"
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return CheckResult(CheckStatus.CRITICAL, f"{prefix}: timed out after {timeout:g} s")
    except OSError as exc:
        return CheckResult(CheckStatus.CRITICAL, f"{prefix}: {exc}")

    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        # The peer may reset a connection that we close without sending anything.
        pass
    return CheckResult(CheckStatus.PASSING, f"{prefix}: Success")


def split_grpc_target(target: str) -> tuple[str, str]:
    """Split Consul's gRPC check target "host:port[/service]" into the address and the service name."""
    address, _, service = target.partition("/")
    return address, service


async def grpc_check(target: str, timeout: float, use_tls: bool = False) -> CheckResult:
    """Call grpc.health.v1.Health/Check once: passing when the service reports SERVING.

    target is "host:port" or "host:port/service"; without a service the
    server's overall health is asked for, as in Consul.
    """
    address, service = split_grpc_target(target)
    prefix = f"gRPC check {target}"
    if use_tls:
        channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials())
    else:
        channel = grpc.aio.insecure_channel(address)
    try:
        async with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
            return CheckResult(CheckStatus.CRITICAL, f"{prefix}: timed out after {timeout:g} s")
        detail = f": {exc.details()}" if exc.details() else ""
        return CheckResult(CheckStatus.CRITICAL, f"{prefix}: failed: {exc.code().name}{detail}")
    serving = health_pb2.HealthCheckResponse.SERVING
    if response.status != serving:
        state = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return CheckResult(CheckStatus.CRITICAL, f"{prefix}: service is {state}, not SERVING")
    return CheckResult(CheckStatus.PASSING, f"{prefix}: success")


async def script_check(args: Sequence[str], timeout: float) -> CheckResult:
    """Run a command (no shell) and grade its exit code the way Consul grades Nagios plugins.

    Exit code 0 is passing, 1 is warning and anything else critical. The
    output is stdout and stderr together, capped at OUTPUT_MAX_SIZE bytes
    from its start (Consul keeps the end instead).
    Going past timeout seconds kills the command's whole process group.
    """
    try:
        process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return CheckResult(CheckStatus.CRITICAL, f"script check failed to start {args[0]!r}: {exc}")

    assert process.stdout is not None
    captured = bytearray()
    total = 0

    async def read_output() -> None:
        nonlocal total
        while chunk := await process.stdout.read(_READ_CHUNK_SIZE):
            total += len(chunk)
            if len(captured) < OUTPUT_MAX_SIZE:
                captured.extend(chunk[: OUTPUT_MAX_SIZE - len(captured)])

    try:
        async with asyncio.timeout(timeout):
            await read_output()
            code = await process.wait()
    except TimeoutError:
        _kill_group(process.pid)
        await process.wait()
        message = f"Timed out ({format_duration(timeout)}) running check"
        output = cap_output(bytes(captured), total)
        return CheckResult(CheckStatus.CRITICAL, f"{message}\n\n{output}" if output else message)
    finally:
        if process.returncode is None:
            _kill_group(process.pid)
            await process.wait()

    output = cap_output(bytes(captured), total)
    if code == 0:
        return CheckResult(CheckStatus.PASSING, output)
    if code == 1:
        return CheckResult(CheckStatus.WARNING, output)
    return CheckResult(CheckStatus.CRITICAL, output)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class StatusThresholds:
    """Consul's SuccessBeforePassing, FailuresBeforeWarning and FailuresBeforeCritical.

    A probe result changes the check's status only after that many consecutive
    results of its kind. As in Consul's StatusHandler, the counters start at
    their thresholds, so the first result of a new check always applies. While
    failures are below FailuresBeforeCritical but at FailuresBeforeWarning, the
    check turns warning.
    """

    def __init__(
        self,
        success_before_passing: int = 0,
        failures_before_warning: int | None = None,
        failures_before_critical: int = 0,
    ) -> None:
        self.success_before_passing = success_before_passing
        self.failures_before_critical = failures_before_critical
        if failures_before_warning is None:
            failures_before_warning = failures_before_critical
        self.failures_before_warning = failures_before_warning
        self._successes = success_before_passing
        self._failures = failures_before_critical

    def apply(self, result: CheckResult) -> CheckResult | None:
        """Return the result to record, or None while a threshold is not yet reached."""
        if result.status in (CheckStatus.PASSING, CheckStatus.WARNING):
            self._successes += 1
            self._failures = 0
            if self._successes >= self.success_before_passing:
                return result
            return None
        self._failures += 1
        self._successes = 0
        if self._failures >= self.failures_before_critical:
            return result
        if self._failures >= self.failures_before_warning:
            return CheckResult(CheckStatus.WARNING, result.output)
        return None


class TTLTimer:
    """A timer that calls on_expire(check_id) when reset() is not called again within ttl seconds.

    The timer starts on start(), and every reset() starts the full ttl again,
    also after it expired, as Consul's TTL checks do.
    """

    def __init__(self, check_id: str, ttl: float, on_expire: Callable[[str], Awaitable[None]]) -> None:
        if ttl <= 0:
            raise ValueError(f"check {check_id}: TTL must be positive, got {ttl}")
        self.check_id = check_id
        self.ttl = ttl
        self._on_expire = on_expire
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.reset()

    def reset(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.get_running_loop().create_task(self._wait(), name=f"ttl {self.check_id}")

    async def stop(self) -> None:
        """Cancel the timer. Safe to call twice or before start()."""
        task, self._task = self._task, None
        if task is None or task is asyncio.current_task():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise

    async def _wait(self) -> None:
        await asyncio.sleep(self.ttl)
        try:
            await self._on_expire(self.check_id)
        except Exception:
            logger.warning("check %s: TTL expiry callback failed", self.check_id, exc_info=True)


Probe = Callable[[], Awaitable[CheckResult]]
ResultCallback = Callable[[str, CheckResult], Awaitable[None]]


class CheckRunner:
    """Runs one check's probe at once on start() and then every interval seconds.

    on_result(check_id, result) is awaited after every probe, changed or not. A
    probe that raises is reported as critical with the exception text, and
    neither it nor a failing on_result ends the loop.
    """

    def __init__(
        self,
        check_id: str,
        probe: Probe,
        interval: float,
        on_result: ResultCallback,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"check {check_id}: interval must be positive, got {interval}")
        self.check_id = check_id
        self.interval = interval
        self._probe = probe
        self._on_result = on_result
        self._task: asyncio.Task[None] | None = None
        # Consecutive probe exceptions with the same text are logged once, counted.
        self._last_error: str | None = None
        self._error_repeats = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the loop as a task on the running event loop."""
        if self.running:
            raise RuntimeError(f"check {self.check_id}: already running")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"check {self.check_id}"
        )

    async def stop(self) -> None:
        """Cancel the loop and wait for it to end. Safe to call twice or before start()."""
        task = self._task
        if task is None:
            return
        task.cancel()
        if task is asyncio.current_task():
            # Called from on_result: the cancellation lands at the loop's next await.
            return
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            next_run = loop.time() + self.interval
            result = await self._probe_once()
            try:
                await self._on_result(self.check_id, result)
            except Exception:
                logger.warning("check %s: result callback failed", self.check_id, exc_info=True)
            await asyncio.sleep(max(0.0, next_run - loop.time()))

    async def _probe_once(self) -> CheckResult:
        try:
            result = await self._probe()
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            self._log_probe_error(text)
            return CheckResult(CheckStatus.CRITICAL, f"check raised {text}")
        self._end_error_series()
        return result

    def _log_probe_error(self, text: str) -> None:
        if text == self._last_error:
            self._error_repeats += 1
            logger.debug("check %s: probe raised %s again", self.check_id, text)
            return
        self._end_error_series()
        self._last_error = text
        self._error_repeats = 1
        logger.warning("check %s: probe raised %s", self.check_id, text, exc_info=True)

    def _end_error_series(self) -> None:
        if self._error_repeats > 1:
            logger.warning(
                "check %s: probe raised %s %d times in a row",
                self.check_id,
                self._last_error,
                self._error_repeats,
            )
        self._last_error = None
        self._error_repeats = 0
