"""The embedded store: one SQLite file, with transactions applied in memory and written in groups.

A transaction runs on the event loop against an in-memory copy of every
key: its compares, reads and writes touch no disk, and it takes the next
revision at once. What it wrote joins the open batch. One writer thread
takes a batch at a time, writes its rows in one SQLite transaction and
commits (WAL with synchronous=FULL, so the commit is fsynced). Only then
are the batch's watchers notified and its callers given their results.
While the thread commits one batch the next one fills, so concurrent
writers share one fsync, and an acknowledged write is on disk.

Batches commit in the order of their revisions, so a transaction that read
a key another one had written but not yet committed returns only after
that write is on disk too.

Every change is also appended to an `events` table, which is the history a
watch replays from; live changes reach watchers from memory after commit.

A failed commit (a full disk, an I/O error) leaves the memory copy ahead of
the file, so the store rejects every write until it is reopened rather
than build on changes that are not on disk.
"""

from __future__ import annotations

import asyncio
import bisect
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

# Writing transactions in one batch at most; the next one starts a new batch.
_MAX_BATCH = 512

# A new store's revision, as in etcd, so that the first write gets revision 2.
INITIAL_REVISION = 1

_COLUMNS = "key, value, create_rev, mod_rev, version, lease"


@dataclass(slots=True)
class _Batch:
    """Writes that commit together, filled on the event loop and written by the writer thread.

    `kv` contains each key's final state in the batch (None for deleted),
    `events` the rows of the events table in revision order. `waiters` get
    their results after the commit, and `readers` run on the writer thread after
    it, each with its future.
    """

    revision: int = 0
    transactions: int = 0
    kv: dict[bytes, KeyValue | None] = field(default_factory=dict)
    events: list[tuple] = field(default_factory=list)
    published: list[list[Event]] = field(default_factory=list)
    lease_puts: list[tuple[int, float]] = field(default_factory=list)
    lease_deletes: list[int] = field(default_factory=list)
    waiters: list[tuple[asyncio.Future, Any]] = field(default_factory=list)
    readers: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future]] = field(default_factory=list)
    sealed: bool = False
    done: asyncio.Future | None = None


@dataclass(slots=True)
class _Watcher:
    key: bytes
    prefix: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def matches(self, key: bytes) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key


