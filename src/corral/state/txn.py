"""Consul's KV transactions, the operations of `/v1/txn`, applied as one store transaction.

The operations run in order against an overlay of the in-memory view. The
overlay contains what earlier operations of the same transaction wrote, and
every key whose committed state an operation reads is recorded with the
modify revision seen (0 when absent). As in Consul, a failing operation
does not stop the others, so that every failure is reported, and then
nothing is written.

When every operation succeeds, the writes go to the store in one
transaction whose compares cover each recorded key. A write that races in
between the read and the commit fails the compares, and the whole
transaction is evaluated again on the newer view, at most
`COMMIT_ATTEMPTS` times. A get-tree in a writing transaction reads through
the store transaction itself, so that keys created under its prefix by a
racing write are in its results. A delete-tree deletes the prefix in the
store transaction, so that such keys are deleted too.

A transaction without writing verbs never reaches the store: the view does
not change while the operations read it, so every read sees one revision.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from corral.state import kvlocks, records
from corral.state.records import KVEntry, Session
from corral.state.state import ConflictError, State
from corral.store import Compare, CompareOp, CompareTarget, Delete, Get, KeyValue, Put, TxnResult
from corral.store.base import Operation

log = logging.getLogger(__name__)

# How many times a transaction is evaluated again after a racing write failed its commit.
COMMIT_ATTEMPTS = 20

# The create or modify index of an entry written by this transaction: the
# store revision it commits at, known only after the commit.
_PENDING = -1


class KVVerb(enum.StrEnum):
    """The verbs of a KV operation, spelled as Consul's API spells them."""

    SET = "set"
    CAS = "cas"
    LOCK = "lock"
    UNLOCK = "unlock"
    GET = "get"
    GET_TREE = "get-tree"
    GET_OR_EMPTY = "get-or-empty"
    CHECK_INDEX = "check-index"
    CHECK_SESSION = "check-session"
    CHECK_NOT_EXISTS = "check-not-exists"
    DELETE = "delete"
    DELETE_TREE = "delete-tree"
    DELETE_CAS = "delete-cas"

    @property
    def writes(self) -> bool:
        """Whether Consul routes a transaction with this verb as a write."""
        return self in _WRITING_VERBS


_WRITING_VERBS = frozenset(
    {
        KVVerb.SET,
        KVVerb.CAS,
        KVVerb.LOCK,
        KVVerb.UNLOCK,
        KVVerb.DELETE,
        KVVerb.DELETE_TREE,
        KVVerb.DELETE_CAS,
    }
)


@dataclass(frozen=True, slots=True)
class KVOp:
    """One KV operation of a transaction.

    `index` is the expected ModifyIndex for cas, check-index and delete-cas.
    """

    verb: KVVerb
    key: str
    value: bytes = b""
    flags: int = 0
    index: int = 0
    session: str = ""


@dataclass(frozen=True, slots=True)
class TxnError:
    """The reason the operation at `op_index` failed, in Consul's words."""

    op_index: int
    what: str


@dataclass(slots=True)
class TxnOutcome:
    """The result of a transaction.

    `results` lists the entries Consul returns, in operation order, with an
    empty value where Consul returns `Value: null`. It is empty when
    `errors` is not. `index` is the revision the transaction committed at,
    or the view's revision when nothing was committed.
    """

    results: list[KVEntry]
    errors: list[TxnError]
    index: int
    read_only: bool


class _OperationFailed(Exception):
    """An operation failed, and the message is the `What` of Consul's error."""


@dataclass(frozen=True, slots=True)
class _TreeRead:
    """A get-tree result that comes from the store's reply to the Get at `position`."""

    position: int


