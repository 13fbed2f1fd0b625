"""The revisioned key/value store that every other layer is stored through.

The shape follows etcd's v3 API so that an etcd backend can implement the
same class: every write gets the next cluster-wide revision, each key
carries its create revision, modify revision and version, a transaction
compares and then writes atomically, and a watch streams every change after
a revision. Keys and values are bytes.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field


class StoreError(Exception):
    """The one error a backend raises for a failed store operation."""


class CompactedError(StoreError):
    """A watch or read asked for a revision that compaction already removed."""

    def __init__(self, revision: int, compacted: int):
        super().__init__(
            f"revision {revision} is compacted: history starts after revision {compacted}"
        )
        self.revision = revision
        self.compacted = compacted


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    """One change: for a delete, `kv` holds the key with the deleting revision."""

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None = None


class CompareTarget(enum.Enum):
    VALUE = "value"
    VERSION = "version"
    CREATE = "create_revision"
    MOD = "mod_revision"


class CompareOp(enum.Enum):
    EQUAL = "=="
    NOT_EQUAL = "!="
    LESS = "<"
    GREATER = ">"


@dataclass(frozen=True, slots=True)
class Compare:
    """A condition on one key; a missing key has version, revisions 0 and no value."""

    key: bytes
    target: CompareTarget
    op: CompareOp
    operand: int | bytes

    def holds(self, kv: KeyValue | None) -> bool:
        actual: int | bytes | None
        if kv is None:
            actual = None if self.target is CompareTarget.VALUE else 0
        else:
            actual = getattr(kv, self.target.value)
        if actual is None:
            # etcd treats a value comparison on a missing key as false.
            return False
        match self.op:
            case CompareOp.EQUAL:
                return actual == self.operand
            case CompareOp.NOT_EQUAL:
                return actual != self.operand
            case CompareOp.LESS:
                return actual < self.operand  # type: ignore[operator]
            case CompareOp.GREATER:
                return actual > self.operand  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete one key, or with `prefix` every key that starts with it."""

    key: bytes
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    """Read one key, or with `prefix` every key that starts with it, inside a txn."""

    key: bytes
    prefix: bool = False


Operation = Put | Delete | Get


@dataclass(slots=True)
class TxnResult:
    """The outcome of a transaction.

    `responses` holds one entry per operation of the branch that ran: the
    list of KeyValues read for a Get, the KeyValues removed for a Delete,
    and the previous KeyValue (or None) for a Put.
    """

    succeeded: bool
    revision: int
    responses: list = field(default_factory=list)


def prefix_end(prefix: bytes) -> bytes | None:
    """Return the smallest key greater than every key with `prefix`, or None for no bound."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class Store(abc.ABC):
    """A revisioned key/value store.

    Backends implement the abstract methods; everything above this layer
    depends only on this class. Every method may raise StoreError.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Open or create the store; safe to call twice."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and close; ends every watch; safe to call twice."""

    @property
    @abc.abstractmethod
    def revision(self) -> int:
        """The revision of the last committed write; a new store starts at 1, as etcd does."""

    @abc.abstractmethod
    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Operation],
        failure: Sequence[Operation] = (),
    ) -> TxnResult:
        """Apply `success` if every compare holds, else `failure`, atomically.

        A transaction that writes anything takes exactly one new revision;
        it is durable on disk before this returns.
        """

    @abc.abstractmethod
    async def range(self, key: bytes, prefix: bool = False) -> tuple[list[KeyValue], int]:
        """Read one key or a prefix; return the KeyValues sorted by key and the revision read at."""

    @abc.abstractmethod
    def watch(self, key: bytes, start_revision: int, prefix: bool = True) -> AsyncIterator[list[Event]]:
        """Stream the changes to a key or prefix from `start_revision` on, a batch per revision.

        Raises CompactedError when `start_revision` is older than the history kept.
        """

    @abc.abstractmethod
    async def grant_lease(self, ttl: float) -> int:
        """Create a lease that expires after `ttl` seconds unless kept alive; return its id."""

    @abc.abstractmethod
    async def keep_alive(self, lease: int) -> float:
        """Renew a lease; return its TTL. Raises StoreError if the lease is unknown or expired."""

    @abc.abstractmethod
    async def revoke_lease(self, lease: int) -> None:
        """End a lease at once, deleting every key attached to it."""

    # The helpers below are written once, in terms of txn and range.

    async def get(self, key: bytes) -> KeyValue | None:
        kvs, _ = await self.range(key)
        return kvs[0] if kvs else None

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        result = await self.txn((), (Put(key, value, lease),))
        return result.revision

    async def delete(self, key: bytes, prefix: bool = False) -> list[KeyValue]:
        result = await self.txn((), (Delete(key, prefix),))
        return result.responses[0]
