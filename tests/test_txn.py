"""Tests for Consul's `/v1/txn` KV transactions.

Each test runs a real SQLiteStore in its own temporary directory with a
State on it. The HTTP tests serve the real application on 127.0.0.1 through
aiohttp's test server. A few go through the py-consul client, which is
synchronous, so its calls run in worker threads while the loop serves them.
The race tests use a store that commits a competing write just before the
transaction under test reaches it.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import consul
import consul.exceptions
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from corral.api import build_app
from corral.state import ConflictError, State, records
from corral.state.records import KVEntry, Session
from corral.state.txn import COMMIT_ATTEMPTS, KVOp, KVVerb, apply_kv_txn
from corral.store import Delete, Put, SQLiteStore, TxnResult
from corral.types import SessionBehavior

HOST = "127.0.0.1"


class RacingStore(SQLiteStore):
    """A SQLiteStore that commits `race_ops` just before each of the next `races` transactions."""

    def __init__(self, path: Path):
        super().__init__(path, lease_check_interval=0.05)
        self.races = 0
        self.race_ops: list[Put | Delete] = []

    async def txn(self, compares, success, failure=()) -> TxnResult:
        if self.races > 0 and success:
            self.races -= 1
            await super().txn((), self.race_ops)
        return await super().txn(compares, success, failure)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RacingStore]:
    racing_store = RacingStore(tmp_path / "state.db")
    await racing_store.open()
    yield racing_store
    await racing_store.close()


@pytest.fixture
async def state(store: RacingStore) -> AsyncIterator[State]:
    domain_state = State(store)
    await domain_state.start()
    yield domain_state
    await domain_state.stop()


@pytest.fixture
async def client(state: State) -> AsyncIterator[TestClient]:
    app = build_app(state, node="n1", rpc_addr="127.0.0.1:8300")
    async with TestClient(TestServer(app, host=HOST)) as test_client:
        yield test_client


@pytest.fixture
def consul_client(client: TestClient) -> consul.Consul:
    return consul.Consul(host=HOST, port=client.server.port)


def kv_op(verb: str, key: str, value: bytes | None = None, **fields: Any) -> dict[str, Any]:
    """Build one KV operation as Consul's API spells it."""
    body: dict[str, Any] = {"Verb": verb, "Key": key}
    if value is not None:
        body["Value"] = base64.b64encode(value).decode()
    body.update(fields)
    return {"KV": body}


async def put_txn(client: TestClient, ops: Sequence[dict[str, Any]]) -> tuple[int, Any, dict[str, str]]:
    """PUT the operations to /v1/txn and return the status, the decoded JSON body and the headers."""
    response = await client.put("/v1/txn", data=orjson.dumps(list(ops)))
    body = await response.json()
    return response.status, body, dict(response.headers)


async def put_raw(client: TestClient, body: bytes) -> tuple[int, str]:
    response = await client.put("/v1/txn", data=body)
    return response.status, await response.text()


async def add_session(state: State, session_id: str) -> None:
    session = Session(session_id, "test", "n1", [], SessionBehavior.RELEASE, lock_delay=15.0)
    revision = await state.store.put(records.session_key(session_id), records.encode(session))
    await state.view.wait_for_revision(revision)


def value_of(result: dict[str, Any]) -> bytes | None:
    encoded = result["KV"]["Value"]
    return None if encoded is None else base64.b64decode(encoded)


# Writes


async def test_set_result(client, state):
    status, body, headers = await put_txn(client, [kv_op("set", "a", b"1", Flags=5)])
    entry = body["Results"][0]["KV"]

    assert status == 200
    assert body["Errors"] is None
    assert entry["Key"] == "a"
    assert entry["Value"] is None
    assert entry["Flags"] == 5
    assert entry["LockIndex"] == 0
    assert entry["ModifyIndex"] == int(headers["X-Consul-Index"])
    assert entry["CreateIndex"] == entry["ModifyIndex"]
    assert state.kv_get("a").value == b"1"


async def test_set_keeps_create_index(client, state):
    await state.kv_put("a", b"old")
    created = state.kv_get("a").create_index

    status, body, _ = await put_txn(client, [kv_op("set", "a", b"new")])
    entry = body["Results"][0]["KV"]

    assert status == 200
    assert entry["CreateIndex"] == created
    assert entry["ModifyIndex"] > created


