"""Per-service and per-node indexes of the catalog, for blocking queries.

Consul's users complain that a blocking query on one service returns on
every change to any service. corral keeps, for each service name
(lowercased, since service names match case-insensitively) and for each
node, the revision of the last change that can alter what a query on it
returns:

- a service name moves when one of its instances is registered, changed
  or deregistered, or when a check of one of those instances changes. It
  also moves when the node of an instance changes, and when a node-level
  check on that node (such as serfHealth) changes;
- a node (its name lowercased, as Consul matches node names
  case-insensitively) moves when its record, one of its services or one
  of its checks changes.

Deletes move the indexes too. When the last instance of a service name
is deregistered, its entry is dropped and the "extinction" revision moves
instead, as in Consul's state store. A name with no entry returns the
extinction revision, which is at least the last revision its entry had.
Nodes are handled the same way. So memory follows the live catalog and
no index goes backwards.

A view listener maintains all this, with maps from each service and check
key to the names it affects, because the events replayed from the
store's history carry no previous value.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from corral.state import records
from corral.state.records import Check, Service
from corral.state.view import View
from corral.store import Event, EventType

log = logging.getLogger(__name__)


class CatalogIndex:
    def __init__(self, view: View):
        self.view = view
        self._floor = 0
        self._service_indexes: dict[str, int] = {}
        self._node_indexes: dict[str, int] = {}
        self._service_extinction = 0
        self._node_extinction = 0
        # lowercased service name -> number of registered instances
        self._instances: dict[str, int] = {}
        # node -> service id -> lowercased service name
        self._node_services: dict[str, dict[str, str]] = {}
        # node -> check id -> service id ("" for a node-level check)
        self._node_checks: dict[str, dict[str, str]] = {}
        self._service_waiters: dict[str, list[asyncio.Future]] = {}
        self._node_waiters: dict[str, list[asyncio.Future]] = {}
        self._started = False

    def start(self) -> None:
        """Load the catalog from the view and follow its changes; the view must be started."""
        if self._started:
            return
        self._started = True
        # Deletes from before this load left no trace here, so no index may fall below
        # the revision loaded: an index must never go backwards for a client.
        self._floor = self.view.revision
        for kv in self.view.range(records.SERVICES):
            self._remember_service(kv.key, Service.decode(kv.value))
        for kv in self.view.range(records.CHECKS):
            self._remember_check(kv.key, Check.decode(kv.value))
        self.view.add_listener(self._on_change)
        log.debug("catalog index loaded nodes=%d revision=%d", len(self._node_services), self._floor)

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self.view.remove_listener(self._on_change)
        for waiters in (*self._service_waiters.values(), *self._node_waiters.values()):
            for future in waiters:
                if not future.done():
                    future.cancel()
        self._service_waiters.clear()
        self._node_waiters.clear()

    # Reads

    def service_index(self, name: str) -> int:
        """Return the index of service `name` (any case); never 0, never below the load revision."""
        index = self._service_indexes.get(name.lower(), self._service_extinction)
        return max(index, self._floor, 1)

    def node_index(self, node: str) -> int:
        """Return the index of `node` (any case); never 0, never below the load revision."""
        index = self._node_indexes.get(node.lower(), self._node_extinction)
        return max(index, self._floor, 1)

    async def wait_for_service(self, name: str, index: int, timeout: float) -> None:
        """Return once service_index(name) exceeds `index`, or after `timeout` seconds."""
        await self._wait(self._service_waiters, name.lower(), lambda: self.service_index(name), index, timeout)

    async def wait_for_node(self, node: str, index: int, timeout: float) -> None:
        """Return once node_index(node) exceeds `index`, or after `timeout` seconds."""
        await self._wait(self._node_waiters, node.lower(), lambda: self.node_index(node), index, timeout)

    async def _wait(self, waiters, name, current, index: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while current() <= index:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            future = loop.create_future()
            waiters.setdefault(name, []).append(future)
            try:
                async with asyncio.timeout(remaining):
                    await future
            except TimeoutError:
                return
            finally:
                pending = waiters.get(name)
                if pending is not None and future in pending:
                    pending.remove(future)
                    if not pending:
                        del waiters[name]

    # Following the view

    def _on_change(self, batch: list[Event]) -> None:
        revision = batch[0].kv.mod_revision
        names: set[str] = set()
        nodes: set[str] = set()

        # The names an event affects are read before and after the maps change,
        # so that a renamed or deleted service moves both its old and new name.
        for event in batch:
            self._collect(event, names, nodes)
        for event in batch:
            self._apply(event)
        for event in batch:
            self._collect(event, names, nodes)

        extinct = False
        for name in names:
            if self._instances.get(name):
                self._service_indexes[name] = revision
            else:
                self._service_indexes.pop(name, None)
                self._service_extinction = revision
                extinct = True
        if extinct:
            # Every name without an entry returns the extinction revision, which moved.
            names.update(name for name in self._service_waiters if name not in self._service_indexes)

        extinct = False
        node_names = set()
        for node in nodes:
            name = node.lower()
            node_names.add(name)
            if node in self._node_services or node in self._node_checks or self.view.get(records.node_key(node)):
                self._node_indexes[name] = revision
            else:
                self._node_indexes.pop(name, None)
                self._node_extinction = revision
                extinct = True
        if extinct:
            node_names.update(name for name in self._node_waiters if name not in self._node_indexes)

        self._wake(self._service_waiters, names)
        self._wake(self._node_waiters, node_names)

    def _collect(self, event: Event, names: set[str], nodes: set[str]) -> None:
        key = event.kv.key
        if key.startswith(records.SERVICES):
            node, service_id = _split(key, records.SERVICES)
            nodes.add(node)
            name = self._node_services.get(node, {}).get(service_id)
            if name is not None:
                names.add(name)
        elif key.startswith(records.CHECKS):
            node, check_id = _split(key, records.CHECKS)
            nodes.add(node)
            service_id = self._node_checks.get(node, {}).get(check_id)
            if service_id == "":
                names.update(self._node_services.get(node, {}).values())
            elif service_id is not None:
                name = self._node_services.get(node, {}).get(service_id)
                if name is not None:
                    names.add(name)
            if event.type is EventType.PUT:
                # A check of a service this index has not seen yet still names its service.
                check = Check.decode(event.kv.value)
                if check.service_id and check.service_name:
                    names.add(check.service_name.lower())
        elif key.startswith(records.NODES):
            node = key[len(records.NODES):].decode()
            nodes.add(node)
            names.update(self._node_services.get(node, {}).values())

    def _apply(self, event: Event) -> None:
        key = event.kv.key
        if key.startswith(records.SERVICES):
            if event.type is EventType.PUT:
                self._remember_service(key, Service.decode(event.kv.value))
            else:
                node, service_id = _split(key, records.SERVICES)
                self._forget_service(node, service_id)
        elif key.startswith(records.CHECKS):
            if event.type is EventType.PUT:
                self._remember_check(key, Check.decode(event.kv.value))
            else:
                node, check_id = _split(key, records.CHECKS)
                _discard(self._node_checks, node, check_id)

    def _remember_service(self, key: bytes, service: Service) -> None:
        node, service_id = _split(key, records.SERVICES)
        self._forget_service(node, service_id)
        name = service.name.lower()
        self._node_services.setdefault(node, {})[service_id] = name
        self._instances[name] = self._instances.get(name, 0) + 1

    def _forget_service(self, node: str, service_id: str) -> None:
        name = _discard(self._node_services, node, service_id)
        if name is None:
            return
        remaining = self._instances.get(name, 0) - 1
        if remaining > 0:
            self._instances[name] = remaining
        else:
            self._instances.pop(name, None)

    def _remember_check(self, key: bytes, check: Check) -> None:
        node, check_id = _split(key, records.CHECKS)
        self._node_checks.setdefault(node, {})[check_id] = check.service_id

    @staticmethod
    def _wake(waiters: dict[str, list[asyncio.Future]], names: Iterable[str]) -> None:
        for name in names:
            for future in waiters.pop(name, []):
                if not future.done():
                    future.set_result(None)


def _split(key: bytes, prefix: bytes) -> tuple[str, str]:
    node, _, rest = key[len(prefix):].decode().partition("/")
    return node, rest


def _discard(nested: dict[str, dict[str, str]], outer: str, inner: str) -> str | None:
    """Remove nested[outer][inner], and nested[outer] once it is empty; return the removed value."""
    entries = nested.get(outer)
    if entries is None:
        return None
    removed = entries.pop(inner, None)
    if not entries:
        del nested[outer]
    return removed
