"""Sessions and KV locks, through the real py-consul client against `corral dev`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import consul
import pytest
from devcluster import DevProcess, task_processes, wait_until

from corral.state.sessions import SessionError, parse_lock_delay, parse_session_request, parse_ttl
from corral.types import SessionBehavior

# Parsing


def test_lock_delay_bare_small_is_seconds():
    assert parse_lock_delay(15) == 15.0


def test_lock_delay_bare_large_is_nanoseconds():
    assert parse_lock_delay(15_000_000_000) == 15.0


def test_lock_delay_string():
    assert parse_lock_delay("0.5s") == 0.5


def test_lock_delay_zero_disables():
    assert parse_lock_delay("0s") == 0.0


def test_lock_delay_capped_at_minute():
    assert parse_lock_delay("5m") == 60.0


def test_lock_delay_negative_rejected():
    with pytest.raises(SessionError, match="must not be negative"):
        parse_lock_delay("-1s")


def test_ttl_empty_means_none():
    assert parse_ttl("") == 0.0


def test_ttl_below_minimum_rejected():
    with pytest.raises(SessionError, match=r"^Invalid Session TTL '5s', must be between \[10s=24h0m0s\]"):
        parse_ttl("5s")


def test_ttl_above_maximum_rejected():
    with pytest.raises(SessionError, match="Invalid Session TTL"):
        parse_ttl("25h")


def test_ttl_malformed_rejected():
    with pytest.raises(SessionError, match="Invalid Session TTL 'soon'"):
        parse_ttl("soon")


def test_request_lowercase_fields():
    request = parse_session_request(
        {"name": "n", "lockdelay": "1s", "behavior": "delete", "ttl": "10s", "checks": []}, "node1"
    )
    assert request.name == "n"
    assert request.lock_delay == 1.0
    assert request.behavior is SessionBehavior.DELETE
    assert request.ttl == 10.0
    assert request.checks == []


def test_request_defaults():
    request = parse_session_request({}, "node1")
    assert request.node == "node1"
    assert request.checks == ["serfHealth"]
    assert request.lock_delay == 15.0
    assert request.behavior is SessionBehavior.RELEASE
    assert request.ttl == 0.0


def test_request_bad_behavior_rejected():
    with pytest.raises(SessionError, match="Invalid Behavior setting 'forget'"):
        parse_session_request({"Behavior": "forget"}, "node1")


# Against a running cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sessions")
    dev = DevProcess(folder / "data", folder / "corral-dev.log")
    dev.start()
    yield dev
    assert dev.stop() == 0
    assert task_processes(dev.data_dir) == []


@pytest.fixture
def client(cluster):
    host, port = cluster.http_addr.split(":")
    consul_client = consul.Consul(host=host, port=int(port))
    yield consul_client
    consul_client.http.close()


def test_create_and_info(client):
    session_id = client.session.create(name="web-lock", lock_delay=0, behavior="release")
    _, info = client.session.info(session_id)
    assert info["ID"] == session_id
    assert info["Name"] == "web-lock"
    assert info["Node"] == "test-node"
    assert info["NodeChecks"] == ["serfHealth"]
    assert info["Behavior"] == "release"
    assert info["LockDelay"] == 0


def test_list_and_node(client):
    session_id = client.session.create(name="listed")
    _, listed = client.session.list()
    _, on_node = client.session.node("test-node")
    assert session_id in {s["ID"] for s in listed}
    assert session_id in {s["ID"] for s in on_node}


def test_unknown_node_rejected(client):
    with pytest.raises(consul.ConsulException, match="Missing node registration"):
        client.session.create(node="no-such-node")


def test_unknown_check_rejected(client):
    with pytest.raises(consul.ConsulException, match="Missing check 'nope' registration"):
        client.session.create(checks=["nope"])


def test_destroy_is_idempotent(client):
    session_id = client.session.create()
    assert client.session.destroy(session_id) is True
    assert client.session.destroy(session_id) is True
    assert client.session.info(session_id)[1] is None


def test_renew_unknown_is_404(cluster):
    request = urllib.request.Request(
        f"http://{cluster.http_addr}/v1/session/renew/0b5b1fd4-0000-0000-0000-000000000000", method="PUT"
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)
    error.value.close()
    assert error.value.code == 404


def test_renew_returns_session(client):
    session_id = client.session.create(ttl=30)
    renewed = client.session.renew(session_id)
    assert renewed["ID"] == session_id
    assert renewed["TTL"] == "30s"


def test_ttl_too_short_is_500(cluster):
    body = json.dumps({"TTL": "5s"}).encode()
    request = urllib.request.Request(f"http://{cluster.http_addr}/v1/session/create", data=body, method="PUT")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)
    body = error.value.read().decode()
    error.value.close()
    assert error.value.code == 500
    assert body.startswith("Invalid Session TTL")


def test_acquire_sets_session_and_lock_index(client):
    session_id = client.session.create(lock_delay=0)
    assert client.kv.put("locks/a", "one", acquire=session_id) is True
    _, entry = client.kv.get("locks/a")
    assert entry["Session"] == session_id
    assert entry["LockIndex"] == 1


def test_holder_reacquire_keeps_lock_index(client):
    session_id = client.session.create(lock_delay=0)
    client.kv.put("locks/b", "one", acquire=session_id)
    assert client.kv.put("locks/b", "two", acquire=session_id) is True
    _, entry = client.kv.get("locks/b")
    assert entry["Value"] == b"two"
    assert entry["LockIndex"] == 1


def test_other_session_cannot_acquire(client):
    holder = client.session.create(lock_delay=0)
    other = client.session.create(lock_delay=0)
    client.kv.put("locks/c", "held", acquire=holder)
    assert client.kv.put("locks/c", "taken", acquire=other) is False
    _, entry = client.kv.get("locks/c")
    assert entry["Value"] == b"held"


def test_release_keeps_lock_index(client):
    session_id = client.session.create(lock_delay=0)
    client.kv.put("locks/d", "v", acquire=session_id)
    assert client.kv.put("locks/d", "v", release=session_id) is True
    _, entry = client.kv.get("locks/d")
    assert "Session" not in entry
    assert entry["LockIndex"] == 1


def test_plain_put_keeps_holder_and_zeroes_lock_index(client):
    session_id = client.session.create(lock_delay=0)
    client.kv.put("locks/plain", "held", acquire=session_id)
    assert client.kv.put("locks/plain", "overwritten") is True
    _, entry = client.kv.get("locks/plain")
    assert entry["Value"] == b"overwritten"
    assert entry["Session"] == session_id
    assert entry["LockIndex"] == 0


def test_unchanged_put_keeps_modify_index(client):
    client.kv.put("same/key", "value", flags=7)
    index, before = client.kv.get("same/key")
    assert client.kv.put("same/key", "value", flags=7) is True
    assert client.kv.put("same/key", "value", flags=7, cas=before["ModifyIndex"]) is True
    _, after = client.kv.get("same/key")
    assert after["ModifyIndex"] == before["ModifyIndex"]
    # A blocking query on the key is not woken by the write that changed nothing.
    started = time.monotonic()
    client.kv.get("same/key", index=index, wait="1s")
    assert time.monotonic() - started >= 0.9
    assert client.kv.put("same/key", "value", flags=8) is True
    _, changed = client.kv.get("same/key")
    assert changed["ModifyIndex"] > before["ModifyIndex"]


def test_release_by_other_session_fails(client):
    holder = client.session.create(lock_delay=0)
    other = client.session.create(lock_delay=0)
    client.kv.put("locks/e", "v", acquire=holder)
    assert client.kv.put("locks/e", "v", release=other) is False


def test_unknown_session_acquire_is_500(client):
    with pytest.raises(consul.ConsulException, match='invalid session "4f0e5c4e-0000-0000-0000-000000000000"'):
        client.kv.put("locks/f", "v", acquire="4f0e5c4e-0000-0000-0000-000000000000")


def test_conflicting_flags_rejected(client):
    session_id = client.session.create()
    with pytest.raises(consul.ConsulException, match="Conflicting flags"):
        client.kv.put("locks/g", "v", acquire=session_id, cas=0)


def test_plain_put_ignores_lock(client):
    session_id = client.session.create(lock_delay=0)
    client.kv.put("locks/h", "held", acquire=session_id)
    assert client.kv.put("locks/h", "overwritten") is True
    _, entry = client.kv.get("locks/h")
    assert entry["Value"] == b"overwritten"
    assert entry["Session"] == session_id


def test_destroy_releases_lock(client):
    session_id = client.session.create(lock_delay=0)
    client.kv.put("locks/i", "v", acquire=session_id)
    client.session.destroy(session_id)
    _, entry = client.kv.get("locks/i")
    assert "Session" not in entry
    assert entry["Value"] == b"v"


def test_delete_behavior_removes_key(client):
    session_id = client.session.create(lock_delay=0, behavior="delete")
    client.kv.put("locks/j", "v", acquire=session_id)
    client.session.destroy(session_id)
    assert client.kv.get("locks/j")[1] is None


def test_lock_delay_blocks_reacquire(client):
    first = client.session.create(lock_delay=1)
    second = client.session.create(lock_delay=0)
    client.kv.put("locks/k", "v", acquire=first)
    client.session.destroy(first)
    assert client.kv.put("locks/k", "v", acquire=second) is False
    time.sleep(1.1)
    assert client.kv.put("locks/k", "v", acquire=second) is True


def test_ttl_expiry_releases_lock(client):
    session_id = client.session.create(ttl=10, lock_delay=0)
    client.kv.put("locks/ttl", "v", acquire=session_id)
    created = time.monotonic()
    wait_until(lambda: client.session.info(session_id)[1] is None, 25, "the session to expire")
    expired_after = time.monotonic() - created
    assert expired_after >= 10
    assert expired_after < 20
    wait_until(lambda: "Session" not in client.kv.get("locks/ttl")[1], 5, "the lock to be released")


def test_blocking_list_wakes_on_create(client):
    index, _ = client.session.list()
    results = {}

    def watch():
        results["index"], results["sessions"] = client.session.list(index=index, wait="10s")

    watcher = threading.Thread(target=watch)
    started = time.monotonic()
    watcher.start()
    time.sleep(0.3)
    session_id = client.session.create(name="wake")
    watcher.join(15)
    assert time.monotonic() - started < 5
    assert int(results["index"]) > int(index)
    assert session_id in {s["ID"] for s in results["sessions"]}


def _flag_job(workdir) -> dict:
    """A job that passes its check while the file `flag` exists in `workdir`."""
    return {
        "name": "flagged",
        "task": {
            "command": "sh",
            "args": ["-c", 'exec python3 -m http.server "$PORT" --bind 127.0.0.1'],
            "workdir": str(workdir),
            "ports": ["http"],
        },
        "service": {"name": "flagged", "port": "http", "check": {"http": "/flag", "interval": "500ms"}},
    }


def test_critical_check_invalidates_session(cluster, client, tmp_path):
    (tmp_path / "flag").write_text("up")
    body = json.dumps(_flag_job(tmp_path)).encode()
    request = urllib.request.Request(f"http://{cluster.http_addr}/v1/jobs", data=body, method="PUT")
    urllib.request.urlopen(request, timeout=5).close()
    try:
        entries = wait_until(lambda: client.health.service("flagged", passing=True)[1], 30, "the job to pass")
        task_id = entries[0]["Service"]["ID"]
        session_id = client.session.create(checks=[f"service:{task_id}"], lock_delay=0)
        assert client.kv.put("locks/flagged", "v", acquire=session_id) is True
        (tmp_path / "flag").unlink()
        wait_until(lambda: client.session.info(session_id)[1] is None, 15, "the session to be invalidated")
        _, entry = client.kv.get("locks/flagged")
        assert "Session" not in entry
    finally:
        cluster.cli("job", "stop", "flagged")


# The lock recipe: several processes compete for one key; at most one may hold it.

_CONTENDER = textwrap.dedent(
    """
    import os, sys, time, consul
    host, port, marker, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    client = consul.Consul(host=host, port=port)
    session = client.session.create(name=f"contender-{os.getpid()}", lock_delay=0, ttl=10)
    held = violations = 0
    index = None
    while held < rounds:
        if client.kv.put("recipe/leader", str(os.getpid()), acquire=session):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                violations += 1
            else:
                time.sleep(0.02)
                os.close(fd)
                os.unlink(marker)
            held += 1
            client.kv.put("recipe/leader", "", release=session)
            time.sleep(0.01)
        else:
            index, _ = client.kv.get("recipe/leader", index=index, wait="1s")
    client.session.destroy(session)
    print(held, violations)
    """
)


def test_lock_recipe_mutual_exclusion(cluster, tmp_path):
    host, port = cluster.http_addr.split(":")
    script = tmp_path / "contender.py"
    script.write_text(_CONTENDER)
    marker = tmp_path / "critical-section"
    rounds = 5
    contenders = [
        subprocess.Popen(
            [sys.executable, str(script), host, port, str(marker), str(rounds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=90) for process in contenders]
    for process, (stdout, stderr) in zip(contenders, outputs):
        assert process.returncode == 0, stderr
    totals = [tuple(int(n) for n in stdout.split()) for stdout, _ in outputs]
    assert sum(held for held, _ in totals) == 4 * rounds
    assert sum(violations for _, violations in totals) == 0