async def test_set_twice_same_key(client, state):
    status, body, _ = await put_txn(client, [kv_op("set", "a", b"1"), kv_op("set", "a", b"2")])

    assert status == 200
    assert len(body["Results"]) == 2
    assert state.kv_get("a").value == b"2"


async def test_cas_index_zero_creates(client, state):
    status, _, _ = await put_txn(client, [kv_op("cas", "a", b"1", Index=0)])

    assert status == 200
    assert state.kv_get("a").value == b"1"


async def test_cas_index_zero_existing(client, state):
    await state.kv_put("a", b"old")

    status, body, _ = await put_txn(client, [kv_op("cas", "a", b"new", Index=0)])

    assert status == 409
    assert body["Errors"] == [{"OpIndex": 0, "What": 'failed to set key "a", index is stale'}]
    assert state.kv_get("a").value == b"old"


async def test_cas_matching_index(client, state):
    await state.kv_put("a", b"old")
    index = state.kv_get("a").modify_index

    status, _, _ = await put_txn(client, [kv_op("cas", "a", b"new", Index=index)])

    assert status == 200
    assert state.kv_get("a").value == b"new"


async def test_cas_stale_index(client, state):
    await state.kv_put("a", b"old")
    index = state.kv_get("a").modify_index

    status, body, _ = await put_txn(client, [kv_op("cas", "a", b"new", Index=index + 1)])

    assert status == 409
    assert body["Errors"][0]["What"] == 'failed to set key "a", index is stale'
    assert state.kv_get("a").value == b"old"


async def test_cas_after_set_in_txn(client, state):
    await state.kv_put("a", b"old")
    index = state.kv_get("a").modify_index

    status, _, _ = await put_txn(
        client, [kv_op("set", "a", b"mid"), kv_op("cas", "a", b"new", Index=index)]
    )

    assert status == 409
    assert state.kv_get("a").value == b"old"


# Reads


async def test_get_value(client, state):
    await state.kv_put("a", b"hello", flags=3)
    stored = state.kv_get("a")

    status, body, _ = await put_txn(client, [kv_op("get", "a")])
    entry = body["Results"][0]["KV"]

    assert status == 200
    assert value_of(body["Results"][0]) == b"hello"
    assert entry["Flags"] == 3
    assert entry["ModifyIndex"] == stored.modify_index
    assert entry["CreateIndex"] == stored.create_index


async def test_get_missing_key(client):
    status, body, _ = await put_txn(client, [kv_op("get", "nope")])

    assert status == 409
    assert body["Results"] is None
    assert body["Errors"] == [{"OpIndex": 0, "What": 'key "nope" doesn\'t exist'}]


async def test_get_sees_earlier_set(client):
    status, body, headers = await put_txn(client, [kv_op("set", "a", b"1"), kv_op("get", "a")])
    entry = body["Results"][1]["KV"]

    assert status == 200
    assert value_of(body["Results"][1]) == b"1"
    assert entry["ModifyIndex"] == int(headers["X-Consul-Index"])


async def test_get_or_empty_missing(client):
    status, body, _ = await put_txn(client, [kv_op("get-or-empty", "nope")])
    entry = body["Results"][0]["KV"]

    assert status == 200
    assert entry["Key"] == "nope"
    assert entry["Value"] is None
    assert entry["ModifyIndex"] == 0


async def test_get_or_empty_existing(client, state):
    await state.kv_put("a", b"here")

    status, body, _ = await put_txn(client, [kv_op("get-or-empty", "a")])

    assert status == 200
    assert value_of(body["Results"][0]) == b"here"


async def test_get_tree(client, state):
    for key in ("app/b", "app/a", "apple", "other"):
        await state.kv_put(key, key.encode())

    status, body, _ = await put_txn(client, [kv_op("get-tree", "app")])
    keys = [result["KV"]["Key"] for result in body["Results"]]

    assert status == 200
    assert keys == ["app/a", "app/b", "apple"]
    assert value_of(body["Results"][0]) == b"app/a"


async def test_get_tree_empty(client):
    status, body, _ = await put_txn(client, [kv_op("get-tree", "none/")])

    assert status == 200
    assert body["Results"] == []


