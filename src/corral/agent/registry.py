"""The agent's local registry: the services and checks of its node, and the truth about them.

Consul's agents work this way (agent/local/state.go in hashicorp/consul):
each agent keeps the services and checks registered on it, runs the checks,
and pushes its state to the catalog. This registry does the same for one
corral agent:

- services and checks come from the agent's own task runners (source LOCAL)
  or from the /v1/agent HTTP API (source REMOTE);
- it runs every check with an interval (HTTP, TCP, gRPC, script) and keeps
  a timer for every TTL check;
- anti-entropy: after every change, and every sync_interval seconds anyway,
  it makes the catalog entries of its node equal to its own. Services and
  checks of this node that it does not know are removed from the catalog,
  except the node check serfHealth, which belongs to the agent's liveness.
  Other nodes are never touched;
- a reaper removes a service whose check has stayed critical for longer than
  the check's DeregisterCriticalServiceAfter;
- what came from the HTTP API is saved to a file (when the registry has
  one) and loaded again when the agent restarts, as Consul persists its
  agent's state. A TTL check keeps its saved status if its TTL has not
  run out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import ipaddress
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

import aiohttp

from corral.agent.checks import (
    SCRIPT_DEFAULT_TIMEOUT,
    CheckResult,
    CheckRunner,
    StatusThresholds,
    TTLTimer,
    cap_output,
    grpc_check,
    http_check,
    script_check,
    tcp_check,
)
from corral.agent.connection import ServerConnection
from corral.duration import format_duration
from corral.state.records import Check, Node, Service
from corral.types import CheckStatus

log = logging.getLogger(__name__)

# Consul's IDs and names of the critical checks that put a service or the node in maintenance.
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"
NODE_MAINTENANCE_ID = "_node_maintenance"
SERVICE_MAINTENANCE_NAME = "Service Maintenance Mode"
NODE_MAINTENANCE_NAME = "Node Maintenance Mode"
DEFAULT_SERVICE_MAINTENANCE_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)
DEFAULT_NODE_MAINTENANCE_REASON = (
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
)

DEFAULT_CHECK_TIMEOUT = 10.0

# Seconds between attempts while syncing to the catalog fails.
SYNC_RETRY_DELAY = 1.0

# The format of the file that saves the registrations made over the HTTP API.
PERSIST_FORMAT = 1

# Consul's ID and name for the node check of the agent's liveness, which sessions depend on
# by default. Anti-entropy recreates it when the node is missing and otherwise leaves it alone.
SERF_HEALTH_ID = "serfHealth"
SERF_HEALTH_NAME = "Serf Health Status"


def serf_health_check(node: str) -> Check:
    """Return the passing serfHealth check that an agent registers for its node."""
    return Check(
        node=node,
        id=SERF_HEALTH_ID,
        name=SERF_HEALTH_NAME,
        status=CheckStatus.PASSING,
        output="Agent alive and reachable",
    )


class ConfigSource(enum.Enum):
    """The origin of a registration: the agent itself (its tasks) or the HTTP API."""

    LOCAL = "local"
    REMOTE = "remote"


class CheckKind(enum.StrEnum):
    """The kind of a check, spelled as Consul's check Type field."""

    TTL = "ttl"
    HTTP = "http"
    TCP = "tcp"
    GRPC = "grpc"
    SCRIPT = "script"
    # A check whose status only the agent sets, such as a maintenance check.
    MANUAL = ""


class RegistryError(Exception):
    """A request the registry rejects, with the HTTP status that the API responds with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RegistryConfig:
    """Settings of an agent's registry. Times are in seconds."""

    # Allow script checks registered through the HTTP API (Consul's enable_script_checks).
    enable_script_checks: bool = False
    # Allow script checks from the agent's own definitions (Consul's enable_local_script_checks).
    enable_local_script_checks: bool = False
    # Consul's full-sync interval for clusters of up to 128 nodes, plus a random stagger.
    # NOTE: Consul lengthens it for larger clusters (2 min up to 256 nodes, and so on), but corral does not.
    sync_interval: float = 60.0
    # Consul's check_reap_interval and its minimum DeregisterCriticalServiceAfter.
    reap_interval: float = 30.0
    min_deregister_after: float = 60.0
    # Consul raises shorter intervals of checks registered over the API to one second.
    min_check_interval: float = 1.0
    # The longest a new check output under an unchanged status waits before it is synced,
    # so that chatty outputs cost one catalog write per interval for all checks together.
    # Consul's check_update_interval defaults to 5 minutes, but corral keeps outputs fresher.
    check_update_interval: float = 2.0


