import asyncio

import pytest

from corral.store import (
    Compare,
    CompareOp,
    CompareTarget,
    CompactedError,
    Delete,
    EventType,
    Get,
    Put,
    SQLiteStore,
    StoreError,
)


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", lease_check_interval=0.05)
    await s.open()
    yield s
    await s.close()


async def test_new_store_is_at_revision_one(store):
    assert store.revision == 1


async def test_put_assigns_revisions(store):
    first = await store.put(b"a", b"1")
    second = await store.put(b"a", b"2")
    kv = await store.get(b"a")
    assert (first, second) == (2, 3)
    assert kv.value == b"2"
    assert kv.create_revision == 2
    assert kv.mod_revision == 3
    assert kv.version == 2
    assert store.revision == 3


async def test_revision_is_cluster_wide(store):
    await store.put(b"a", b"1")
    await store.put(b"b", b"1")
    kv = await store.get(b"b")
    assert kv.create_revision == 3


async def test_delete_of_missing_key_takes_no_revision(store):
    await store.put(b"a", b"1")
    removed = await store.delete(b"missing")
    assert removed == []
    assert store.revision == 2


async def test_prefix_range_is_sorted_and_bounded(store):
    for key in (b"jobs/b", b"jobs/a", b"jobsx", b"kv/a"):
        await store.put(key, b"v")
    kvs, revision = await store.range(b"jobs/", prefix=True)
    assert [kv.key for kv in kvs] == [b"jobs/a", b"jobs/b"]
    assert revision == 5


async def test_delete_prefix(store):
    for key in (b"t/1", b"t/2", b"u/1"):
        await store.put(key, b"v")
    removed = await store.delete(b"t/", prefix=True)
    assert sorted(kv.key for kv in removed) == [b"t/1", b"t/2"]
    kvs, _ = await store.range(b"", prefix=True)
    assert [kv.key for kv in kvs] == [b"u/1"]


async def test_txn_compare_mod_revision(store):
    revision = await store.put(b"k", b"old")
    stale = Compare(b"k", CompareTarget.MOD, CompareOp.EQUAL, revision - 1)
    current = Compare(b"k", CompareTarget.MOD, CompareOp.EQUAL, revision)
    failed = await store.txn([stale], [Put(b"k", b"lost")], [Get(b"k")])
    assert not failed.succeeded
    assert failed.responses[0][0].value == b"old"
    applied = await store.txn([current], [Put(b"k", b"new")])
    assert applied.succeeded
    assert (await store.get(b"k")).value == b"new"


async def test_txn_create_only_compare(store):
    absent = Compare(b"k", CompareTarget.VERSION, CompareOp.EQUAL, 0)
    assert (await store.txn([absent], [Put(b"k", b"1")])).succeeded
    assert not (await store.txn([absent], [Put(b"k", b"2")])).succeeded
    assert (await store.get(b"k")).value == b"1"


async def test_txn_writes_take_one_revision(store):
    result = await store.txn([], [Put(b"a", b"1"), Put(b"b", b"1"), Delete(b"a")])
    assert result.revision == 2
    assert await store.get(b"a") is None
    assert (await store.get(b"b")).mod_revision == 2


async def test_failed_request_leaves_batch_intact(store):
    ok_writes = [store.put(f"k{i}".encode(), b"v") for i in range(20)]
    bad = store.txn([], [Put(b"x", b"v", lease=999)])
    results = await asyncio.gather(*ok_writes, bad, return_exceptions=True)
    assert isinstance(results[-1], StoreError)
    assert "lease 999" in str(results[-1])
    kvs, _ = await store.range(b"k", prefix=True)
    assert len(kvs) == 20


async def test_concurrent_writes_get_distinct_revisions(store):
    revisions = await asyncio.gather(*(store.put(f"k{i}".encode(), b"v") for i in range(200)))
    assert sorted(revisions) == list(range(2, 202))


async def test_batch_over_one_statement_survives_reopen(tmp_path):
    path = tmp_path / "state.db"
    first = SQLiteStore(path)
    await first.open()
    # One transaction of 250 puts and 150 concurrent single puts: several
    # statements' worth of kv and event rows, in one or a few batches.
    many = first.txn([], [Put(f"txn/{number:03d}".encode(), f"t{number}".encode()) for number in range(250)])
    singles = [first.put(f"one/{number:03d}".encode(), f"o{number}".encode()) for number in range(150)]
    await asyncio.gather(many, *singles)
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    try:
        kvs, revision = await second.range(b"txn/", prefix=True)
        assert [kv.value for kv in kvs] == [f"t{number}".encode() for number in range(250)]
        kvs, _ = await second.range(b"one/", prefix=True)
        assert [kv.value for kv in kvs] == [f"o{number}".encode() for number in range(150)]
        assert revision == 152
        events = []
        async for batch in second.watch(b"", start_revision=2):
            events.extend(batch)
            if len(events) == 400:
                break
        assert sorted(event.kv.key for event in events) == sorted(
            [f"txn/{number:03d}".encode() for number in range(250)]
            + [f"one/{number:03d}".encode() for number in range(150)]
        )
    finally:
        await second.close()


