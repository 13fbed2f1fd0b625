"""Hold many blocking reads of one key open, write the key, and time the wake-up.

Run by bench/kvbench.py in its own process, because wrk cannot hold
requests open. Prints one JSON object on stdout, with times in seconds.

corral: each watcher is `GET /v1/kv/KEY?index=N&wait=60s` on its own
connection, where N is the key's current ModifyIndex. corral sends nothing
until a blocking request returns, so the write waits until every request
has been sent, the server has one established connection per watcher, and
the server process has been idle for a moment.

etcd: each watcher is a `POST /v3/watch` stream through etcd's JSON
gateway, on its own connection. The write waits until every stream has
sent its `created` message.

The clock starts just before the write is sent. A watcher's time is taken
when the client has read its response (corral) or its event (etcd), so the
client's own work of reading 10,000 responses on one event loop is part of
the figure for both servers. The server's and the client's CPU time from
the write until the last response are reported beside it, to show which
of the two limits the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import psutil

WAIT = "60s"
# Watchers are started in groups of this many. Larger groups overflow a listen
# backlog of 128 (aiohttp's default) more often, and the kernel retries each
# dropped connection attempt only after about a second.
START_GROUP = 100
SETUP_TIMEOUT = 120.0
WAKE_TIMEOUT = 60.0
# Server CPU time per interval below which corral is taken to have parsed every request.
IDLE_CPU_SECONDS = 0.01
IDLE_INTERVAL = 0.5


@dataclass
class Watchers:
    """The state shared by the watcher tasks of one run."""

    count: int
    headers_sent: int = 0
    ready: int = 0
    early: int = 0
    errors: list[str] = field(default_factory=list)
    wake_start: float | None = None
    # Seconds from the write to each watcher's response, in arrival order.
    answered: list[float] = field(default_factory=list)
    all_ready: asyncio.Event = field(default_factory=asyncio.Event)

    def mark_ready(self) -> None:
        self.ready += 1
        if self.ready == self.count:
            self.all_ready.set()


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(
            f"open file limit too low: {needed} descriptors needed, but the hard limit is {hard}. "
            "Raise it (ulimit -Hn) or use fewer watchers (--count)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def corral_watcher(session: aiohttp.ClientSession, url: str, index: int, state: Watchers) -> None:
    params = {"index": str(index), "wait": WAIT}
    try:
        async with session.get(url, params=params) as response:
            await response.read()
            now = time.perf_counter()
            if state.wake_start is None:
                state.early += 1
                return
            if response.status != 200:
                state.errors.append(f"corral watcher: HTTP {response.status}")
                return
            if int(response.headers.get("X-Consul-Index", "0")) <= index:
                state.errors.append("corral watcher: returned without a new index (the wait timed out)")
                return
            state.answered.append(now - state.wake_start)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        state.errors.append(f"corral watcher: {type(exc).__name__}: {exc}")


async def etcd_watcher(session: aiohttp.ClientSession, base: str, key: str, state: Watchers) -> None:
    body = {"create_request": {"key": b64(key)}}
    try:
        async with session.post(f"{base}/v3/watch", json=body) as response:
            if response.status != 200:
                state.errors.append(f"etcd watcher: HTTP {response.status}")
                return
            created = json.loads(await response.content.readline())
            if not created.get("result", {}).get("created"):
                state.errors.append(f"etcd watcher: expected a created message, got {created}")
                return
            state.mark_ready()
            while True:
                line = await response.content.readline()
                if not line:
                    state.errors.append("etcd watcher: stream closed before an event")
                    return
                message = json.loads(line)
                if message.get("result", {}).get("events"):
                    now = time.perf_counter()
                    if state.wake_start is None:
                        state.early += 1
                        return
                    state.answered.append(now - state.wake_start)
                    return
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        state.errors.append(f"etcd watcher: {type(exc).__name__}: {exc}")


async def wait_until_corral_connected(state: Watchers, server_pid: int, port: int) -> None:
    """Wait until corral has one connection per watcher and its CPU use has settled."""
    server = psutil.Process(server_pid)
    deadline = time.monotonic() + SETUP_TIMEOUT
    while state.headers_sent < state.count:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {SETUP_TIMEOUT:.0f}s: only {state.headers_sent} of {state.count} requests sent"
            )
        await asyncio.sleep(0.05)
    while True:
        established = sum(
            1
            for conn in server.net_connections(kind="tcp")
            if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port
        )
        before = sum(server.cpu_times()[:2])
        await asyncio.sleep(IDLE_INTERVAL)
        used = sum(server.cpu_times()[:2]) - before
        if established >= state.count and used < IDLE_CPU_SECONDS:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {SETUP_TIMEOUT:.0f}s: corral has {established} of {state.count} "
                f"connections and used {used:.3f}s of CPU in the last {IDLE_INTERVAL}s"
            )


async def run_corral(args: argparse.Namespace) -> dict:
    base = f"http://{args.addr}"
    url = f"{base}/v1/kv/{args.key}"
    state = Watchers(args.count)
    async with aiohttp.ClientSession() as control:
        async with control.put(url, data=b"before") as response:
            response.raise_for_status()
        async with control.get(url) as response:
            response.raise_for_status()
            index = int(response.headers["X-Consul-Index"])

        async def write() -> None:
            async with control.put(url, data=b"after") as response:
                response.raise_for_status()

        def start(session: aiohttp.ClientSession) -> Awaitable:
            return corral_watcher(session, url, index, state)

        async def wait_ready() -> None:
            await wait_until_corral_connected(state, args.server_pid, int(args.addr.rsplit(":", 1)[1]))

        return await measure(psutil.Process(args.server_pid), state, start, wait_ready, write)


async def run_etcd(args: argparse.Namespace) -> dict:
    base = f"http://{args.addr}"
    state = Watchers(args.count)
    async with aiohttp.ClientSession() as control:
        put_body = {"key": b64(args.key), "value": b64("before")}
        async with control.post(f"{base}/v3/kv/put", json=put_body) as response:
            response.raise_for_status()

        async def write() -> None:
            body = {"key": b64(args.key), "value": b64("after")}
            async with control.post(f"{base}/v3/kv/put", json=body) as response:
                response.raise_for_status()

        def start(session: aiohttp.ClientSession) -> Awaitable:
            return etcd_watcher(session, base, args.key, state)

        async def wait_ready() -> None:
            await asyncio.wait_for(state.all_ready.wait(), SETUP_TIMEOUT)

        return await measure(psutil.Process(args.server_pid), state, start, wait_ready, write)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def measure(
    server: psutil.Process,
    state: Watchers,
    start: Callable[[aiohttp.ClientSession], Awaitable],
    wait_ready: Callable[[], Awaitable],
    write: Callable[[], Awaitable],
) -> dict:
    async def on_headers_sent(session, context, params) -> None:
        state.headers_sent += 1

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(on_headers_sent)
    # limit=0 lifts aiohttp's default cap of 100 connections per session.
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
    setup_start = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trace_configs=[trace]) as session:
        tasks: list[asyncio.Task] = []
        deadline = time.monotonic() + SETUP_TIMEOUT
        for first in range(0, state.count, START_GROUP):
            group = min(START_GROUP, state.count - first)
            tasks += [asyncio.create_task(start(session)) for _ in range(group)]
            while state.headers_sent < len(tasks) and not state.errors:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"timed out after {SETUP_TIMEOUT:.0f}s: only {state.headers_sent} of "
                        f"{state.count} requests sent"
                    )
                await asyncio.sleep(0.01)
        if state.errors:
            raise RuntimeError(f"{len(state.errors)} watchers failed to start: {state.errors[:3]}")
        await wait_ready()
        setup_seconds = time.perf_counter() - setup_start
        if state.early:
            raise RuntimeError(f"{state.early} watchers received a response before the write")

        server_cpu_before = cpu_seconds(server)
        client_cpu_before = time.process_time()
        state.wake_start = time.perf_counter()
        await write()
        write_seconds = time.perf_counter() - state.wake_start
        done, pending = await asyncio.wait(tasks, timeout=WAKE_TIMEOUT)
        server_cpu = cpu_seconds(server) - server_cpu_before
        client_cpu = time.process_time() - client_cpu_before
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    answered = sorted(state.answered)
    result = {
        "watchers": state.count,
        "answered": len(answered),
        "not_answered": state.count - len(answered),
        "errors": len(state.errors),
        "first_errors": state.errors[:5],
        "setup_s": round(setup_seconds, 3),
        "write_s": round(write_seconds, 4),
        "server_cpu_s": round(server_cpu, 3),
        "client_cpu_s": round(client_cpu, 3),
    }
    if answered:
        result.update(
            first_s=round(answered[0], 4),
            p50_s=round(statistics.median(answered), 4),
            p99_s=round(answered[int(0.99 * (len(answered) - 1))], 4),
            last_s=round(answered[-1], 4),
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", choices=["corral", "etcd"], help="the server's API")
    parser.add_argument("--addr", required=True, help="HOST:PORT of the server's HTTP API")
    parser.add_argument("--count", type=int, default=10_000, help="number of watchers [10000]")
    parser.add_argument("--key", default="bench/watch", help="the key to watch and write [bench/watch]")
    parser.add_argument("--server-pid", type=int, required=True,
                        help="process id of the server, for its CPU time (and to see when corral is idle)")
    args = parser.parse_args()
    # One descriptor per watcher, plus room for the control session and the interpreter.
    raise_fd_limit(args.count + 256)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    run = run_corral if args.server == "corral" else run_etcd
    json.dump(runner(run(args)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