async def test_get_tree_sees_earlier_set(client, state):
    await state.kv_put("dir/a", b"1")

    status, body, headers = await put_txn(
        client, [kv_op("set", "dir/b", b"2"), kv_op("get-tree", "dir/")]
    )
    tree = body["Results"][1:]

    assert status == 200
    assert [result["KV"]["Key"] for result in tree] == ["dir/a", "dir/b"]
    assert value_of(tree[1]) == b"2"
    assert tree[1]["KV"]["ModifyIndex"] == int(headers["X-Consul-Index"])


# Checks


async def test_check_index_match(client, state):
    await state.kv_put("a", b"1")
    index = state.kv_get("a").modify_index

    status, body, _ = await put_txn(client, [kv_op("check-index", "a", Index=index)])

    assert status == 200
    assert body["Results"][0]["KV"]["Value"] is None
    assert body["Results"][0]["KV"]["ModifyIndex"] == index


async def test_check_index_mismatch(client, state):
    await state.kv_put("a", b"1")
    index = state.kv_get("a").modify_index

    status, body, _ = await put_txn(client, [kv_op("check-index", "a", Index=index + 7)])

    assert status == 409
    assert body["Errors"][0]["What"] == (
        f'failed index check for key "a", current modify index {index} != {index + 7}'
    )


async def test_check_index_missing(client):
    status, body, _ = await put_txn(client, [kv_op("check-index", "nope", Index=3)])

    assert status == 409
    assert body["Errors"][0]["What"] == 'failed to check index, key "nope" doesn\'t exist'


async def test_check_session_match(client, state):
    await add_session(state, "s1")
    await put_txn(client, [kv_op("lock", "a", b"1", Session="s1")])

    status, body, _ = await put_txn(client, [kv_op("check-session", "a", Session="s1")])

    assert status == 200
    assert body["Results"][0]["KV"]["Session"] == "s1"


async def test_check_session_mismatch(client, state):
    await state.kv_put("a", b"1")

    status, body, _ = await put_txn(client, [kv_op("check-session", "a", Session="s1")])

    assert status == 409
    assert body["Errors"][0]["What"] == 'failed session check for key "a", current session "" != "s1"'


async def test_check_not_exists(client):
    status, body, _ = await put_txn(client, [kv_op("check-not-exists", "nope")])

    assert status == 200
    assert body["Results"] == []


async def test_check_not_exists_existing(client, state):
    await state.kv_put("a", b"1")

    status, body, _ = await put_txn(client, [kv_op("check-not-exists", "a")])

    assert status == 409
    assert body["Errors"] == [{"OpIndex": 0, "What": 'key "a" exists'}]


# Deletes


async def test_delete(client, state):
    await state.kv_put("a", b"1")

    status, body, _ = await put_txn(client, [kv_op("delete", "a")])

    assert status == 200
    assert body["Results"] == []
    assert state.kv_get("a") is None


async def test_delete_missing_key(client):
    status, body, _ = await put_txn(client, [kv_op("delete", "nope")])

    assert status == 200
    assert body["Results"] == []


async def test_delete_tree(client, state):
    for key in ("dir/a", "dir/b/c", "dirt", "other"):
        await state.kv_put(key, b"x")

    status, body, _ = await put_txn(client, [kv_op("delete-tree", "dir/")])

    assert status == 200
    assert body["Results"] == []
    assert [entry.key for entry in state.kv_list("")] == ["dirt", "other"]


async def test_delete_tree_then_set(client, state):
    await state.kv_put("dir/a", b"old")

    status, _, _ = await put_txn(
        client, [kv_op("delete-tree", "dir/"), kv_op("set", "dir/b", b"new")]
    )

    assert status == 200
    assert [entry.key for entry in state.kv_list("dir/")] == ["dir/b"]


async def test_set_then_delete_tree(client, state):
    status, _, _ = await put_txn(
        client, [kv_op("set", "dir/a", b"1"), kv_op("delete-tree", "dir/"), kv_op("get", "dir/a")]
    )

    assert status == 409
    assert state.kv_get("dir/a") is None


