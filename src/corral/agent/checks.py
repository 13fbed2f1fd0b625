"""Health checks run by the agent: HTTP and TCP probes, and a loop that repeats one."""

from __future__ import annotations

import asyncio
import codecs
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from corral.types import CheckStatus

logger = logging.getLogger(__name__)

# Consul's default OutputMaxSize: the most bytes of a probe's output that a check keeps.
OUTPUT_MAX_SIZE = 4096

_READ_CHUNK_SIZE = 65536


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
) -> CheckResult:
    """Send one HTTP request and grade the response status the way Consul does.

    2xx is passing, 429 is warning and any other status is critical, as is a
    connection error or going past timeout seconds, which covers reading the body.
    headers maps each name to its values, as in Consul's check definitions.
    """
    # A list of pairs, because aiohttp sends a name once per pair.
    request_headers = [
        (name, value) for name, values in (headers or {}).items() for value in values
    ]

    prefix = f"HTTP {method} {url}"
    try:
        async with session.request(
            method,
            url,
            headers=request_headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            body, body_size = await _read_capped(response, OUTPUT_MAX_SIZE)
    except TimeoutError:
        return CheckResult(CheckStatus.CRITICAL, f"{prefix}: timed out after {timeout:g} s")
    except aiohttp.ClientError as exc:
        reason = str(exc) or type(exc).__name__
        return CheckResult(CheckStatus.CRITICAL, f"{prefix}: request failed: {reason}")

    output = f"{prefix}: {response.status} {response.reason} Output: {cap_output(body, body_size)}"
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
