"""The embedded store: one SQLite file, written by one thread with group commit.

All work on the database runs on a single writer thread. The thread takes
every request waiting in its queue, applies each one inside its own
savepoint of one SQLite transaction, commits once (WAL with
synchronous=FULL, so the commit is fsynced), and only then completes the
requests' futures. Concurrent writers therefore share one fsync, and an
acknowledged write is on disk.

Every change is also appended to an `events` table, which is the history a
watch replays from; live changes reach watchers from memory after commit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.store.base import (
    Compare,
    CompactedError,
    Delete,
    Event,
    EventType,
    Get,
    KeyValue,
    Operation,
    Put,
    Store,
    StoreError,
    TxnResult,
    prefix_end,
)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    rev INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    type INTEGER NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL,
    PRIMARY KEY (rev, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY,
    ttl REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

_EVENT_PUT = 0
_EVENT_DELETE = 1

# Requests taken from the queue into one commit at most.
_MAX_BATCH = 512


# A new store's revision, as in etcd, so that the first write gets revision 2.
INITIAL_REVISION = 1


@dataclass(slots=True)
class _Request:
    """Work for the writer thread: `run` executes there and returns the future's result."""

    run: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future


@dataclass(slots=True)
class _Watcher:
    key: bytes
    prefix: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def matches(self, key: bytes) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key


