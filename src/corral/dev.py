"""`corral dev`: a server and an agent in one process, on the embedded SQLite store.

DevCluster is a corral.server.Server with an Agent in the same process,
which reaches the state through a LocalConnection. The parts start in the
order of their dependencies (store, state view, HTTP and DNS listeners,
job scheduler, agent, agent monitor) and stop in the reverse order, except
that the job scheduler stops before the agent, so that it does not replace
the tasks that the agent stops on the way out.

The agent monitor does not give the in-process agent a heartbeat deadline:
the agent lives and stops with this process, so it is listed as alive in
GET /v1/agents for as long as the server runs. Agents in other processes
may join with `corral agent --join` and are monitored as on `corral server`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from corral.agent.agent import Agent
from corral.agent.connection import LocalConnection
from corral.agent.custom_executor import LocalExecutorReporter
from corral.agent.registry import RegistryConfig
from corral.agent.resources import DEFAULT_PORT_RANGE, AgentResources, PortRange

# HTTP_SHUTDOWN_TIMEOUT, ListenError and _address_error are re-exported because
# corral.agent_process and corral.cli.agent import them from this module.
from corral.server import (  # noqa: F401
    HTTP_SHUTDOWN_TIMEOUT,
    ListenError,
    Server,
    ServerConfig,
    _address_error,
)


def default_data_dir() -> Path:
    """Return the per-user data folder: $XDG_DATA_HOME/corral/dev, or ~/.local/share/corral/dev."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "corral" / "dev"


@dataclass
class DevConfig(ServerConfig):
    """The server's settings plus those of the in-process agent; `node` names both."""

    port_range: PortRange = DEFAULT_PORT_RANGE
    # Overrides of the detected resources, for tests and small machines.
    cpus: float | None = None
    memory: int | None = None
    # The agent's registry: script-check permissions, sync and reap intervals.
    registry: RegistryConfig = field(default_factory=RegistryConfig)


class DevCluster(Server):
    log = logging.getLogger(__name__)
    name = "corral dev"

    def __init__(self, config: DevConfig):
        super().__init__(config)
        self.config: DevConfig = config
        self.agent = Agent(
            LocalConnection(self.state, self.monitor),
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

    def _resource_override(self, detected: AgentResources) -> AgentResources:
        return AgentResources(
            cpus=self.config.cpus if self.config.cpus is not None else detected.cpus,
            memory=self.config.memory if self.config.memory is not None else detected.memory,
            disk=detected.disk,
            ports=detected.ports,
        )

    def log_started(self) -> None:
        config = self.config
        self.log.info(
            "corral dev started node=%s datacenter=%s http=%s:%d dns=%s:%d data_dir=%s",
            config.node, config.datacenter, config.http_host, config.http_port,
            config.dns_host, config.dns_port, config.data_dir,
        )
