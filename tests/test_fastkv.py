"""The lean /v1/kv path in front of aiohttp, on a real `corral dev` over raw sockets.

A connection starts on the lean path and moves to aiohttp at its first
request of another kind. Each request below is sent on a fresh connection
and on one already handed to aiohttp: the two responses must be the same
bytes but for the Date header, whichever path served them.
"""

from __future__ import annotations

import base64
import gzip
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from devcluster import DevProcess

# The value size limit of the server under test, small so that a 413 is cheap to provoke.
VALUE_LIMIT = 64


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevProcess]:
    folder = tmp_path_factory.mktemp("fastkv")
    process = DevProcess(folder / "data", folder / "corral.log", ["--kv-max-value-size", str(VALUE_LIMIT)])
    process.start()
    yield process
    assert process.stop() == 0, process.log()


class Connection:
    """A raw HTTP/1.1 connection that sends bytes as given and reads whole responses."""

    def __init__(self, address: str):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed with {self.pending!r} unread")
        self.pending += chunk

    def response(self) -> bytes:
        """Read one response; its body is delimited by Content-Length or, failing that, by the close."""
        while b"\r\n\r\n" not in self.pending:
            self._fill()
        head, _, rest = self.pending.partition(b"\r\n\r\n")
        match = re.search(rb"\r\nContent-Length: (\d+)", head, re.IGNORECASE)
        if match is None:
            try:
                while True:
                    self._fill()
            except ConnectionError:
                pass
            body, self.pending = self.pending.partition(b"\r\n\r\n")[2], b""
            return head + b"\r\n\r\n" + body
        length = int(match.group(1))
        while len(rest) < length:
            self._fill()
            rest = self.pending.partition(b"\r\n\r\n")[2]
        self.pending = rest[length:]
        return head + b"\r\n\r\n" + rest[:length]

    def exchange(self, data: bytes) -> bytes:
        self.send(data)
        return self.response()

    def close(self) -> None:
        self.sock.close()


