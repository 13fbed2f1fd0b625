"""The state of a watch: a loop of blocking queries, shared by both clients.

It follows Consul's rules for blocking-query clients: the first read does
not block; later reads block on the last X-Consul-Index; an index that goes
backwards (a store restored from older data, a server started afresh)
resets the index to 0, so the next read starts over without blocking; an
index of 0 in a response is raised to 1, so that a read never spins on 0;
and calls are rate-limited by a token bucket with a burst of 2, so quick
changes are delivered at once and a key that churns is read at most once
per `min_interval`. Like Consul's watch plans, a result equal to the last
one delivered is not delivered again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from corral.client.core import CorralError, Request, Response

log = logging.getLogger("corral.client")

T = TypeVar("T")

DEFAULT_WAIT = 300.0
# NOTE: Consul's docs suggest degrading to about one call per 15 s under churn; 1 s is this
# client's own choice, which favours quick configuration reloads over server load.
DEFAULT_MIN_INTERVAL = 1.0
# Failed reads are retried after 1 s, doubling up to this many seconds.
MAX_RETRY_DELAY = 30.0
RATE_BURST = 2


class TokenBucket:
    """Allows `burst` calls at once, then one call per `interval` seconds."""

    def __init__(self, interval: float, burst: int = RATE_BURST, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def reserve(self) -> float:
        """Take a token and return how many seconds the caller must wait before using it."""
        now = self._clock()
        if self.interval <= 0:
            return 0.0
        self._tokens = min(self.burst, self._tokens + (now - self._updated) / self.interval)
        self._updated = now
        self._tokens -= 1
        if self._tokens >= 0:
            return 0.0
        return -self._tokens * self.interval


_NOTHING = object()


class Watch(Generic[T]):
    """The index, the last result and the pacing of one watch; the clients do the I/O.

    `build(index, wait)` returns the request to send; `decode` turns a
    response into the value to deliver and raises CorralError for an error.
    """

    def __init__(
        self,
        what: str,
        build: Callable[[int, float], Request],
        decode: Callable[[Response], T],
        wait: float = DEFAULT_WAIT,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        if wait <= 0:
            raise ValueError(f"invalid wait {wait!r}: expected more than 0 seconds")
        if min_interval < 0:
            raise ValueError(f"invalid min_interval {min_interval!r}: expected 0 or more seconds")
        self.what = what
        self.index = 0
        self.wait = wait
        self._build = build
        self._decode = decode
        self._bucket = TokenBucket(min_interval, clock=clock)
        self._last: object = _NOTHING
        self._failures = 0

    def pace(self) -> float:
        """Return the seconds to wait before the next request, as the rate limit allows."""
        return self._bucket.reserve()

    def request(self) -> Request:
        return self._build(self.index, self.wait)

    def handle(self, response: Response) -> tuple[bool, T | None]:
        """Record a response; return (True, value) when the value is new, else (False, None).

        Raises CorralError for an error status.
        """
        value = self._decode(response)
        self._failures = 0
        received = response.index
        if received < self.index:
            log.info("watch index went backwards, reading again from 0 what=%s index=%d received=%d",
                     self.what, self.index, received)
            self.index = 0
        else:
            self.index = max(received, 1)
        if self._last is not _NOTHING and value == self._last:
            return False, None
        self._last = value
        return True, value

    def failed(self, error: CorralError) -> float:
        """Return the seconds to wait before retrying after `error`, or re-raise it if retrying cannot help.

        An unreachable server and a 5xx status are retried, with a delay that
        doubles from 1 s up to 30 s. A 4xx status (a bad request) is raised.
        """
        if error.status is not None and error.status < 500:
            raise error
        self._failures += 1
        delay = min(MAX_RETRY_DELAY, 2.0 ** (self._failures - 1))
        log.warning("watch read failed, retrying what=%s attempt=%d delay=%.0fs error=%s",
                    self.what, self._failures, delay, error)
        return delay