async def test_get_after_delete_tree(client, state):
    await state.kv_put("dir/a", b"1")

    status, body, _ = await put_txn(client, [kv_op("delete-tree", "dir/"), kv_op("get", "dir/a")])

    assert status == 409
    assert body["Errors"] == [{"OpIndex": 1, "What": 'key "dir/a" doesn\'t exist'}]
    assert state.kv_get("dir/a") is not None


async def test_delete_tree_empty_key(client, state):
    await state.kv_put("a", b"1")
    await state.kv_put("b/c", b"2")

    status, _, _ = await put_txn(client, [kv_op("delete-tree", "")])

    assert status == 200
    assert state.kv_list("") == []


async def test_delete_cas_match(client, state):
    await state.kv_put("a", b"1")
    index = state.kv_get("a").modify_index

    status, body, _ = await put_txn(client, [kv_op("delete-cas", "a", Index=index)])

    assert status == 200
    assert body["Results"] == []
    assert state.kv_get("a") is None


async def test_delete_cas_stale(client, state):
    await state.kv_put("a", b"1")
    index = state.kv_get("a").modify_index

    status, body, _ = await put_txn(client, [kv_op("delete-cas", "a", Index=index + 1)])

    assert status == 409
    assert body["Errors"][0]["What"] == 'failed to delete key "a", index is stale'
    assert state.kv_get("a") is not None


async def test_delete_cas_missing_key(client):
    status, _, _ = await put_txn(client, [kv_op("delete-cas", "nope", Index=9)])

    assert status == 200


# Atomicity


async def test_failed_op_rolls_back_set(client, state):
    await state.kv_put("b", b"exists")
    revision = state.store.revision

    status, body, _ = await put_txn(client, [kv_op("set", "a", b"1"), kv_op("check-not-exists", "b")])

    assert status == 409
    assert body["Errors"] == [{"OpIndex": 1, "What": 'key "b" exists'}]
    assert state.kv_get("a") is None
    assert state.store.revision == revision


async def test_check_sees_earlier_delete(client, state):
    await state.kv_put("b", b"exists")

    status, body, _ = await put_txn(client, [kv_op("delete", "b"), kv_op("check-not-exists", "b")])

    assert status == 200
    assert body["Errors"] is None
    assert state.kv_get("b") is None


async def test_every_error_reported(client, state):
    await state.kv_put("a", b"1")

    status, body, _ = await put_txn(
        client,
        [kv_op("get", "missing"), kv_op("set", "b", b"2"), kv_op("check-not-exists", "a")],
    )
    indexes = [error["OpIndex"] for error in body["Errors"]]

    assert status == 409
    assert indexes == [0, 2]
    assert state.kv_get("b") is None


async def test_empty_txn(client):
    status, body, _ = await put_txn(client, [])

    assert status == 200
    assert body == {"Results": [], "Errors": None}


# Locks


async def test_lock_and_unlock(client, state):
    await add_session(state, "s1")

    status, body, _ = await put_txn(client, [kv_op("lock", "leader", b"me", Session="s1")])
    locked = body["Results"][0]["KV"]

    assert status == 200
    assert locked["LockIndex"] == 1
    assert locked["Session"] == "s1"
    assert locked["Value"] is None
    assert state.kv_get("leader").session == "s1"

    status, body, _ = await put_txn(client, [kv_op("unlock", "leader", b"done", Session="s1")])
    unlocked = body["Results"][0]["KV"]

    assert status == 200
    assert unlocked["LockIndex"] == 1
    assert "Session" not in unlocked
    assert state.kv_get("leader").session == ""
    assert state.kv_get("leader").value == b"done"


async def test_lock_again_keeps_lock_index(client, state):
    await add_session(state, "s1")
    await put_txn(client, [kv_op("lock", "leader", b"1", Session="s1")])

    status, body, _ = await put_txn(client, [kv_op("lock", "leader", b"2", Session="s1")])

    assert status == 200
    assert body["Results"][0]["KV"]["LockIndex"] == 1


async def test_lock_held_by_other(client, state):
    await add_session(state, "s1")
    await add_session(state, "s2")
    await put_txn(client, [kv_op("lock", "leader", b"1", Session="s1")])

    status, body, _ = await put_txn(client, [kv_op("lock", "leader", b"2", Session="s2")])

    assert status == 409
    assert body["Errors"][0]["What"] == 'failed to lock key "leader", lock is already held'
    assert state.kv_get("leader").session == "s1"