class SQLiteStore(Store):
    """A Store kept in one SQLite file.

    `history` is how many revisions of change history are kept for watches
    before older ones are compacted away.
    """

    def __init__(self, path: Path | str, history: int = 100_000, lease_check_interval: float = 0.5):
        self.path = Path(path)
        self.history = history
        self.lease_check_interval = lease_check_interval
        self._revision = 0
        self._compacted = 0
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: list[_Watcher] = []
        self._leases: dict[int, tuple[float, float]] = {}  # id -> (ttl, monotonic deadline)
        self._lease_task: asyncio.Task | None = None
        self._closed = False

    # Lifecycle

    async def open(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ready: asyncio.Future = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._writer_main, args=(ready,), name=f"sqlite-store:{self.path.name}", daemon=True
        )
        self._thread.start()
        self._revision, self._compacted, leases = await ready
        now = time.monotonic()
        # Like etcd after a leader change, a restart renews every lease for one full TTL.
        self._leases = {lease_id: (ttl, now + ttl) for lease_id, ttl in leases}
        self._lease_task = self._loop.create_task(self._expire_leases())
        log.info("store opened path=%s revision=%d", self.path, self._revision)

    async def close(self) -> None:
        if self._thread is None or self._closed:
            return
        self._closed = True
        if self._lease_task is not None:
            self._lease_task.cancel()
            try:
                await self._lease_task
            except asyncio.CancelledError:
                pass
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)
        self._watchers.clear()
        log.info("store closed path=%s revision=%d", self.path, self._revision)

    @property
    def revision(self) -> int:
        return self._revision

    # The writer thread

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        return conn

    def _writer_main(self, ready: asyncio.Future) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect()
            meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            leases = conn.execute("SELECT id, ttl FROM leases").fetchall()
            # Index 1, the lowest index a Consul client gets, is then always before any write.
            state = (meta.get("revision", INITIAL_REVISION), meta.get("compacted", 0), leases)
        except sqlite3.Error as exc:
            error = StoreError(f"cannot open store {self.path}: {exc}")
            loop.call_soon_threadsafe(_set_exception, ready, error)
            return
        loop.call_soon_threadsafe(_set_result, ready, state)
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                stop = False
                while len(batch) < _MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._run_batch(conn, batch)
                if stop:
                    break
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Request]) -> None:
        loop = self._loop
        assert loop is not None
        outcomes: list[tuple[_Request, bool, Any]] = []
        published: list[list[Event]] = []
        revision_before = self._revision
        try:
            conn.execute("BEGIN IMMEDIATE")
            for request in batch:
                conn.execute("SAVEPOINT request")
                try:
                    result = request.run(conn)
                except Exception as exc:  # the one request fails, the batch goes on
                    conn.execute("ROLLBACK TO request")
                    conn.execute("RELEASE request")
                    outcomes.append((request, False, _as_store_error(exc)))
                    continue
                conn.execute("RELEASE request")
                if isinstance(result, _Applied):
                    if result.events:
                        published.append(result.events)
                    result = result.value
                outcomes.append((request, True, result))
            if self._revision != revision_before:
                conn.execute(
                    "INSERT OR REPLACE INTO meta(name, value) VALUES ('revision', ?)", (self._revision,)
                )
                self._compact_if_due(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # The commit failed, so nothing in this batch is durable: fail every request.
            self._revision = revision_before
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            log.error("store commit failed path=%s requests=%d: %s", self.path, len(batch), exc)
            error = StoreError(f"store commit failed: {exc}")
            for request in batch:
                loop.call_soon_threadsafe(_set_exception, request.future, error)
            return
        loop.call_soon_threadsafe(self._complete, outcomes, published)

    def _complete(self, outcomes: list[tuple[_Request, bool, Any]], published: list[list[Event]]) -> None:
        # Watchers hear of a revision before the writer's await returns, so a
        # caller that waits for its own revision in a watch-fed view never waits long.
        for events in published:
            self._publish(events)
        for request, ok, value in outcomes:
            if ok:
                _set_result(request.future, value)
            else:
                _set_exception(request.future, value)

    def _publish(self, events: list[Event]) -> None:
        for watcher in self._watchers:
            matching = [event for event in events if watcher.matches(event.kv.key)]
            if matching:
                watcher.queue.put_nowait(matching)

    def _compact_if_due(self, conn: sqlite3.Connection) -> None:
        floor = self._revision - self.history
        # Compact in steps of a tenth of the history, not on every commit.
        if floor - self._compacted < max(1, self.history // 10):
            return
        conn.execute("DELETE FROM events WHERE rev <= ?", (floor,))
        conn.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('compacted', ?)", (floor,))
        self._compacted = floor

    async def _submit(self, run: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._thread is None or self._closed:
            raise StoreError(f"store {self.path} is not open")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Request(run, future))
        return await future

    # Transactions

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Operation],
        failure: Sequence[Operation] = (),
    ) -> TxnResult:
        compares = tuple(compares)
        success = tuple(success)
        failure = tuple(failure)
        for op in success + failure:
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise StoreError(f"lease {op.lease} not found")
        return await self._submit(lambda conn: self._apply_txn(conn, compares, success, failure))

    def _apply_txn(self, conn, compares, success, failure) -> _Applied:
        succeeded = all(compare.holds(_read_one(conn, compare.key)) for compare in compares)
        ops = success if succeeded else failure
        revision = self._revision + 1
        events: list[Event] = []
        responses: list = []
        for op in ops:
            if isinstance(op, Get):
                responses.append(_read(conn, op.key, op.prefix))
            elif isinstance(op, Put):
                responses.append(_apply_put(conn, op, revision, events))
            else:
                responses.append(_apply_delete(conn, op, revision, events))
        if events:
            self._revision = revision
            _record_events(conn, events)
        return _Applied(TxnResult(succeeded, self._revision, responses), events)

    async def range(self, key: bytes, prefix: bool = False) -> tuple[list[KeyValue], int]:
        return await self._submit(lambda conn: (_read(conn, key, prefix), self._revision))

    # Watches

    async def watch(self, key: bytes, start_revision: int, prefix: bool = True) -> AsyncIterator[list[Event]]:
        if start_revision and start_revision <= self._compacted:
            raise CompactedError(start_revision, self._compacted)
        watcher = _Watcher(key, prefix)
        # Register before reading history, so no revision falls between the two.
        self._watchers.append(watcher)
        try:
            last = start_revision - 1
            if start_revision and start_revision <= self._revision:
                history = await self._submit(
                    lambda conn: _read_history(conn, key, prefix, start_revision)
                )
                for batch in history:
                    yield batch
                    last = batch[0].kv.mod_revision
            while True:
                batch = await watcher.queue.get()
                if batch is None:
                    return
                if batch[0].kv.mod_revision > last:
                    last = batch[0].kv.mod_revision
                    yield batch
        finally:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    # Leases

    async def grant_lease(self, ttl: float) -> int:
        if ttl <= 0:
            raise StoreError(f"invalid lease ttl {ttl}: expected a number of seconds above 0")

        def run(conn: sqlite3.Connection) -> int:
            cursor = conn.execute("INSERT INTO leases(ttl) VALUES (?)", (ttl,))
            return int(cursor.lastrowid)

        lease_id = await self._submit(run)
        self._leases[lease_id] = (ttl, time.monotonic() + ttl)
        return lease_id

    async def keep_alive(self, lease: int) -> float:
        entry = self._leases.get(lease)
        if entry is None:
            raise StoreError(f"lease {lease} not found")
        ttl = entry[0]
        self._leases[lease] = (ttl, time.monotonic() + ttl)
        return ttl

    async def revoke_lease(self, lease: int) -> None:
        if self._leases.pop(lease, None) is None:
            return
        await self._submit(lambda conn: self._apply_revoke(conn, lease))

    def _apply_revoke(self, conn: sqlite3.Connection, lease: int) -> _Applied:
        revision = self._revision + 1
        events: list[Event] = []
        rows = conn.execute(f"SELECT {_COLUMNS} FROM kv WHERE lease = ?", (lease,)).fetchall()
        for row in rows:
            _apply_delete(conn, Delete(row[0]), revision, events)
        conn.execute("DELETE FROM leases WHERE id = ?", (lease,))
        if events:
            self._revision = revision
            _record_events(conn, events)
        return _Applied(None, events)

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_check_interval)
            now = time.monotonic()
            expired = [lease for lease, (_, deadline) in self._leases.items() if deadline <= now]
            for lease in expired:
                try:
                    await self.revoke_lease(lease)
                except StoreError as exc:
                    log.error("lease expiry failed lease=%d: %s", lease, exc)
                else:
                    log.debug("lease expired lease=%d", lease)


