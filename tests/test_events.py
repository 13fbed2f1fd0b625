"""User events, /v1/event/fire and /v1/event/list, through the real py-consul client against `corral dev`."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import consul
import pytest
from devcluster import DevProcess

from corral.api.event import MAX_EVENTS, UserEvent, event_index


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("events")
    dev = DevProcess(folder / "data", folder / "corral-dev.log")
    dev.start()
    yield dev
    assert dev.stop() == 0


@pytest.fixture
def client(cluster):
    host, port = cluster.http_addr.split(":")
    consul_client = consul.Consul(host=host, port=int(port))
    consul_client.http.session.trust_env = False
    yield consul_client
    consul_client.http.close()


def put(cluster: DevProcess, path: str, body: bytes = b"") -> tuple[int, str]:
    request = urllib.request.Request(f"http://{cluster.http_addr}{path}", data=body, method="PUT")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def timed(function, *args, **kwargs):
    started = time.monotonic()
    result = function(*args, **kwargs)
    return time.monotonic() - started, result


def test_fire_returns_event(client):
    event = client.event.fire("fire-fields", "build 42")

    assert uuid.UUID(event["ID"])
    assert event["Name"] == "fire-fields"
    assert event["Payload"] == "YnVpbGQgNDI="
    assert event["NodeFilter"] == ""
    assert event["Version"] == 1
    assert event["LTime"] >= 1


def test_fire_empty_payload_null(client):
    event = client.event.fire("fire-empty")

    assert event["Payload"] is None


def test_list_by_name(client):
    fired = client.event.fire("list-named", "payload")
    client.event.fire("list-other")

    _, events = client.event.list(name="list-named")

    assert [event["ID"] for event in events] == [fired["ID"]]
    assert events[0]["Payload"] == b"payload"


def test_list_keeps_order(client):
    first = client.event.fire("ordered")
    second = client.event.fire("ordered")

    _, events = client.event.list(name="ordered")

    assert [event["ID"] for event in events] == [first["ID"], second["ID"]]
    assert events[0]["LTime"] < events[1]["LTime"]


def test_list_empty_index_one(client):
    index, events = client.event.list(name="never-fired")

    assert events == []
    assert index == "1"


def test_node_filter_matching_listed(client):
    fired = client.event.fire("node-match", node="^test-")

    _, events = client.event.list(name="node-match")

    assert [event["ID"] for event in events] == [fired["ID"]]
    assert events[0]["NodeFilter"] == "^test-"


def test_node_filter_other_not_listed(client):
    fired = client.event.fire("node-miss", node="^elsewhere$")

    _, events = client.event.list(name="node-miss")

    assert fired["Name"] == "node-miss"
    assert events == []


def test_service_filter_unmatched_not_listed(client):
    client.event.fire("service-miss", service="^no-such-service$", tag="v1")

    _, events = client.event.list(name="service-miss")

    assert events == []


@pytest.mark.parametrize(
    ("path", "status", "expected"),
    [
        ("/v1/event/fire/tagged?tag=v1", 500, "Cannot provide tag filter without service filter"),
        ("/v1/event/fire/bad-regex?node=%5B", 500, "Invalid node filter"),
        ("/v1/event/fire/_rexec", 400, "Invalid event name '_rexec'"),
        ("/v1/event/fire/", 400, "Missing name"),
        ("/v1/event/fire/far?dc=elsewhere", 500, "No path to datacenter"),
    ],
)
def test_fire_rejected(cluster, path, status, expected):
    code, text = put(cluster, path)

    assert code == status
    assert text.startswith(expected), text


def test_fire_payload_too_large(cluster):
    code, text = put(cluster, "/v1/event/fire/big", b"x" * 600)

    assert code == 500
    assert text.startswith("user event exceeds configured limit of 512 bytes")


def test_fire_payload_near_limit(cluster):
    code, _ = put(cluster, "/v1/event/fire/fits", b"x" * 400)

    assert code == 200


def test_list_blocking_wakes(client):
    index, _ = client.event.list(name="block-wake")

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiter = pool.submit(timed, client.event.list, name="block-wake", index=index, wait="10s")
        time.sleep(0.3)
        fired = client.event.fire("block-wake")
        elapsed, (after, events) = waiter.result()

    assert elapsed < 5
    assert after != index
    assert [event["ID"] for event in events] == [fired["ID"]]


def test_list_blocking_times_out(client):
    client.event.fire("block-quiet")
    index, _ = client.event.list(name="block-quiet")

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiter = pool.submit(timed, client.event.list, name="block-quiet", index=index, wait="1s")
        time.sleep(0.2)
        client.event.fire("block-other")
        elapsed, (after, _) = waiter.result()

    assert elapsed >= 0.9
    assert after == index


def test_list_keeps_last_256(client):
    first_ids = [client.event.fire("ring")["ID"] for _ in range(10)]
    for _ in range(MAX_EVENTS):
        client.event.fire("ring-filler")

    _, everything = client.event.list()
    _, ring = client.event.list(name="ring")

    assert len(everything) == MAX_EVENTS
    assert [event["ID"] for event in ring if event["ID"] in first_ids] == []


def test_event_index_folds_uuid():
    event = UserEvent(id="00000000-0000-0001-0000-000000000003", name="n", payload=None)

    assert event_index([event]) == 2
