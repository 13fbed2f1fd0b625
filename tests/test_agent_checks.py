"""Tests for corral.agent.checks against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import pytest
from aiohttp import web

from corral.agent.checks import (
    OUTPUT_MAX_SIZE,
    CheckResult,
    CheckRunner,
    cap_output,
    http_check,
    tcp_check,
)
from corral.types import CheckStatus


@pytest.fixture
async def http_server():
    """Serve test endpoints on 127.0.0.1 and yield the base URL."""
    release_slow = asyncio.Event()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="all good")

    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=429, text="slow down")

    async def down(request: web.Request) -> web.Response:
        return web.Response(status=503, text="maintenance")

    async def slow(request: web.Request) -> web.Response:
        await release_slow.wait()
        return web.Response(text="late")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 10000)

    async def echo(request: web.Request) -> web.Response:
        values = ",".join(request.headers.getall("X-Probe", []))
        return web.Response(text=f"{request.method} {values}")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/busy", busy)
    app.router.add_get("/down", down)
    app.router.add_get("/slow", slow)
    app.router.add_get("/big", big)
    app.router.add_route("*", "/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    release_slow.set()
    await runner.cleanup()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as client:
        yield client


def closed_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_http_200_passing(http_server, session):
    url = f"{http_server}/ok"
    result = await http_check(session, url, timeout=5)

    assert result.status == CheckStatus.PASSING
    assert result.output == f"HTTP GET {url}: 200 OK Output: all good"


async def test_http_429_warning(http_server, session):
    url = f"{http_server}/busy"
    result = await http_check(session, url, timeout=5)

    assert result.status == CheckStatus.WARNING
    assert result.output == f"HTTP GET {url}: 429 Too Many Requests Output: slow down"


async def test_http_503_critical(http_server, session):
    url = f"{http_server}/down"
    result = await http_check(session, url, timeout=5)

    assert result.status == CheckStatus.CRITICAL
    assert result.output == f"HTTP GET {url}: 503 Service Unavailable Output: maintenance"


async def test_http_404_critical(http_server, session):
    result = await http_check(session, f"{http_server}/missing", timeout=5)

    assert result.status == CheckStatus.CRITICAL
    assert ": 404 Not Found Output: " in result.output


async def test_http_timeout_critical(http_server, session):
    url = f"{http_server}/slow"
    result = await http_check(session, url, timeout=0.2)

    assert result.status == CheckStatus.CRITICAL
    assert result.output == f"HTTP GET {url}: timed out after 0.2 s"


async def test_http_connection_refused_critical(session):
    url = f"http://127.0.0.1:{closed_port()}/healthz"
    result = await http_check(session, url, timeout=5)

    assert result.status == CheckStatus.CRITICAL
    assert result.output.startswith(f"HTTP GET {url}: request failed: ")
    assert "127.0.0.1" in result.output


async def test_http_method_and_headers(http_server, session):
    url = f"{http_server}/echo"
    result = await http_check(
        session, url, timeout=5, method="POST", headers={"X-Probe": ["one", "two"]}
    )

    assert result.status == CheckStatus.PASSING
    assert result.output == f"HTTP POST {url}: 200 OK Output: POST one,two"


async def test_http_output_truncated(http_server, session):
    url = f"{http_server}/big"
    result = await http_check(session, url, timeout=5)

    prefix = f"HTTP GET {url}: 200 OK Output: "
    note = f"... (output truncated: {OUTPUT_MAX_SIZE} of 10000 bytes captured)"
    assert result.status == CheckStatus.PASSING
    assert result.output == prefix + "x" * OUTPUT_MAX_SIZE + note


def test_cap_output_short_text_unchanged():
    assert cap_output(b"hello", 5) == "hello"


def test_cap_output_at_limit_not_truncated():
    assert cap_output(b"y" * OUTPUT_MAX_SIZE, OUTPUT_MAX_SIZE) == "y" * OUTPUT_MAX_SIZE


def test_cap_output_drops_split_character():
    # "é" is two bytes in UTF-8, and the limit falls between them.
    captured = b"a" * (OUTPUT_MAX_SIZE - 1) + "é".encode()
    text = cap_output(captured, len(captured))

    assert text == "a" * (OUTPUT_MAX_SIZE - 1) + (
        f"... (output truncated: {OUTPUT_MAX_SIZE} of {OUTPUT_MAX_SIZE + 1} bytes captured)"
    )


def test_cap_output_replaces_invalid_bytes():
    assert cap_output(b"ok\xff", 3) == "ok\ufffd"


async def test_tcp_listening_port_passing():
    server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await tcp_check("127.0.0.1", port, timeout=5)
    finally:
        server.close()
        await server.wait_closed()

    assert result == CheckResult(CheckStatus.PASSING, f"TCP connect 127.0.0.1:{port}: Success")


async def test_tcp_closed_port_critical():
    port = closed_port()
    result = await tcp_check("127.0.0.1", port, timeout=5)

    assert result.status == CheckStatus.CRITICAL
    assert result.output.startswith(f"TCP connect 127.0.0.1:{port}: ")
    assert "Success" not in result.output


async def test_tcp_timeout_critical():
    # A listener with a full accept queue drops new SYNs, so connecting hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.1)
        result = await tcp_check("127.0.0.1", port, timeout=0.3)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()

    assert result == CheckResult(
        CheckStatus.CRITICAL, f"TCP connect 127.0.0.1:{port}: timed out after 0.3 s"
    )


async def wait_for_count(items: list, count: int, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while len(items) < count:
            await asyncio.sleep(0.01)


async def test_runner_reports_every_probe():
    calls = 0

    async def probe() -> CheckResult:
        nonlocal calls
        calls += 1
        return CheckResult(CheckStatus.PASSING, "same")

    results: list[tuple[str, CheckResult]] = []

    async def on_result(check_id: str, result: CheckResult) -> None:
        results.append((check_id, result))

    runner = CheckRunner("service:web", probe, interval=0.02, on_result=on_result)
    runner.start()
    try:
        await wait_for_count(results, 4)
    finally:
        await runner.stop()

    assert len(results) >= 4
    assert calls == len(results)
    assert all(item == ("service:web", CheckResult(CheckStatus.PASSING, "same")) for item in results)
    assert not runner.running


async def test_runner_probes_at_once_on_start():
    results: list[CheckResult] = []

    async def probe() -> CheckResult:
        return CheckResult(CheckStatus.PASSING, "up")

    async def on_result(check_id: str, result: CheckResult) -> None:
        results.append(result)

    runner = CheckRunner("service:web", probe, interval=60, on_result=on_result)
    runner.start()
    try:
        await wait_for_count(results, 1, timeout=1)
    finally:
        await runner.stop()

    assert results == [CheckResult(CheckStatus.PASSING, "up")]


async def test_runner_survives_probe_exception(caplog):
    calls = 0

    async def probe() -> CheckResult:
        nonlocal calls
        calls += 1
        if calls in (2, 3):
            raise ConnectionError("backend exploded")
        return CheckResult(CheckStatus.PASSING, f"call {calls}")

    results: list[CheckResult] = []

    async def on_result(check_id: str, result: CheckResult) -> None:
        results.append(result)

    runner = CheckRunner("service:db", probe, interval=0.02, on_result=on_result)
    with caplog.at_level(logging.WARNING, logger="corral.agent.checks"):
        runner.start()
        try:
            await wait_for_count(results, 5)
        finally:
            await runner.stop()

    assert results[0] == CheckResult(CheckStatus.PASSING, "call 1")
    failure = CheckResult(CheckStatus.CRITICAL, "check raised ConnectionError: backend exploded")
    assert results[1] == failure
    assert results[2] == failure
    assert results[3] == CheckResult(CheckStatus.PASSING, "call 4")
    warnings = [record.getMessage() for record in caplog.records]
    assert "check service:db: probe raised ConnectionError: backend exploded" in warnings
    assert "check service:db: probe raised ConnectionError: backend exploded 2 times in a row" in warnings


async def test_runner_survives_callback_exception(caplog):
    async def probe() -> CheckResult:
        return CheckResult(CheckStatus.PASSING, "up")

    seen: list[CheckResult] = []

    async def on_result(check_id: str, result: CheckResult) -> None:
        seen.append(result)
        if len(seen) == 1:
            raise RuntimeError("store unavailable")

    runner = CheckRunner("service:web", probe, interval=0.02, on_result=on_result)
    with caplog.at_level(logging.WARNING, logger="corral.agent.checks"):
        runner.start()
        try:
            await wait_for_count(seen, 3)
        finally:
            await runner.stop()

    assert len(seen) >= 3
    assert "check service:web: result callback failed" in [r.getMessage() for r in caplog.records]


async def test_runner_stop_twice_and_before_start():
    async def probe() -> CheckResult:
        return CheckResult(CheckStatus.PASSING, "up")

    async def on_result(check_id: str, result: CheckResult) -> None:
        pass

    runner = CheckRunner("service:web", probe, interval=0.05, on_result=on_result)
    await runner.stop()
    runner.start()
    assert runner.running
    await runner.stop()
    await runner.stop()

    assert not runner.running


async def test_runner_stop_from_callback():
    async def probe() -> CheckResult:
        return CheckResult(CheckStatus.PASSING, "up")

    results: list[CheckResult] = []

    async def on_result(check_id: str, result: CheckResult) -> None:
        results.append(result)
        await runner.stop()

    runner = CheckRunner("service:web", probe, interval=0.01, on_result=on_result)
    runner.start()
    await asyncio.sleep(0.1)

    assert results == [CheckResult(CheckStatus.PASSING, "up")]
    assert not runner.running


def test_runner_rejects_non_positive_interval():
    async def probe() -> CheckResult:
        return CheckResult(CheckStatus.PASSING, "up")

    async def on_result(check_id: str, result: CheckResult) -> None:
        pass

    with pytest.raises(ValueError, match="interval"):
        CheckRunner("service:web", probe, interval=0, on_result=on_result)
