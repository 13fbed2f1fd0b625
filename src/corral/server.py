"""`corral server`: the control plane without an agent.

It contains the SQLite store, the state view, the job scheduler, the agent
monitor (failure detection), and the HTTP and DNS listeners. Agents run as
separate processes and reach it over the HTTP API (corral.api.agents).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from corral.api import build_app
from corral.dev import STORE_FILE, start_listeners
from corral.dns.server import DNSConfig, DNSServer
from corral.master.agents import DEFAULT_AGENT_TIMEOUT, AgentMonitor
from corral.master.jobs import JobScheduler
from corral.master.master import Master, MasterConfig
from corral.metrics import Metrics
from corral.state import State
from corral.store import SQLiteStore

log = logging.getLogger(__name__)


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
    dns: DNSConfig = field(default_factory=DNSConfig)
    # The offer cycle: allocation interval, offer timeout, role weights, status resends.
    master: MasterConfig = field(default_factory=MasterConfig)


class Server:
    """The server's parts, started in dependency order and stopped in reverse.

    `setup` opens the store and binds the listeners, `start` starts the
    loops that write (job scheduler, agent monitor), `stop` undoes both.
    Each is safe to call twice.
    """

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
        self._runner: web.AppRunner | None = None
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
            self.state, config.node, f"{config.http_host}:{config.http_port}",
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
        self.monitor.start()
        config = self.config
        log.info(
            "corral server started node=%s datacenter=%s http=%s:%d dns=%s:%d agent_timeout=%gs data_dir=%s",
            config.node, config.datacenter, config.http_host, config.http_port,
            config.dns_host, config.dns_port, config.agent_timeout, config.data_dir,
        )

    async def stop(self) -> None:
        """Stop every part; safe to call twice and after a failed setup. Agents and their tasks keep running."""
        if not self._set_up:
            return
        log.info("corral server stopping node=%s", self.config.node)
        if self._started:
            self._started = False
            await self.master.stop()
            await self.monitor.stop()
            await self.scheduler.stop()
        self._set_up = False
        await self.dns.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.state.stop()
        await self.store.close()
        log.info("corral server stopped node=%s", self.config.node)