class SQLiteStore(Store):
    """A Store kept in one SQLite file, with a copy of every key in memory.

    `history` is how many revisions of change history are kept for watches
    before older ones are compacted away.
    """

    def __init__(self, path: Path | str, history: int = 100_000, lease_check_interval: float = 0.5):
        self.path = Path(path)
        self.history = history
        self.lease_check_interval = lease_check_interval
        # The revision of the last transaction applied in memory, and of the last one on disk.
        self._revision = 0
        self._committed = 0
        self._compacted = 0
        self._data: dict[bytes, KeyValue] = {}
        self._sorted_keys: list[bytes] = []
        self._lease_keys: dict[int, set[bytes]] = {}
        self._next_lease = 1
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open_batch: _Batch | None = None
        self._last_batch: _Batch | None = None
        self._failed: StoreError | None = None
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
        revision, self._compacted, leases, rows = await ready
        self._revision = self._committed = revision
        for row in rows:
            kv = _row_to_kv(row)
            self._data[kv.key] = kv
            if kv.lease:
                self._lease_keys.setdefault(kv.lease, set()).add(kv.key)
        self._sorted_keys = sorted(self._data)
        now = time.monotonic()
        # Like etcd after a leader change, a restart renews every lease for one full TTL.
        self._leases = {lease_id: (ttl, now + ttl) for lease_id, ttl in leases}
        self._next_lease = max(self._leases, default=0) + 1
        self._lease_task = self._loop.create_task(self._expire_leases())
        log.info("store opened path=%s revision=%d keys=%d", self.path, revision, len(self._data))

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
        # Batches already queued are written before the thread reads the end marker.
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)
        self._watchers.clear()
        log.info("store closed path=%s revision=%d", self.path, self._committed)

    @property
    def revision(self) -> int:
        return self._committed

    def _check_writable(self) -> None:
        if self._thread is None or self._closed:
            raise StoreError(f"store {self.path} is not open")
        if self._failed is not None:
            raise self._failed

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
            rows = conn.execute(f"SELECT {_COLUMNS} FROM kv").fetchall()
            # Index 1, the lowest index a Consul client gets, is then always before any write.
            state = (meta.get("revision", INITIAL_REVISION), meta.get("compacted", 0), leases, rows)
        except sqlite3.Error as exc:
            error = StoreError(f"cannot open store {self.path}: {exc}")
            loop.call_soon_threadsafe(_set_exception, ready, error)
            return
        loop.call_soon_threadsafe(_set_result, ready, state)
        try:
            while True:
                batch = self._queue.get()
                if batch is None:
                    break
                with self._lock:
                    # From here on the event loop starts a new batch instead of adding to this one.
                    batch.sealed = True
                self._write_batch(conn, batch)
        finally:
            conn.close()

    def _write_batch(self, conn: sqlite3.Connection, batch: _Batch) -> None:
        loop = self._loop
        assert loop is not None
        error = self._failed
        if error is None and (batch.kv or batch.events or batch.lease_puts or batch.lease_deletes):
            try:
                self._commit(conn, batch)
            except sqlite3.Error as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                log.critical(
                    "store commit failed path=%s revision=%d transactions=%d: %s; "
                    "the store takes no more writes until it is reopened",
                    self.path, batch.revision, batch.transactions, exc,
                )
                error = StoreError(f"store commit failed: {exc}; the store takes no more writes until restarted")
                self._failed = error
        results = []
        if error is None:
            for run, future in batch.readers:
                try:
                    results.append((future, True, run(conn)))
                except Exception as exc:
                    results.append((future, False, _as_store_error(exc)))
        loop.call_soon_threadsafe(self._complete, batch, error, results)

    def _commit(self, conn: sqlite3.Connection, batch: _Batch) -> None:
        conn.execute("BEGIN IMMEDIATE")
        puts = [
            (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)
            for kv in batch.kv.values()
            if kv is not None
        ]
        deletes = [(key,) for key, kv in batch.kv.items() if kv is None]
        if puts:
            _insert_rows(conn, f"INSERT OR REPLACE INTO kv({_COLUMNS}) VALUES ", 6, puts)
        if deletes:
            conn.executemany("DELETE FROM kv WHERE key = ?", deletes)
        if batch.events:
            _insert_rows(
                conn, "INSERT INTO events(rev, seq, type, key, value, create_rev, mod_rev, version, lease) VALUES ",
                9, batch.events,
            )
        if batch.lease_puts:
            conn.executemany("INSERT OR REPLACE INTO leases(id, ttl) VALUES (?, ?)", batch.lease_puts)
        if batch.lease_deletes:
            conn.executemany("DELETE FROM leases WHERE id = ?", [(lease,) for lease in batch.lease_deletes])
        if batch.events:
            conn.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('revision', ?)", (batch.revision,))
            self._compact_if_due(conn, batch.revision)
        conn.execute("COMMIT")

    def _complete(self, batch: _Batch, error: StoreError | None, results: list) -> None:
        if error is None:
            if batch.events:
                self._committed = batch.revision
            # Watchers are given the revision before its writers' futures resolve, so a
            # writer that then waits for its revision in a watch-fed view finds it queued.
            for events in batch.published:
                self._publish(events)
            for future, value in batch.waiters:
                _set_result(future, value)
        else:
            for future, _ in batch.waiters:
                _set_exception(future, error)
            for _, future in batch.readers:
                _set_exception(future, error)
        for future, ok, value in results:
            if ok:
                _set_result(future, value)
            else:
                _set_exception(future, value)
        assert batch.done is not None
        _set_result(batch.done, error)

    def _publish(self, events: list[Event]) -> None:
        for watcher in self._watchers:
            matching = [event for event in events if watcher.matches(event.kv.key)]
            if matching:
                watcher.queue.put_nowait(matching)

    def _compact_if_due(self, conn: sqlite3.Connection, revision: int) -> None:
        floor = revision - self.history
        # Compact in steps of a tenth of the history, not on every commit.
        if floor - self._compacted < max(1, self.history // 10):
            return
        conn.execute("DELETE FROM events WHERE rev <= ?", (floor,))
        conn.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('compacted', ?)", (floor,))
        self._compacted = floor

    def _batch(self) -> _Batch:
        """Return the batch that the next write joins, starting one if the writer took the last."""
        batch = self._open_batch
        if batch is not None and not batch.sealed and batch.transactions < _MAX_BATCH:
            return batch
        loop = self._loop
        assert loop is not None
        batch = _Batch(revision=self._revision, done=loop.create_future())
        self._open_batch = batch
        self._last_batch = batch
        self._queue.put(batch)
        return batch

    async def _after_pending_writes(self) -> None:
        """Wait until every write applied in memory so far is on disk; raise if its commit failed."""
        batch = self._last_batch
        if batch is None or batch.done is None:
            return
        if not batch.done.done():
            await asyncio.shield(batch.done)
        error = batch.done.result()
        if error is not None:
            raise error

    async def _on_writer(self, run: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `run` on the writer thread once every write applied so far has committed."""
        self._check_writable()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._batch().readers.append((run, future))
        return await future

    # Transactions

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Operation],
        failure: Sequence[Operation] = (),
    ) -> TxnResult:
        self._check_writable()
        for op in (*success, *failure):
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise StoreError(f"lease {op.lease} not found")
        data = self._data
        succeeded = all(compare.holds(data.get(compare.key)) for compare in compares)
        ops = success if succeeded else failure
        revision = self._revision + 1
        events: list[Event] = []
        responses: list = []
        for op in ops:
            if isinstance(op, Put):
                responses.append(self._apply_put(op, revision, events))
            elif isinstance(op, Delete):
                responses.append(self._apply_delete(op, revision, events))
            else:
                responses.append(self._read(op.key, op.prefix))
        if not events:
            # Nothing to write, but what it read may be waiting for its commit.
            result = TxnResult(succeeded, self._revision, responses)
            if self._revision != self._committed:
                await self._after_pending_writes()
            return result
        self._revision = revision
        result = TxnResult(succeeded, revision, responses)
        return await self._join(events, result)

    async def _join(self, events: list[Event], result: Any, lease_puts=(), lease_deletes=()) -> Any:
        """Add one revision's changes to the open batch; return `result` once they are committed."""
        revision = events[0].kv.mod_revision if events else self._revision
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            batch = self._batch()
            batch.transactions += 1
            batch.revision = revision
            kv_rows = batch.kv
            event_rows = batch.events
            for seq, event in enumerate(events):
                kv = event.kv
                if event.type is EventType.PUT:
                    kv_rows[kv.key] = kv
                    kind = _EVENT_PUT
                else:
                    kv_rows[kv.key] = None
                    kind = _EVENT_DELETE
                event_rows.append(
                    (revision, seq, kind, kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)
                )
            if events:
                batch.published.append(events)
            batch.lease_puts.extend(lease_puts)
            batch.lease_deletes.extend(lease_deletes)
            batch.waiters.append((future, result))
        return await future

    def _apply_put(self, op: Put, revision: int, events: list[Event]) -> KeyValue | None:
        previous = self._data.get(op.key)
        if previous is None:
            kv = KeyValue(op.key, op.value, revision, revision, 1, op.lease)
            bisect.insort(self._sorted_keys, op.key)
        else:
            kv = KeyValue(op.key, op.value, previous.create_revision, revision, previous.version + 1, op.lease)
            if previous.lease and previous.lease != op.lease:
                self._forget_lease_key(previous.lease, op.key)
        if op.lease:
            self._lease_keys.setdefault(op.lease, set()).add(op.key)
        self._data[op.key] = kv
        events.append(Event(EventType.PUT, kv, previous))
        return previous

    def _apply_delete(self, op: Delete, revision: int, events: list[Event]) -> list[KeyValue]:
        removed = self._read(op.key, op.prefix)
        for previous in removed:
            key = previous.key
            del self._data[key]
            del self._sorted_keys[bisect.bisect_left(self._sorted_keys, key)]
            if previous.lease:
                self._forget_lease_key(previous.lease, key)
            tombstone = KeyValue(key, b"", previous.create_revision, revision, 0, 0)
            events.append(Event(EventType.DELETE, tombstone, previous))
        return removed

    def _forget_lease_key(self, lease: int, key: bytes) -> None:
        keys = self._lease_keys.get(lease)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._lease_keys[lease]

    def _read(self, key: bytes, prefix: bool) -> list[KeyValue]:
        if not prefix:
            found = self._data.get(key)
            return [found] if found is not None else []
        keys = self._sorted_keys
        start = bisect.bisect_left(keys, key)
        bound = prefix_end(key)
        end = len(keys) if bound is None else bisect.bisect_left(keys, bound, start)
        data = self._data
        return [data[k] for k in keys[start:end]]

    async def range(self, key: bytes, prefix: bool = False) -> tuple[list[KeyValue], int]:
        if self._thread is None or self._closed:
            raise StoreError(f"store {self.path} is not open")
        found = self._read(key, prefix)
        revision = self._revision
        if revision != self._committed:
            await self._after_pending_writes()
        return found, revision

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
                history = await self._on_writer(lambda conn: _read_history(conn, key, prefix, start_revision))
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
        self._check_writable()
        lease_id = self._next_lease
        self._next_lease += 1
        self._leases[lease_id] = (ttl, time.monotonic() + ttl)
        try:
            await self._join([], None, lease_puts=[(lease_id, ttl)])
        except StoreError:
            self._leases.pop(lease_id, None)
            raise
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
        self._check_writable()
        events: list[Event] = []
        revision = self._revision + 1
        for key in sorted(self._lease_keys.get(lease, ())):
            self._apply_delete(Delete(key), revision, events)
        self._lease_keys.pop(lease, None)
        if events:
            self._revision = revision
        await self._join(events, None, lease_deletes=[lease])

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


def _row_to_kv(row: tuple) -> KeyValue:
    return KeyValue(bytes(row[0]), bytes(row[1]), row[2], row[3], row[4], row[5])


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


# Rows per INSERT of a batch: 900 parameters at most, within the 999 of SQLite
# builds before 3.32. executemany retakes the GIL from the event loop after every
# row, and one statement per 100 rows gave about 10 % more PUTs per second.
_ROWS_PER_INSERT = 100


def _insert_rows(conn: sqlite3.Connection, insert: str, columns: int, rows: list[tuple]) -> None:
    """Run `insert` ("INSERT ... VALUES ") for `rows` of `columns` values, in statements of up to _ROWS_PER_INSERT rows."""
    group = "(" + ", ".join("?" * columns) + ")"
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start:start + _ROWS_PER_INSERT]
        conn.execute(insert + ", ".join([group] * len(chunk)), [value for row in chunk for value in row])


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
