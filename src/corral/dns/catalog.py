"""The catalog as the DNS server reads it: the protocol the state layer implements."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from corral.types import CheckStatus


@dataclass(frozen=True, slots=True)
class DNSInstance:
    """One service instance as DNS returns it.

    ``status`` is the worst status among the instance's checks and its node's checks:
    passing or warning, since the catalog leaves out critical instances.
    ``weights`` are the service's SRV weights while passing and while warning.
    """

    node: str
    node_address: str
    address: str  # "" means the node's address
    port: int
    tags: tuple[str, ...]
    status: CheckStatus = CheckStatus.PASSING
    weights: tuple[int, int] = (1, 1)

    @property
    def weight(self) -> int:
        """Return the SRV weight for the instance's status, as Consul picks it."""
        passing, warning = self.weights
        return warning if self.status is CheckStatus.WARNING else passing


class DNSNode(Protocol):
    """A catalog node as DNS reads it; the state layer's node record has these fields."""

    name: str
    address: str
    meta: Mapping[str, str]


class DNSCatalog(Protocol):
    """Catalog view that the DNS server reads; the state layer implements it."""

    datacenter: str

    def service_instances(self, name: str, tag: str | None) -> list[DNSInstance]:
        """Return the instances of service ``name`` that DNS may return, filtered by ``tag``.

        The catalog leaves out critical instances and matches name and tag case-insensitively.
        """
        ...

    def dns_node(self, name: str) -> DNSNode | None:
        """Return node ``name``, matched case-insensitively, or None if there is no such node."""
        ...

    def watch_catalog(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after every change to nodes, services or checks.

        Returns a function that stops the calls. The DNS server clears its answer cache
        in ``callback``, so the catalog must call it before any later read sees the change.
        """
        ...
