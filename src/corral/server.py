"""`corral server`: the control plane, and the parts that `corral dev` adds an agent to.

A Server contains the SQLite store, the state view, the master (offer
cycle), the job scheduler, the agent monitor (failure detection), metrics,
and the HTTP and DNS listeners. Agents in other processes reach it over the
HTTP API (corral.api.agents). `corral dev` (corral.dev.DevCluster) is a
Server with one agent in the same process.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from corral.agent.agent import Agent
from corral.api import build_app
from corral.api.fastkv import FastKVServer
from corral.dns.server import DNSConfig, DNSServer
from corral.master.agents import DEFAULT_AGENT_TIMEOUT, AgentMonitor
from corral.master.jobs import JobScheduler
from corral.master.master import Master, MasterConfig
from corral.metrics import Metrics
from corral.state import State
from corral.store import SQLiteStore

STORE_FILE = "corral.db"

# Seconds that requests in progress get to finish when the server stops.
HTTP_SHUTDOWN_TIMEOUT = 5.0


class ListenError(Exception):
    """A listen address cannot be bound; the message names it and the flag that changes it."""


@dataclass
class ServerConfig:
    data_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int = 8500
    dns_host: str = "127.0.0.1"
    dns_port: int = 8600
    # The server's own name, reported by /v1/agent/self and /v1/status/leader.
    node: str = field(default_factory=socket.gethostname)
    datacenter: str = "dc1"
    # The largest KV value a PUT may store, in bytes (Consul's kv_max_value_size).
    kv_max_value_size: int = 512 * 1024
    # Seconds without a heartbeat after which an agent is declared failed.
    agent_timeout: float = DEFAULT_AGENT_TIMEOUT
    # TTLs, health filtering, truncation and recursors of the DNS interface.
    dns: DNSConfig = field(default_factory=DNSConfig)
    # The offer cycle: allocation interval, offer timeout, role weights, status resends.
    master: MasterConfig = field(default_factory=MasterConfig)


class Server:
    """The server's parts, started in dependency order and stopped in reverse.

    `setup` opens the store and binds the listeners, `start` starts the
    loops that write (job scheduler, agent monitor), `stop` undoes both.
    Each is safe to call twice.

    `agent` is an agent in this process, which a subclass sets before
    `setup` (`corral dev` does). The HTTP API then also serves its
    /v1/agent endpoints. It starts after the job scheduler and stops after
    the job scheduler has stopped, so that the scheduler does not replace
    the tasks that the agent stops on the way out.
    """

    # The logger and the name of the start and stop log lines.
    log = logging.getLogger(__name__)
    name = "corral server"

    def __init__(self, config: ServerConfig):
        self.config = config
        self.store = SQLiteStore(Path(config.data_dir) / STORE_FILE)
        self.state = State(self.store, datacenter=config.datacenter)
        self.monitor = AgentMonitor(self.state, config.agent_timeout)
        self.master = Master(
            self.state, config.master, monitor=self.monitor,
            master_info={"id": config.node, "ip": 0, "port": config.http_port, "hostname": config.http_host},
        )
        self.scheduler = JobScheduler(self.state, master=self.master)
        self.metrics = Metrics()
        self.metrics.allocator = self.master
        self.dns = DNSServer(
            self.state, config.dns_host, config.dns_port, config.dns, on_response=self.metrics.observe_dns_response
        )
        self.agent: Agent | None = None
        self._runner: HttpListener | None = None
        self._set_up = False
        self._started = False

    async def setup(self) -> None:
        """Open the store and listen on HTTP and DNS; raise ListenError if an address cannot be bound."""
        if self._set_up:
            return
        self._set_up = True
        config = self.config
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
        await self.store.open()
        await self.state.start()
        app = build_app(
            self.state, config.node, f"{config.http_host}:{config.http_port}", agent=self.agent,
            kv_max_value_size=config.kv_max_value_size, metrics=self.metrics, agent_monitor=self.monitor,
            master=self.master,
        )
        self._runner = await start_listeners(app, config.http_host, config.http_port, self.dns)

    async def start(self) -> None:
        if self._started:
            return
        await self.setup()
        self._started = True
        await self.master.start()
        self.scheduler.start()
        if self.agent is not None:
            # Before the monitor starts, so that the monitor has marked this agent as
            # in-process when it gives the stored agent records their deadlines.
            await self.agent.start()
        self.monitor.start()
        self.log_started()

    def log_started(self) -> None:
        config = self.config
        self.log.info(
            "corral server started node=%s datacenter=%s http=%s:%d dns=%s:%d agent_timeout=%gs data_dir=%s",
            config.node, config.datacenter, config.http_host, config.http_port,
            config.dns_host, config.dns_port, config.agent_timeout, config.data_dir,
        )

    async def stop(self) -> None:
        """Stop every part; safe to call twice and after a failed setup.

        The in-process agent, if there is one, stops its tasks. Agents in
        other processes and their tasks keep running.
        """
        if not self._set_up:
            return
        self.log.info("%s stopping node=%s", self.name, self.config.node)
        if self._started:
            self._started = False
            await self.master.stop()
            await self.monitor.stop()
            await self.scheduler.stop()
            if self.agent is not None:
                await self.agent.stop()
        self._set_up = False
        await self.dns.stop()
        # Blocking queries respond now with what they have, instead of holding the
        # HTTP server's shutdown for HTTP_SHUTDOWN_TIMEOUT.
        self.state.view.release_waiters()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.state.stop()
        await self.store.close()
        self.log.info("%s stopped node=%s", self.name, self.config.node)


class HttpListener:
    """The HTTP address: the plain /v1/kv path of fastkv.py in front, and aiohttp for every other request."""

    def __init__(self, runner: web.AppRunner, front: FastKVServer) -> None:
        self.runner = runner
        self.front = front

    async def cleanup(self) -> None:
        self.front.close()
        await self.runner.cleanup()


async def start_listeners(app: web.Application, http_host: str, http_port: int, dns: DNSServer) -> HttpListener:
    """Serve `app` on the HTTP address and start `dns`; raise ListenError naming a taken address."""
    # Blocking queries wait up to 10 minutes, and aiohttp waits for running handlers
    # when it stops (60 s by default), so they are cancelled after this many seconds.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT)
    await runner.setup()
    assert runner.server is not None
    listener = HttpListener(runner, FastKVServer(app, runner.server))
    # A deep accept queue, so that thousands of blocking queries connecting at once are
    # not dropped and retried a second later (aiohttp's default backlog is 128).
    try:
        await listener.front.start(http_host, http_port, backlog=socket.SOMAXCONN)
    except OSError as exc:
        await listener.cleanup()
        raise _address_error(exc, "HTTP", http_host, http_port, "--http-addr") from None
    try:
        await dns.start()
    except OSError as exc:
        await listener.cleanup()
        raise _address_error(exc, "DNS", dns.address[0], dns.address[1], "--dns-addr") from None
    return listener


def _address_error(exc: OSError, what: str, host: str, port: int, flag: str) -> Exception:
    # uvloop raises its own OSError for a UDP bind, with the system's error as the cause.
    cause = exc.__cause__ if exc.errno is None and isinstance(exc.__cause__, OSError) else exc
    if cause.errno == errno.EADDRINUSE:
        return ListenError(
            f"{what} address {host}:{port} is already in use; stop what listens there "
            f"or choose another address with {flag}"
        )
    reason = cause.strerror or str(cause)
    return ListenError(f"cannot listen on {what} address {host}:{port} ({reason}); choose another with {flag}")