async def test_lock_unknown_session(client, state):
    status, body, _ = await put_txn(client, [kv_op("lock", "leader", b"1", Session="ghost")])

    assert status == 409
    assert body["Errors"] == [{"OpIndex": 0, "What": 'invalid session "ghost"'}]
    assert state.kv_get("leader") is None


async def test_lock_without_session(client):
    status, body, _ = await put_txn(client, [kv_op("lock", "leader", b"1")])

    assert status == 409
    assert body["Errors"][0]["What"] == "missing session"


async def test_lock_in_lock_delay(client, state):
    await add_session(state, "s1")
    state.lock_delays["leader"] = time.monotonic() + 60

    status, body, _ = await put_txn(
        client, [kv_op("set", "other", b"x"), kv_op("lock", "leader", b"1", Session="s1")]
    )

    assert status == 409
    assert body["Errors"] == [{"OpIndex": 1, "What": 'failed to lock key "leader" due to lock delay'}]
    assert state.kv_get("other") is None


async def test_unlock_not_holder(client, state):
    await add_session(state, "s1")
    await add_session(state, "s2")
    await put_txn(client, [kv_op("lock", "leader", b"1", Session="s1")])

    status, body, _ = await put_txn(client, [kv_op("unlock", "leader", b"", Session="s2")])

    assert status == 409
    assert body["Errors"][0]["What"] == (
        'failed to unlock key "leader", lock isn\'t held, or is held by another session'
    )
    assert state.kv_get("leader").session == "s1"


async def test_set_keeps_lock(client, state):
    await add_session(state, "s1")
    await put_txn(client, [kv_op("lock", "leader", b"1", Session="s1")])

    status, _, _ = await put_txn(client, [kv_op("set", "leader", b"2")])

    assert status == 200
    assert state.kv_get("leader").session == "s1"


# Headers and field names


async def test_read_only_headers(client, state):
    await state.kv_put("a", b"1")

    status, _, headers = await put_txn(client, [kv_op("get", "a")])

    assert status == 200
    assert int(headers["X-Consul-Index"]) == state.index
    assert headers["X-Consul-KnownLeader"] == "true"
    assert headers["X-Consul-LastContact"] == "0"


async def test_read_only_conflict_headers(client):
    status, _, headers = await put_txn(client, [kv_op("get", "nope")])

    assert status == 409
    assert "X-Consul-KnownLeader" in headers


async def test_write_conflict_no_index(client):
    status, _, headers = await put_txn(client, [kv_op("cas", "a", b"1", Index=5)])

    assert status == 409
    assert "X-Consul-Index" not in headers


async def test_write_index_is_revision(client, state):
    status, _, headers = await put_txn(client, [kv_op("set", "a", b"1")])

    assert status == 200
    assert int(headers["X-Consul-Index"]) == state.store.revision


async def test_lowercase_field_names(client, state):
    op = {"kv": {"verb": "set", "key": "a", "value": base64.b64encode(b"low").decode(), "flags": 2}}

    status, _, _ = await put_txn(client, [op])

    assert status == 200
    assert state.kv_get("a").value == b"low"
    assert state.kv_get("a").flags == 2


async def test_null_value(client, state):
    status, _, _ = await put_txn(client, [{"KV": {"Verb": "set", "Key": "a", "Value": None}}])

    assert status == 200
    assert state.kv_get("a").value == b""


async def test_other_datacenter(client):
    response = await client.put("/v1/txn?dc=elsewhere", data=b"[]")

    assert response.status == 500
    assert "No path to datacenter" in await response.text()


# Limits and bad requests


async def test_max_ops_accepted(client):
    ops = [kv_op("set", f"k{i}", b"v") for i in range(128)]

    status, body, _ = await put_txn(client, ops)

    assert status == 200
    assert len(body["Results"]) == 128


async def test_too_many_ops(client, state):
    ops = [kv_op("set", f"k{i}", b"v") for i in range(129)]

    status, text = await put_raw(client, orjson.dumps(ops))

    assert status == 413
    assert text == "Transaction contains too many operations (129 > 128)"
    assert state.kv_list("") == []


