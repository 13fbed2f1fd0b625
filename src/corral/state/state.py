"""The domain state: KV entries, jobs, tasks and the catalog, stored through the store.

Every write goes to the store and then waits until the in-memory view has
applied its revision, so a caller always reads its own writes. Every read
comes from the view.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from corral.dns.server import DNSInstance
from corral.jobspec import Job
from corral.state import kvlocks, records
from corral.state.records import (
    AgentInfo,
    Check,
    FrameworkRecord,
    JobRecord,
    JobStatus,
    KVEntry,
    Node,
    Service,
    Session,
    Task,
    encode,
)
from corral.state.view import View
from corral.store import Compare, CompareOp, CompareTarget, Delete, Event, EventType, KeyValue, Put, Store, StoreError
from corral.types import CheckStatus, DesiredState

log = logging.getLogger(__name__)

# How many times a read-modify-write of one record is retried on a conflict.
_UPDATE_ATTEMPTS = 20


class ConflictError(StoreError):
    """A record changed under a read-modify-write more often than it could be retried."""


# Catalog


class CatalogError(ValueError):
    """A catalog registration that names a service the node does not have; the message is Consul's."""


class State:
    def __init__(self, store: Store, datacenter: str = "dc1"):
        self.store = store
        self.datacenter = datacenter
        self.view = View(store)
        # Lowercased service name -> store keys of its instances, so that a lookup of one
        # service reads its own instances instead of decoding the whole catalog.
        self._service_keys: dict[str, set[bytes]] = {}
        # Key -> monotonic deadline of its lock-delay. Kept in memory only, as Consul's
        # leader does: a restart forgets lock-delays.
        self.lock_delays: dict[str, float] = {}

    async def start(self) -> None:
        await self.view.start()
        self._service_keys.clear()
        for kv in self.view.range(records.SERVICES):
            self._service_keys.setdefault(_service_name(kv.value), set()).add(kv.key)
        self.view.add_listener(self._track_service_names)

    def _track_service_names(self, batch: list[Event]) -> None:
        """Keep the index of service keys by lowercased name current, renames and deletes included."""
        for event in batch:
            key = event.kv.key
            if not key.startswith(records.SERVICES):
                continue
            if event.prev_kv is not None:
                self._drop_service_key(_service_name(event.prev_kv.value), key)
            elif event.type is EventType.DELETE:
                for name in list(self._service_keys):
                    self._drop_service_key(name, key)
            if event.type is EventType.PUT:
                self._service_keys.setdefault(_service_name(event.kv.value), set()).add(key)

    def _drop_service_key(self, name: str, key: bytes) -> None:
        keys = self._service_keys.get(name)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._service_keys[name]

    async def stop(self) -> None:
        await self.view.stop()

    @property
    def index(self) -> int:
        return max(self.view.revision, 1)

    async def _commit(self, compares, success) -> bool:
        result = await self.store.txn(compares, success)
        # After a failed compare too: the caller retries from the view, which must
        # first show the write that made the compare fail.
        if result.revision > self.view.revision:
            await self.view.wait_for_revision(result.revision)
        return result.succeeded

    # Key/value

    def kv_get(self, key: str) -> KVEntry | None:
        kv = self.view.get(records.kv_key(key))
        if kv is None:
            return None
        return KVEntry.decode(key, kv.value, kv.create_revision, kv.mod_revision)

    def kv_list(self, prefix: str) -> list[KVEntry]:
        offset = len(records.KV)
        return [
            KVEntry.decode(kv.key[offset:].decode(), kv.value, kv.create_revision, kv.mod_revision)
            for kv in self.view.range(records.kv_key(prefix))
        ]

    def kv_index(self, key: str, recurse: bool = False) -> int:
        if not recurse:
            kv = self.view.get(records.kv_key(key))
            if kv is not None:
                return kv.mod_revision
        return self.view.index(records.kv_key(key))

    async def kv_put(self, key: str, value: bytes, flags: int = 0, cas: int | None = None) -> bool:
        store_key = records.kv_key(key)
        existing = self.kv_get(key)
        # As in Consul, a plain write keeps the lock holder (locks are advisory) and
        # sets LockIndex to 0, because Consul's set takes LockIndex from the request.
        entry = KVEntry(key, value, flags=flags)
        if existing is not None:
            entry.session = existing.session
            if _same_entry(existing, entry) and (cas is None or cas == existing.modify_index):
                # Consul skips a write that changes nothing, so no index moves and no watcher wakes.
                return True
        if cas is not None:
            compares = [_mod_revision_is(store_key, cas)]
        elif existing is None or not existing.session:
            # The key has no lock holder, and only an acquire can set one, which
            # bumps the key's lock marker. Comparing the marker instead of the key
            # lets concurrent plain writes of one key commit together.
            marker = records.kv_lock_key(key)
            marker_kv = self.view.get(marker)
            compares = [_mod_revision_is(marker, marker_kv.mod_revision if marker_kv else 0)]
        else:
            compares = [_mod_revision_is(store_key, existing.modify_index)]
        if await self._commit(compares, [Put(store_key, entry.encode())]):
            return True
        if cas is not None:
            return False
        # The lock fields changed between our read and our write: retry with the new ones.
        return await self.kv_put(key, value, flags)

    async def kv_lock(
        self, key: str, value: bytes, flags: int, session_id: str, acquire: bool
    ) -> bool:
        """Acquire or release the lock on `key` for a session, writing `value` with it.

        Returns False when the lock rules do not allow it; raises
        InvalidSessionError for an acquire through an unknown session.
        """
        store_key = records.kv_key(key)
        for _ in range(_UPDATE_ATTEMPTS):
            existing = self.kv_get(key)
            if acquire:
                outcome = kvlocks.acquire(
                    key, existing, value, flags, self.session(session_id), session_id,
                    self.lock_delay_remaining(key),
                )
            else:
                outcome = kvlocks.release(key, existing, value, flags, session_id)
            if outcome.entry is None:
                log.debug("kv lock not changed key=%s session=%s: %s", key, session_id, outcome.reason)
                return False
            compare = _mod_revision_is(store_key, existing.modify_index if existing else 0)
            compares = [compare]
            if acquire:
                # The session must still exist when the write lands.
                compares.append(_mod_revision_above(records.session_key(session_id), 0))
            ops = [Put(store_key, outcome.entry.encode())]
            if acquire:
                ops.append(Put(records.kv_lock_key(key), b""))
            if await self._commit(compares, ops):
                return True
        raise ConflictError(f"key {key} changed concurrently {_UPDATE_ATTEMPTS} times")

    # Sessions

    def session(self, session_id: str) -> Session | None:
        kv = self.view.get(records.session_key(session_id))
        return Session.decode(kv.value) if kv else None

    def sessions(self, node: str | None = None) -> list[Session]:
        found = [Session.decode(kv.value) for kv in self.view.range(records.SESSIONS)]
        return [session for session in found if node is None or session.node == node]

    def lock_delay_remaining(self, key: str) -> float:
        """Return the seconds left before `key` can be acquired again after its holder was invalidated."""
        deadline = self.lock_delays.get(key)
        if deadline is None:
            return 0.0
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            del self.lock_delays[key]
            return 0.0
        return remaining

    async def kv_delete(self, key: str, recurse: bool = False, cas: int | None = None) -> bool:
        store_key = records.kv_key(key)
        if cas is not None and not recurse and self.view.get(store_key) is None:
            # Consul's delete-cas of a missing key succeeds whatever the index.
            return True
        compares = [] if cas is None else [_mod_revision_is(store_key, cas)]
        return await self._commit(compares, [Delete(store_key, prefix=recurse)])

    async def wait_for_kv(self, key: str, index: int, timeout: float, recurse: bool = False) -> None:
        """Return once kv_index(key, recurse) exceeds `index`, or after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        prefixes = (records.kv_key(key),)
        while self.kv_index(key, recurse) <= index:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            if not await self.view.wait_for_next_change(prefixes, remaining):
                return

    # Jobs

    def job(self, name: str) -> JobRecord | None:
        kv = self.view.get(records.job_key(name))
        return JobRecord.decode(kv.value) if kv else None

    def jobs(self) -> list[JobRecord]:
        return [JobRecord.decode(kv.value) for kv in self.view.range(records.JOBS)]

    def job_status(self, name: str) -> JobStatus:
        kv = self.view.get(records.job_status_key(name))
        return JobStatus.decode(kv.value) if kv else JobStatus(name)

    async def submit_job(self, job: Job) -> JobRecord:
        """Store a job; a changed spec, or a stopped job run again, gets the next version."""
        spec = job.to_dict()
        key = records.job_key(job.name)
        for _ in range(_UPDATE_ATTEMPTS):
            kv = self.view.get(key)
            current = JobRecord.decode(kv.value) if kv else None
            if current is not None and current.spec == spec and not current.stopped:
                return current
            version = current.version + 1 if current else 1
            task_version = 1
            if current is not None:
                same_task = _without_count(current.spec) == _without_count(spec)
                task_version = current.task_version if same_task else current.task_version + 1
            record = JobRecord(job.name, spec, version, task_version, submitted_at=time.time())
            compare = _mod_revision_is(key, kv.mod_revision if kv else 0)
            if await self._commit([compare], [Put(key, encode(record))]):
                log.info("job submitted job=%s version=%d count=%d", job.name, version, job.count)
                return record
        raise ConflictError(f"job {job.name} changed concurrently {_UPDATE_ATTEMPTS} times; try again")

    async def stop_job(self, name: str) -> JobRecord | None:
        def mark(record: JobRecord) -> None:
            record.stopped = True

        record = await self._update(records.job_key(name), JobRecord.decode, mark)
        if record is not None:
            log.info("job stopped job=%s version=%d", name, record.version)
        return record

    async def put_job_status(self, status: JobStatus) -> bool:
        """Store the scheduler's status of a job; return whether it changed."""
        key = records.job_status_key(status.name)
        kv = self.view.get(key)
        if kv is not None and JobStatus.decode(kv.value) == status:
            return False
        if kv is None and not status.unplaced:
            return False
        await self._commit([], [Put(key, encode(status))])
        return True

    # Tasks

    def task(self, task_id: str) -> Task | None:
        kv = self.view.get(records.task_key(task_id))
        return Task.decode(kv.value) if kv else None

    def tasks(self, job: str | None = None, node: str | None = None) -> list[Task]:
        found = []
        for kv in self.view.range(records.TASKS):
            task = Task.decode(kv.value)
            if job is not None and task.job != job:
                continue
            if node is not None and task.node != node:
                continue
            found.append(task)
        return found

    async def put_tasks(self, tasks: Iterable[Task]) -> None:
        """Create or overwrite task records in one transaction."""
        now = time.time()
        ops = []
        for task in tasks:
            task.updated_at = now
            ops.append(Put(records.task_key(task.id), encode(task)))
        if ops:
            await self._commit([], ops)

    async def update_task(self, task_id: str, mutate: Callable[[Task], None]) -> Task | None:
        """Apply `mutate` to the current task record, retrying on conflicts; None if it is gone."""

        def stamped(task: Task) -> None:
            mutate(task)
            task.updated_at = time.time()

        return await self._update(records.task_key(task_id), Task.decode, stamped)

    async def delete_tasks(self, task_ids: Iterable[str]) -> None:
        ops = [Delete(records.task_key(task_id)) for task_id in task_ids]
        if ops:
            await self._commit([], ops)

    async def set_desired(self, task_ids: Iterable[str], desired: DesiredState) -> None:
        for task_id in task_ids:

            def change(task: Task) -> None:
                task.desired = desired

            await self.update_task(task_id, change)

    async def _update(self, key: bytes, decode, mutate):
        for _ in range(_UPDATE_ATTEMPTS):
            kv = self.view.get(key)
            if kv is None:
                return None
            record = decode(kv.value)
            mutate(record)
            if await self._commit([_mod_revision_is(key, kv.mod_revision)], [Put(key, encode(record))]):
                return record
        raise ConflictError(f"record {key.decode()} changed concurrently {_UPDATE_ATTEMPTS} times")

    # Agents

    def agents(self) -> list[AgentInfo]:
        return [AgentInfo.decode(kv.value) for kv in self.view.range(records.AGENTS)]

    async def register_agent(self, agent: AgentInfo) -> None:
        await self._commit([], [Put(records.agent_key(agent.node), encode(agent))])

    def agent(self, node: str) -> AgentInfo | None:
        kv = self.view.get(records.agent_key(node))
        return AgentInfo.decode(kv.value) if kv else None

    async def deregister_agent(self, node: str) -> bool:
        """Remove an agent's record, so that nothing new is placed on it; False when it had none."""
        key = records.agent_key(node)
        if self.view.get(key) is None:
            return False
        await self._commit([], [Delete(key)])
        return True

    # Frameworks

    def framework(self, framework_id: str) -> FrameworkRecord | None:
        kv = self.view.get(records.framework_key(framework_id))
        return FrameworkRecord.decode(kv.value) if kv else None

    def frameworks(self) -> list[FrameworkRecord]:
        return [FrameworkRecord.decode(kv.value) for kv in self.view.range(records.FRAMEWORKS)]

    async def put_framework(self, framework: FrameworkRecord) -> None:
        await self._commit([], [Put(records.framework_key(framework.id), encode(framework))])

    async def delete_framework(self, framework_id: str) -> bool:
        """Remove a framework's record; False when it had none. Its tasks' records stay."""
        key = records.framework_key(framework_id)
        if self.view.get(key) is None:
            return False
        await self._commit([], [Delete(key)])
        return True

    # Catalog

    def node(self, name: str) -> Node | None:
        kv = self.view.get(records.node_key(name))
        return Node.decode(kv.value) if kv else None

    def nodes(self) -> list[Node]:
        return [Node.decode(kv.value) for kv in self.view.range(records.NODES)]

    def services(self, node: str | None = None) -> list[Service]:
        prefix = records.SERVICES + (f"{node}/".encode() if node else b"")
        return [Service.decode(kv.value) for kv in self.view.range(prefix)]

    def checks(self, node: str | None = None) -> list[Check]:
        prefix = records.CHECKS + (f"{node}/".encode() if node else b"")
        return [Check.decode(kv.value) for kv in self.view.range(prefix)]

    def service(self, node: str, service_id: str) -> Service | None:
        kv = self.view.get(records.service_key(node, service_id))
        return Service.decode(kv.value) if kv else None

    def catalog_index(self) -> int:
        return max(self.view.index(records.SERVICES), self.view.index(records.NODES), 1)

    def health_index(self) -> int:
        return max(self.catalog_index(), self.view.index(records.CHECKS))

    async def register_node(self, node: Node, checks: Iterable[Check] = ()) -> None:
        ops = [Put(records.node_key(node.name), encode(node))]
        ops += [Put(records.check_key(node.name, check.id), encode(check)) for check in checks]
        await self._commit([], ops)

    async def register_service(self, service: Service, checks: Iterable[Check] = ()) -> None:
        """Register a service instance with its checks, keeping the status of unchanged checks."""
        ops = [Put(records.service_key(service.node, service.id), encode(service))]
        for check in checks:
            key = records.check_key(check.node, check.id)
            existing = self.view.get(key)
            if existing is not None:
                previous = Check.decode(existing.value)
                check.status, check.output = previous.status, previous.output
            ops.append(Put(key, encode(check)))
        await self._commit([], ops)
        log.info("catalog service registered node=%s service=%s id=%s port=%d",
                 service.node, service.name, service.id, service.port)

    async def deregister_service(self, node: str, service_id: str) -> bool:
        """Remove a service instance and the checks that belong to it."""
        if self.service(node, service_id) is None:
            return False
        ops = [Delete(records.service_key(node, service_id))]
        for check in self.checks(node):
            if check.service_id == service_id:
                ops.append(Delete(records.check_key(node, check.id)))
        await self._commit([], ops)
        log.info("catalog service deregistered node=%s id=%s", node, service_id)
        return True

    async def update_check(self, node: str, check_id: str, status: CheckStatus, output: str) -> bool:
        """Store a check's result if it changed; return False when the check is not registered."""
        key = records.check_key(node, check_id)
        kv = self.view.get(key)
        if kv is None:
            return False
        previous = Check.decode(kv.value).status

        def apply(check: Check) -> None:
            check.status, check.output = status, output

        if Check.decode(kv.value).output == output and previous is status:
            return True
        if await self._update(key, Check.decode, apply) is None:
            return False
        if previous is not status:
            log.info("check status changed node=%s check=%s from=%s to=%s",
                     node, check_id, previous.value, status.value)
        return True

    def service_instances_with_checks(self, name: str) -> list[tuple[Node, Service, list[Check]]]:
        """Return each instance of a service (matched case-insensitively) with its node and checks.

        The checks are the instance's own and its node's.
        """
        nodes: dict[str, Node | None] = {}
        checks_by_node: dict[str, list[Check]] = {}
        found = []
        for key in sorted(self._service_keys.get(name.lower(), ())):
            kv = self.view.get(key)
            if kv is None:
                continue
            service = Service.decode(kv.value)
            if service.node not in nodes:
                nodes[service.node] = self.node(service.node)
                checks_by_node[service.node] = self.checks(service.node)
            node = nodes[service.node]
            if node is None:
                continue
            checks = [
                check
                for check in checks_by_node[service.node]
                if check.service_id in ("", service.id)
            ]
            found.append((node, service, checks))
        return found

    # Catalog: Consul's /v1/catalog/register and /v1/catalog/deregister

    def find_node(self, name: str) -> Node | None:
        """Return the node named `name`, matched case-insensitively as Consul matches node names."""
        node = self.node(name)
        if node is not None:
            return node
        lowered = name.lower()
        for candidate in self.nodes():
            if candidate.name.lower() == lowered:
                return candidate
        return None

    async def register_catalog_entry(
        self, node: Node, service: Service | None, checks: list[Check], skip_node_update: bool = False
    ) -> bool:
        """Register a node, and optionally a service and checks on it, in one transaction.

        With `skip_node_update`, an existing node record is left as it is.
        Records equal to the stored ones are not rewritten, so their indexes
        do not move. Returns whether anything was written. Raises
        CatalogError when a check names a service the node does not have.
        """
        for _ in range(_UPDATE_ATTEMPTS):
            compares, ops = self._catalog_entry_ops(node, service, checks, skip_node_update)
            if not ops:
                return False
            if await self._commit(compares, ops):
                log.info(
                    "catalog entry registered node=%s service=%s checks=%d",
                    node.name, service.id if service else "-", len(checks),
                )
                return True
        raise ConflictError(f"catalog entries of node {node.name} changed concurrently {_UPDATE_ATTEMPTS} times")

    def _catalog_entry_ops(
        self, node: Node, service: Service | None, checks: list[Check], skip_node_update: bool
    ) -> tuple[list[Compare], list[Put]]:
        # Every key read here is compared at commit, so a concurrent deregistration
        # cannot leave a check without its service.
        compares: list[Compare] = []
        ops: list[Put] = []
        node_key = records.node_key(node.name)
        node_kv = self.view.get(node_key)
        compares.append(_mod_revision_is(node_key, node_kv.mod_revision if node_kv else 0))
        if node_kv is None or not skip_node_update:
            _put_if_changed(ops, node_key, node_kv, encode(node))

        registered: dict[str, Service] = {}
        if service is not None:
            key = records.service_key(node.name, service.id)
            kv = self.view.get(key)
            if kv is not None and not service.task_id:
                # A catalog write keeps the link to the task that corral runs for this instance.
                service.task_id = Service.decode(kv.value).task_id
            compares.append(_mod_revision_is(key, kv.mod_revision if kv else 0))
            _put_if_changed(ops, key, kv, encode(service))
            registered[service.id] = service

        for check in checks:
            if check.service_id:
                owner = registered.get(check.service_id)
                if owner is None:
                    key = records.service_key(node.name, check.service_id)
                    kv = self.view.get(key)
                    if kv is None:
                        raise CatalogError(
                            f'failed inserting check: Missing service registration on node "{node.name}"'
                        )
                    compares.append(_mod_revision_is(key, kv.mod_revision))
                    owner = Service.decode(kv.value)
                check.service_name = owner.name
            key = records.check_key(node.name, check.id)
            kv = self.view.get(key)
            compares.append(_mod_revision_is(key, kv.mod_revision if kv else 0))
            _put_if_changed(ops, key, kv, encode(check))
        return compares, ops

    async def deregister_node(self, name: str) -> bool:
        """Remove a node with its services, checks and sessions in one transaction.

        The SessionManager detects the deleted sessions and releases (or
        deletes) the locks they held. Returns False when the node is not registered.
        """
        key = records.node_key(name)
        if self.view.get(key) is None:
            return False
        sessions = self.sessions(node=name)
        ops = [
            Delete(records.SERVICES + f"{name}/".encode(), prefix=True),
            Delete(records.CHECKS + f"{name}/".encode(), prefix=True),
            *(Delete(records.session_key(session.id)) for session in sessions),
            Delete(key),
        ]
        await self._commit([], ops)
        for session in sessions:
            if session.lease:
                # The session key is gone already, so this only drops the lease.
                await self.store.revoke_lease(session.lease)
        log.info("catalog node deregistered node=%s sessions=%d", name, len(sessions))
        return True

    async def deregister_check(self, node: str, check_id: str) -> bool:
        """Remove one check; return False when it is not registered."""
        key = records.check_key(node, check_id)
        if self.view.get(key) is None:
            return False
        await self._commit([], [Delete(key)])
        log.info("catalog check deregistered node=%s check=%s", node, check_id)
        return True

    # Agent registry

    async def sync_agent_node(
        self, node: Node, services: list[Service], checks: list[Check], liveness_check: Check
    ) -> dict[str, int]:
        """Make the catalog entries of an agent's node equal to its local registry, in one write.

        Writes the node record when it differs, `liveness_check` (serfHealth)
        only when it is missing, and every service and check that differs from
        the stored one, then deletes this node's other services and checks
        (except the liveness check). Unchanged records are not rewritten, so
        their indexes do not move. Returns how many services and checks were
        written and removed.
        """
        ops: list[Put | Delete] = []
        node_key = records.node_key(node.name)
        stored_node = self.view.get(node_key)
        if stored_node is None or Node.decode(stored_node.value) != node:
            ops.append(Put(node_key, encode(node)))
        liveness_key = records.check_key(node.name, liveness_check.id)
        if self.view.get(liveness_key) is None:
            ops.append(Put(liveness_key, encode(liveness_check)))

        counts = {"services_written": 0, "services_removed": 0, "checks_written": 0, "checks_removed": 0}
        wanted_services = {records.service_key(node.name, service.id): service for service in services}
        for kv in self.view.range(records.SERVICES + f"{node.name}/".encode()):
            if kv.key not in wanted_services:
                ops.append(Delete(kv.key))
                counts["services_removed"] += 1
        for key, service in wanted_services.items():
            stored = self.view.get(key)
            if stored is None or Service.decode(stored.value) != service:
                ops.append(Put(key, encode(service)))
                counts["services_written"] += 1

        wanted_checks = {records.check_key(node.name, check.id): check for check in checks}
        for kv in self.view.range(records.CHECKS + f"{node.name}/".encode()):
            if kv.key not in wanted_checks and kv.key != liveness_key:
                ops.append(Delete(kv.key))
                counts["checks_removed"] += 1
        for key, check in wanted_checks.items():
            stored = self.view.get(key)
            if stored is None or Check.decode(stored.value) != check:
                ops.append(Put(key, encode(check)))
                counts["checks_written"] += 1

        if ops:
            await self._commit([], ops)
        return counts

    # The DNSCatalog protocol

    def service_instances(self, name: str, tag: str | None) -> list[DNSInstance]:
        """Return the instances DNS may return, each with the worst status of its checks.

        An instance with a critical or maintenance check, its own or its node's, is left out.
        """
        wanted_tag = tag.lower() if tag else None
        instances = []
        for node, service, checks in self.service_instances_with_checks(name):
            statuses = {check.status for check in checks}
            if CheckStatus.CRITICAL in statuses or CheckStatus.MAINTENANCE in statuses:
                continue
            if wanted_tag and wanted_tag not in (t.lower() for t in service.tags):
                continue
            status = CheckStatus.WARNING if CheckStatus.WARNING in statuses else CheckStatus.PASSING
            weights = (service.weights.get("Passing", 1), service.weights.get("Warning", 1))
            instances.append(
                DNSInstance(
                    node.name, node.address, service.address, service.port, tuple(service.tags), status, weights
                )
            )
        return instances

    def dns_node(self, name: str) -> Node | None:
        node = self.node(name)
        if node is not None:
            return node
        wanted = name.lower()
        for candidate in self.nodes():
            if candidate.name.lower() == wanted:
                return candidate
        return None

    def node_address(self, name: str) -> str | None:
        node = self.dns_node(name)
        return node.address if node is not None else None

    def watch_catalog(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` after each write to nodes, services or checks; return a function that stops it."""
        prefixes = (records.NODES, records.SERVICES, records.CHECKS)

        def on_batch(batch: list) -> None:
            if any(event.kv.key.startswith(prefixes) for event in batch):
                callback()

        self.view.add_listener(on_batch)
        return lambda: self.view.remove_listener(on_batch)


def _service_name(raw: bytes) -> str:
    return Service.decode(raw).name.lower()


def _without_count(spec: dict) -> dict:
    return {field: value for field, value in spec.items() if field != "count"}


def _same_entry(existing: KVEntry, entry: KVEntry) -> bool:
    """Tell whether writing `entry` would change nothing of `existing`, as Consul's DirEntry.Equal does."""
    return (
        existing.value == entry.value
        and existing.flags == entry.flags
        and existing.lock_index == entry.lock_index
        and existing.session == entry.session
    )


def _mod_revision_is(key: bytes, revision: int) -> Compare:
    return Compare(key, CompareTarget.MOD, CompareOp.EQUAL, revision)


def _mod_revision_above(key: bytes, revision: int) -> Compare:
    return Compare(key, CompareTarget.MOD, CompareOp.GREATER, revision)


# Catalog


def _put_if_changed(ops: list[Put], key: bytes, current: KeyValue | None, value: bytes) -> None:
    if current is None or current.value != value:
        ops.append(Put(key, value))
