"""corral.client, blocking and asyncio, against a real `corral dev` subprocess; and the greeter example."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from devcluster import EXAMPLES, DevProcess, wait_until

from corral.client import AsyncClient, Check, Client, CorralError, Response
from corral.client.operations import kv_get
from corral.client.watch import TokenBucket, Watch


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("client")
    dev = DevProcess(folder / "data", folder / "corral-dev.log")
    dev.start()
    yield dev
    assert dev.stop() == 0


@pytest.fixture
def client(cluster):
    return Client(cluster.http_addr, timeout=10)


@pytest.fixture
def health_server():
    """An HTTP server on 127.0.0.1 whose /healthz returns 200, for HTTP checks."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"ok\n")

        def log_message(self, format, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


class Watcher:
    """A client of its own whose watches run in threads, each putting its values into a queue.

    close() closes the client, which ends every watch, and joins the threads.
    """

    def __init__(self, address: str):
        self.client = Client(address, timeout=10)
        self.threads: list[threading.Thread] = []

    def start(self, iterator) -> queue.Queue:
        values: queue.Queue = queue.Queue()

        def run():
            for value in iterator:
                values.put(value)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)
        return values

    def close(self) -> None:
        self.client.close()
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive(), "a watch did not end when its client closed"


@pytest.fixture
def watcher(cluster):
    watcher = Watcher(cluster.http_addr)
    yield watcher
    watcher.close()


# Pure parts: the rate limit and the watch's index handling


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def response(index: int, value: str | None) -> Response:
    if value is None:
        return Response(404, b"", {"X-Consul-Index": str(index)})
    body = json.dumps([{"Key": "k", "Value": base64.b64encode(value.encode()).decode(), "ModifyIndex": index}])
    return Response(200, body.encode(), {"X-Consul-Index": str(index)})


def key_watch(clock=None) -> Watch:
    return Watch("key k", lambda index, wait: kv_get("k", index=index, wait=wait).request,
                 kv_get("k").decode, wait=10, min_interval=5, clock=clock or FakeClock())


def test_token_bucket_allows_burst_of_two():
    clock = FakeClock()
    bucket = TokenBucket(5.0, clock=clock)
    assert bucket.reserve() == 0
    assert bucket.reserve() == 0
    assert bucket.reserve() == pytest.approx(5.0)


def test_token_bucket_refills_over_time():
    clock = FakeClock()
    bucket = TokenBucket(5.0, clock=clock)
    bucket.reserve()
    bucket.reserve()
    clock.now += 5.0
    assert bucket.reserve() == 0


def test_watch_first_read_does_not_block():
    watch = key_watch()
    assert ("index", "0") not in watch.request().query
    assert all(name != "index" for name, _ in watch.request().query)


def test_watch_blocks_on_received_index():
    watch = key_watch()
    watch.handle(response(42, "a"))
    assert ("index", "42") in watch.request().query


def test_watch_index_zero_becomes_one():
    watch = key_watch()
    watch.handle(response(0, None))
    assert watch.index == 1
    assert ("index", "1") in watch.request().query


def test_watch_resets_when_index_goes_back():
    watch = key_watch()
    watch.handle(response(42, "a"))
    changed, value = watch.handle(response(7, "b"))
    assert watch.index == 0
    assert changed
    assert value.value == b"b"


def test_watch_skips_equal_result():
    watch = key_watch()
    watch.handle(response(42, "a"))
    changed, _ = watch.handle(response(42, "a"))
    assert not changed


def test_closed_client_ends_watch(cluster):
    client = Client(cluster.http_addr, timeout=10)
    watch = client.watch_key("client/closing", wait=60, min_interval=0.1)
    assert next(watch) is None
    closer = threading.Timer(0.3, client.close)
    closer.start()
    started = time.monotonic()
    assert list(watch) == []
    assert time.monotonic() - started < 5
    closer.join()


def test_watch_raises_client_errors():
    watch = key_watch()
    with pytest.raises(CorralError):
        watch.failed(CorralError("bad request", 400, "Invalid wait time"))


def test_watch_retries_server_errors_with_backoff():
    watch = key_watch()
    first = watch.failed(CorralError("unreachable"))
    second = watch.failed(CorralError("store error", 500, "store error"))
    assert first == 1
    assert second == 2


