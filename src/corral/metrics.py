"""corral's own metrics: plain counters on the hot paths, read out as Prometheus text or Consul's JSON.

Recording is a dict increment, so the HTTP middleware and the DNS server
pay little per request. At scrape time, prometheus-client renders the
text exposition from a custom collector, and to_consul_json() renders
Consul's /v1/agent/metrics shape from the same numbers. Catalog sizes are
read from the state when scraped, not kept up to date on every write.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from dnslib import QTYPE, RCODE
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from corral.types import CheckStatus

# Consul's Prometheus output names this version of the text format.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The discovery rate is averaged over this many seconds.
RATE_WINDOW_SECONDS = 60

# Methods outside this set are counted as OTHER, so that a client cannot create label values at will.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

# DNS query types counted by name; any other type is counted as OTHER, for the same reason.
DNS_QTYPES = frozenset({"A", "AAAA", "ANY", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT"})

_DNS_HEADER_SIZE = 12


class CatalogSource(Protocol):
    """The source of the catalog gauges: the state's current nodes, services and checks."""

    def nodes(self) -> list: ...

    def services(self) -> list: ...

    def checks(self) -> list: ...


# Upper bounds in seconds of the allocation cycle duration histogram's buckets.
ALLOCATION_CYCLE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(slots=True)
class AllocatorFigures:
    """The master's offer-cycle figures at one moment; counts are totals since the server started."""

    offers_made: int = 0
    offers_accepted: int = 0
    offers_declined: int = 0
    offers_rescinded: int = 0
    # Tasks launched on offers per second, over the last minute: the allocation rate.
    launches_per_second: float = 0.0
    # Cycles whose duration was at most each bound of ALLOCATION_CYCLE_BUCKETS (not cumulative).
    cycle_bucket_counts: list[int] | None = None
    cycle_count: int = 0
    cycle_seconds_total: float = 0.0
    # Each role's dominant share of the cluster, between 0 and 1.
    dominant_shares: dict[str, float] | None = None


class AllocatorSource(Protocol):
    """The source of the allocator metrics: the master."""

    def allocator_figures(self) -> AllocatorFigures: ...


