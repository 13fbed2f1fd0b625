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

# A client is one list, its record: [share, tie-break, name, cpus, mem, disk, weight,
# active, payload], where payload is any object the caller attached to the client.
# The tie-break is offer count * RANK_SPAN + the rank of the name among the
# sorter's names, so that (share, tie-break) orders as (share, offer count,
# name) does, with an integer comparison in place of a string one. Ranks are
# unique, so a comparison of two records never reaches the name. The order
# contains the records themselves and compares them as lists. One mutable record
# per client, rather than a client object and a new key tuple on every change,
# saves an allocation and the attribute lookups on each of the two sorter
# updates per offer.
SHARE, TIEBREAK, NAME, CPUS, MEM, DISK, WEIGHT, ACTIVE, PAYLOAD = range(9)
RANK_SPAN = 1 << 32

ClientRecord = list


def validate_weight(weight: float) -> float:
    """Return weight as a float, or raise ValueError unless it is a finite number above 0."""
    value = float(weight)
    if not 0.0 < value < float("inf"):
        raise ValueError(f"invalid weight {weight!r}: expected a finite number greater than 0")
    return value


class DRFSorter:
    """Clients kept in weighted DRF order, lowest share first. Only active clients are in the order."""

    def __init__(self) -> None:
        self._clients: dict[str, ClientRecord] = {}
        # The clients' names in sorted order, for ranking a new name.
        self._names: list[str] = []
        self._order: list[ClientRecord] = []
        self._total = (0, 0, 0)
        self._stale = False

    def __contains__(self, name: object) -> bool:
        return name in self._clients

    def __len__(self) -> int:
        return len(self._clients)

    @property
    def active_count(self) -> int:
        if not self._stale:
            return len(self._order)
        return sum(1 for record in self._clients.values() if record[ACTIVE])

    def add(self, name: str, weight: float = 1.0, payload: object = None) -> None:
        """Add an inactive client with no allocation, or raise KeyError if it exists.

        payload is stored in the client's record, so that a caller walking
        ordered_records() reaches its own object for the client without a lookup.
        """
        if name in self._clients:
            raise KeyError(f"client {name!r} already exists")
        record = [0.0, 0, name, 0, 0, 0, validate_weight(weight), False, payload]
        self._clients[name] = record
        self._rank_new_name(name)

    def remove(self, name: str) -> None:
        """Remove a client even if resources are still allocated to it, so release them first."""
        self.deactivate(name)
        del self._clients[name]
        del self._names[bisect_left(self._names, name)]

    def activate(self, name: str) -> bool:
        """Put a client into the order, and return whether it was inactive before."""
        record = self._clients[name]
        if record[ACTIVE]:
            return False
        record[ACTIVE] = True
        if not self._stale:
            record[SHARE] = self._share(record)
            insort(self._order, record)
        return True

    def deactivate(self, name: str) -> bool:
        """Take a client out of the order, and return whether it was active before."""
        record = self._clients[name]
        if not record[ACTIVE]:
            return False
        if not self._stale:
            self._remove_record(record)
        record[ACTIVE] = False
        return True

    def is_active(self, name: str) -> bool:
        return self._clients[name][ACTIVE]

    def update_weight(self, name: str, weight: float) -> None:
        self._clients[name][WEIGHT] = validate_weight(weight)
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
        """Add quantities (negative to subtract) to a client's allocation and move it in the order.

        count_offer counts one more offer made to the client, for the tie-break.
        """
        record = self._clients[name]
        if record[ACTIVE] and not self._stale:
            self._remove_record(record)
            self._add(record, cpus, mem, disk, count_offer)
            record[SHARE] = self._share(record)
            insort(self._order, record)
        else:
            self._add(record, cpus, mem, disk, count_offer)

    def add_offer(self, record: ClientRecord, cpus: int, mem: int, disk: int) -> None:
        """Add an offer of these quantities to the client whose record ordered_records() listed.

        This is add_allocation(name, cpus, mem, disk, count_offer=True) for the
        allocator's hot path, two calls per offer, so it takes the record and
        computes the share inline.
        """
        if not record[ACTIVE] or self._stale:
            self._add(record, cpus, mem, disk, True)
            return
        order = self._order
        # The allocator offers mostly to the first client in the order, so
        # check that place before a binary search. The record is found by
        # identity, because the order contains the records themselves.
        if order[0] is record:
            index = 0
        else:
            index = bisect_left(order, record)
            if index == len(order) or order[index] is not record:
                raise AssertionError(f"client {record[NAME]!r} is missing from the DRF order")
        del order[index]
        client_cpus = record[CPUS] = record[CPUS] + cpus
        client_mem = record[MEM] = record[MEM] + mem
        client_disk = record[DISK] = record[DISK] + disk
        record[TIEBREAK] += RANK_SPAN
        total_cpus, total_mem, total_disk = self._total
        share = client_cpus / total_cpus if total_cpus > 0 else 0.0
        if total_mem > 0 and client_mem / total_mem > share:
            share = client_mem / total_mem
        if total_disk > 0 and client_disk / total_disk > share:
            share = client_disk / total_disk
        record[SHARE] = share / record[WEIGHT]
        # The share only grows and the count too, so the record moves right of index.
        insort(order, record, index)

    def allocation(self, name: str) -> tuple[int, int, int]:
        record = self._clients[name]
        return (record[CPUS], record[MEM], record[DISK])

    def share(self, name: str) -> float:
        """Return the client's dominant share divided by its weight, the first part of its sort key."""
        return self._share(self._clients[name])

    def dominant_share(self, name: str) -> float:
        """Return the client's dominant share, not divided by its weight."""
        record = self._clients[name]
        return self._share(record) * record[WEIGHT]

    def sorted_active(self) -> list[str]:
        """Return the active clients' names, lowest weighted share first."""
        return [record[NAME] for record in self.ordered_records()]

    def ordered_records(self) -> list[ClientRecord]:
        """Return the live list of active clients' records, lowest sort key first, with the name in record[NAME].

        The list changes in place with every allocation change, so iterate
        it only while nothing changes, and stop at the first change. The
        records are for reading and for add_offer only.
        """
        if self._stale:
            self._rebuild()
        return self._order

    def names(self) -> list[str]:
        return list(self._clients)

    @staticmethod
    def _add(record: ClientRecord, cpus: int, mem: int, disk: int, count_offer: bool) -> None:
        record[CPUS] += cpus
        record[MEM] += mem
        record[DISK] += disk
        if count_offer:
            record[TIEBREAK] += RANK_SPAN

    def _rank_new_name(self, name: str) -> None:
        """Give a new client a rank between its neighbours' in name order.

        When no rank is free between them, spread all ranks evenly again.
        Changing ranks this way keeps the order sorted, because ranks always
        follow name order.
        """
        names = self._names
        index = bisect_left(names, name)
        names.insert(index, name)
        clients = self._clients
        low = clients[names[index - 1]][TIEBREAK] % RANK_SPAN if index > 0 else -1
        high = clients[names[index + 1]][TIEBREAK] % RANK_SPAN if index + 1 < len(names) else RANK_SPAN
        if high - low > 1:
            clients[name][TIEBREAK] += (low + high) // 2
            return
        step = RANK_SPAN // (len(names) + 1)
        for rank, other in enumerate(names, 1):
            record = clients[other]
            record[TIEBREAK] = record[TIEBREAK] // RANK_SPAN * RANK_SPAN + rank * step

    def _share(self, record: ClientRecord) -> float:
        total_cpus, total_mem, total_disk = self._total
        share = 0.0
        if total_cpus > 0:
            share = record[CPUS] / total_cpus
        if total_mem > 0:
            fraction = record[MEM] / total_mem
            if fraction > share:
                share = fraction
        if total_disk > 0:
            fraction = record[DISK] / total_disk
            if fraction > share:
                share = fraction
        return share / record[WEIGHT]

    def _remove_record(self, record: ClientRecord) -> None:
        index = bisect_left(self._order, record)
        if index == len(self._order) or self._order[index] is not record:
            raise AssertionError(f"client {record[NAME]!r} is missing from the DRF order")
        del self._order[index]

    def _rebuild(self) -> None:
        for record in self._clients.values():
            record[SHARE] = self._share(record)
        self._order = sorted(record for record in self._clients.values() if record[ACTIVE])
        self._stale = False