# Addresses and errors


def test_address_from_environment(monkeypatch):
    monkeypatch.setenv("CORRAL_HTTP_ADDR", "127.0.0.1:9999")
    assert Client().base_url == "http://127.0.0.1:9999"


def test_invalid_address_is_named():
    with pytest.raises(ValueError, match="'nowhere'"):
        Client("nowhere")


def test_unreachable_error_has_no_status():
    with pytest.raises(CorralError) as caught:
        Client("127.0.0.1:1", timeout=5).kv_get("x")
    assert caught.value.status is None
    assert "127.0.0.1:1" in str(caught.value)


def test_error_carries_status_and_text(client):
    with pytest.raises(CorralError) as caught:
        client.update_check("no-such-check", "passing")
    assert caught.value.status == 404
    assert "Unknown check ID" in caught.value.text


# Blocking client


def test_kv_put_get_delete(client):
    assert client.kv_put("client/kv", "one") is True
    entry = client.kv_get("client/kv")
    assert entry.value == b"one"
    assert entry.modify_index > 0
    assert client.kv_delete("client/kv") is True
    assert client.kv_get("client/kv") is None


def test_kv_cas_rejects_stale_index(client):
    client.kv_put("client/cas", "one")
    entry = client.kv_get("client/cas")
    assert client.kv_put("client/cas", "two", cas=entry.modify_index) is True
    assert client.kv_put("client/cas", "three", cas=entry.modify_index) is False
    assert client.kv_get("client/cas").value == b"two"


def test_http_check_makes_instance_healthy(client, health_server):
    port = health_server.server_address[1]
    check = Check.http(f"http://127.0.0.1:{port}/healthz", interval="1s")
    service_id = client.register_service("client-http", service_id="client-http-1", address="127.0.0.1",
                                         port=port, tags=["blue"], check=check)
    assert service_id == "client-http-1"
    instances = wait_until(lambda: client.healthy_instances("client-http"), 15, "the HTTP check to pass")
    assert [instance.port for instance in instances] == [port]
    assert instances[0].tags == ["blue"]
    assert instances[0].status == "passing"
    client.deregister_service("client-http-1")
    assert client.service_instances("client-http") == []


def test_ttl_check_passes_after_update(client):
    client.register_service("client-ttl", port=7001, check=Check.ttl("30s"))
    assert client.healthy_instances("client-ttl") == []
    assert client.service_instances("client-ttl")[0].status == "critical"
    client.update_check("service:client-ttl", "passing", "fine")
    assert [instance.id for instance in client.healthy_instances("client-ttl")] == ["client-ttl"]
    client.deregister_service("client-ttl")


def test_watch_key_wakes_on_change(client, watcher):
    client.kv_put("client/watched", "first")
    values = watcher.start(watcher.client.watch_key("client/watched", wait=60, min_interval=0.1))
    assert values.get(timeout=10).value == b"first"
    time.sleep(0.5)
    started = time.monotonic()
    client.kv_put("client/watched", "second")
    assert values.get(timeout=10).value == b"second"
    # A poll would wait for the 60 s blocking read to time out.
    assert time.monotonic() - started < 5


def test_watch_key_sees_creation_and_deletion(client, watcher):
    values = watcher.start(watcher.client.watch_key("client/created", wait=60, min_interval=0.1))
    assert values.get(timeout=10) is None
    client.kv_put("client/created", "now")
    assert values.get(timeout=10).value == b"now"
    client.kv_delete("client/created")
    assert values.get(timeout=10) is None


def test_watch_service_wakes_on_health(client, watcher):
    client.register_service("client-watched", port=7002, check=Check.ttl("30s"))
    values = watcher.start(watcher.client.watch_service("client-watched", wait=60, min_interval=0.1))
    assert values.get(timeout=10) == []
    client.update_check("service:client-watched", "passing")
    instances = values.get(timeout=10)
    assert [instance.port for instance in instances] == [7002]
    client.deregister_service("client-watched")
    assert values.get(timeout=10) == []