def without_date(response: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*", b"", response)


def handed_off(address: str) -> Connection:
    """Return a connection whose first request, one the lean path does not serve, moved it to aiohttp."""
    connection = Connection(address)
    assert connection.exchange(b"GET /v1/status/leader HTTP/1.1\r\nHost: t\r\n\r\n").startswith(b"HTTP/1.1 200")
    return connection


def put(key: str, value: bytes) -> bytes:
    return b"PUT /v1/kv/%s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (key.encode(), len(value), value)


def get(target: str, extra: bytes = b"") -> bytes:
    return b"GET /v1/kv/%s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (target.encode(), extra)


# Requests whose responses do not depend on the path that serves them: reads,
# writes of a value the key already has, and requests that aiohttp rejects with an error.
SAME_RESPONSE = {
    "get": get("same/key"),
    "get stale": get("same/key?stale"),
    "get consistent": get("same/key?consistent"),
    "get missing": get("same/missing"),
    "get client headers": get("same/key", b"Connection: keep-alive\r\nAccept-Encoding: gzip, deflate\r\n"
                                          b"Accept: */*\r\nUser-Agent: python-requests/2.32\r\n"),
    "get raw": get("same/key?raw"),
    "get recurse": get("same?recurse"),
    "get stale and consistent": get("same/key?stale&consistent"),
    "get empty key": get(""),
    "get escaped key": get("same/%6Bey"),
    "get dot segment": get("same/./key"),
    "get double slash": get("same//key"),
    "get wrong datacenter": get("same/key?dc=elsewhere"),
    "put unchanged": put("same/key", b"value"),
    "put unchanged escaped": put("same%2Fkey", b"value"),
    "put too large": put("same/big", b"x" * (VALUE_LIMIT + 1)),
    "put bad flags": put("same/key?flags=-1", b"value"),
    "put chunked unchanged": b"PUT /v1/kv/same/key HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nvalue\r\n0\r\n\r\n",
    "put empty key": put("", b"value"),
    "post": b"POST /v1/kv/same/key HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
    "get bare line feeds": b"GET /v1/kv/same/key HTTP/1.1\nHost: t\n\n",
    "get bare line feed": b"GET /v1/kv/same/key HTTP/1.1\r\nHost: t\n\r\n",
    "get bare carriage return": get("same/key", b"Accept: a\rb\r\n"),
    "get space in name": get("same/key", b"Accept Language: en\r\n"),
    "get control in name": get("same/key", b"Accept\x01: */*\r\n"),
    "get NUL in value": get("same/key", b"Accept: a\x00b\r\n"),
    "get DEL in value": get("same/key", b"Accept: a\x7fb\r\n"),
    "get without host": b"GET /v1/kv/same/key HTTP/1.1\r\n\r\n",
    "get two hosts": get("same/key", b"host: u\r\n"),
    "get two user agents": get("same/key", b"User-Agent: a\r\nUser-Agent: b\r\n"),
    "get too many headers": get("same/key", b"A: b\r\n" * 128),
    "put two content types": b"PUT /v1/kv/same/key HTTP/1.1\r\nHost: t\r\nContent-Type: a\r\n"
                             b"Content-Type: b\r\nContent-Length: 5\r\n\r\nvalue",
}


def on_both_paths(address: str, request_bytes: bytes) -> tuple[bytes, bytes]:
    """Send `request_bytes` on a fresh connection and on a handed-off one; return both responses without Date."""
    fresh = Connection(address)
    aiohttp = handed_off(address)
    try:
        return without_date(fresh.exchange(request_bytes)), without_date(aiohttp.exchange(request_bytes))
    finally:
        fresh.close()
        aiohttp.close()


@pytest.mark.parametrize("request_bytes", SAME_RESPONSE.values(), ids=SAME_RESPONSE.keys())
def test_paths_respond_alike(dev, request_bytes):
    setup = Connection(dev.http_addr)
    assert setup.exchange(put("same/key", b"value")).endswith(b"\r\n\r\ntrue")
    setup.close()
    from_fresh, from_aiohttp = on_both_paths(dev.http_addr, request_bytes)
    assert from_fresh == from_aiohttp


# Starts of requests that aiohttp rejects before their head is complete.
MALFORMED_STARTS = {
    "not a method": b"value",
    "lower case version": b"GET /v1/kv/same/key HtTP/1.1\r\nHost: t\r\n",
    "header without colon": b"GET /v1/kv/same/key HTTP/1.1\r\nHost t\r\n",
    "bare line feeds": b"GET /v1/kv/same/key HTTP/1.1\nHost: t\n",
}


@pytest.mark.parametrize("start", MALFORMED_STARTS.values(), ids=MALFORMED_STARTS.keys())
def test_malformed_start_answered_at_once(dev, start):
    from_fresh, from_aiohttp = on_both_paths(dev.http_addr, start)
    assert from_fresh == from_aiohttp
    assert from_fresh.startswith(b"HTTP/1.0 400 Bad Request\r\n")


def test_put_then_get_on_lean_path(dev):
    connection = Connection(dev.http_addr)
    try:
        assert connection.exchange(put("lean/a", b"one")).endswith(b"\r\n\r\ntrue")
        response = connection.exchange(get("lean/a"))
    finally:
        connection.close()
    assert response.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: ")
    assert b'"Key":"lean/a"' in response
    assert b'"Value":"b25l"' in response


def test_fresh_and_handed_off_puts_alike(dev):
    fresh = Connection(dev.http_addr)
    aiohttp = handed_off(dev.http_addr)
    try:
        from_fresh = without_date(fresh.exchange(put("alike/a", b"first")))
        from_aiohttp = without_date(aiohttp.exchange(put("alike/a", b"second")))
    finally:
        fresh.close()
        aiohttp.close()
    assert from_fresh == from_aiohttp
    assert from_fresh.endswith(b"\r\n\r\ntrue")
    assert dev.get("/v1/kv/alike/a")[0]["Value"] == "c2Vjb25k"


def test_pipelined_handoff_keeps_order(dev):
    connection = Connection(dev.http_addr)
    try:
        connection.send(put("order/a", b"1") + put("order/b", b"2") + get("order?keys") + get("order/a")
                        + put("order/a", b"3") + get("order/a"))
        responses = [connection.response() for _ in range(6)]
    finally:
        connection.close()
    assert [response.split(b"\r\n", 1)[0] for response in responses] == [b"HTTP/1.1 200 OK"] * 6
    assert responses[0].endswith(b"true")
    assert responses[1].endswith(b"true")
    assert responses[2].endswith(b'["order/a","order/b"]')
    assert b'"Value":"MQ=="' in responses[3]
    assert responses[4].endswith(b"true")
    assert b'"Value":"Mw=="' in responses[5]


def test_request_in_fragments(dev):
    request = put("fragments/a", b"pieces") + get("fragments/a")
    connection = Connection(dev.http_addr)
    try:
        for offset in range(len(request)):
            connection.send(request[offset:offset + 1])
            time.sleep(0.001)
        written = connection.response()
        read = connection.response()
    finally:
        connection.close()
    assert written.endswith(b"\r\n\r\ntrue")
    assert b'"Value":"cGllY2Vz"' in read


def test_http10_and_close_go_to_aiohttp(dev):
    for request in (b"GET /v1/kv/same/key HTTP/1.0\r\n\r\n",
                    b"GET /v1/kv/same/key HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"):
        connection = Connection(dev.http_addr)
        try:
            response = connection.exchange(request)
            # aiohttp closes the connection after the response, as HTTP/1.0 and Connection: close ask.
            assert connection.sock.recv(1) == b""
        finally:
            connection.close()
        assert b"\r\nConnection: close" in response or response.startswith(b"HTTP/1.0")


def _request_count(dev: DevProcess, method: str, status: str) -> int:
    for sample in dev.get("/v1/agent/metrics")["Counters"]:
        labels = sample.get("Labels", {})
        if (sample["Name"] == "corral.http.requests" and labels.get("route") == "/v1/kv/{key}"
                and labels.get("method") == method and labels.get("status") == status):
            return sample["Count"]
    return 0


def test_lean_requests_counted(dev):
    before = {(method, status): _request_count(dev, method, status)
              for method, status in (("GET", "200"), ("GET", "404"), ("PUT", "200"))}
    connection = Connection(dev.http_addr)
    try:
        for number in range(3):
            connection.exchange(put(f"counted/{number}", b"v"))
        for number in range(4):
            connection.exchange(get(f"counted/{number}"))
    finally:
        connection.close()
    assert _request_count(dev, "PUT", "200") - before["PUT", "200"] == 3
    assert _request_count(dev, "GET", "200") - before["GET", "200"] == 3
    assert _request_count(dev, "GET", "404") - before["GET", "404"] == 1


def test_stop_closes_idle_connections(tmp_path):
    process = DevProcess(tmp_path / "data", tmp_path / "corral.log")
    process.start()
    lean = Connection(process.http_addr)
    aiohttp = handed_off(process.http_addr)
    busy = Connection(process.http_addr)
    try:
        assert lean.exchange(put("idle/a", b"v")).endswith(b"true")
        # Half a request, which the server must not wait for when it stops.
        busy.send(b"PUT /v1/kv/idle/b HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        started = time.monotonic()
        assert process.stop() == 0, process.log()
        assert time.monotonic() - started < 10
        for connection in (lean, aiohttp, busy):
            assert connection.sock.recv(1) == b""
    finally:
        for connection in (lean, aiohttp, busy):
            connection.close()


def test_gzip_put_stored_decompressed(dev):
    compressed = gzip.compress(b"unpacked")
    connection = Connection(dev.http_addr)
    try:
        response = connection.exchange(b"PUT /v1/kv/gzip/a HTTP/1.1\r\nHost: t\r\nContent-Encoding: gzip\r\n"
                                       b"Content-Length: %d\r\n\r\n%s" % (len(compressed), compressed))
    finally:
        connection.close()
    assert response.endswith(b"\r\n\r\ntrue")
    assert base64.b64decode(dev.get("/v1/kv/gzip/a")[0]["Value"]) == b"unpacked"


def test_unread_responses_pause_reading(dev):
    connection = Connection(dev.http_addr)
    connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.sock.settimeout(2)
    requests = get("unread/missing") * 1000
    sent = 0
    try:
        # The responses are never read. Once they fill the socket, the server must stop reading requests
        # instead of buffering all of them, so sending blocks long before 64 MB.
        while sent < 64 << 20:
            connection.send(requests)
            sent += len(requests)
    except socket.timeout:
        pass
    finally:
        connection.close()
    assert sent < 16 << 20


def test_stop_skips_pipelined_requests(tmp_path):
    process = DevProcess(tmp_path / "data", tmp_path / "corral.log")
    process.start()
    # A blocking query, which the server must end when it stops rather than wait for.
    blocked = handed_off(process.http_addr)
    blocked.send(get("stop/blocked?index=1000000&wait=60s"))
    lean = Connection(process.http_addr)
    requests = b"".join(put(f"stop/{number}", b"v") for number in range(20000))
    sender = threading.Thread(target=_send_ignoring_errors, args=(lean, requests))

    try:
        sender.start()
        assert lean.response().endswith(b"\r\n\r\ntrue")
        assert process.process is not None
        process.process.send_signal(signal.SIGINT)
        signalled = time.monotonic()

        answered = 1
        while True:
            try:
                lean.response()
            except ConnectionError:
                break
            answered += 1
        closed_after = time.monotonic() - signalled

        assert process.process.wait(timeout=30) == 0, process.log()
        stopped_after = time.monotonic() - signalled
        released = blocked.response()
    finally:
        lean.close()
        blocked.close()
        sender.join()
        if process.process is not None and process.process.poll() is None:
            process.stop()
    # The connection closes after the PUT in progress, not after the thousands sent behind it.
    assert closed_after < 4
    assert answered < 20000
    # The blocking query got the missing key's 404 at once, so the stop did not wait
    # the 5 s that aiohttp gives running handlers.
    assert released.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert stopped_after < 4.5


def _send_ignoring_errors(connection: Connection, data: bytes) -> None:
    try:
        connection.send(data)
    except OSError:
        pass
