"""Weighted Dominant Resource Fairness (DRF) ordering of allocation clients.

A client is a role (in the allocator's role sorter) or a framework (in its
role's framework sorter). A client's dominant share is the largest fraction
of the cluster's total cpus, mem or disk offered to it or used by its tasks,
divided by its weight. Ports are not scalar and do not count.

The sorter keeps its active clients in a list ordered by the key
(share, offer count, name), the order that Mesos's DRF sorter uses
(apache/mesos src/master/allocator/mesos/sorter/drf/sorter.hpp, compareDRF):
among equal shares the client offered resources fewer times goes first, and
the name settles the rest. A change to one client's allocation moves that one
key with two binary searches, so an allocation cycle never sorts from
scratch. A change of the cluster total or of a weight changes every share, so
it marks the order stale and the next read rebuilds it.

Quantities are integers in thousandths (of a cpu, of a MB), as the allocator
stores them.
"""

from __future__ import annotations

from bisect import bisect_left, insort

SortKey = tuple[float, int, str]


class _Client:
    __slots__ = ("name", "weight", "active", "cpus", "mem", "disk", "count", "key")

    def __init__(self, name: str, weight: float) -> None:
        self.name = name
        self.weight = weight
        self.active = False
        self.cpus = 0
        self.mem = 0
        self.disk = 0
        # Offers made to the client so far: the tie-break between equal shares.
        self.count = 0
        self.key: SortKey = (0.0, 0, name)


def validate_weight(weight: float) -> float:
    """Return weight as a float, or raise ValueError unless it is a finite number above 0."""
    value = float(weight)
    if not 0.0 < value < float("inf"):
        raise ValueError(f"invalid weight {weight!r}: expected a finite number greater than 0")
    return value


class DRFSorter:
    """Clients kept in weighted DRF order, lowest share first. Only active clients are in the order."""

    def __init__(self) -> None:
        self._clients: dict[str, _Client] = {}
        self._order: list[SortKey] = []
        self._total = (0, 0, 0)
        self._stale = False

    def __contains__(self, name: object) -> bool:
        return name in self._clients

    def __len__(self) -> int:
        return len(self._clients)

    @property
    def active_count(self) -> int:
        return len(self._order) if not self._stale else sum(c.active for c in self._clients.values())

    def add(self, name: str, weight: float = 1.0) -> None:
        """Add an inactive client with no allocation, or raise KeyError if it exists."""
        if name in self._clients:
            raise KeyError(f"client {name!r} already exists")
        self._clients[name] = _Client(name, validate_weight(weight))

    def remove(self, name: str) -> None:
        """Remove a client even if resources are still allocated to it, so release them first."""
        self.deactivate(name)
        del self._clients[name]

    def activate(self, name: str) -> bool:
        """Put a client into the order, and return whether it was inactive before."""
        client = self._clients[name]
        if client.active:
            return False
        client.active = True
        if not self._stale:
            client.key = (self._share(client), client.count, client.name)
            insort(self._order, client.key)
        return True

    def deactivate(self, name: str) -> bool:
        """Take a client out of the order, and return whether it was active before."""
        client = self._clients[name]
        if not client.active:
            return False
        client.active = False
        if not self._stale:
            self._remove_key(client.key)
        return True

    def is_active(self, name: str) -> bool:
        return self._clients[name].active

    def update_weight(self, name: str, weight: float) -> None:
        self._clients[name].weight = validate_weight(weight)
        self._stale = True

    def set_total(self, cpus: int, mem: int, disk: int) -> None:
        """Set the cluster's total quantities, the denominators of every share."""
        total = (cpus, mem, disk)
        if total != self._total:
            self._total = total
            self._stale = True

    def add_allocation(
        self, name: str, cpus: int, mem: int, disk: int, *, count_offer: bool = False
    ) -> None:
        """Add quantities (negative to subtract) to a client's allocation and move its key.

        count_offer counts one more offer made to the client, for the tie-break.
        """
        client = self._clients[name]
        client.cpus += cpus
        client.mem += mem
        client.disk += disk
        if count_offer:
            client.count += 1
        if not client.active or self._stale:
            return
        # This is the allocator's hot path, so the share is computed inline.
        order = self._order
        old_key = client.key
        index = bisect_left(order, old_key)
        if index == len(order) or order[index] != old_key:
            raise AssertionError(f"sort key {old_key!r} is missing from the DRF order")
        del order[index]
        total_cpus, total_mem, total_disk = self._total
        share = client.cpus / total_cpus if total_cpus > 0 else 0.0
        if total_mem > 0 and client.mem / total_mem > share:
            share = client.mem / total_mem
        if total_disk > 0 and client.disk / total_disk > share:
            share = client.disk / total_disk
        client.key = (share / client.weight, client.count, name)
        insort(order, client.key)

    def allocation(self, name: str) -> tuple[int, int, int]:
        client = self._clients[name]
        return (client.cpus, client.mem, client.disk)

    def share(self, name: str) -> float:
        """Return the client's dominant share divided by its weight, the first part of its sort key."""
        return self._share(self._clients[name])

    def dominant_share(self, name: str) -> float:
        """Return the client's dominant share, not divided by its weight."""
        client = self._clients[name]
        return self._share(client) * client.weight

    def sorted_active(self) -> list[str]:
        """Return the active clients' names, lowest weighted share first."""
        return [key[2] for key in self.ordered_keys()]

    def ordered_keys(self) -> list[SortKey]:
        """Return the live list of active clients' sort keys, lowest first, with the name in key[2].

        The list changes in place with every allocation change, so iterate
        it only while nothing changes, and stop at the first change.
        """
        if self._stale:
            self._rebuild()
        return self._order

    def names(self) -> list[str]:
        return list(self._clients)

    def _share(self, client: _Client) -> float:
        total_cpus, total_mem, total_disk = self._total
        share = 0.0
        if total_cpus > 0:
            share = client.cpus / total_cpus
        if total_mem > 0:
            fraction = client.mem / total_mem
            if fraction > share:
                share = fraction
        if total_disk > 0:
            fraction = client.disk / total_disk
            if fraction > share:
                share = fraction
        return share / client.weight

    def _remove_key(self, key: SortKey) -> None:
        index = bisect_left(self._order, key)
        if index == len(self._order) or self._order[index] != key:
            raise AssertionError(f"sort key {key!r} is missing from the DRF order")
        del self._order[index]

    def _rebuild(self) -> None:
        for client in self._clients.values():
            client.key = (self._share(client), client.count, client.name)
        self._order = sorted(client.key for client in self._clients.values() if client.active)
        self._stale = False