@dataclass
class CheckDefinition:
    """A check's kind, target and timing. Times are in seconds."""

    kind: CheckKind
    interval: float = 0.0
    timeout: float = 0.0
    ttl: float = 0.0
    http: str = ""
    method: str = ""
    header: dict[str, list[str]] = field(default_factory=dict)
    body: str = ""
    tls_skip_verify: bool = False
    tcp: str = ""
    grpc: str = ""
    grpc_use_tls: bool = False
    args: list[str] = field(default_factory=list)
    deregister_critical_after: float = 0.0
    success_before_passing: int = 0
    failures_before_warning: int | None = None
    failures_before_critical: int = 0

    @property
    def effective_timeout(self) -> float:
        if self.timeout > 0:
            return self.timeout
        return SCRIPT_DEFAULT_TIMEOUT if self.kind is CheckKind.SCRIPT else DEFAULT_CHECK_TIMEOUT

    def to_api(self) -> dict:
        """Return Consul's Definition object of a health check."""
        return {
            "HTTP": self.http,
            "Header": self.header or None,
            "Method": self.method,
            "Body": self.body,
            "TLSSkipVerify": self.tls_skip_verify,
            "TCP": self.tcp,
            "GRPC": self.grpc,
            "GRPCUseTLS": self.grpc_use_tls,
            "ScriptArgs": self.args or None,
            "Interval": format_duration(self.interval),
            "Timeout": format_duration(self.timeout),
            "TTL": format_duration(self.ttl),
            "DeregisterCriticalServiceAfter": format_duration(self.deregister_critical_after),
        }


@dataclass
class CheckRequest:
    """A check to register: on its own, or as one of a service's checks (service_id is then filled in)."""

    definition: CheckDefinition
    id: str = ""
    name: str = ""
    notes: str = ""
    status: CheckStatus | None = None
    service_id: str = ""


@dataclass
class LocalService:
    """A service instance registered on this agent, with Consul's agent-side fields."""

    id: str
    name: str
    address: str = ""
    port: int = 0
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    tagged_addresses: dict[str, dict] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    enable_tag_override: bool = False
    # Set for the instances of corral's own tasks.
    task_id: str = ""
    source: ConfigSource = ConfigSource.REMOTE


@dataclass
class LocalCheck:
    """A check registered on this agent, with its current status and what runs it."""

    id: str
    name: str
    status: CheckStatus
    definition: CheckDefinition
    source: ConfigSource
    output: str = ""
    notes: str = ""
    service_id: str = ""
    service_name: str = ""
    # Monotonic time at which the check last turned critical, or None while it is not critical.
    critical_since: float | None = None
    runner: CheckRunner | None = None
    ttl_timer: TTLTimer | None = None
    thresholds: StatusThresholds | None = None

    @property
    def is_maintenance(self) -> bool:
        return self.id == NODE_MAINTENANCE_ID or self.id.startswith(SERVICE_MAINTENANCE_PREFIX)


def aggregated_status(checks: list[LocalCheck]) -> str:
    """Return Consul's AggregatedStatus: maintenance if any check is a maintenance check, else the worst status.

    With no checks, the status is passing.
    """
    if any(check.is_maintenance for check in checks):
        return CheckStatus.MAINTENANCE.value
    statuses = {check.status for check in checks}
    for status in (CheckStatus.CRITICAL, CheckStatus.WARNING):
        if status in statuses:
            return status.value
    return CheckStatus.PASSING.value


def service_maintenance_check_id(service_id: str) -> str:
    return SERVICE_MAINTENANCE_PREFIX + service_id


def _go_quote(text: str) -> str:
    """Quote text in double quotes as Go's %q does, because clients match Consul's messages."""
    return orjson.dumps(text).decode()


