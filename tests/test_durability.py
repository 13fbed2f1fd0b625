"""Durability under `kill -9`: acknowledged KV writes survive, transactions stay whole.

Writer threads put unique keys through `PUT /v1/kv` and run transactions
through `PUT /v1/txn` while the test kills `corral dev` with SIGKILL at
random moments and starts it again on the same data folder and ports. A
write counts as acknowledged only when its response arrived: `200` with
`true` for a KV put, `200` for a transaction. A write whose response never
arrived may or may not be stored. At the end, after a clean restart, every
acknowledged write must be stored with its value, and every transaction
must be stored whole or not at all, acknowledged or not.

NOTE: SIGKILL ends the process but not the machine, so data that reached
the page cache survives it. This test checks that corral acknowledges a
write only after its commit and never commits half a transaction. It does
not check that the fsync reaches the disk, which only a power cut tests.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from devcluster import DevProcess

PREFIX = "dur/"
KV_WRITERS = 6
TXN_WRITERS = 3
KILL_CYCLES = 10
# The range, in seconds, of the random wait between a restart and the next kill.
KILL_DELAY_RANGE = (0.2, 1.5)
# Seconds the kill cycles may take in all, well under the per-test timeout of 120 s.
CYCLE_BUDGET = 45.0
# Seconds a writer waits for a response. The kernel closes a killed server's
# connections at once, so a request times out only when the server hangs.
REQUEST_TIMEOUT = 10.0
# Seconds a writer pauses after a failed request, so it does not spin while the server is down.
RETRY_DELAY = 0.02
MIN_ACKNOWLEDGED_PUTS = 200
MIN_ACKNOWLEDGED_TXNS = 50
MIN_KILLS = 3


@dataclass(frozen=True, slots=True)
class Reply:
    """A response whose body is read."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes


