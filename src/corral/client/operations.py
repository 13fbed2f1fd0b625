"""Each API call as a request to send and a function that decodes its response.

Both clients run these: `Client` over http.client and `AsyncClient` over
aiohttp. Decoders raise CorralError for an error status, except where
Consul's API uses the status as an answer (404 for a missing KV key).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from corral.client.core import (
    CorralError,
    Request,
    Response,
    blocking_query,
    blocking_timeout,
    json_request,
    raise_for_status,
)
from corral.client.models import Check, KVPair, ServiceInstance
from corral.client.watch import Watch

T = TypeVar("T")

CHECK_STATUSES = ("passing", "warning", "critical")


@dataclass(frozen=True)
class Call(Generic[T]):
    request: Request
    decode: Callable[[Response], T]


def _decode_json(request: Request) -> Callable[[Response], Any]:
    def decode(response: Response) -> Any:
        return raise_for_status(request, response).json()

    return decode


def _decode_nothing(request: Request) -> Callable[[Response], None]:
    def decode(response: Response) -> None:
        raise_for_status(request, response)

    return decode


def _json_call(request: Request) -> Call[Any]:
    return Call(request, _decode_json(request))


# Agent: the services and checks of the agent the client talks to


def register_service(
    name: str,
    *,
    service_id: str | None = None,
    address: str = "",
    port: int = 0,
    tags: Iterable[str] = (),
    meta: dict[str, str] | None = None,
    check: Check | None = None,
) -> Call[str]:
    """PUT /v1/agent/service/register; the call returns the service ID."""
    if not name:
        raise ValueError("invalid service name '': a service needs a name")
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid port {port}: expected 0 to 65535")
    body: dict[str, Any] = {"Name": name, "ID": service_id or name, "Address": address, "Port": port}
    body["Tags"] = list(tags)
    if meta:
        body["Meta"] = dict(meta)
    if check is not None:
        body["Check"] = check.to_api()
    request = json_request("PUT", "/v1/agent/service/register", body)
    registered_id = body["ID"]

    def decode(response: Response) -> str:
        raise_for_status(request, response)
        return registered_id

    return Call(request, decode)


def deregister_service(service_id: str) -> Call[None]:
    request = Request("PUT", f"/v1/agent/service/deregister/{service_id}")
    return Call(request, _decode_nothing(request))


def update_check(check_id: str, status: str, output: str = "") -> Call[None]:
    """PUT /v1/agent/check/update/ID: set a TTL check's status and output, and restart its TTL."""
    if status not in CHECK_STATUSES:
        raise ValueError(f"invalid check status {status!r}: expected passing, warning or critical")
    request = json_request("PUT", f"/v1/agent/check/update/{check_id}", {"Status": status, "Output": output})
    return Call(request, _decode_nothing(request))


def agent_self() -> Call[dict]:
    return _json_call(Request("GET", "/v1/agent/self"))


def members() -> Call[list[dict]]:
    return _json_call(Request("GET", "/v1/agent/members"))


def metrics(prometheus: bool = False) -> Call[Any]:
    """GET /v1/agent/metrics: a dict in Consul's JSON shape, or the Prometheus text with prometheus=True."""
    query = [("format", "prometheus")] if prometheus else []
    request = Request("GET", "/v1/agent/metrics", query=query)
    if not prometheus:
        return _json_call(request)

    def decode(response: Response) -> str:
        return raise_for_status(request, response).body.decode()

    return Call(request, decode)


# Catalog and health


def catalog_services(index: int = 0, wait: float = 0.0) -> Call[dict[str, list[str]]]:
    request = Request("GET", "/v1/catalog/services", query=blocking_query(index, wait),
                      timeout=blocking_timeout(wait) if index else None)
    return _json_call(request)


def catalog_nodes() -> Call[list[dict]]:
    return _json_call(Request("GET", "/v1/catalog/nodes"))


def health_service(name: str, *, passing: bool = True, tag: str | None = None,
                   index: int = 0, wait: float = 0.0) -> Call[list[ServiceInstance]]:
    """GET /v1/health/service/NAME: the instances, only those whose checks all pass when `passing`."""
    if not name:
        raise ValueError("invalid service name '': a service needs a name")
    query = []
    if passing:
        query.append(("passing", "1"))
    if tag:
        query.append(("tag", tag))
    query += blocking_query(index, wait)
    request = Request("GET", f"/v1/health/service/{name}", query=query,
                      timeout=blocking_timeout(wait) if index else None)

    def decode(response: Response) -> list[ServiceInstance]:
        entries = raise_for_status(request, response).json()
        return [ServiceInstance.from_api(entry) for entry in entries]

    return Call(request, decode)


# Key/value store


def _check_key(key: str) -> None:
    if not key or key.startswith("/"):
        raise ValueError(f"invalid key {key!r}: expected a non-empty key that does not start with '/'")


def kv_get(key: str, *, index: int = 0, wait: float = 0.0) -> Call[KVPair | None]:
    """GET /v1/kv/KEY; the call returns None for a missing key."""
    _check_key(key)
    request = Request("GET", f"/v1/kv/{key}", query=blocking_query(index, wait),
                      timeout=blocking_timeout(wait) if index else None)

    def decode(response: Response) -> KVPair | None:
        if response.status == 404:
            return None
        entries = raise_for_status(request, response).json()
        return KVPair.from_api(entries[0])

    return Call(request, decode)


def _decode_bool(request: Request) -> Callable[[Response], bool]:
    def decode(response: Response) -> bool:
        result = raise_for_status(request, response).json()
        if not isinstance(result, bool):
            raise CorralError(f"{request.describe()} returned {json.dumps(result)}, expected true or false",
                              response.status)
        return result

    return decode


def kv_put(key: str, value: bytes | str, *, cas: int | None = None, flags: int | None = None) -> Call[bool]:
    """PUT /v1/kv/KEY; the call returns False when a `cas` write did not apply."""
    _check_key(key)
    query = []
    if cas is not None:
        query.append(("cas", str(cas)))
    if flags is not None:
        query.append(("flags", str(flags)))
    body = value.encode() if isinstance(value, str) else bytes(value)
    request = Request("PUT", f"/v1/kv/{key}", query=query, body=body)
    return Call(request, _decode_bool(request))


def kv_delete(key: str, *, recurse: bool = False, cas: int | None = None) -> Call[bool]:
    """DELETE /v1/kv/KEY, or every key under the prefix with `recurse`; False when a `cas` delete did not apply."""
    if not recurse:
        _check_key(key)
    query = []
    if recurse:
        query.append(("recurse", "true"))
    if cas is not None:
        query.append(("cas", str(cas)))
    request = Request("DELETE", f"/v1/kv/{key}", query=query)
    return Call(request, _decode_bool(request))


def key_watch(key: str, wait: float, min_interval: float) -> Watch:
    """Build the watch of one KV key that both clients run: its entry, or None while it does not exist."""
    return Watch(
        f"key {key}",
        lambda index, wait: kv_get(key, index=index, wait=wait).request,
        kv_get(key).decode,
        wait,
        min_interval,
    )


def service_watch(name: str, passing: bool, tag: str | None, wait: float, min_interval: float) -> Watch:
    """Build the watch of one service's instances that both clients run."""
    return Watch(
        f"service {name}",
        lambda index, wait: health_service(name, passing=passing, tag=tag, index=index, wait=wait).request,
        health_service(name, passing=passing, tag=tag).decode,
        wait,
        min_interval,
    )