async def test_body_too_large(client, state):
    ops = [kv_op("set", "big", b"x" * (400 * 1024))]

    status, text = await put_raw(client, orjson.dumps(ops))

    assert status == 413
    assert text == "Request body too large, max size: 524288 bytes"
    assert state.kv_get("big") is None


async def test_large_value_accepted(client, state):
    ops = [kv_op("set", "big", b"x" * (300 * 1024))]

    status, _ = await put_raw(client, orjson.dumps(ops))

    assert status == 200
    assert len(state.kv_get("big").value) == 300 * 1024


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"[{", "Failed to parse body: malformed JSON"),
        (b"", "Failed to parse body: empty body"),
        (b'{"KV": {}}', "expected a JSON array of operations, got an object"),
        (b"[7]", "operation 0 must be a JSON object, got a number"),
        (b"[{}]", "operation 0 has no KV field"),
        (b'[{"KV": []}]', "operation 0: KV must be a JSON object, got an array"),
        (b'[{"KV": {"Key": "a"}}]', "operation 0: missing or invalid Verb null"),
        (b'[{"KV": {"Verb": "frob", "Key": "a"}}]', 'operation 0: unknown KV verb "frob"'),
        (b'[{"KV": {"Verb": "SET", "Key": "a"}}]', 'operation 0: unknown KV verb "SET"'),
        (b'[{"KV": {"Verb": "get"}}]', 'operation 0: missing Key for verb "get"'),
        (b'[{"KV": {"Verb": "get", "Key": 5}}]', "operation 0: invalid Key 5: expected a string"),
        (
            b'[{"KV": {"Verb": "set", "Key": "a", "Value": "!!"}}]',
            'operation 0: invalid base64 in Value "!!"',
        ),
        (
            b'[{"KV": {"Verb": "set", "Key": "a", "Value": 12}}]',
            "operation 0: invalid Value 12: expected a base64 string",
        ),
        (
            b'[{"KV": {"Verb": "set", "Key": "a", "Flags": -1}}]',
            "operation 0: invalid Flags -1: expected an unsigned 64-bit integer",
        ),
        (
            b'[{"KV": {"Verb": "cas", "Key": "a", "Index": true}}]',
            "operation 0: invalid Index true: expected an unsigned 64-bit integer",
        ),
        (
            b'[{"KV": {"Verb": "lock", "Key": "a", "Session": 1}}]',
            "operation 0: invalid Session 1: expected a string",
        ),
        (
            b'[{"KV": {"Verb": "get", "Key": "a"}}, {"KV": {"Verb": "nope", "Key": "b"}}]',
            'operation 1: unknown KV verb "nope"',
        ),
    ],
)
async def test_bad_request(client, body: bytes, expected: str):
    status, text = await put_raw(client, body)

    assert status == 400
    assert expected in text


@pytest.mark.parametrize("kind", ["Node", "Service", "Check"])
async def test_non_kv_rejected(client, state, kind: str):
    ops = [kv_op("set", "a", b"1"), {kind: {"Verb": "get"}}]

    status, text = await put_raw(client, orjson.dumps(ops))

    assert status == 400
    assert text == f"operation 1: {kind} operations are not supported yet, only KV operations are"
    assert state.kv_get("a") is None


# The py-consul client


async def test_consul_client_set_get(consul_client, state):
    ops = [kv_op("set", "cfg/a", b"one"), kv_op("get", "cfg/a")]

    reply = await asyncio.to_thread(consul_client.txn.put, ops)

    assert reply["Errors"] is None
    assert value_of(reply["Results"][1]) == b"one"
    assert state.kv_get("cfg/a").value == b"one"


async def test_consul_client_conflict(consul_client, state):
    await state.kv_put("cfg/a", b"one")
    ops = [kv_op("set", "cfg/b", b"two"), kv_op("check-not-exists", "cfg/a")]

    with pytest.raises(consul.exceptions.ClientError) as raised:
        await asyncio.to_thread(consul_client.txn.put, ops)

    assert str(raised.value).startswith("409 ")
    assert 'key \\"cfg/a\\" exists' in str(raised.value)
    assert state.kv_get("cfg/b") is None