async def test_data_survives_reopen(tmp_path):
    path = tmp_path / "state.db"
    first = SQLiteStore(path)
    await first.open()
    await first.put(b"kv/greeting", b"hello")
    await first.delete(b"kv/greeting")
    await first.put(b"kv/greeting", b"again")
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    try:
        kv = await second.get(b"kv/greeting")
        assert kv.value == b"again"
        assert kv.create_revision == 4
        assert second.revision == 4
    finally:
        await second.close()


async def test_watch_replays_history_then_follows(store):
    await store.put(b"w/a", b"1")
    await store.put(b"other", b"1")
    await store.delete(b"w/a")
    seen = []

    async def consume():
        async for batch in store.watch(b"w/", start_revision=1):
            seen.extend(batch)
            if len(seen) == 3:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    await store.put(b"w/b", b"2")
    await asyncio.wait_for(task, 5)
    assert [(e.type, e.kv.key, e.kv.mod_revision) for e in seen] == [
        (EventType.PUT, b"w/a", 2),
        (EventType.DELETE, b"w/a", 4),
        (EventType.PUT, b"w/b", 5),
    ]


async def test_watch_live_event_has_previous_value(store):
    await store.put(b"k", b"before")
    stream = store.watch(b"k", start_revision=store.revision + 1, prefix=False)
    pending = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.05)
    await store.put(b"k", b"after")
    batch = await asyncio.wait_for(pending, 5)
    await stream.aclose()
    assert batch[0].kv.value == b"after"
    assert batch[0].prev_kv.value == b"before"


async def test_watch_compacted_revision_raises(tmp_path):
    store = SQLiteStore(tmp_path / "state.db", history=10)
    await store.open()
    try:
        for i in range(30):
            await store.put(b"k", str(i).encode())
        with pytest.raises(CompactedError):
            async for _ in store.watch(b"k", start_revision=1):
                break
    finally:
        await store.close()


async def test_lease_expiry_deletes_keys(store):
    lease = await store.grant_lease(0.2)
    await store.put(b"session/a", b"x", lease=lease)
    await store.put(b"plain", b"y")
    await asyncio.sleep(0.6)
    assert await store.get(b"session/a") is None
    assert await store.get(b"plain") is not None
    with pytest.raises(StoreError):
        await store.keep_alive(lease)


async def test_lease_keep_alive_holds_keys(store):
    lease = await store.grant_lease(0.3)
    await store.put(b"session/a", b"x", lease=lease)
    for _ in range(6):
        await asyncio.sleep(0.1)
        await store.keep_alive(lease)
    assert await store.get(b"session/a") is not None
    await store.revoke_lease(lease)
    assert await store.get(b"session/a") is None


async def test_closed_store_rejects_requests(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.put(b"k", b"v")


async def test_read_only_txn_waits_for_commit(store):
    write = asyncio.ensure_future(store.put(b"pending", b"v"))
    await asyncio.sleep(0)  # the put is applied in memory, its batch not yet committed
    result = await store.txn([], [Get(b"pending")])
    assert write.done()
    assert result.responses[0][0].value == b"v"
    assert store.revision == result.revision


async def test_failed_commit_stops_writes(tmp_path):
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    await store.open()
    await store.put(b"kept", b"v")
    # A real SQLITE_FULL: cap the file at the pages it has now, then write more than fits.
    pages = await store._on_writer(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    await store._on_writer(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages}"))
    with pytest.raises(StoreError, match="commit failed"):
        await store.put(b"big", b"x" * 200_000)
    with pytest.raises(StoreError, match="no more writes"):
        await store.put(b"after", b"v")
    await store.close()

    reopened = SQLiteStore(path)
    await reopened.open()
    try:
        assert (await reopened.get(b"kept")).value == b"v"
        assert await reopened.get(b"big") is None
        assert reopened.revision == 2
        await reopened.put(b"after", b"v")
    finally:
        await reopened.close()
