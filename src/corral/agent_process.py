"""`corral agent`: one agent in its own process, joined to a server over HTTP.

The process runs the Agent with an HttpConnection and sends heartbeats at
the interval the server suggests. On --http-addr it serves the /v1/agent/*
endpoints of its own registry and PUT /v1/agent/leave, and forwards every
other path to the server, so Consul clients can point at an agent as they
do with Consul's client agents.

Stopping the process (SIGTERM or Ctrl-C) leaves its tasks running, for the
next run of the agent to adopt, and the server declares the agent failed
if it does not come back within the agent timeout. `corral agent leave`
(PUT /v1/agent/leave) is the graceful exit: the server stops placing tasks
on the agent, the agent stops its tasks (the scheduler replaces them
elsewhere), deregisters its node, and exits.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from corral.agent.agent import Agent
from corral.agent.http_connection import HttpConnection
from corral.agent.registry import RegistryConfig
from corral.agent.resources import DEFAULT_PORT_RANGE, PortRange, ResourceSpec
from corral.api import agent as agent_api
from corral.api import executor as executor_api
from corral.dev import HTTP_SHUTDOWN_TIMEOUT, _address_error

log = logging.getLogger(__name__)

# Headers that describe one hop of a connection, not the message, so the proxy does not copy them.
_HOP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})


@dataclass
class AgentProcessConfig:
    join: str  # HOST:PORT of the server's HTTP API
    node: str
    data_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int = 8500
    datacenter: str = "dc1"
    port_range: PortRange = DEFAULT_PORT_RANGE
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    attributes: dict[str, str] = field(default_factory=dict)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


class AgentProcess:
    def __init__(self, config: AgentProcessConfig):
        self.config = config
        self.connection = HttpConnection(config.join, config.node)
        ports = config.resources.ports
        self.agent = Agent(
            self.connection,
            node=config.node,
            address=config.http_host,
            datacenter=config.datacenter,
            data_dir=Path(config.data_dir),
            port_range=ports[0] if ports else config.port_range,
            resources_override=config.resources.apply,
            registry_config=config.registry,
        )
        # Attributes travel as the catalog node's metadata, where Consul keeps node metadata.
        self.agent.registry.node.meta.update(config.attributes)
        self.left = asyncio.Event()
        self.leave_requested = asyncio.Event()
        self._heartbeats: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self._proxy: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Listen on --http-addr, register with the server, start the agent and its heartbeats."""
        config = self.config
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
        self._proxy = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        self._runner = web.AppRunner(
            self._build_app(), access_log=None, handle_signals=False, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.http_host, config.http_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise _address_error(exc, "HTTP", config.http_host, config.http_port, "--http-addr") from None
        # Custom executors reach the agent at the address it listens on.
        self.agent.executors.endpoint = f"{config.http_host}:{config.http_port}"
        await self.agent.start()
        self._heartbeats = asyncio.create_task(self._send_heartbeats(), name="agent-heartbeats")
        log.info("agent process started node=%s server=%s http=%s:%d",
                 config.node, config.join, config.http_host, config.http_port)

    async def stop(self) -> None:
        """Stop the agent and leave its tasks running, for the next run to adopt."""
        await self._stop_heartbeats()
        await self.agent.stop(stop_tasks=False)
        await self._close()
        log.info("agent process stopped node=%s", self.config.node)

    async def leave(self) -> None:
        """Leave the cluster: no new placements, stop every task, deregister the node."""
        node = self.config.node
        log.info("agent leaving node=%s", node)
        await self._stop_heartbeats()
        await self.connection.leave()
        await self.agent.stop()
        await self.connection.deregister()
        self.left.set()
        log.info("agent left node=%s", node)
        await self._close()

    async def _stop_heartbeats(self) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            await asyncio.gather(self._heartbeats, return_exceptions=True)
            self._heartbeats = None

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._proxy is not None:
            await self._proxy.close()
            self._proxy = None
        await self.connection.close()

    async def _send_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.connection.heartbeat_interval)
            try:
                await self.connection.heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat failed node=%s; sending the next one in %gs",
                              self.config.node, self.connection.heartbeat_interval)

    # HTTP

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024 * 1024)
        agent_api.add_routes(app, self.agent)
        executor_api.add_routes(app, self.agent.executors)
        app.router.add_put("/v1/agent/leave", self._handle_leave)
        # NOTE: /v1/agent/self and /v1/agent/metrics are forwarded too, so they describe the server.
        # Registered last, so that the routes above win for their paths and methods.
        app.router.add_route("*", "/{path:.*}", self._forward)
        return app

    async def _handle_leave(self, request: web.Request) -> web.Response:
        self.leave_requested.set()
        await self.left.wait()
        return web.Response()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        """Send the request to the server and return its response unchanged."""
        assert self._proxy is not None
        url = f"http://{self.config.join}{request.rel_url}"
        headers = {name: value for name, value in request.headers.items() if name.lower() not in _HOP_HEADERS}
        body = await request.read()
        try:
            async with self._proxy.request(
                request.method, url, headers=headers, data=body or None, allow_redirects=False
            ) as answer:
                payload = await answer.read()
                response = web.Response(status=answer.status, body=payload)
                for name, value in answer.headers.items():
                    if name.lower() not in _HOP_HEADERS:
                        response.headers.add(name, value)
                return response
        except aiohttp.ClientError as exc:
            log.warning("request forward failed node=%s server=%s path=%s: %s",
                        self.config.node, self.config.join, request.path, exc)
            return web.Response(status=502, text=f"server {self.config.join} is unreachable: {exc}\n")