def test_watch_survives_server_restart_with_lower_index(tmp_path, caplog):
    """A server started afresh on the same address has lower indexes; the watch resets and goes on."""
    first = DevProcess(tmp_path / "first", tmp_path / "first.log")
    first.start()
    second = DevProcess(tmp_path / "second", tmp_path / "second.log")
    second.http_addr = first.http_addr
    client = Client(first.http_addr, timeout=10)
    watcher = Watcher(first.http_addr)
    try:
        for number in range(40):
            client.kv_put("client/restart", f"old {number}")
        old_index = client.kv_get("client/restart").modify_index
        caplog.set_level(logging.INFO, logger="corral.client")
        values = watcher.start(watcher.client.watch_key("client/restart", wait=2, min_interval=0.1))
        assert values.get(timeout=10).value == b"old 39"
        assert first.stop() == 0
        second.start()
        client.kv_put("client/restart", "new")
        assert client.kv_get("client/restart").modify_index < old_index
        assert values.get(timeout=30).value == b"new"
        assert "watch index went backwards" in caplog.text
        client.kv_put("client/restart", "newer")
        assert values.get(timeout=10).value == b"newer"
    finally:
        watcher.close()
        for dev in (first, second):
            if dev.process is not None and dev.process.poll() is None:
                dev.stop()


# Asyncio client


async def test_async_kv_roundtrip(cluster):
    async with AsyncClient(cluster.http_addr) as client:
        assert await client.kv_put("client/async", b"\x00bytes") is True
        entry = await client.kv_get("client/async")
        assert entry.value == b"\x00bytes"
        assert await client.kv_delete("client/async") is True
        assert await client.kv_get("client/async") is None


async def test_async_register_and_find(cluster):
    async with AsyncClient(cluster.http_addr) as client:
        await client.register_service("client-async", port=7003, check=Check.ttl("30s"))
        await client.update_check("service:client-async", "passing")
        instances = await client.healthy_instances("client-async")
        assert [instance.port for instance in instances] == [7003]
        await client.deregister_service("client-async")
        assert await client.service_instances("client-async") == []


async def test_async_error_status(cluster):
    async with AsyncClient(cluster.http_addr) as client:
        with pytest.raises(CorralError) as caught:
            await client.deregister_service("no-such-service")
    assert caught.value.status == 404


async def test_async_unreachable_error():
    async with AsyncClient("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(CorralError) as caught:
            await client.kv_get("x")
    assert caught.value.status is None


async def test_async_watch_key_wakes(cluster):
    async with AsyncClient(cluster.http_addr) as client:
        await client.kv_put("client/async-watched", "first")
        watch = client.watch_key("client/async-watched", wait=60, min_interval=0.1)
        assert (await anext(watch)).value == b"first"

        async def change_soon():
            await asyncio.sleep(0.3)
            await client.kv_put("client/async-watched", "second")

        started = time.monotonic()
        writer = asyncio.create_task(change_soon())
        assert (await anext(watch)).value == b"second"
        assert time.monotonic() - started < 5
        await writer
        await watch.aclose()


async def test_async_watch_cancels_cleanly(cluster):
    async with AsyncClient(cluster.http_addr) as client:
        watch = client.watch_key("client/async-cancelled", wait=60, min_interval=0.1)
        assert await anext(watch) is None
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.3)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await watch.aclose()


# The greeter example


def start_greeter(cluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / "greeter.py"), "--min-interval", "0.1", *args],
        env={**os.environ, "CORRAL_HTTP_ADDR": cluster.http_addr},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def fetch(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return answer.read().decode().strip()


def stop_greeter(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


@pytest.mark.parametrize("check", ["http", "ttl"])
def test_greeter_reloads_greeting(cluster, client, check):
    name = f"greeter-{check}"
    key = f"config/{name}/greeting"
    client.kv_put(key, "Hello")
    process = start_greeter(cluster, "--name", name, "--key", key, "--check", check, "--check-interval", "1")
    try:
        instances = wait_until(lambda: client.healthy_instances(name), 20, f"{name} to pass its {check} check")
        port = instances[0].port
        assert fetch(port) == "Hello"
        client.kv_put(key, "Hello again")
        wait_until(lambda: fetch(port) == "Hello again", 10, "the greeter to reload its greeting")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert client.service_instances(name) == []
    finally:
        output = stop_greeter(process)
    assert "configuration reloaded" in output
