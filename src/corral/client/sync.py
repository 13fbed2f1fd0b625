"""The blocking client, on http.client from the standard library."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

from corral.client import operations
from corral.client.core import (
    DEFAULT_TIMEOUT,
    CorralError,
    Request,
    Response,
    json_request,
    raise_for_status,
    resolve_address,
    unreachable,
)
from corral.client.models import Check, KVPair, ServiceInstance
from corral.client.operations import Call
from corral.client.watch import DEFAULT_MIN_INTERVAL, DEFAULT_WAIT, Watch

T = TypeVar("T")

Query = Mapping[str, str] | Iterable[tuple[str, str]] | None


def query_pairs(query: Query) -> list[tuple[str, str]]:
    if query is None:
        return []
    if isinstance(query, Mapping):
        return list(query.items())
    return list(query)


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Client:
    """A blocking client of corral's HTTP API (Consul's API and corral's own).

    `address` is HOST:PORT; without it the client reads CORRAL_HTTP_ADDR,
    then uses 127.0.0.1:8500. Each request opens its own connection, so one
    client can be shared between threads. Methods raise CorralError when
    the server cannot be reached or returns an error status. close()
    ends the client's watches, including reads in progress.
    """

    def __init__(self, address: str | None = None, *, timeout: float = DEFAULT_TIMEOUT):
        self.host, self.port = resolve_address(address)
        self.base_url = base_url(self.host, self.port)
        self.timeout = timeout
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Interrupt the requests in progress, end every watch and reject new requests. Safe to call twice."""
        with self._lock:
            self._closed.set()
            connections = list(self._open)
        for connection in connections:
            # shutdown() wakes a thread blocked reading this socket; close() alone may not.
            if connection.sock is not None:
                try:
                    connection.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # Transport

    def send(self, request: Request) -> Response:
        """Send one request and return the response, whatever its status.

        Raises CorralError only when the server cannot be reached or the
        request times out.
        """
        if self.closed:
            raise CorralError(f"the client of {self.base_url} is closed")
        timeout = request.timeout if request.timeout is not None else self.timeout
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Content-Type": "application/json"} if request.body is not None else {}
        try:
            # Connect before registering the connection, so that close() always finds a
            # socket to shut down; under the lock, so that a close() in between is seen.
            connection.connect()
            with self._lock:
                if self.closed:
                    connection.close()
                    raise CorralError(f"the client of {self.base_url} is closed")
                self._open.add(connection)
        except OSError as error:
            connection.close()
            raise unreachable(self.base_url, error) from None
        try:
            connection.request(request.method, request.target(), body=request.body, headers=headers)
            answer = connection.getresponse()
            body = answer.read()
        except (OSError, http.client.HTTPException) as error:
            if self.closed:
                raise CorralError(f"the client of {self.base_url} is closed") from None
            raise unreachable(self.base_url, error) from None
        finally:
            with self._lock:
                self._open.discard(connection)
            connection.close()
        return Response(answer.status, body, dict(answer.getheaders()))

    def request(self, method: str, path: str, *, query: Query = None, body: bytes | None = None,
                timeout: float | None = None) -> Response:
        """Send a request to any endpoint and return the response, whatever its status."""
        return self.send(Request(method, path, query_pairs(query), body, timeout))

    def request_json(self, method: str, path: str, data: Any = None, *, query: Query = None,
                     timeout: float | None = None) -> Any:
        """Send `data` as JSON and return the decoded JSON response; raise CorralError on an error status."""
        request = json_request(method, path, data, query=query_pairs(query), timeout=timeout)
        return raise_for_status(request, self.send(request)).json()

    def _call(self, call: Call[T]) -> T:
        return call.decode(self.send(call.request))

    # Agent

    def register_service(self, name: str, *, service_id: str | None = None, address: str = "", port: int = 0,
                         tags: Iterable[str] = (), meta: dict[str, str] | None = None,
                         check: Check | None = None) -> str:
        """Register a service instance with the agent, which runs its check; return the service ID.

        The ID defaults to the name, as in Consul; registering the same ID again replaces it.
        """
        return self._call(operations.register_service(
            name, service_id=service_id, address=address, port=port, tags=tags, meta=meta, check=check,
        ))

    def deregister_service(self, service_id: str) -> None:
        self._call(operations.deregister_service(service_id))

    def update_check(self, check_id: str, status: str = "passing", output: str = "") -> None:
        """Report a TTL check's status (passing, warning or critical); a service's check ID is "service:ID"."""
        self._call(operations.update_check(check_id, status, output))

    def agent_self(self) -> dict:
        return self._call(operations.agent_self())

    def members(self) -> list[dict]:
        return self._call(operations.members())

    def metrics(self, prometheus: bool = False) -> Any:
        return self._call(operations.metrics(prometheus))

    # Catalog and health

    def catalog_services(self) -> dict[str, list[str]]:
        """Return each service name with the tags of its instances."""
        return self._call(operations.catalog_services())

    def catalog_nodes(self) -> list[dict]:
        return self._call(operations.catalog_nodes())

    def healthy_instances(self, name: str, *, tag: str | None = None) -> list[ServiceInstance]:
        """Return the instances of service `name` whose checks all pass, node checks included."""
        return self._call(operations.health_service(name, passing=True, tag=tag))

    def service_instances(self, name: str, *, tag: str | None = None) -> list[ServiceInstance]:
        """Return every instance of service `name`, whatever the status of its checks."""
        return self._call(operations.health_service(name, passing=False, tag=tag))

    # Key/value store

    def kv_get(self, key: str) -> KVPair | None:
        """Return the key's entry, or None when the key does not exist."""
        return self._call(operations.kv_get(key))

    def kv_put(self, key: str, value: bytes | str, *, cas: int | None = None, flags: int | None = None) -> bool:
        """Store `value` at `key`; with `cas`, only if the key's ModifyIndex is `cas` (0: only if absent)."""
        return self._call(operations.kv_put(key, value, cas=cas, flags=flags))

    def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        return self._call(operations.kv_delete(key, recurse=recurse, cas=cas))

    # Watches

    def watch_key(self, key: str, *, wait: float = DEFAULT_WAIT,
                  min_interval: float = DEFAULT_MIN_INTERVAL) -> Iterator[KVPair | None]:
        """Yield the key's entry now and again each time it changes; None while the key does not exist.

        Each read blocks up to `wait` seconds on the server. An unreachable
        server and 5xx errors are retried with backoff; other errors are raised.
        """
        return self._watch(operations.key_watch(key, wait, min_interval))

    def watch_service(self, name: str, *, passing: bool = True, tag: str | None = None,
                      wait: float = DEFAULT_WAIT,
                      min_interval: float = DEFAULT_MIN_INTERVAL) -> Iterator[list[ServiceInstance]]:
        """Yield the service's instances (only passing ones when `passing`) now and on each change."""
        return self._watch(operations.service_watch(name, passing, tag, wait, min_interval))

    def _watch(self, watch: Watch[T]) -> Iterator[T]:
        """Run `watch` until the client is closed; waits are cut short by close()."""
        while not self._closed.wait(watch.pace()):
            try:
                changed, value = watch.handle(self.send(watch.request()))
            except CorralError as error:
                if self.closed:
                    return
                self._closed.wait(watch.failed(error))
                continue
            if changed:
                yield value  # type: ignore[misc]
