"""Consul's lock rules for KV entries, as pure functions shared by `?acquire`, `?release` and /v1/txn.

A lock is advisory: a plain write ignores it. Acquiring an unlocked key
with a valid session bumps LockIndex and sets Session; the holder may
acquire again to update the value without bumping LockIndex. Releasing
clears Session and keeps LockIndex. A key whose holder's session was
invalidated cannot be acquired until its lock-delay ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.state.records import KVEntry, Session


class InvalidSessionError(Exception):
    """An acquire or release named a session that does not exist.

    Consul answers this with 500 and the text `invalid session "ID"`, which
    client libraries such as python-consul and Patroni match on.
    """

    def __init__(self, session_id: str):
        # Consul rejects an empty session with "missing session" before it looks the session up.
        super().__init__(f'invalid session "{session_id}"' if session_id else "missing session")
        self.session_id = session_id


@dataclass(frozen=True, slots=True)
class LockOutcome:
    """The entry to store, or None with the reason the lock operation did not apply."""

    entry: KVEntry | None
    reason: str = ""


def acquire(
    key: str,
    existing: KVEntry | None,
    value: bytes,
    flags: int,
    session: Session | None,
    session_id: str,
    lock_delay_remaining: float,
) -> LockOutcome:
    """Apply Consul's acquire rules; raise InvalidSessionError for an unknown session."""
    if session is None:
        raise InvalidSessionError(session_id)
    if existing is not None and existing.session == session_id:
        return LockOutcome(
            KVEntry(key, value, flags=flags, lock_index=existing.lock_index, session=session_id)
        )
    if existing is not None and existing.session:
        return LockOutcome(None, f"key {key!r} is locked by session {existing.session}")
    if lock_delay_remaining > 0:
        return LockOutcome(
            None, f"key {key!r} is in its lock-delay for {lock_delay_remaining:.3f}s more"
        )
    lock_index = existing.lock_index + 1 if existing is not None else 1
    return LockOutcome(KVEntry(key, value, flags=flags, lock_index=lock_index, session=session_id))


def release(key: str, existing: KVEntry | None, value: bytes, flags: int, session_id: str) -> LockOutcome:
    """Apply Consul's release rules: only the holding session can release, even a stale one.

    Raises InvalidSessionError for an empty session id, as Consul fails such an unlock.
    """
    if not session_id:
        raise InvalidSessionError(session_id)
    if existing is None:
        return LockOutcome(None, f"key {key!r} does not exist")
    if existing.session != session_id:
        holder = existing.session or "no session"
        return LockOutcome(None, f"key {key!r} is locked by {holder}, not by session {session_id}")
    return LockOutcome(KVEntry(key, value, flags=flags, lock_index=existing.lock_index, session=""))