async def apply_kv_txn(state: State, ops: Sequence[KVOp]) -> TxnOutcome:
    """Apply `ops` atomically: all of them, or none when any fails.

    Raises ConflictError when racing writes fail the commit
    COMMIT_ATTEMPTS times in a row.
    """
    read_only = not any(op.verb.writes for op in ops)
    # Consul checks lock-delays before it applies anything, and reports only these then.
    delayed = _lock_delay_errors(state, ops)
    if delayed:
        return TxnOutcome([], delayed, state.index, read_only)
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        evaluation = _Evaluation(state, read_only)
        errors = evaluation.run(ops)
        # Writing verbs that change nothing leave no store operation, and then
        # nothing needs committing: the view did not change while they were evaluated.
        if errors or read_only or not evaluation.store_ops:
            results = [] if errors else evaluation.results_at(None)
            return TxnOutcome(results, errors, state.index, read_only)
        result = await state.store.txn(evaluation.compares(), evaluation.store_ops)
        # On success this is our own revision, and on a conflict one that includes the racing write.
        await state.view.wait_for_revision(result.revision)
        if result.succeeded:
            return TxnOutcome(evaluation.results_at(result), [], result.revision, False)
        log.debug("kv txn conflict ops=%d attempt=%d revision=%d", len(ops), attempt, result.revision)
    raise ConflictError(f"kv transaction of {len(ops)} operations lost {COMMIT_ATTEMPTS} commit races")


def _lock_delay_errors(state: State, ops: Sequence[KVOp]) -> list[TxnError]:
    return [
        TxnError(i, f"failed to lock key {_quote(op.key)} due to lock delay")
        for i, op in enumerate(ops)
        if op.verb is KVVerb.LOCK and state.lock_delay_remaining(op.key) > 0
    ]


class _Evaluation:
    """One pass over the operations: the overlay, the reads to compare and the store writes."""

    def __init__(self, state: State, read_only: bool):
        self.state = state
        self.read_only = read_only
        self.written: dict[str, KVEntry | None] = {}
        self.deleted_prefixes: list[str] = []
        self.seen: dict[bytes, int] = {}
        self.store_ops: list[Operation] = []
        self.results: list[KVEntry | _TreeRead] = []

    def run(self, ops: Sequence[KVOp]) -> list[TxnError]:
        errors = []
        for i, op in enumerate(ops):
            try:
                _HANDLERS[op.verb](self, op)
            except _OperationFailed as exc:
                errors.append(TxnError(i, str(exc)))
        return errors

    # Reads

    def entry(self, key: str) -> KVEntry | None:
        """Return the entry as earlier operations left it, recording any read of committed state."""
        if key in self.written:
            return self.written[key]
        if any(key.startswith(prefix) for prefix in self.deleted_prefixes):
            return None
        entry = self.state.kv_get(key)
        self.seen.setdefault(records.kv_key(key), entry.modify_index if entry else 0)
        return entry

    def session(self, session_id: str) -> Session | None:
        key = records.session_key(session_id)
        kv = self.state.view.get(key)
        self.seen.setdefault(key, kv.mod_revision if kv else 0)
        return Session.decode(kv.value) if kv else None

    def read_tree(self, prefix: str) -> None:
        if self.read_only:
            self.results.extend(self.state.kv_list(prefix))
            return
        self.results.append(_TreeRead(len(self.store_ops)))
        self.store_ops.append(Get(records.kv_key(prefix), prefix=True))

    # Writes

    def put(self, entry: KVEntry) -> None:
        self.written[entry.key] = entry
        self.store_ops.append(Put(records.kv_key(entry.key), entry.encode()))

    def delete(self, key: str) -> None:
        self.written[key] = None
        self.store_ops.append(Delete(records.kv_key(key)))

    def delete_tree(self, prefix: str) -> None:
        for key in self.written:
            if key.startswith(prefix):
                self.written[key] = None
        self.deleted_prefixes.append(prefix)
        self.store_ops.append(Delete(records.kv_key(prefix), prefix=True))

    # Results

    def add_result(self, entry: KVEntry, with_value: bool) -> None:
        self.results.append(dataclasses.replace(entry, value=entry.value if with_value else b""))

    def compares(self) -> list[Compare]:
        return [
            Compare(key, CompareTarget.MOD, CompareOp.EQUAL, revision)
            for key, revision in self.seen.items()
        ]

    def results_at(self, result: TxnResult | None) -> list[KVEntry]:
        """Return the results with the revision of the commit in place of pending indexes."""
        revision = result.revision if result is not None else _PENDING
        entries = []
        for item in self.results:
            if isinstance(item, _TreeRead):
                assert result is not None, "a read-only transaction reads trees from the view"
                entries.extend(_decode(kv) for kv in result.responses[item.position])
                continue
            if item.create_index == _PENDING:
                item.create_index = revision
            if item.modify_index == _PENDING:
                item.modify_index = revision
            entries.append(item)
        return entries


