"""The asyncio client, on aiohttp: the same calls as `Client`, as coroutines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any, TypeVar

import aiohttp
from yarl import URL

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
from corral.client.sync import Query, base_url, query_pairs
from corral.client.watch import DEFAULT_MIN_INTERVAL, DEFAULT_WAIT, Watch

T = TypeVar("T")


class AsyncClient:
    """An asyncio client of corral's HTTP API; use it as `async with AsyncClient() as client`.

    `address` is HOST:PORT; without it the client reads CORRAL_HTTP_ADDR,
    then uses 127.0.0.1:8500. Pass `session` to share an aiohttp session;
    otherwise the client opens one and close() closes it. Methods raise
    CorralError when the server cannot be reached or returns an error status.
    """

    def __init__(self, address: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 session: aiohttp.ClientSession | None = None):
        self.host, self.port = resolve_address(address)
        self.base_url = base_url(self.host, self.port)
        self.timeout = timeout
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the client's own aiohttp session; a shared one is left open. Safe to call twice."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # Transport

    async def send(self, request: Request) -> Response:
        """Send one request and return the response, whatever its status.

        Raises CorralError only when the server cannot be reached or the
        request times out.
        """
        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = request.timeout if request.timeout is not None else self.timeout
        headers = {"Content-Type": "application/json"} if request.body is not None else {}
        # encoded=True: the target is already percent-encoded, and must not be encoded twice.
        url = URL(self.base_url + request.target(), encoded=True)
        try:
            async with self._session.request(
                request.method, url, data=request.body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as answer:
                body = await answer.read()
                return Response(answer.status, body, dict(answer.headers))
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise unreachable(self.base_url, error or "timed out") from None

    async def request(self, method: str, path: str, *, query: Query = None, body: bytes | None = None,
                      timeout: float | None = None) -> Response:
        """Send a request to any endpoint and return the response, whatever its status."""
        return await self.send(Request(method, path, query_pairs(query), body, timeout))

    async def request_json(self, method: str, path: str, data: Any = None, *, query: Query = None,
                           timeout: float | None = None) -> Any:
        """Send `data` as JSON and return the decoded JSON response; raise CorralError on an error status."""
        request = json_request(method, path, data, query=query_pairs(query), timeout=timeout)
        return raise_for_status(request, await self.send(request)).json()

    async def _call(self, call: Call[T]) -> T:
        return call.decode(await self.send(call.request))

    # Agent

    async def register_service(self, name: str, *, service_id: str | None = None, address: str = "",
                               port: int = 0, tags: Iterable[str] = (), meta: dict[str, str] | None = None,
                               check: Check | None = None) -> str:
        """Register a service instance with the agent, which runs its check; return the service ID."""
        return await self._call(operations.register_service(
            name, service_id=service_id, address=address, port=port, tags=tags, meta=meta, check=check,
        ))

    async def deregister_service(self, service_id: str) -> None:
        await self._call(operations.deregister_service(service_id))

    async def update_check(self, check_id: str, status: str = "passing", output: str = "") -> None:
        """Report a TTL check's status (passing, warning or critical); a service's check ID is "service:ID"."""
        await self._call(operations.update_check(check_id, status, output))

    async def agent_self(self) -> dict:
        return await self._call(operations.agent_self())

    async def members(self) -> list[dict]:
        return await self._call(operations.members())

    async def metrics(self, prometheus: bool = False) -> Any:
        return await self._call(operations.metrics(prometheus))

    # Catalog and health

    async def catalog_services(self) -> dict[str, list[str]]:
        return await self._call(operations.catalog_services())

    async def catalog_nodes(self) -> list[dict]:
        return await self._call(operations.catalog_nodes())

    async def healthy_instances(self, name: str, *, tag: str | None = None) -> list[ServiceInstance]:
        """Return the instances of service `name` whose checks all pass, node checks included."""
        return await self._call(operations.health_service(name, passing=True, tag=tag))

    async def service_instances(self, name: str, *, tag: str | None = None) -> list[ServiceInstance]:
        return await self._call(operations.health_service(name, passing=False, tag=tag))

    # Key/value store

    async def kv_get(self, key: str) -> KVPair | None:
        """Return the key's entry, or None when the key does not exist."""
        return await self._call(operations.kv_get(key))

    async def kv_put(self, key: str, value: bytes | str, *, cas: int | None = None,
                     flags: int | None = None) -> bool:
        return await self._call(operations.kv_put(key, value, cas=cas, flags=flags))

    async def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        return await self._call(operations.kv_delete(key, recurse=recurse, cas=cas))

    # Watches

    def watch_key(self, key: str, *, wait: float = DEFAULT_WAIT,
                  min_interval: float = DEFAULT_MIN_INTERVAL) -> AsyncIterator[KVPair | None]:
        """Yield the key's entry now and again each time it changes; None while the key does not exist."""
        return self._watch(operations.key_watch(key, wait, min_interval))

    def watch_service(self, name: str, *, passing: bool = True, tag: str | None = None,
                      wait: float = DEFAULT_WAIT,
                      min_interval: float = DEFAULT_MIN_INTERVAL) -> AsyncIterator[list[ServiceInstance]]:
        """Yield the service's instances (only passing ones when `passing`) now and on each change."""
        return self._watch(operations.service_watch(name, passing, tag, wait, min_interval))

    async def _watch(self, watch: Watch[T]) -> AsyncIterator[T]:
        while True:
            await asyncio.sleep(watch.pace())
            try:
                changed, value = watch.handle(await self.send(watch.request()))
            except CorralError as error:
                await asyncio.sleep(watch.failed(error))
                continue
            if changed:
                yield value  # type: ignore[misc]
