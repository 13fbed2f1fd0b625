"""`corral dev`: a server and an agent in one process, on the embedded SQLite store.

The parts start in the order of their dependencies (store, state view, job
scheduler, HTTP and DNS listeners, agent) and stop in the reverse order,
except that the job scheduler stops first, so that it does not replace
the tasks that the agent stops on the way out.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from corral.agent.agent import Agent
from corral.agent.connection import LocalConnection
from corral.agent.custom_executor import LocalExecutorReporter
from corral.agent.registry import RegistryConfig
from corral.agent.resources import DEFAULT_PORT_RANGE, AgentResources, PortRange
from corral.api import build_app
from corral.dns.server import DNSConfig, DNSServer
from corral.master.jobs import JobScheduler
from corral.master.master import Master, MasterConfig
from corral.metrics import Metrics
from corral.state import State
from corral.store import SQLiteStore

log = logging.getLogger(__name__)

STORE_FILE = "corral.db"

# Seconds that requests in progress get to finish when corral dev stops.
HTTP_SHUTDOWN_TIMEOUT = 5.0


class ListenError(Exception):
    """A listen address cannot be bound; the message names it and the flag that changes it."""


def default_data_dir() -> Path:
    """Return the per-user data folder: $XDG_DATA_HOME/corral/dev, or ~/.local/share/corral/dev."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "corral" / "dev"


@dataclass
class DevConfig:
    data_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int = 8500
    dns_host: str = "127.0.0.1"
    dns_port: int = 8600
    node: str = field(default_factory=socket.gethostname)
    datacenter: str = "dc1"
    port_range: PortRange = DEFAULT_PORT_RANGE
    # Overrides of the detected resources, for tests and small machines.
    cpus: float | None = None
    memory: int | None = None
    # The largest KV value a PUT may store, in bytes (Consul's kv_max_value_size).
    kv_max_value_size: int = 512 * 1024
    # The agent's registry: script-check permissions, sync and reap intervals.
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    # TTLs, health filtering, truncation and recursors of the DNS interface.
    dns: DNSConfig = field(default_factory=DNSConfig)
    # The offer cycle: allocation interval, offer timeout, role weights, status resends.
    master: MasterConfig = field(default_factory=MasterConfig)


class DevCluster:
    def __init__(self, config: DevConfig):
        self.config = config
        self.store = SQLiteStore(Path(config.data_dir) / STORE_FILE)
        self.state = State(self.store, datacenter=config.datacenter)
        self.master = Master(
            self.state, config.master,
            master_info={"id": config.node, "ip": 0, "port": config.http_port, "hostname": config.http_host},
        )
        self.scheduler = JobScheduler(self.state, master=self.master)
        self.metrics = Metrics()
        self.metrics.allocator = self.master
        self.dns = DNSServer(
            self.state, config.dns_host, config.dns_port, config.dns, on_response=self.metrics.observe_dns_response
        )
        self.agent = Agent(
            LocalConnection(self.state),
            node=config.node,
            address=config.http_host,
            datacenter=config.datacenter,
            data_dir=Path(config.data_dir) / "agent",
            port_range=config.port_range,
            resources_override=self._resource_override,
            registry_config=config.registry,
        )
        self.agent.registry.on_check_result = self.metrics.observe_check_result
        # Custom executors call the agent's executor API on the dev HTTP address.
        self.agent.executors.endpoint = f"{config.http_host}:{config.http_port}"
        self.agent.executors.reporter = LocalExecutorReporter(self.master)
        self._runner: web.AppRunner | None = None
        self._started = False

    def _resource_override(self, detected: AgentResources) -> AgentResources:
        return AgentResources(
            cpus=self.config.cpus if self.config.cpus is not None else detected.cpus,
            memory=self.config.memory if self.config.memory is not None else detected.memory,
            disk=detected.disk,
            ports=detected.ports,
        )

    async def start(self) -> None:
        """Start every part; raise ListenError if a listen address cannot be bound."""
        if self._started:
            return
        self._started = True
        config = self.config
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
        await self.store.open()
        await self.state.start()
        rpc_addr = f"{config.http_host}:{config.http_port}"
        app = build_app(
            self.state, config.node, rpc_addr, agent=self.agent, kv_max_value_size=config.kv_max_value_size,
            metrics=self.metrics, master=self.master,
        )
        self._runner = await start_listeners(app, config.http_host, config.http_port, self.dns)
        await self.master.start()
        self.scheduler.start()
        await self.agent.start()
        log.info(
            "corral dev started node=%s datacenter=%s http=%s:%d dns=%s:%d data_dir=%s",
            config.node, config.datacenter, config.http_host, config.http_port,
            config.dns_host, config.dns_port, config.data_dir,
        )

    async def stop(self) -> None:
        """Stop every task and every part; safe to call twice and after a failed start."""
        if not self._started:
            return
        self._started = False
        log.info("corral dev stopping node=%s", self.config.node)
        await self.master.stop()
        await self.scheduler.stop()
        await self.agent.stop()
        await self.dns.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.state.stop()
        await self.store.close()
        log.info("corral dev stopped node=%s", self.config.node)


async def start_listeners(app: web.Application, http_host: str, http_port: int, dns: DNSServer) -> web.AppRunner:
    """Serve `app` on the HTTP address and start `dns`; raise ListenError naming a taken address."""
    # Blocking queries wait up to 10 minutes, and aiohttp waits for running handlers
    # when it stops (60 s by default), so they are cancelled after this many seconds.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT)
    await runner.setup()
    # A deep accept queue, so that thousands of blocking queries connecting at once are
    # not dropped and retried a second later (aiohttp's default backlog is 128).
    site = web.TCPSite(runner, http_host, http_port, reuse_address=True, backlog=socket.SOMAXCONN)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise _address_error(exc, "HTTP", http_host, http_port, "--http-addr") from None
    try:
        await dns.start()
    except OSError as exc:
        await runner.cleanup()
        raise _address_error(exc, "DNS", dns.address[0], dns.address[1], "--dns-addr") from None
    return runner


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
