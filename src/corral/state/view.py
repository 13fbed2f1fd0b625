"""An in-memory copy of the store, kept current by the store's watch.

Reads and blocking queries are served from here and never touch disk. The
view remembers the revision at which each key was deleted (a tombstone),
so that the index of a prefix never goes backwards when a key under it is
deleted.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable, Iterable

from corral.store import Event, EventType, KeyValue, Store
from corral.store.base import prefix_end

log = logging.getLogger(__name__)

Listener = Callable[[list[Event]], None]


class View:
    def __init__(self, store: Store):
        self.store = store
        self.revision = 0
        self._data: dict[bytes, KeyValue] = {}
        self._sorted_keys: list[bytes] = []
        self._tombstones: dict[bytes, int] = {}
        self._index_floor = 0
        self._waiters: list[tuple[bytes, asyncio.Future]] = []
        self._revision_waiters: list[tuple[int, asyncio.Future]] = []
        self._listeners: list[Listener] = []
        self._task: asyncio.Task | None = None
        # Set by release_waiters when the server stops: waits for changes then end at once.
        self._released = False

    async def start(self) -> None:
        if self._task is not None:
            return
        kvs, revision = await self.store.range(b"", prefix=True)
        for kv in kvs:
            self._data[kv.key] = kv
        self._sorted_keys = sorted(self._data)
        self.revision = revision
        # Deletes from before this load left no tombstone here, so no prefix index may
        # fall below the revision loaded: an index must never go backwards for a client.
        self._index_floor = revision
        self._task = asyncio.create_task(self._follow(revision + 1), name="view-watch")
        log.info("view loaded keys=%d revision=%d", len(self._data), revision)

    def release_waiters(self) -> None:
        """End every wait for a change now and every later one at once, so that blocking queries respond.

        The server calls this when it stops, so that its HTTP server does not
        wait for blocking queries that could otherwise run for minutes.
        """
        self._released = True
        for _, future in self._waiters:
            if not future.done():
                future.set_result(None)
        self._waiters = []

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        for _, future in self._waiters + self._revision_waiters:
            if not future.done():
                future.cancel()

    async def _follow(self, start: int) -> None:
        async for batch in self.store.watch(b"", start):
            self.apply(batch)

    def apply(self, batch: list[Event]) -> None:
        """Apply one revision's events and wake the waiters they concern."""
        revision = batch[0].kv.mod_revision
        for event in batch:
            key = event.kv.key
            if event.type is EventType.PUT:
                if key not in self._data:
                    bisect.insort(self._sorted_keys, key)
                self._data[key] = event.kv
                self._tombstones.pop(key, None)
            else:
                if self._data.pop(key, None) is not None:
                    index = bisect.bisect_left(self._sorted_keys, key)
                    del self._sorted_keys[index]
                # NOTE: tombstones are kept for the life of the process; a long-running
                # server with heavy key churn needs them collected after a grace period.
                self._tombstones[key] = revision
        self.revision = revision
        self._wake(batch)
        for listener in self._listeners:
            listener(batch)

    def _wake(self, batch: list[Event]) -> None:
        if self._waiters:
            keys = [event.kv.key for event in batch]
            remaining = []
            for prefix, future in self._waiters:
                if future.done():
                    continue
                if any(key.startswith(prefix) for key in keys):
                    future.set_result(None)
                else:
                    remaining.append((prefix, future))
            self._waiters = remaining
        if self._revision_waiters:
            remaining_revisions = []
            for wanted, future in self._revision_waiters:
                if future.done():
                    continue
                if self.revision >= wanted:
                    future.set_result(None)
                else:
                    remaining_revisions.append((wanted, future))
            self._revision_waiters = remaining_revisions

    def add_listener(self, listener: Listener) -> None:
        """Call `listener` with every batch of events after the view has applied it."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling `listener`; a listener that was never added is ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    # Reads

    def get(self, key: bytes) -> KeyValue | None:
        return self._data.get(key)

    def range(self, prefix: bytes) -> list[KeyValue]:
        """Return the KeyValues under `prefix`, sorted by key."""
        keys = self._sorted_keys
        start = bisect.bisect_left(keys, prefix)
        # Bisect for the end too: slicing from `start` to the end of the list would copy
        # every later key, which made each small range cost as much as the whole view.
        bound = prefix_end(prefix)
        end = len(keys) if bound is None else bisect.bisect_left(keys, bound, start)
        data = self._data
        return [data[key] for key in keys[start:end]]

    def keys(self, prefix: bytes) -> Iterable[bytes]:
        return (kv.key for kv in self.range(prefix))

    def index(self, prefix: bytes) -> int:
        """Return the highest revision that touched a key under `prefix`, deletes included.

        Never 0, because Consul clients treat index 0 as "no index" and loop, and
        never below the revision the view was loaded at.
        """
        highest = 0
        for kv in self.range(prefix):
            highest = max(highest, kv.mod_revision)
        # NOTE: this scans every tombstone; a per-prefix index is needed before large keyspaces.
        for key, revision in self._tombstones.items():
            if revision > highest and key.startswith(prefix):
                highest = revision
        return max(highest, self._index_floor, 1)

    # Waiting

    async def wait_for_change(self, prefix: bytes, index: int, timeout: float) -> None:
        """Return once `index(prefix)` exceeds `index`, or after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.index(prefix) <= index:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._released:
                return
            future = loop.create_future()
            self._waiters.append((prefix, future))
            try:
                async with asyncio.timeout(remaining):
                    await future
            except TimeoutError:
                return

    async def wait_for_next_change(self, prefixes: tuple[bytes, ...], timeout: float) -> bool:
        """Wait for the next write under any of `prefixes`.

        Return False after `timeout` seconds, or at once when the waiters were released.
        """
        if self._released:
            return False
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        for prefix in prefixes:
            self._waiters.append((prefix, future))
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            return False
        return not self._released

    async def wait_for_revision(self, revision: int, timeout: float = 10.0) -> None:
        """Return once the view has applied `revision`, so a writer reads its own write."""
        if self.revision >= revision:
            return
        future = asyncio.get_running_loop().create_future()
        self._revision_waiters.append((revision, future))
        async with asyncio.timeout(timeout):
            await future