class RateWindow:
    """Events per second over the last `seconds` seconds, counted in one-second buckets."""

    def __init__(self, seconds: int = RATE_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self._clock = clock
        self._buckets = [0] * seconds
        self._current = int(clock())

    def _advance(self) -> int:
        now = int(self._clock())
        if now != self._current:
            # Zero the buckets of the seconds that passed without events (all of them after a long gap).
            for second in range(self._current + 1, min(now, self._current + self.seconds) + 1):
                self._buckets[second % self.seconds] = 0
            self._current = now
        return now

    def add(self, count: int = 1) -> None:
        self._buckets[self._advance() % self.seconds] += count

    def rate(self) -> float:
        self._advance()
        return sum(self._buckets) / self.seconds


@dataclass(slots=True)
class SampleStats:
    """Count, sum, min, max and sum of squares of observed values, as Consul's samples report them."""

    count: int = 0
    total: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    squares: float = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.squares += value * value
        self.minimum = min(self.minimum, value)
        self.maximum = max(self.maximum, value)

    def to_consul(self, scale: float = 1.0) -> dict[str, float]:
        if self.count == 0:
            return {"Count": 0, "Sum": 0, "Min": 0, "Max": 0, "Mean": 0, "Stddev": 0}
        mean = self.total / self.count
        variance = max(0.0, self.squares / self.count - mean * mean)
        return {
            "Count": self.count,
            "Sum": self.total * scale,
            "Min": self.minimum * scale,
            "Max": self.maximum * scale,
            "Mean": mean * scale,
            "Stddev": math.sqrt(variance) * scale,
        }


def dns_question_labels(response: bytes) -> tuple[str, str] | None:
    """Return the query type and RCODE names of a packed DNS response, or None if it is malformed.

    Reads the header and the first question in place, without parsing the
    whole message, because this runs for every response sent.
    """
    if len(response) < _DNS_HEADER_SIZE:
        return None
    rcode = RCODE.get(response[3] & 0x0F, "OTHER")
    if response[4] == 0 and response[5] == 0:
        return "NONE", rcode
    offset = _DNS_HEADER_SIZE
    while offset < len(response):
        length = response[offset]
        if length & 0xC0 == 0xC0:
            offset += 2
            break
        offset += 1 + length
        if length == 0:
            break
    if offset + 2 > len(response):
        return None
    qtype = QTYPE.get(int.from_bytes(response[offset:offset + 2], "big"), "OTHER")
    return (qtype if qtype in DNS_QTYPES else "OTHER"), rcode


def _labels_dict(names: tuple[str, ...], values: tuple[str, ...]) -> dict[str, str]:
    return dict(zip(names, values, strict=True))


class Metrics:
    """The counters of one corral process; the API and the DNS server record into it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.http_requests: dict[tuple[str, str, str], int] = {}
        self.http_durations: dict[tuple[str, str], SampleStats] = {}
        self.blocking_queries = 0
        self.dns_queries: dict[tuple[str, str], int] = {}
        self.check_results: dict[str, int] = {}
        self.discovery = RateWindow(clock=clock)
        self.catalog: CatalogSource | None = None
        self.allocator: AllocatorSource | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # Recording

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in HTTP_METHODS else "OTHER"
        key = (method, route, str(status))
        self.http_requests[key] = self.http_requests.get(key, 0) + 1
        stats = self.http_durations.get((method, route))
        if stats is None:
            stats = self.http_durations[(method, route)] = SampleStats()
        stats.observe(seconds)

    def observe_dns_response(self, response: bytes) -> None:
        labels = dns_question_labels(response)
        if labels is None:
            return
        self.dns_queries[labels] = self.dns_queries.get(labels, 0) + 1
        self.discovery.add()

    def observe_health_lookup(self) -> None:
        self.discovery.add()

    def observe_check_result(self, status: CheckStatus) -> None:
        self.check_results[status.value] = self.check_results.get(status.value, 0) + 1

    # Reading

    def catalog_sizes(self) -> tuple[int, int, int, dict[str, int]]:
        """Return the numbers of nodes, service names, service instances, and checks by status."""
        by_status = {status.value: 0 for status in CheckStatus}
        if self.catalog is None:
            return 0, 0, 0, by_status
        services = self.catalog.services()
        for check in self.catalog.checks():
            by_status[check.status.value] = by_status.get(check.status.value, 0) + 1
        names = {service.name for service in services}
        return len(self.catalog.nodes()), len(names), len(services), by_status

    def to_prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def to_consul_json(self) -> dict[str, Any]:
        """Return the metrics in the shape of Consul's GET /v1/agent/metrics.

        NOTE: Consul reports the last 10-second interval; corral reports totals
        since the process started, so Counters and Samples only grow.
        """
        nodes, services, instances, checks = self.catalog_sizes()
        gauges = [
            _gauge("corral.http.blocking_queries", self.blocking_queries),
            _gauge("corral.catalog.nodes", nodes),
            _gauge("corral.catalog.services", services),
            _gauge("corral.catalog.service_instances", instances),
            _gauge("corral.discovery.lookups_per_second", self.discovery.rate()),
        ]
        gauges += [_gauge("corral.catalog.checks", count, {"status": status}) for status, count in checks.items()]
        counters = [
            _counter("corral.http.requests", count, _labels_dict(("method", "route", "status"), key))
            for key, count in sorted(self.http_requests.items())
        ]
        counters += [
            _counter("corral.dns.queries", count, _labels_dict(("qtype", "rcode"), key))
            for key, count in sorted(self.dns_queries.items())
        ]
        counters += [
            _counter("corral.checks.results", count, {"status": status})
            for status, count in sorted(self.check_results.items())
        ]
        # Milliseconds, as Consul's timers report them.
        samples = [
            {"Name": "corral.http.request_duration", **stats.to_consul(scale=1000.0),
             "Labels": _labels_dict(("method", "route"), key)}
            for key, stats in sorted(self.http_durations.items())
        ]
        if self.allocator is not None:
            figures = self.allocator.allocator_figures()
            for name in ("offers_made", "offers_accepted", "offers_declined", "offers_rescinded"):
                counters.append(_counter(f"corral.allocator.{name}", getattr(figures, name), {}))
            gauges.append(_gauge("corral.allocator.launches_per_second", figures.launches_per_second))
            gauges += [_gauge("corral.allocator.dominant_share", share, {"role": role})
                       for role, share in sorted((figures.dominant_shares or {}).items())]
        timestamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")
        return {"Timestamp": timestamp, "Gauges": gauges, "Points": [], "Counters": counters, "Samples": samples}


def _gauge(name: str, value: float, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"Name": name, "Value": value, "Labels": labels or {}}


def _counter(name: str, count: int, labels: dict[str, str]) -> dict[str, Any]:
    # Every increment is 1, so the statistics of the increments follow from the count.
    return {"Name": name, "Count": count, "Sum": count, "Min": 1, "Max": 1, "Mean": 1, "Stddev": 0,
            "Labels": labels}


class _Collector:
    """Renders a Metrics object as Prometheus metric families when the registry is scraped."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        requests = CounterMetricFamily(
            "corral_http_requests", "HTTP requests answered, by method, route pattern and status.",
            labels=["method", "route", "status"],
        )
        for key, count in metrics.http_requests.items():
            requests.add_metric(list(key), count)
        yield requests

        durations = SummaryMetricFamily(
            "corral_http_request_duration_seconds", "Time to answer HTTP requests, by method and route pattern.",
            labels=["method", "route"],
        )
        for key, stats in metrics.http_durations.items():
            durations.add_metric(list(key), stats.count, stats.total)
        yield durations

        yield GaugeMetricFamily(
            "corral_http_blocking_queries", "Blocking queries (?index or ?hash) being held now.",
            value=metrics.blocking_queries,
        )

        dns = CounterMetricFamily(
            "corral_dns_queries", "DNS responses sent, by query type and response code.", labels=["qtype", "rcode"],
        )
        for key, count in metrics.dns_queries.items():
            dns.add_metric(list(key), count)
        yield dns

        results = CounterMetricFamily(
            "corral_check_results", "Health check results recorded by the agent, by status.", labels=["status"],
        )
        for status, count in metrics.check_results.items():
            results.add_metric([status], count)
        yield results

        nodes, services, instances, checks = metrics.catalog_sizes()
        yield GaugeMetricFamily("corral_catalog_nodes", "Nodes in the catalog.", value=nodes)
        yield GaugeMetricFamily("corral_catalog_services", "Distinct service names in the catalog.", value=services)
        yield GaugeMetricFamily(
            "corral_catalog_service_instances", "Service instances in the catalog.", value=instances
        )
        by_status = GaugeMetricFamily("corral_catalog_checks", "Checks in the catalog, by status.", labels=["status"])
        for status, count in checks.items():
            by_status.add_metric([status], count)
        yield by_status

        if metrics.allocator is not None:
            yield from _allocator_families(metrics.allocator.allocator_figures())

        yield GaugeMetricFamily(
            "corral_discovery_lookups_per_second",
            f"DNS responses and /v1/health/service lookups answered per second, over the last "
            f"{RATE_WINDOW_SECONDS} seconds.",
            value=metrics.discovery.rate(),
        )