def _decode(kv: KeyValue) -> KVEntry:
    key = kv.key[len(records.KV) :].decode()
    return KVEntry.decode(key, kv.value, kv.create_revision, kv.mod_revision)


def _quote(text: str) -> str:
    """Quote a key or session id as Go's %q does for the texts Consul formats with it."""
    return orjson.dumps(text).decode()


def _index_matches(existing: KVEntry | None, index: int) -> bool:
    """Apply Consul's check-and-set rule: index 0 means absent, else the ModifyIndex must match."""
    if index == 0:
        return existing is None
    return existing is not None and existing.modify_index == index


def _written(existing: KVEntry | None, entry: KVEntry) -> KVEntry:
    """Stamp an entry about to be written with its indexes: the create index is kept if it exists."""
    entry.create_index = existing.create_index if existing is not None else _PENDING
    entry.modify_index = _PENDING
    return entry


# One handler per verb. Each reads and writes through the evaluation and
# raises _OperationFailed with Consul's text when the operation fails.


def _set(evaluation: _Evaluation, op: KVOp) -> None:
    existing = evaluation.entry(op.key)
    # As State.kv_put for /v1/kv: Consul's set keeps the Session and takes LockIndex from
    # the request, which has none, so 0.
    entry = KVEntry(op.key, op.value, flags=op.flags)
    if existing is not None:
        entry.session = existing.session
        if _unchanged(existing, entry):
            # Consul skips a write that changes nothing and returns the stored indexes.
            evaluation.add_result(existing, with_value=False)
            return
    evaluation.put(_written(existing, entry))
    evaluation.add_result(entry, with_value=False)


def _unchanged(existing: KVEntry, entry: KVEntry) -> bool:
    """Tell whether writing `entry` would change nothing of `existing`, as Consul's DirEntry.Equal does."""
    return (
        existing.value == entry.value
        and existing.flags == entry.flags
        and existing.lock_index == entry.lock_index
        and existing.session == entry.session
    )


def _cas(evaluation: _Evaluation, op: KVOp) -> None:
    if not _index_matches(evaluation.entry(op.key), op.index):
        raise _OperationFailed(f"failed to set key {_quote(op.key)}, index is stale")
    _set(evaluation, op)


def _lock(evaluation: _Evaluation, op: KVOp) -> None:
    if not op.session:
        raise _OperationFailed("missing session")
    session = evaluation.session(op.session)
    existing = evaluation.entry(op.key)
    try:
        # The lock-delay was checked before any operation ran, as Consul does.
        outcome = kvlocks.acquire(op.key, existing, op.value, op.flags, session, op.session, 0.0)
    except kvlocks.InvalidSessionError as exc:
        raise _OperationFailed(str(exc)) from None
    if outcome.entry is None:
        raise _OperationFailed(f"failed to lock key {_quote(op.key)}, lock is already held")
    evaluation.put(_written(existing, outcome.entry))
    # Plain writes of an unlocked key compare this marker; see State.kv_put.
    evaluation.store_ops.append(Put(records.kv_lock_key(op.key), b""))
    evaluation.add_result(outcome.entry, with_value=False)


