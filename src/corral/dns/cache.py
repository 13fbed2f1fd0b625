"""Encoded DNS responses, kept until the catalog changes.

A response depends only on the request's bytes (apart from its 16-bit ID), on the
transport, on the catalog and on the random order of shuffled answers. So the cache is
keyed by the request's bytes after the ID, one cache per transport, and stores the
response's bytes after the ID: a hit costs one dict lookup and one concatenation, with
no parsing. The key contains the name as sent, the type, the class, the flags and the
EDNS0 OPT record with its payload size, which sets the UDP size limit.

A shuffled answer keeps several encodings, each built with its own random order, and
hits rotate through them, so that clients still see instances in varied order. Requests
that differ in any byte, such as a random EDNS cookie, are separate entries.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

# Requests larger than this are not cached; ordinary queries are well below it.
MAX_KEY_SIZE = 512

# Encodings kept for a shuffled answer that fits the transport whole.
SHUFFLED_VARIANTS = 8

# At most this many encodings per answer, for answers cut to fit the transport.
MAX_VARIANTS = 64


def variants_wanted(total_groups: int, kept_groups: int) -> int:
    """Return how many encodings to keep for an answer of ``total_groups`` instances.

    One when the order cannot vary. When only ``kept_groups`` fit, enough encodings
    that each instance appears in about two of them, within ``MAX_VARIANTS``.
    """
    if total_groups <= 1:
        return 1
    if kept_groups >= total_groups:
        return SHUFFLED_VARIANTS
    # NOTE: each encoding keeps a random subset, so an instance can still be in none of
    # them until the catalog changes; rotating one shuffled order would guarantee coverage.
    needed = 2 * -(-total_groups // max(kept_groups, 1))
    return max(SHUFFLED_VARIANTS, min(needed, MAX_VARIANTS))


class AnswerCache:
    """Encoded responses by request bytes, bounded in total size, oldest entries evicted first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.size = 0
        # Entries with all their encodings, rotating forever.
        self._ready: dict[bytes, Iterator[bytes]] = {}
        # Entries still collecting encodings: key -> (encodings, number wanted).
        self._filling: dict[bytes, tuple[list[bytes], int]] = {}
        # Every key in insertion order, with the bytes it holds.
        self._sizes: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._sizes)

    def lookup(self, key: bytes) -> bytes | None:
        """Return the next encoding for ``key``, or None while the entry is missing or filling."""
        encodings = self._ready.get(key)
        if encodings is None:
            return None
        return next(encodings)

    def add(self, key: bytes, body: bytes, wanted: int) -> None:
        """Store one encoding for ``key``; after ``wanted`` of them, lookups rotate through them."""
        if len(key) > MAX_KEY_SIZE or key in self._ready:
            return
        if len(key) + len(body) > self.max_bytes:
            return
        while self._sizes and self.size + len(key) + len(body) > self.max_bytes:
            self._evict_oldest()
        added = len(body) if key in self._sizes else len(key) + len(body)
        filling = self._filling.get(key)
        if filling is None:
            filling = ([], wanted)
            self._filling[key] = filling
        encodings, wanted = filling
        encodings.append(body)
        self._sizes[key] = self._sizes.get(key, 0) + added
        self.size += added
        if len(encodings) >= wanted:
            del self._filling[key]
            self._ready[key] = itertools.cycle(encodings)

    def clear(self) -> int:
        """Drop every entry and return how many there were."""
        count = len(self._sizes)
        self._ready.clear()
        self._filling.clear()
        self._sizes.clear()
        self.size = 0
        return count

    def _evict_oldest(self) -> None:
        key = next(iter(self._sizes))
        self.size -= self._sizes.pop(key)
        self._ready.pop(key, None)
        self._filling.pop(key, None)