def _allocator_families(figures: AllocatorFigures) -> Iterator[Metric]:
    for name, text in (
        ("offers_made", "Offers sent to frameworks."),
        ("offers_accepted", "Offers accepted with at least one launch."),
        ("offers_declined", "Offers declined, or accepted with no launch."),
        ("offers_rescinded", "Offers taken back: timed out, or their agent or framework went away."),
    ):
        yield CounterMetricFamily(f"corral_allocator_{name}", text, value=getattr(figures, name))
    buckets = []
    cumulative = 0
    for bound, count in zip(ALLOCATION_CYCLE_BUCKETS, figures.cycle_bucket_counts or [], strict=False):
        cumulative += count
        buckets.append((repr(bound), cumulative))
    buckets.append(("+Inf", figures.cycle_count))
    yield HistogramMetricFamily(
        "corral_allocator_cycle_seconds", "Duration of the allocation cycles.",
        buckets=buckets, sum_value=figures.cycle_seconds_total,
    )
    yield GaugeMetricFamily(
        "corral_allocator_launches_per_second",
        "Tasks launched on offers per second over the last minute (the allocation rate).",
        value=figures.launches_per_second,
    )
    shares = GaugeMetricFamily(
        "corral_allocator_role_dominant_share", "Each role's dominant share of the cluster.", labels=["role"]
    )
    for role, share in sorted((figures.dominant_shares or {}).items()):
        shares.add_metric([role], share)
    yield shares