def _serialized(method):
    """Run a LocalRegistry method under the registry's lock, one change at a time."""

    @functools.wraps(method)
    async def locked(self: LocalRegistry, *args, **kwargs):
        async with self._lock:
            return await method(self, *args, **kwargs)

    return locked


class LocalRegistry:
    """The services and checks of one agent's node, kept in sync with the catalog."""

    def __init__(
        self,
        connection: ServerConnection,
        node: Node,
        config: RegistryConfig | None = None,
        persist_path: Path | None = None,
    ) -> None:
        self.connection = connection
        self.persist_path = persist_path
        self.node = node
        self.config = config or RegistryConfig()
        self.services: dict[str, LocalService] = {}
        self.checks: dict[str, LocalCheck] = {}
        self._http: aiohttp.ClientSession | None = None
        self._own_http = False
        self._started = False
        self._dirty = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        # Held by every change of services and checks, so that two requests do not interleave.
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # Every change bumps the version, which hash-based blocking queries wait on.
        self.version = 0
        # Service id -> the number of its latest local registration, until a sync pushes it.
        # Such a service keeps its own tags even with EnableTagOverride, as in Consul, whose
        # partial sync pushes a local change before a full sync adopts the catalog's tags.
        self._unpushed_services: dict[str, int] = {}
        self._registrations = 0
        self._saved: dict | None = None
        self._save_pending: dict | None = None
        self._save_task: asyncio.Task | None = None
        self._deferred_sync: asyncio.TimerHandle | None = None
        # Called with the status of every check result (probe, TTL report or TTL expiry), for metrics.
        self.on_check_result: Callable[[CheckStatus], None] | None = None

    # Lifecycle

    async def start(self, http: aiohttp.ClientSession | None = None) -> None:
        """Push the registry to the catalog once, then keep it in sync. Safe to call twice.

        HTTP checks use `http`, or a session of the registry's own when it is None.
        """
        if self._started:
            return
        self._started = True
        self._http = http
        if http is None:
            self._http = aiohttp.ClientSession()
            self._own_http = True
        await self._load()
        for check in self.checks.values():
            self._start_check(check)
        await self.sync()
        self._tasks = [
            asyncio.create_task(self._sync_loop(), name=f"registry-sync {self.node.name}"),
            asyncio.create_task(self._reap_loop(), name=f"registry-reap {self.node.name}"),
        ]
        log.info("agent registry started node=%s services=%d checks=%d",
                 self.node.name, len(self.services), len(self.checks))

    async def stop(self) -> None:
        """Stop every check and the sync loops; the catalog keeps what was synced. Safe to call twice."""
        if not self._started:
            return
        self._started = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._deferred_sync is not None:
            self._deferred_sync.cancel()
            self._deferred_sync = None
        await asyncio.gather(*(self._stop_check(check) for check in self.checks.values()))
        if self._save_task is not None:
            await self._save_task
        if self._own_http and self._http is not None:
            await self._http.close()
        self._http = None
        self._own_http = False
        log.info("agent registry stopped node=%s", self.node.name)

    # Reads

    def service(self, service_id: str) -> LocalService | None:
        return self.services.get(service_id)

    def services_named(self, name: str) -> list[LocalService]:
        return [service for service in self.services.values() if service.name == name]

    def checks_for_service(self, service_id: str, include_node: bool = False) -> list[LocalCheck]:
        """Return a service's checks, and the node's own checks when include_node is set."""
        return [
            check for check in self.checks.values()
            if check.service_id == service_id or (include_node and not check.service_id)
        ]

    async def wait_for_change(self, version: int, timeout: float) -> None:
        """Return once the registry has changed after `version`, or after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.version <= version:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            event = self._changed
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                return

    # Services

    @_serialized
    async def add_service(
        self,
        service: LocalService,
        checks: list[CheckRequest] = (),
        replace_existing_checks: bool = False,
    ) -> None:
        """Register or replace a service with its checks, keeping the status of checks it had.

        Check IDs default to "service:<service id>", numbered ":1", ":2" ... when
        there are several. Without replace_existing_checks, the service's earlier
        checks that are not in `checks` stay registered. Raises RegistryError.
        """
        self._set_default_tagged_addresses(service)
        requests = list(checks)
        for index, request in enumerate(requests, start=1):
            if not request.id:
                request.id = f"service:{service.id}" + (f":{index}" if len(requests) > 1 else "")
            if not request.name:
                request.name = f"Service '{service.name}' check"
            request.service_id = service.id
            self._vet_definition(request, service.source)
        for request in requests:
            self._adjust_timing(request.definition, service.source)

        previous = self.services.get(service.id)
        self.services[service.id] = service
        self._registrations += 1
        self._unpushed_services[service.id] = self._registrations
        kept = set()
        for request in requests:
            await self._put_check(request, service, service.source)
            kept.add(request.id)
        if replace_existing_checks:
            for check in self.checks_for_service(service.id):
                if check.id not in kept and not check.is_maintenance:
                    await self._drop_check(check.id)
        self._mark_changed()
        verb = "updated" if previous else "registered"
        log.info("agent service %s node=%s service=%s id=%s checks=%d",
                 verb, self.node.name, service.name, service.id, len(requests))

    @_serialized
    async def remove_service(self, service_id: str) -> None:
        """Remove a service and every check of it. Raises RegistryError 404 for an unknown ID."""
        if service_id not in self.services:
            raise RegistryError(
                404,
                f"Unknown service ID {_go_quote(service_id)}. Ensure that the service ID is passed, not the service name.",
            )
        await self._drop_service(service_id)

    async def _drop_service(self, service_id: str) -> None:
        for check in self.checks_for_service(service_id):
            await self._drop_check(check.id)
        del self.services[service_id]
        self._unpushed_services.pop(service_id, None)
        self._mark_changed()
        log.info("agent service deregistered node=%s id=%s", self.node.name, service_id)

    # Checks

    @_serialized
    async def add_check(self, request: CheckRequest, source: ConfigSource = ConfigSource.REMOTE) -> None:
        """Register or replace one check, keeping its status if it existed. Raises RegistryError."""
        service = None
        if request.service_id:
            service = self.services.get(request.service_id)
            if service is None:
                raise RegistryError(404, f"ServiceID {_go_quote(request.service_id)} does not exist")
        self._vet_definition(request, source)
        self._adjust_timing(request.definition, source)
        await self._put_check(request, service, source)
        self._mark_changed()
        log.info("agent check registered node=%s check=%s type=%s service=%s",
                 self.node.name, request.id, request.definition.kind.value or "manual", request.service_id)

    @_serialized
    async def remove_check(self, check_id: str) -> None:
        """Remove a check. Raises RegistryError 404 for an unknown ID."""
        if check_id not in self.checks:
            raise RegistryError(
                404, f"Unknown check ID {_go_quote(check_id)}. Ensure that the check ID is passed, not the check name."
            )
        await self._drop_check(check_id)
        self._mark_changed()
        log.info("agent check deregistered node=%s check=%s", self.node.name, check_id)

    @_serialized
    async def update_ttl(self, check_id: str, status: CheckStatus, output: str) -> None:
        """Set a TTL check's status and output and restart its TTL. Raises RegistryError."""
        check = self.checks.get(check_id)
        if check is None:
            raise RegistryError(
                404, f"Unknown check ID {_go_quote(check_id)}. Ensure that the check ID is passed, not the check name."
            )
        if check.definition.kind is not CheckKind.TTL or check.ttl_timer is None:
            raise RegistryError(500, f"CheckID {_go_quote(check_id)} does not have associated TTL")
        encoded = output.encode()
        self._count_result(status)
        self._set_status(check, status, cap_output(encoded, len(encoded)))
        check.ttl_timer.reset()
        self._schedule_save()

    # Maintenance

    @_serialized
    async def set_service_maintenance(self, service_id: str, enable: bool, reason: str = "") -> None:
        """Add or remove the critical check that takes a service out of discovery. Raises RegistryError."""
        service = self.services.get(service_id)
        if service is None:
            raise RegistryError(404, f"No service registered with ID {_go_quote(service_id)}")
        check_id = service_maintenance_check_id(service_id)
        if enable and check_id not in self.checks:
            request = CheckRequest(
                CheckDefinition(CheckKind.MANUAL),
                id=check_id,
                name=SERVICE_MAINTENANCE_NAME,
                notes=reason or DEFAULT_SERVICE_MAINTENANCE_REASON,
                status=CheckStatus.CRITICAL,
                service_id=service_id,
            )
            await self._put_check(request, service, ConfigSource.REMOTE)
            self._mark_changed()
            log.info("service entered maintenance mode node=%s id=%s", self.node.name, service_id)
        elif not enable and check_id in self.checks:
            await self._drop_check(check_id)
            self._mark_changed()
            log.info("service left maintenance mode node=%s id=%s", self.node.name, service_id)

    @_serialized
    async def set_node_maintenance(self, enable: bool, reason: str = "") -> None:
        """Add or remove the critical node check that takes every service of this node out of discovery."""
        if enable and NODE_MAINTENANCE_ID not in self.checks:
            request = CheckRequest(
                CheckDefinition(CheckKind.MANUAL),
                id=NODE_MAINTENANCE_ID,
                name=NODE_MAINTENANCE_NAME,
                notes=reason or DEFAULT_NODE_MAINTENANCE_REASON,
                status=CheckStatus.CRITICAL,
            )
            await self._put_check(request, None, ConfigSource.REMOTE)
            self._mark_changed()
            log.info("node entered maintenance mode node=%s", self.node.name)
        elif not enable and NODE_MAINTENANCE_ID in self.checks:
            await self._drop_check(NODE_MAINTENANCE_ID)
            self._mark_changed()
            log.info("node left maintenance mode node=%s", self.node.name)

    # Anti-entropy

    async def sync(self) -> bool:
        """Make the catalog entries of this node equal to the registry's now, and return whether it worked.

        Errors are logged and left to the next sync, as Consul's agent does:
        the local change already happened.
        """
        async with self._sync_lock:
            self._dirty.clear()
            try:
                await self._push()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._dirty.set()
                log.exception("agent sync failed node=%s; retrying in %gs", self.node.name, SYNC_RETRY_DELAY)
                return False
            return True

    async def _push(self) -> None:
        unpushed = dict(self._unpushed_services)
        await self._adopt_catalog_tags(unpushed)
        services = [self._catalog_service(service) for service in self.services.values()]
        checks = [self._catalog_check(check) for check in self.checks.values()]
        changes = await self.connection.sync_node_catalog(
            self.node, services, checks, serf_health_check(self.node.name)
        )
        if any(changes.values()):
            log.info(
                "agent sync changed the catalog node=%s services_written=%d services_removed=%d "
                "checks_written=%d checks_removed=%d",
                self.node.name, changes["services_written"], changes["services_removed"],
                changes["checks_written"], changes["checks_removed"],
            )
        # A service registered again during the push stays unpushed, since its number changed.
        for service_id, number in unpushed.items():
            if self._unpushed_services.get(service_id) == number:
                del self._unpushed_services[service_id]

    async def _adopt_catalog_tags(self, unpushed: dict[str, int]) -> None:
        """Take the catalog's tags for services with EnableTagOverride, as Consul's anti-entropy does.

        Services registered locally since the last push keep their own tags.
        """
        overriding = [
            service for service in self.services.values()
            if service.enable_tag_override and service.id not in unpushed
        ]
        if not overriding:
            return
        remote = {service.id: service for service in await self.connection.node_services(self.node.name)}
        for service in overriding:
            catalog = remote.get(service.id)
            if catalog is not None and catalog.tags != service.tags:
                service.tags = list(catalog.tags)
                self._bump()

    async def _sync_loop(self) -> None:
        interval = self.config.sync_interval
        while True:
            # Consul staggers full syncs so that agents do not sync in step.
            wait = interval + random.uniform(0, interval / 16)
            try:
                async with asyncio.timeout(wait):
                    await self._dirty.wait()
            except TimeoutError:
                pass
            if not await self.sync():
                await asyncio.sleep(SYNC_RETRY_DELAY)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_interval)
            try:
                await self.reap()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("agent reaper failed node=%s", self.node.name)

    @_serialized
    async def reap(self) -> None:
        """Remove the services whose checks have been critical for longer than DeregisterCriticalServiceAfter."""
        now = time.monotonic()
        for check in list(self.checks.values()):
            after = check.definition.deregister_critical_after
            if after <= 0 or not check.service_id or check.critical_since is None:
                continue
            if now - check.critical_since <= after:
                continue
            if check.service_id not in self.services:
                continue
            log.info("service deregistered after its check stayed critical node=%s id=%s check=%s for=%s",
                     self.node.name, check.service_id, check.id, format_duration(now - check.critical_since))
            await self._drop_service(check.service_id)

    # Internals

    def _mark_changed(self) -> None:
        self._bump()
        self._dirty.set()
        self._schedule_save()

    def _bump(self) -> None:
        self.version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _vet_definition(self, request: CheckRequest, source: ConfigSource) -> None:
        if request.definition.kind is not CheckKind.SCRIPT:
            return
        if source is ConfigSource.REMOTE and not self.config.enable_script_checks:
            raise RegistryError(
                403,
                "Scripts are disabled on this agent from remote calls; script checks registered "
                "over the HTTP API can run any command, so they are off unless the agent is started "
                "with --enable-script-checks",
            )
        if source is ConfigSource.LOCAL and not (
            self.config.enable_script_checks or self.config.enable_local_script_checks
        ):
            raise RegistryError(
                403,
                "Scripts are disabled on this agent; to enable them, start the agent with "
                "--enable-script-checks or --enable-local-script-checks",
            )

    def _adjust_timing(self, definition: CheckDefinition, source: ConfigSource) -> None:
        minimum = self.config.min_check_interval
        if source is ConfigSource.REMOTE and 0 < definition.interval < minimum:
            log.warning("check interval raised to the minimum node=%s interval=%s minimum=%s",
                        self.node.name, format_duration(definition.interval), format_duration(minimum))
            definition.interval = minimum
        after = definition.deregister_critical_after
        if 0 < after < self.config.min_deregister_after:
            log.warning("DeregisterCriticalServiceAfter raised to the minimum node=%s after=%s minimum=%s",
                        self.node.name, format_duration(after), format_duration(self.config.min_deregister_after))
            definition.deregister_critical_after = self.config.min_deregister_after

    async def _put_check(self, request: CheckRequest, service: LocalService | None, source: ConfigSource) -> None:
        previous = self.checks.get(request.id)
        status = request.status or CheckStatus.CRITICAL
        output = ""
        if previous is not None:
            # Consul keeps a re-registered check's status, so that it does not flap.
            status, output = previous.status, previous.output
            await self._stop_check(previous)
        check = LocalCheck(
            id=request.id,
            name=request.name,
            status=status,
            definition=request.definition,
            source=source,
            output=output,
            notes=request.notes,
            service_id=service.id if service else "",
            service_name=service.name if service else "",
            critical_since=(previous.critical_since if previous else None),
        )
        if status is CheckStatus.CRITICAL and check.critical_since is None:
            check.critical_since = time.monotonic()
        self.checks[check.id] = check
        if self._started:
            self._start_check(check)

    async def _drop_check(self, check_id: str) -> None:
        check = self.checks.pop(check_id, None)
        if check is not None:
            await self._stop_check(check)

    def _start_check(self, check: LocalCheck) -> None:
        definition = check.definition
        if definition.kind is CheckKind.TTL:
            check.ttl_timer = TTLTimer(check.id, definition.ttl, self._on_ttl_expired)
            check.ttl_timer.start()
            return
        probe = self._probe(definition)
        if probe is None:
            return
        check.thresholds = StatusThresholds(
            definition.success_before_passing,
            definition.failures_before_warning,
            definition.failures_before_critical,
        )
        check.runner = CheckRunner(check.id, probe, definition.interval, self._on_result)
        check.runner.start()

    async def _stop_check(self, check: LocalCheck) -> None:
        if check.runner is not None:
            await check.runner.stop()
            check.runner = None
        if check.ttl_timer is not None:
            await check.ttl_timer.stop()
            check.ttl_timer = None

    def _probe(self, definition: CheckDefinition) -> Callable[[], Awaitable[CheckResult]] | None:
        timeout = definition.effective_timeout
        kind = definition.kind
        if kind is CheckKind.HTTP:
            assert self._http is not None
            http = self._http
            return lambda: http_check(
                http, definition.http, timeout, definition.method or "GET",
                definition.header, definition.body, definition.tls_skip_verify,
            )
        if kind is CheckKind.TCP:
            host, _, port = definition.tcp.rpartition(":")
            host = host.strip("[]")
            return lambda: tcp_check(host, int(port), timeout)
        if kind is CheckKind.GRPC:
            return lambda: grpc_check(definition.grpc, timeout, definition.grpc_use_tls)
        if kind is CheckKind.SCRIPT:
            return lambda: script_check(definition.args, timeout)
        return None

    async def _on_result(self, check_id: str, result: CheckResult) -> None:
        check = self.checks.get(check_id)
        if check is None or check.thresholds is None:
            return
        self._count_result(result.status)
        applied = check.thresholds.apply(result)
        if applied is None:
            log.debug("check result below its threshold node=%s check=%s status=%s",
                      self.node.name, check_id, result.status.value)
            return
        self._set_status(check, applied.status, applied.output)

    async def _on_ttl_expired(self, check_id: str) -> None:
        check = self.checks.get(check_id)
        if check is None:
            return
        log.warning("check missed its TTL node=%s check=%s ttl=%s",
                    self.node.name, check_id, format_duration(check.definition.ttl))
        self._count_result(CheckStatus.CRITICAL)
        output = "TTL expired"
        if check.output:
            output += f" (last output before timeout follows): {check.output}"
        self._set_status(check, CheckStatus.CRITICAL, output)

    def _count_result(self, status: CheckStatus) -> None:
        if self.on_check_result is not None:
            self.on_check_result(status)

    def _set_status(self, check: LocalCheck, status: CheckStatus, output: str) -> None:
        """Record a check's status and output; a new status or a first output goes to the catalog at once.

        Another output under the same status waits up to check_update_interval,
        as in Consul, so that a probe whose output changes every time does not
        write to the catalog every time. Callers that need it in the catalog at
        once call sync().
        """
        if check.status is status and check.output == output:
            return
        changed = check.status is not status
        urgent = changed or not check.output
        if changed:
            log.info("check status changed node=%s check=%s from=%s to=%s",
                     self.node.name, check.id, check.status.value, status.value)
            check.critical_since = time.monotonic() if status is CheckStatus.CRITICAL else None
        check.status = status
        check.output = output
        if urgent:
            self._mark_changed()
            return
        self._bump()
        if self._deferred_sync is None:
            self._deferred_sync = asyncio.get_running_loop().call_later(
                self.config.check_update_interval, self._run_deferred_sync
            )

    def _run_deferred_sync(self) -> None:
        self._deferred_sync = None
        self._dirty.set()

    @staticmethod
    def _set_default_tagged_addresses(service: LocalService) -> None:
        """Add lan_ipv4 and wan_ipv4 (or _ipv6) for an IP address, as Consul's agent does."""
        try:
            ip = ipaddress.ip_address(service.address)
        except ValueError:
            return
        family = "ipv4" if ip.version == 4 else "ipv6"
        for scope in ("lan", "wan"):
            service.tagged_addresses.setdefault(
                f"{scope}_{family}", {"Address": service.address, "Port": service.port}
            )

    # Saving and loading what came from the HTTP API

    def _snapshot(self) -> dict[str, Any]:
        services = [
            {name: value for name, value in dataclasses.asdict(service).items() if name != "source"}
            for service in self.services.values()
            if service.source is ConfigSource.REMOTE
        ]
        checks = []
        for check in self.checks.values():
            if check.source is not ConfigSource.REMOTE:
                continue
            entry = {
                "id": check.id,
                "name": check.name,
                "notes": check.notes,
                "service_id": check.service_id,
                "definition": dataclasses.asdict(check.definition),
            }
            if check.definition.kind is CheckKind.TTL or check.is_maintenance:
                entry["status"] = check.status.value
                entry["output"] = check.output
            checks.append(entry)
        return {"format": PERSIST_FORMAT, "services": services, "checks": checks}

    def _schedule_save(self) -> None:
        if self.persist_path is None:
            return
        snapshot = self._snapshot()
        if snapshot == self._saved:
            return
        self._saved = snapshot
        self._save_pending = snapshot
        if self._save_task is None or self._save_task.done():
            self._save_task = asyncio.get_running_loop().create_task(self._save_loop(), name="registry-save")

    async def _save_loop(self) -> None:
        while self._save_pending is not None:
            snapshot, self._save_pending = self._save_pending, None
            # The wall clock, because TTLs must run on across a restart of the agent.
            snapshot = {**snapshot, "saved_at": time.time()}
            try:
                await asyncio.to_thread(_write_atomically, self.persist_path, orjson.dumps(snapshot))
            except OSError as exc:
                log.error("agent registry not saved node=%s path=%s: %s", self.node.name, self.persist_path, exc)

    async def _load(self) -> None:
        if self.persist_path is None:
            return
        try:
            raw = await asyncio.to_thread(self.persist_path.read_bytes)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("agent registry not loaded node=%s path=%s: %s", self.node.name, self.persist_path, exc)
            return
        try:
            saved = orjson.loads(raw)
            self._restore(saved)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("agent registry file is invalid and was ignored node=%s path=%s: %s",
                      self.node.name, self.persist_path, exc)
            return
        self._saved = self._snapshot()
        log.info("agent registry loaded node=%s services=%d checks=%d path=%s",
                 self.node.name, len(saved["services"]), len(saved["checks"]), self.persist_path)

    def _restore(self, saved: dict[str, Any]) -> None:
        if saved.get("format") != PERSIST_FORMAT:
            raise ValueError(f"unsupported format {saved.get('format')!r}, expected {PERSIST_FORMAT}")
        elapsed = max(0.0, time.time() - saved["saved_at"])
        for fields in saved["services"]:
            service = LocalService(**fields, source=ConfigSource.REMOTE)
            self.services[service.id] = service
        for fields in saved["checks"]:
            definition_fields = dict(fields["definition"])
            definition_fields["kind"] = CheckKind(definition_fields["kind"])
            definition = CheckDefinition(**definition_fields)
            service = self.services.get(fields["service_id"]) if fields["service_id"] else None
            if fields["service_id"] and service is None:
                continue
            if definition.kind is CheckKind.SCRIPT and not self.config.enable_script_checks:
                log.warning("saved script check not loaded node=%s check=%s: script checks are disabled",
                            self.node.name, fields["id"])
                continue
            status = CheckStatus.CRITICAL
            output = ""
            # A TTL check keeps its status only while its TTL had not run out, as in Consul.
            if "status" in fields and (definition.kind is not CheckKind.TTL or elapsed < definition.ttl):
                status = CheckStatus(fields["status"])
                output = fields["output"]
            self.checks[fields["id"]] = LocalCheck(
                id=fields["id"],
                name=fields["name"],
                status=status,
                definition=definition,
                source=ConfigSource.REMOTE,
                output=output,
                notes=fields["notes"],
                service_id=service.id if service else "",
                service_name=service.name if service else "",
                critical_since=time.monotonic() if status is CheckStatus.CRITICAL else None,
            )

    # Catalog records

    def _catalog_service(self, service: LocalService) -> Service:
        return Service(
            node=self.node.name,
            id=service.id,
            name=service.name,
            address=service.address,
            port=service.port,
            tags=list(service.tags),
            meta=dict(service.meta),
            task_id=service.task_id,
            weights=dict(service.weights),
            tagged_addresses={tag: dict(entry) for tag, entry in service.tagged_addresses.items()},
            enable_tag_override=service.enable_tag_override,
        )

    def _catalog_check(self, check: LocalCheck) -> Check:
        definition = check.definition
        return Check(
            node=self.node.name,
            id=check.id,
            name=check.name,
            status=check.status,
            output=check.output,
            notes=check.notes,
            service_id=check.service_id,
            service_name=check.service_name,
            type=definition.kind.value,
            interval=format_duration(definition.interval) if definition.interval else "",
            timeout=format_duration(definition.timeout) if definition.timeout else "",
        )


def _write_atomically(path: Path, data: bytes) -> None:
    """Write a file through a temporary one and a rename, so a crash leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