def _unlock(evaluation: _Evaluation, op: KVOp) -> None:
    if not op.session:
        raise _OperationFailed("missing session")
    existing = evaluation.entry(op.key)
    outcome = kvlocks.release(op.key, existing, op.value, op.flags, op.session)
    if outcome.entry is None:
        raise _OperationFailed(
            f"failed to unlock key {_quote(op.key)}, lock isn't held, or is held by another session"
        )
    evaluation.put(_written(existing, outcome.entry))
    evaluation.add_result(outcome.entry, with_value=False)


def _get(evaluation: _Evaluation, op: KVOp) -> None:
    existing = evaluation.entry(op.key)
    if existing is None:
        raise _OperationFailed(f"key {_quote(op.key)} doesn't exist")
    evaluation.add_result(existing, with_value=True)


def _get_or_empty(evaluation: _Evaluation, op: KVOp) -> None:
    existing = evaluation.entry(op.key)
    if existing is None:
        # Consul echoes the request's Flags, Session and Index in the empty entry.
        existing = KVEntry(op.key, b"", flags=op.flags, session=op.session, modify_index=op.index)
    evaluation.add_result(existing, with_value=True)


def _get_tree(evaluation: _Evaluation, op: KVOp) -> None:
    evaluation.read_tree(op.key)


def _check_index(evaluation: _Evaluation, op: KVOp) -> None:
    existing = evaluation.entry(op.key)
    if existing is None:
        raise _OperationFailed(f"failed to check index, key {_quote(op.key)} doesn't exist")
    if existing.modify_index == _PENDING:
        # NOTE: Consul compares with the index this transaction commits at. That revision
        # is unknown here before the commit, so a check of a key written earlier fails.
        raise _OperationFailed(
            f"failed index check for key {_quote(op.key)}, it was written earlier in this transaction"
        )
    if existing.modify_index != op.index:
        raise _OperationFailed(
            f"failed index check for key {_quote(op.key)}, "
            f"current modify index {existing.modify_index} != {op.index}"
        )
    evaluation.add_result(existing, with_value=False)


def _check_session(evaluation: _Evaluation, op: KVOp) -> None:
    existing = evaluation.entry(op.key)
    if existing is None:
        raise _OperationFailed(f"failed to check session, key {_quote(op.key)} doesn't exist")
    if existing.session != op.session:
        raise _OperationFailed(
            f"failed session check for key {_quote(op.key)}, "
            f"current session {_quote(existing.session)} != {_quote(op.session)}"
        )
    evaluation.add_result(existing, with_value=False)


def _check_not_exists(evaluation: _Evaluation, op: KVOp) -> None:
    if evaluation.entry(op.key) is not None:
        raise _OperationFailed(f"key {_quote(op.key)} exists")


def _delete(evaluation: _Evaluation, op: KVOp) -> None:
    evaluation.delete(op.key)


def _delete_tree(evaluation: _Evaluation, op: KVOp) -> None:
    evaluation.delete_tree(op.key)


def _delete_cas(evaluation: _Evaluation, op: KVOp) -> None:
    existing = evaluation.entry(op.key)
    if existing is None:
        # Consul lets a delete-cas of a missing key succeed, whatever its index.
        return
    if existing.modify_index != op.index:
        raise _OperationFailed(f"failed to delete key {_quote(op.key)}, index is stale")
    evaluation.delete(op.key)


_HANDLERS: dict[KVVerb, Callable[[_Evaluation, KVOp], None]] = {
    KVVerb.SET: _set,
    KVVerb.CAS: _cas,
    KVVerb.LOCK: _lock,
    KVVerb.UNLOCK: _unlock,
    KVVerb.GET: _get,
    KVVerb.GET_TREE: _get_tree,
    KVVerb.GET_OR_EMPTY: _get_or_empty,
    KVVerb.CHECK_INDEX: _check_index,
    KVVerb.CHECK_SESSION: _check_session,
    KVVerb.CHECK_NOT_EXISTS: _check_not_exists,
    KVVerb.DELETE: _delete,
    KVVerb.DELETE_TREE: _delete_tree,
    KVVerb.DELETE_CAS: _delete_cas,
}
