"""Consul sessions: creation, renewal and the invalidation that releases their locks.

A session with a TTL is stored on a store lease of that TTL, so the store
deletes its key when it is not renewed in time (after the TTL, within the
store's lease check interval). However a session ends (destroyed, TTL
expired, its node deregistered, or one of its checks critical or
deregistered), the same invalidation follows: every lock it holds is
released (behavior "release") or its key deleted (behavior "delete"), and
each of those keys enters the session's lock-delay.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from corral.duration import format_duration, parse_duration
from corral.state import records
from corral.state.records import Check, KVEntry, Session, encode
from corral.state.state import State
from corral.store import Compare, CompareOp, CompareTarget, Delete, Event, EventType, Put, StoreError
from corral.types import CheckStatus, SessionBehavior

log = logging.getLogger(__name__)

DEFAULT_LOCK_DELAY = 15.0
MAX_LOCK_DELAY = 60.0
MIN_TTL = 10.0
MAX_TTL = 86400.0
# Consul reads a bare LockDelay number below this as seconds, and above it as nanoseconds.
_LOCK_DELAY_SECONDS_THRESHOLD = 1000
SERF_HEALTH_ID = "serfHealth"
_INVALIDATE_ATTEMPTS = 20
# How many times a session create is tried again after a check of its node changed under it.
_CREATE_ATTEMPTS = 20


class SessionError(Exception):
    """A session request that Consul rejects; `status` is the HTTP status Consul returns for it."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class SessionRequest:
    """The validated body of a session create request."""

    name: str
    node: str
    checks: list[str]
    service_checks: list[str]
    behavior: SessionBehavior
    lock_delay: float
    ttl: float


def parse_lock_delay(value: object) -> float:
    """Read LockDelay as Consul does: a duration string, or a bare number (seconds below 1000, else ns)."""
    if isinstance(value, bool):
        raise SessionError(f"Invalid LockDelay {value!r}: expected a duration such as \"15s\"", 400)
    if isinstance(value, (int, float)):
        seconds = float(value) if value < _LOCK_DELAY_SECONDS_THRESHOLD else value / 1e9
    elif isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise SessionError(f"Invalid LockDelay {value!r}: {exc}", 400) from None
    else:
        raise SessionError(f"Invalid LockDelay {value!r}: expected a duration such as \"15s\"", 400)
    if seconds < 0:
        raise SessionError(f"Invalid LockDelay {value!r}: must not be negative", 400)
    return min(seconds, MAX_LOCK_DELAY)


def parse_ttl(value: object) -> float:
    """Read TTL: "" or "0s" means none; otherwise a duration from 10s to 24h."""
    if value in (None, "", "0", 0):
        return 0.0
    if not isinstance(value, str):
        raise SessionError(f"Invalid Session TTL {value!r}: expected a duration string such as \"30s\"")
    try:
        ttl = parse_duration(value)
    except ValueError as exc:
        raise SessionError(f"Invalid Session TTL '{value}': {exc}") from None
    if ttl == 0:
        return 0.0
    if not MIN_TTL <= ttl <= MAX_TTL:
        # The range as Go prints time.Duration values, which clients may match on.
        raise SessionError(f"Invalid Session TTL '{value}', must be between [10s=24h0m0s]")
    return ttl