class Connection:
    """One keep-alive HTTP connection to corral, opened again after any error."""

    def __init__(self, address: str):
        host, port = address.rsplit(":", 1)
        self.host = host
        self.port = int(port)
        self._connection: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None) -> Reply:
        if self._connection is None:
            self._connection = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT)
        try:
            self._connection.request(method, path, body=body)
            response = self._connection.getresponse()
            return Reply(response.status, response.headers, response.read())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class Writer(threading.Thread):
    """A thread that sends one write at a time, each with the next sequence number, until stopped.

    Subclasses implement `write`. A connection error or a timeout leaves the
    write unacknowledged, and the next write goes on a new connection.
    """

    def __init__(self, name: str, address: str, stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self.address = address
        self.stop = stop
        self.outcomes: Counter[str] = Counter()
        self.timed_out = False
        self.error: Exception | None = None

    def run(self) -> None:
        connection = Connection(self.address)
        sequence = 0
        try:
            while not self.stop.is_set():
                sequence += 1
                try:
                    self.write(connection, sequence)
                except (OSError, http.client.HTTPException) as exc:
                    self.outcomes[type(exc).__name__] += 1
                    if isinstance(exc, TimeoutError):
                        self.timed_out = True
                    self.stop.wait(RETRY_DELAY)
        except Exception as exc:  # kept for the test to assert on, with the writer's name
            self.error = exc
        finally:
            connection.close()

    def write(self, connection: Connection, sequence: int) -> None:
        raise NotImplementedError


class KVWriter(Writer):
    """Puts a new key for every sequence number: dur/w<writer>/<sequence>."""

    def __init__(self, number: int, address: str, stop: threading.Event):
        super().__init__(f"kv-writer-{number}", address, stop)
        self.number = number
        self.sent: dict[str, bytes] = {}
        self.acknowledged: set[str] = set()

    def write(self, connection: Connection, sequence: int) -> None:
        key = f"{PREFIX}w{self.number}/{sequence:06d}"
        value = f"kv writer {self.number} put {sequence}".encode()
        self.sent[key] = value
        response = connection.request("PUT", f"/v1/kv/{key}", value)
        if response.status == 200 and response.body.strip() == b"true":
            self.acknowledged.add(key)
            self.outcomes["acknowledged"] += 1
        else:
            self.outcomes[f"{response.status} {response.body[:60]!r}"] += 1


class TxnWriter(Writer):
    """Runs one transaction for every sequence number.

    Each transaction sets two new keys, dur/t<writer>/<sequence>/a and /b,
    and overwrites dur/latest/t<writer> with the sequence number.
    """

    def __init__(self, number: int, address: str, stop: threading.Event):
        super().__init__(f"txn-writer-{number}", address, stop)
        self.number = number
        self.latest_key = f"{PREFIX}latest/t{number}"
        self.sent: dict[int, dict[str, bytes]] = {}
        self.acknowledged: set[int] = set()
        # The highest index an acknowledged transaction was committed at.
        self.highest_index = 0

    def keys_of(self, sequence: int) -> dict[str, bytes]:
        """Return the new keys of one transaction and their values."""
        return {
            f"{PREFIX}t{self.number}/{sequence:06d}/{part}": f"txn {self.number}.{sequence} {part}".encode()
            for part in ("a", "b")
        }

    def write(self, connection: Connection, sequence: int) -> None:
        writes = self.keys_of(sequence)
        self.sent[sequence] = writes
        writes = {**writes, self.latest_key: str(sequence).encode()}
        operations = [
            {"KV": {"Verb": "set", "Key": key, "Value": base64.b64encode(value).decode()}}
            for key, value in writes.items()
        ]
        response = connection.request("PUT", "/v1/txn", json.dumps(operations).encode())
        if response.status != 200:
            self.outcomes[f"{response.status} {response.body[:60]!r}"] += 1
            return
        self.acknowledged.add(sequence)
        self.outcomes["acknowledged"] += 1
        results = json.loads(response.body)["Results"]
        for result in results:
            self.highest_index = max(self.highest_index, result["KV"]["ModifyIndex"])


def read_prefix(connection: Connection) -> tuple[int, dict[str, bytes]]:
    """Read every key under PREFIX and return X-Consul-Index with the values by key."""
    response = connection.request("GET", f"/v1/kv/{PREFIX}?recurse")
    index = int(response.headers["X-Consul-Index"])
    if response.status == 404:
        return index, {}
    assert response.status == 200, (
        f"GET /v1/kv/{PREFIX}?recurse returned {response.status}: {response.body[:200]!r}"
    )
    entries = {}
    for entry in json.loads(response.body):
        entries[entry["Key"]] = base64.b64decode(entry["Value"]) if entry["Value"] else b""
    return index, entries


def sample(items: Iterable, limit: int = 10) -> str:
    """Render up to `limit` items, sorted, and how many more there are."""
    ordered = sorted(items)
    text = ", ".join(str(item) for item in ordered[:limit])
    if len(ordered) > limit:
        text += f", ... and {len(ordered) - limit} more"
    return f"[{text}]"


@pytest.fixture
def dev(tmp_path):
    server = DevProcess(tmp_path / "data", tmp_path / "corral-dev.log")
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.kill()
        server.process.wait(timeout=10)


def test_acknowledged_writes_survive_kill(dev):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"seed={seed} log={dev.log_path}")
    reader = Connection(dev.http_addr)
    probe = reader.request("PUT", "/v1/txn", b"[]")
    assert probe.status not in (404, 405), f"PUT /v1/txn is not served: {probe.status}"

    stop = threading.Event()
    kv_writers = [KVWriter(number, dev.http_addr, stop) for number in range(KV_WRITERS)]
    txn_writers = [TxnWriter(number, dev.http_addr, stop) for number in range(TXN_WRITERS)]
    writers: list[Writer] = [*kv_writers, *txn_writers]
    # X-Consul-Index of PREFIX, read before every kill and after every restart.
    index_readings = [("start", read_prefix(reader)[0])]
    kills = 0
    started = time.monotonic()
    for writer in writers:
        writer.start()
    try:
        while kills < KILL_CYCLES and time.monotonic() - started < CYCLE_BUDGET:
            time.sleep(rng.uniform(*KILL_DELAY_RANGE))
            index_readings.append((f"before kill {kills + 1}", read_prefix(reader)[0]))
            dev.process.kill()
            dev.process.wait(timeout=10)
            reader.close()
            kills += 1
            dev.start()
            index_readings.append((f"after restart {kills}", read_prefix(reader)[0]))
        time.sleep(rng.uniform(*KILL_DELAY_RANGE))
    finally:
        stop.set()
        for writer in writers:
            writer.join(timeout=REQUEST_TIMEOUT + 5)
    cycles_seconds = time.monotonic() - started

    still_running = [writer.name for writer in writers if writer.is_alive()]
    assert not still_running, f"writers did not stop: {still_running}"
    failed = {writer.name: repr(writer.error) for writer in writers if writer.error is not None}
    assert not failed, f"writers raised: {failed}"

    exit_code = dev.stop()
    assert exit_code == 0, f"corral dev exited with {exit_code} on SIGINT:\n{dev.log()[-3000:]}"
    dev.start()
    reader.close()
    final_index, stored = read_prefix(reader)
    index_readings.append(("after clean restart", final_index))
    reader.close()

    acknowledged_puts = {key for writer in kv_writers for key in writer.acknowledged}
    acknowledged_txns = sum(len(writer.acknowledged) for writer in txn_writers)
    outcomes = sum((writer.outcomes for writer in writers), Counter())
    print(
        f"kills={kills} seconds={cycles_seconds:.1f} acknowledged puts={len(acknowledged_puts)} "
        f"acknowledged txns={acknowledged_txns} stored keys={len(stored)} index={final_index}"
    )
    print(f"outcomes={dict(outcomes)}")
    print(f"index readings={index_readings}")

    assert kills >= MIN_KILLS, f"only {kills} kills in {CYCLE_BUDGET}s; expected at least {MIN_KILLS}"
    assert len(acknowledged_puts) > MIN_ACKNOWLEDGED_PUTS, (
        f"only {len(acknowledged_puts)} KV puts acknowledged; expected over {MIN_ACKNOWLEDGED_PUTS}"
    )
    assert acknowledged_txns > MIN_ACKNOWLEDGED_TXNS, (
        f"only {acknowledged_txns} transactions acknowledged; expected over {MIN_ACKNOWLEDGED_TXNS}"
    )

    # Every key stored under PREFIX must be one a writer sent, with the value it sent.
    expected: dict[str, bytes] = {}
    for writer in kv_writers:
        expected.update(writer.sent)
    for writer in txn_writers:
        for writes in writer.sent.values():
            expected.update(writes)
    latest_keys = {writer.latest_key for writer in txn_writers}
    unknown = set(stored) - set(expected) - latest_keys
    assert not unknown, f"{len(unknown)} stored keys were never sent: {sample(unknown)}"
    wrong = {key for key, value in stored.items() if key in expected and value != expected[key]}
    assert not wrong, (
        f"{len(wrong)} keys have a value other than the one sent: "
        f"{sample(f'{key}={stored[key]!r}' for key in wrong)}"
    )

    lost_puts = acknowledged_puts - set(stored)
    assert not lost_puts, (
        f"{len(lost_puts)} of {len(acknowledged_puts)} acknowledged KV puts are lost: {sample(lost_puts)}"
    )

    half_applied = []
    lost_txns = []
    # Per transaction writer, the sequence numbers of its transactions stored whole.
    applied: dict[str, list[int]] = {}
    for writer in txn_writers:
        applied[writer.name] = []
        for sequence, writes in writer.sent.items():
            present = [key for key in writes if key in stored]
            if present and len(present) < len(writes):
                half_applied.append(f"{writer.name}#{sequence} has only {present}")
            if not present and sequence in writer.acknowledged:
                lost_txns.append(f"{writer.name}#{sequence}")
            if len(present) == len(writes):
                applied[writer.name].append(sequence)
    assert not half_applied, f"{len(half_applied)} transactions are half applied: {sample(half_applied)}"
    assert not lost_txns, f"{len(lost_txns)} acknowledged transactions are lost: {sample(lost_txns)}"

    # Every transaction also overwrote its writer's latest key, so that key must contain
    # the sequence number of the newest transaction stored.
    for writer in txn_writers:
        latest = stored.get(writer.latest_key)
        newest = max(applied[writer.name], default=None)
        if newest is None:
            assert latest is None, (
                f"{writer.latest_key}={latest!r}, but no transaction of {writer.name} is stored"
            )
            continue
        assert latest is not None, f"{writer.latest_key} is missing, but {writer.name}#{newest} is stored"
        # A request that timed out may still be applied after the next one, so the
        # newest stored transaction is the last one applied only for a writer without timeouts.
        if not writer.timed_out:
            assert latest == str(newest).encode(), (
                f"{writer.latest_key}={latest!r}, but the newest stored transaction is {writer.name}#{newest}"
            )
        assert latest in {str(sequence).encode() for sequence in applied[writer.name]}, (
            f"{writer.latest_key}={latest!r} names a transaction that is not stored whole"
        )

    backwards = [
        f"{earlier[0]}={earlier[1]} > {later[0]}={later[1]}"
        for earlier, later in itertools.pairwise(index_readings)
        if later[1] < earlier[1]
    ]
    assert not backwards, f"X-Consul-Index of {PREFIX} went backwards: {backwards}"
    highest_txn_index = max(writer.highest_index for writer in txn_writers)
    assert final_index >= highest_txn_index, (
        f"X-Consul-Index of {PREFIX} is {final_index} after restart, "
        f"below the index {highest_txn_index} an acknowledged transaction was committed at"
    )
