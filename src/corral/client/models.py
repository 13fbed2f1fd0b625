"""The values the client sends and returns: check definitions, KV pairs and service instances."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from corral.client.core import duration_text


@dataclass(frozen=True)
class Check:
    """A health check to register with a service, built with http(), tcp() or ttl().

    Durations are seconds or Go duration strings such as "10s".
    `deregister_after` removes the service once the check has been critical
    that long (Consul's DeregisterCriticalServiceAfter, at least 1 minute).
    """

    definition: dict[str, Any]

    @classmethod
    def http(cls, url: str, interval: str | float = "10s", timeout: str | float | None = None,
             deregister_after: str | float | None = None) -> Check:
        """Check with GET `url`: 2xx is passing, 429 warning, anything else critical."""
        definition = {"HTTP": url, "Interval": duration_text(interval)}
        return cls(_with_options(definition, timeout, deregister_after))

    @classmethod
    def tcp(cls, address: str, interval: str | float = "10s", timeout: str | float | None = None,
            deregister_after: str | float | None = None) -> Check:
        """Check that a TCP connection to HOST:PORT `address` opens."""
        definition = {"TCP": address, "Interval": duration_text(interval)}
        return cls(_with_options(definition, timeout, deregister_after))

    @classmethod
    def ttl(cls, ttl: str | float, deregister_after: str | float | None = None) -> Check:
        """Check that turns critical unless the application reports within `ttl` (Client.update_check)."""
        definition = {"TTL": duration_text(ttl)}
        return cls(_with_options(definition, None, deregister_after))

    def to_api(self) -> dict[str, Any]:
        return dict(self.definition)


def _with_options(definition: dict[str, Any], timeout: str | float | None,
                  deregister_after: str | float | None) -> dict[str, Any]:
    if timeout is not None:
        definition["Timeout"] = duration_text(timeout)
    if deregister_after is not None:
        definition["DeregisterCriticalServiceAfter"] = duration_text(deregister_after)
    return definition


@dataclass(frozen=True)
class KVPair:
    """One key of the KV store, as GET /v1/kv/KEY returns it."""

    key: str
    value: bytes
    flags: int = 0
    create_index: int = 0
    modify_index: int = 0
    lock_index: int = 0
    session: str = ""

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> KVPair:
        encoded = data.get("Value")
        return cls(
            key=data["Key"],
            value=base64.b64decode(encoded) if encoded else b"",
            flags=data.get("Flags", 0),
            create_index=data.get("CreateIndex", 0),
            modify_index=data.get("ModifyIndex", 0),
            lock_index=data.get("LockIndex", 0),
            session=data.get("Session", "") or "",
        )

    def text(self, encoding: str = "utf-8") -> str:
        return self.value.decode(encoding)


@dataclass(frozen=True)
class HealthCheck:
    check_id: str
    name: str
    status: str
    output: str
    service_id: str


@dataclass(frozen=True)
class ServiceInstance:
    """One element of /v1/health/service/NAME: a service instance, its node and its checks.

    `address` is the service's address, or its node's when the service has none,
    which is the address a client connects to.
    """

    id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    node: str
    node_address: str
    checks: list[HealthCheck] = field(default_factory=list)

    @classmethod
    def from_api(cls, entry: dict[str, Any]) -> ServiceInstance:
        node = entry["Node"]
        service = entry["Service"]
        checks = [
            HealthCheck(
                check_id=check["CheckID"],
                name=check.get("Name", ""),
                status=check["Status"],
                output=check.get("Output", ""),
                service_id=check.get("ServiceID", ""),
            )
            for check in entry.get("Checks") or []
        ]
        return cls(
            id=service["ID"],
            name=service["Service"],
            address=service.get("Address") or node["Address"],
            port=service.get("Port", 0),
            tags=list(service.get("Tags") or []),
            meta=dict(service.get("Meta") or {}),
            node=node["Node"],
            node_address=node["Address"],
            checks=checks,
        )

    @property
    def status(self) -> str:
        """Return the worst status of the instance's checks (node checks included); passing if none."""
        order = ("passing", "warning", "critical", "maintenance")
        worst = "passing"
        for check in self.checks:
            if check.status in order and order.index(check.status) > order.index(worst):
                worst = check.status
        return worst
