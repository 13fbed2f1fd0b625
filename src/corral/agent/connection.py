"""How an agent reaches the servers.

The agent depends only on ServerConnection. `corral dev` runs the agent in
the server's process and uses LocalConnection, which calls the state
directly. Agent processes use HttpConnection (corral.agent.http_connection),
which calls the same operations over the HTTP API.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from corral.state import State
from corral.state.records import TASKS, AgentInfo, Check, KVEntry, Node, Service, Task
from corral.types import CheckStatus

if TYPE_CHECKING:
    # corral.master.agents imports the agent registry, which imports this module.
    from corral.master.agents import AgentMonitor


class ServerConnection(abc.ABC):
    @abc.abstractmethod
    async def register(self, agent: AgentInfo, node: Node, checks: Iterable[Check]) -> None:
        """Register the agent's resources and its catalog node with the node's checks."""

    @abc.abstractmethod
    async def assigned_tasks(self, node: str) -> tuple[list[Task], int]:
        """Return the tasks placed on `node` and the index to wait on for changes."""

    @abc.abstractmethod
    async def wait_for_assignments(self, node: str, index: int, timeout: float) -> None:
        """Return once the tasks may have changed after `index`, or after `timeout` seconds."""

    @abc.abstractmethod
    async def update_task(self, task_id: str, mutate: Callable[[Task], None]) -> Task | None:
        """Apply `mutate` to the stored task; return the new record, or None when it is gone."""

    @abc.abstractmethod
    async def kv_get(self, key: str) -> tuple[KVEntry | None, int]:
        """Return a KV entry (or None) and the index to wait on for changes to it."""

    @abc.abstractmethod
    async def wait_for_kv(self, key: str, index: int, timeout: float) -> None:
        """Return once the key may have changed after `index`, or after `timeout` seconds."""

    @abc.abstractmethod
    async def register_service(self, service: Service, checks: Iterable[Check]) -> None: ...

    @abc.abstractmethod
    async def deregister_service(self, node: str, service_id: str) -> None: ...

    @abc.abstractmethod
    async def update_check(self, node: str, check_id: str, status: CheckStatus, output: str) -> None: ...

    @abc.abstractmethod
    async def node_services(self, node: str) -> list[Service]: ...

    # Agent registry

    @abc.abstractmethod
    async def sync_node_catalog(
        self, node: Node, services: list[Service], checks: list[Check], liveness_check: Check
    ) -> dict[str, int]:
        """Make the catalog entries of `node` equal to `services` and `checks` (anti-entropy).

        `liveness_check` is written only when missing and never removed.
        Returns the counts of services and checks written and removed.
        """


class LocalConnection(ServerConnection):
    """A connection to the server in the same process.

    With `monitor`, registration marks the agent as in-process in the
    server's agent monitor. Such an agent sends no heartbeats and is never
    declared failed, because it stops only when the server stops.
    """

    def __init__(self, state: State, monitor: AgentMonitor | None = None):
        self.state = state
        self.monitor = monitor

    async def register(self, agent: AgentInfo, node: Node, checks: Iterable[Check]) -> None:
        await self.state.register_agent(agent)
        await self.state.register_node(node, checks)
        if self.monitor is not None:
            self.monitor.registered(agent.node, in_process=True)

    async def assigned_tasks(self, node: str) -> tuple[list[Task], int]:
        return self.state.tasks(node=node), self.state.view.index(TASKS)

    async def wait_for_assignments(self, node: str, index: int, timeout: float) -> None:
        # NOTE: this wakes on a change to any task, not only this node's; fine for one agent.
        await self.state.view.wait_for_change(TASKS, index, timeout)

    async def update_task(self, task_id: str, mutate: Callable[[Task], None]) -> Task | None:
        return await self.state.update_task(task_id, mutate)

    async def kv_get(self, key: str) -> tuple[KVEntry | None, int]:
        return self.state.kv_get(key), self.state.kv_index(key)

    async def wait_for_kv(self, key: str, index: int, timeout: float) -> None:
        await self.state.wait_for_kv(key, index, timeout)

    async def register_service(self, service: Service, checks: Iterable[Check]) -> None:
        await self.state.register_service(service, checks)

    async def deregister_service(self, node: str, service_id: str) -> None:
        await self.state.deregister_service(node, service_id)

    async def update_check(self, node: str, check_id: str, status: CheckStatus, output: str) -> None:
        await self.state.update_check(node, check_id, status, output)

    async def node_services(self, node: str) -> list[Service]:
        return self.state.services(node)

    # Agent registry

    async def sync_node_catalog(
        self, node: Node, services: list[Service], checks: list[Check], liveness_check: Check
    ) -> dict[str, int]:
        return await self.state.sync_agent_node(node, services, checks, liveness_check)