def _string_list(value: object, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise SessionError(f"Invalid {field} {value!r}: expected a list of check IDs", 400)
    return list(value)


def _service_check_ids(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SessionError(f"Invalid ServiceChecks {value!r}: expected a list of {{\"ID\": ...}} objects", 400)
    ids = []
    for item in value:
        fields = {str(key).lower(): field for key, field in item.items()} if isinstance(item, dict) else {}
        if not isinstance(fields.get("id"), str):
            raise SessionError(f"Invalid ServiceChecks entry {item!r}: expected {{\"ID\": \"check id\"}}", 400)
        ids.append(fields["id"])
    return ids


def parse_session_request(body: dict, default_node: str) -> SessionRequest:
    """Validate a create body; field names are matched case-insensitively, as Go's JSON decoder does."""
    fields = {key.lower(): value for key, value in body.items()}
    name = fields.get("name") or ""
    if not isinstance(name, str):
        raise SessionError(f"Invalid Name {name!r}: expected a string", 400)
    node = fields.get("node") or default_node
    if not isinstance(node, str):
        raise SessionError(f"Invalid Node {node!r}: expected a node name", 400)
    behavior_text = fields.get("behavior") or SessionBehavior.RELEASE.value
    try:
        behavior = SessionBehavior(behavior_text)
    except ValueError:
        raise SessionError(f"Invalid Behavior setting '{behavior_text}': expected release or delete", 400) from None
    lock_delay = DEFAULT_LOCK_DELAY
    if fields.get("lockdelay") is not None:
        lock_delay = parse_lock_delay(fields["lockdelay"])
    # As in Consul, naming any of these fields drops the default serfHealth check, even
    # when its value is null: {"Checks": null} makes a session that no check ends.
    given = [field for field in ("checks", "nodechecks", "servicechecks") if field in fields]
    checks = _string_list(fields.get("checks"), "Checks") + _string_list(fields.get("nodechecks"), "NodeChecks")
    service_checks = _service_check_ids(fields.get("servicechecks"))
    if not given:
        checks = [SERF_HEALTH_ID]
    return SessionRequest(
        name=name,
        node=node,
        checks=list(dict.fromkeys(checks)),
        service_checks=list(dict.fromkeys(service_checks)),
        behavior=behavior,
        lock_delay=lock_delay,
        ttl=parse_ttl(fields.get("ttl")),
    )


def session_to_api(state: State, session: Session) -> dict:
    kv = state.view.get(records.session_key(session.id))
    create, modify = (kv.create_revision, kv.mod_revision) if kv else (0, 0)
    return {
        "ID": session.id,
        "Name": session.name,
        "Node": session.node,
        "Checks": session.checks + session.service_checks,
        "NodeChecks": session.checks,
        "ServiceChecks": [{"ID": check_id, "Namespace": ""} for check_id in session.service_checks] or None,
        "LockDelay": int(round(session.lock_delay * 1e9)),
        "Behavior": session.behavior.value,
        "TTL": format_duration(session.ttl) if session.ttl else "",
        "Namespace": "default",
        "CreateIndex": create,
        "ModifyIndex": modify,
    }


class SessionManager:
    def __init__(self, state: State):
        self.state = state
        self._pending: set[asyncio.Task] = set()
        self._started = False
        # KV key -> the session holding its lock, and session -> the keys it holds, kept
        # from the view's events so that ending a session reads only its own keys instead
        # of decoding every KV entry. None until start() builds it from the view.
        self._holder_of: dict[str, str] | None = None
        self._held_by: dict[str, set[str]] = {}

    async def start(self) -> None:
        """Follow the view for ended sessions, then clean up locks left by sessions that ended while down."""
        if self._started:
            return
        self._started = True
        # No await between the build and the listener, so no view change falls between them.
        self._index_holders()
        self.state.view.add_listener(self._on_change)
        await self._release_orphan_locks()

    async def stop(self) -> None:
        self._started = False
        self.state.view.remove_listener(self._on_change)
        self._holder_of = None
        self._held_by = {}
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    # Requests

    async def create(self, request: SessionRequest) -> Session:
        """Store a new session, or raise SessionError with Consul's text for what it names wrongly.

        A check whose output changes while the session is written makes the commit
        fail, so the checks are read again and the write retried: only a missing
        node or check, or a critical check, fails the request.
        """
        state = self.state
        # Node names match case-insensitively, as in Consul. The session keeps the stored
        # spelling, because invalidation finds a node's sessions by its exact name.
        node = state.find_node(request.node)
        session = Session(
            id=str(uuid.uuid4()),
            name=request.name,
            node=node.name if node is not None else request.node,
            checks=request.checks,
            service_checks=request.service_checks,
            behavior=request.behavior,
            lock_delay=request.lock_delay,
            ttl=request.ttl,
        )
        # Validate before a lease is granted, so that a request naming a missing node or
        # check, or a critical check, changes nothing in the store.
        self._create_compares(session)
        if session.ttl:
            session.lease = await state.store.grant_lease(session.ttl)
        try:
            await self._write_new(session)
        except BaseException:
            if session.lease:
                await state.store.revoke_lease(session.lease)
            raise
        log.info(
            "session created session=%s node=%s name=%r ttl=%s behavior=%s lock_delay=%s",
            session.id, session.node, session.name, format_duration(session.ttl) if session.ttl else "none",
            session.behavior.value, format_duration(session.lock_delay),
        )
        return session

    async def _write_new(self, session: Session) -> None:
        state = self.state
        for attempt in range(1, _CREATE_ATTEMPTS + 1):
            # The checks are validated and their revisions taken from one reading of
            # the view, with no await between, so the compares guard what was validated.
            compares = self._create_compares(session)
            put = Put(records.session_key(session.id), encode(session), lease=session.lease)
            if await state._commit(compares, [put]):
                return
            log.debug("session create conflict session=%s node=%s attempt=%d", session.id, session.node, attempt)
        raise SessionError(
            f"Node '{session.node}' or its checks changed {_CREATE_ATTEMPTS} times while the session "
            "was created; retry"
        )

    def _create_compares(self, session: Session) -> list[Compare]:
        """Validate the session's node and checks in the view; return the compares that keep them so."""
        state = self.state
        node = state.node(session.node)
        if node is None:
            raise SessionError(f"Missing node registration for '{session.node}'")
        compares = [Compare(records.node_key(node.name), CompareTarget.MOD, CompareOp.GREATER, 0)]
        for check_id in session.checks + session.service_checks:
            check_key = records.check_key(node.name, check_id)
            current = state.view.get(check_key)
            if current is None:
                raise SessionError(f"Missing check '{check_id}' registration")
            if Check.decode(current.value).status is CheckStatus.CRITICAL:
                raise SessionError(f"Check '{check_id}' is in critical state")
            compares.append(Compare(check_key, CompareTarget.MOD, CompareOp.EQUAL, current.mod_revision))
        return compares

    async def renew(self, session_id: str) -> Session | None:
        """Restart a session's TTL; return None when the session does not exist."""
        session = self.state.session(session_id)
        if session is None:
            return None
        if session.lease:
            try:
                await self.state.store.keep_alive(session.lease)
            except StoreError:
                # The lease ran out between the read and the renewal.
                return None
        return session

    async def destroy(self, session_id: str) -> None:
        """End a session and release its locks; a session that does not exist is not an error."""
        session = self.state.session(session_id)
        if session is None:
            return
        await self._invalidate(session, "destroyed")

    # Invalidation

    def _on_change(self, batch: list[Event]) -> None:
        # The holder index takes the whole batch first, so that a session deleted together
        # with the release of its locks is seen holding none.
        for event in batch:
            if event.kv.key.startswith(records.KV):
                self._update_holder(event)
        if not self._started:
            return
        for event in batch:
            key = event.kv.key
            if key.startswith(records.SESSIONS):
                if event.type is EventType.DELETE and event.prev_kv is not None:
                    session = Session.decode(event.prev_kv.value)
                    if self._holds_locks(session.id):
                        self._schedule(session, "its TTL expired or it was removed")
            elif key.startswith(records.CHECKS):
                self._on_check_change(event)
            elif key.startswith(records.NODES) and event.type is EventType.DELETE:
                node = key[len(records.NODES):].decode()
                for session in self.state.sessions(node=node):
                    self._schedule(session, f"node {node} was deregistered")

    def _on_check_change(self, event: Event) -> None:
        node, _, check_id = event.kv.key[len(records.CHECKS):].decode().partition("/")
        if event.type is EventType.PUT:
            if Check.decode(event.kv.value).status is not CheckStatus.CRITICAL:
                return
            reason = f"check {check_id} on node {node} is critical"
        else:
            reason = f"check {check_id} on node {node} was deregistered"
        for session in self.state.sessions(node=node):
            if check_id in session.checks or check_id in session.service_checks:
                self._schedule(session, reason)

    # The index of lock holders

    def _index_holders(self) -> None:
        self._holder_of = {}
        self._held_by = {}
        offset = len(records.KV)
        for kv in self.state.view.range(records.KV):
            key = kv.key[offset:].decode()
            session_id = KVEntry.decode(key, kv.value, 0, 0).session
            if session_id:
                self._holder_of[key] = session_id
                self._held_by.setdefault(session_id, set()).add(key)

    def _update_holder(self, event: Event) -> None:
        if self._holder_of is None:
            return
        key = event.kv.key[len(records.KV):].decode()
        previous = self._holder_of.pop(key, None)
        if previous is not None:
            keys = self._held_by.get(previous)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._held_by[previous]
        if event.type is EventType.PUT:
            session_id = KVEntry.decode(key, event.kv.value, 0, 0).session
            if session_id:
                self._holder_of[key] = session_id
                self._held_by.setdefault(session_id, set()).add(key)

    def _held_entries(self, session_id: str) -> list[KVEntry]:
        """Return the KV entries whose lock `session_id` holds, as the view has them now."""
        if self._holder_of is None:
            return [entry for entry in self.state.kv_list("") if entry.session == session_id]
        entries = []
        for key in sorted(self._held_by.get(session_id, ())):
            entry = self.state.kv_get(key)
            if entry is not None and entry.session == session_id:
                entries.append(entry)
        return entries

    def _holds_locks(self, session_id: str) -> bool:
        return bool(self._held_entries(session_id))

    def _schedule(self, session: Session, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._invalidate(session, reason))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _invalidate(self, session: Session, reason: str) -> None:
        """Delete the session and release (or delete) its locks in one transaction."""
        state = self.state
        for _ in range(_INVALIDATE_ATTEMPTS):
            compares = []
            ops: list[Put | Delete] = []
            session_key = records.session_key(session.id)
            current = state.view.get(session_key)
            if current is not None:
                compares.append(Compare(session_key, CompareTarget.MOD, CompareOp.EQUAL, current.mod_revision))
                ops.append(Delete(session_key))
            held = self._held_entries(session.id)
            for entry in held:
                store_key = records.kv_key(entry.key)
                compares.append(Compare(store_key, CompareTarget.MOD, CompareOp.EQUAL, entry.modify_index))
                if session.behavior is SessionBehavior.DELETE:
                    ops.append(Delete(store_key))
                else:
                    released = KVEntry(entry.key, entry.value, flags=entry.flags, lock_index=entry.lock_index)
                    ops.append(Put(store_key, released.encode()))
            if not ops:
                return
            if session.lock_delay > 0:
                deadline = time.monotonic() + session.lock_delay
                for entry in held:
                    state.lock_delays[entry.key] = deadline
            try:
                committed = await state._commit(compares, ops)
            except StoreError as exc:
                log.error("session invalidation failed session=%s: %s", session.id, exc)
                return
            if committed:
                log.info(
                    "session invalidated session=%s node=%s locks=%d behavior=%s: %s",
                    session.id, session.node, len(held), session.behavior.value, reason,
                )
                if current is not None and session.lease:
                    await state.store.revoke_lease(session.lease)
                return
        log.error("session invalidation gave up after %d conflicts session=%s", _INVALIDATE_ATTEMPTS, session.id)

    async def _release_orphan_locks(self) -> None:
        """Release locks whose session no longer exists, left by a stop between expiry and release."""
        orphans = {session_id for session_id in self._held_by if self.state.session(session_id) is None}
        for session_id in orphans:
            # The session record is gone, so its behavior is unknown: release, the safe default.
            orphan = Session(session_id, "", "", [], SessionBehavior.RELEASE, lock_delay=0.0)
            await self._invalidate(orphan, "its session ended while the server was down")