async def test_consul_client_lock(consul_client, state):
    await add_session(state, "s1")
    ops = [kv_op("lock", "leader", b"n1", Session="s1"), kv_op("check-session", "leader", Session="s1")]

    reply = await asyncio.to_thread(consul_client.txn.put, ops)
    _, entry = await asyncio.to_thread(consul_client.kv.get, "leader")

    assert reply["Results"][0]["KV"]["LockIndex"] == 1
    assert reply["Results"][1]["KV"]["Session"] == "s1"
    assert entry["Session"] == "s1"


async def test_consul_client_too_many(consul_client):
    ops = [kv_op("get-or-empty", f"k{i}") for i in range(129)]

    with pytest.raises(consul.exceptions.ClientError) as raised:
        await asyncio.to_thread(consul_client.txn.put, ops)

    assert "413 Transaction contains too many operations (129 > 128)" in str(raised.value)


# Races with other writers


def racing_put(key: str, value: bytes) -> Put:
    return Put(records.kv_key(key), KVEntry(key, value).encode())


async def test_race_reevaluates_cas(store, state):
    await state.kv_put("a", b"old")
    index = state.kv_get("a").modify_index
    store.race_ops = [racing_put("a", b"racer")]
    store.races = 1

    outcome = await apply_kv_txn(state, [KVOp(KVVerb.CAS, "a", b"mine", index=index)])

    assert outcome.errors[0].what == 'failed to set key "a", index is stale'
    assert state.kv_get("a").value == b"racer"


async def test_race_reevaluates_set(store, state):
    await add_session(state, "s1")
    store.race_ops = [
        Put(records.kv_key("a"), KVEntry("a", b"racer", lock_index=1, session="s1").encode())
    ]
    store.races = 1

    outcome = await apply_kv_txn(state, [KVOp(KVVerb.SET, "a", b"mine")])

    assert outcome.errors == []
    assert state.kv_get("a").value == b"mine"
    assert state.kv_get("a").session == "s1"
    assert outcome.results[0].create_index < outcome.results[0].modify_index


async def test_race_session_deleted(store, state):
    await add_session(state, "s1")
    store.race_ops = [Delete(records.session_key("s1"))]
    store.races = 1

    outcome = await apply_kv_txn(state, [KVOp(KVVerb.LOCK, "leader", b"1", session="s1")])

    assert outcome.errors[0].what == 'invalid session "s1"'
    assert state.kv_get("leader") is None


async def test_race_get_tree_sees_insert(store, state):
    await state.kv_put("dir/a", b"1")
    store.race_ops = [racing_put("dir/new", b"racer")]
    store.races = 1

    outcome = await apply_kv_txn(
        state, [KVOp(KVVerb.GET_TREE, "dir/"), KVOp(KVVerb.SET, "other", b"x")]
    )
    keys = [entry.key for entry in outcome.results]

    assert keys == ["dir/a", "dir/new", "other"]


async def test_race_delete_tree_removes_insert(store, state):
    await state.kv_put("dir/a", b"1")
    store.race_ops = [racing_put("dir/new", b"racer")]
    store.races = 1

    outcome = await apply_kv_txn(state, [KVOp(KVVerb.DELETE_TREE, "dir/")])

    assert outcome.errors == []
    assert state.kv_list("dir/") == []


async def test_race_gives_up(store, state):
    await state.kv_put("a", b"old")
    store.race_ops = [racing_put("a", b"racer")]
    store.races = COMMIT_ATTEMPTS

    with pytest.raises(ConflictError):
        await apply_kv_txn(state, [KVOp(KVVerb.SET, "a", b"mine")])

    assert state.kv_get("a").value == b"racer"


async def test_race_gives_up_http(client, store, state):
    await state.kv_put("a", b"old")
    store.race_ops = [racing_put("a", b"racer")]
    store.races = COMMIT_ATTEMPTS

    status, text = await put_raw(client, orjson.dumps([kv_op("set", "a", b"mine")]))

    assert status == 500
    assert f"lost {COMMIT_ATTEMPTS} commit races" in text


async def test_read_only_skips_store(store, state):
    await state.kv_put("dir/a", b"1")
    store.race_ops = [racing_put("dir/new", b"racer")]
    store.races = 1

    outcome = await apply_kv_txn(state, [KVOp(KVVerb.GET_TREE, "dir/")])

    assert [entry.key for entry in outcome.results] == ["dir/a"]
    assert outcome.index == state.index
    assert store.races == 1