@dataclass(slots=True)
class _Applied:
    """What a writing request returns on the writer thread: its result and its events."""

    value: Any
    events: list[Event]


_COLUMNS = "key, value, create_rev, mod_rev, version, lease"


def _row_to_kv(row: tuple) -> KeyValue:
    return KeyValue(bytes(row[0]), bytes(row[1]), row[2], row[3], row[4], row[5])


def _read_one(conn: sqlite3.Connection, key: bytes) -> KeyValue | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM kv WHERE key = ?", (key,)).fetchone()
    return _row_to_kv(row) if row else None


def _read(conn: sqlite3.Connection, key: bytes, prefix: bool) -> list[KeyValue]:
    if not prefix:
        found = _read_one(conn, key)
        return [found] if found else []
    end = prefix_end(key)
    if end is None:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM kv WHERE key >= ? ORDER BY key", (key,))
    else:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM kv WHERE key >= ? AND key < ? ORDER BY key", (key, end)
        )
    return [_row_to_kv(row) for row in rows]


def _apply_put(conn: sqlite3.Connection, op: Put, revision: int, events: list[Event]) -> KeyValue | None:
    previous = _read_one(conn, op.key)
    if previous is None:
        kv = KeyValue(op.key, op.value, revision, revision, 1, op.lease)
    else:
        kv = KeyValue(op.key, op.value, previous.create_revision, revision, previous.version + 1, op.lease)
    conn.execute(
        f"INSERT OR REPLACE INTO kv({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
        (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease),
    )
    events.append(Event(EventType.PUT, kv, previous))
    return previous


def _apply_delete(conn: sqlite3.Connection, op: Delete, revision: int, events: list[Event]) -> list[KeyValue]:
    removed = _read(conn, op.key, op.prefix)
    for previous in removed:
        conn.execute("DELETE FROM kv WHERE key = ?", (previous.key,))
        tombstone = KeyValue(previous.key, b"", previous.create_revision, revision, 0, 0)
        events.append(Event(EventType.DELETE, tombstone, previous))
    return removed


def _record_events(conn: sqlite3.Connection, events: list[Event]) -> None:
    conn.executemany(
        "INSERT INTO events(rev, seq, type, key, value, create_rev, mod_rev, version, lease) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                event.kv.mod_revision,
                seq,
                _EVENT_PUT if event.type is EventType.PUT else _EVENT_DELETE,
                event.kv.key,
                event.kv.value,
                event.kv.create_revision,
                event.kv.mod_revision,
                event.kv.version,
                event.kv.lease,
            )
            for seq, event in enumerate(events)
        ],
    )


def _read_history(conn: sqlite3.Connection, key: bytes, prefix: bool, start: int) -> list[list[Event]]:
    rows = conn.execute(
        "SELECT rev, type, key, value, create_rev, mod_rev, version, lease FROM events "
        "WHERE rev >= ? ORDER BY rev, seq",
        (start,),
    )
    batches: list[list[Event]] = []
    current_rev = -1
    for rev, kind, k, value, create_rev, mod_rev, version, lease in rows:
        k = bytes(k)
        if not (k.startswith(key) if prefix else k == key):
            continue
        event_type = EventType.PUT if kind == _EVENT_PUT else EventType.DELETE
        event = Event(event_type, KeyValue(k, bytes(value), create_rev, mod_rev, version, lease))
        if rev != current_rev:
            batches.append([])
            current_rev = rev
        batches[-1].append(event)
    return batches


def _as_store_error(exc: Exception) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    return StoreError(f"store request failed: {exc}")


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
