"""Settings of the DNS interface, with Consul's defaults, and parsers for their flags."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from corral.duration import parse_duration

# RFC 2181 section 8: a TTL is an unsigned 32-bit number whose top bit must be 0.
MAX_TTL = 2**31 - 1

RECURSOR_PORT = 53


@dataclass(slots=True)
class DNSConfig:
    """Settings of the DNS server. TTLs are in whole seconds and timeouts in seconds.

    ``service_ttl`` maps a service name, or a name prefix ending in ``*``, to the TTL of
    that service's records; an exact name wins over a prefix and a longer prefix over a
    shorter one, as in Consul's ``dns_config.service_ttl``. ``node_ttl`` applies to node
    and ``.addr`` lookups. With ``only_passing``, instances with a warning check are left
    out too. With ``enable_truncate``, a UDP response that had records dropped to fit sets
    the TC bit; without it (Consul's default) the client gets the records that fit and no
    hint that more exist. ``recursors`` are the IP and port of upstream servers that names
    outside the domains are forwarded to, tried in order. A TCP connection with no request
    for ``tcp_idle_timeout`` seconds is closed.
    """

    domains: tuple[str, ...] = ("consul", "corral")
    node_ttl: int = 0
    service_ttl: dict[str, int] = field(default_factory=dict)
    only_passing: bool = False
    enable_truncate: bool = False
    recursors: tuple[tuple[str, int], ...] = ()
    recursor_timeout: float = 2.0
    tcp_idle_timeout: float = 10.0
    cache_max_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("invalid dns domains: expected at least one domain")
        _check_ttl("node ttl", self.node_ttl)
        for name, ttl in self.service_ttl.items():
            _check_ttl(f"service ttl of {name!r}", ttl)
        self.service_ttl = {name.lower(): ttl for name, ttl in self.service_ttl.items()}
        if self.recursor_timeout <= 0:
            raise ValueError(f"invalid dns recursor timeout {self.recursor_timeout}: expected seconds > 0")
        if self.tcp_idle_timeout <= 0:
            raise ValueError(f"invalid dns tcp idle timeout {self.tcp_idle_timeout}: expected seconds > 0")
        if self.cache_max_bytes < 0:
            raise ValueError(f"invalid dns cache size {self.cache_max_bytes}: expected bytes >= 0")

    def ttl_for_service(self, name: str) -> int:
        """Return the TTL of service ``name`` (lowercase), or 0 when no entry matches."""
        ttls = self.service_ttl
        if not ttls:
            return 0
        ttl = ttls.get(name)
        if ttl is not None:
            return ttl
        best_length = -1
        best = 0
        for pattern, pattern_ttl in ttls.items():
            if pattern.endswith("*"):
                prefix = pattern[:-1]
                if len(prefix) > best_length and name.startswith(prefix):
                    best_length, best = len(prefix), pattern_ttl
        return best


def _check_ttl(what: str, ttl: int) -> None:
    if not 0 <= ttl <= MAX_TTL:
        raise ValueError(f"invalid dns {what} {ttl}: expected whole seconds from 0 to {MAX_TTL}")


def parse_ttl(text: str) -> int:
    """Parse a duration such as "10s" or "1m" into whole seconds for a TTL, or raise ValueError."""
    seconds = parse_duration(text)
    if seconds < 0:
        raise ValueError(f"invalid ttl {text!r}: expected a duration >= 0, such as 10s")
    if seconds > MAX_TTL:
        raise ValueError(f"invalid ttl {text!r}: expected at most {MAX_TTL} seconds")
    # DNS counts TTLs in whole seconds; Consul truncates the same way.
    return int(seconds)


def parse_service_ttl(text: str) -> tuple[str, int]:
    """Parse "NAME=DURATION" or "DURATION" (which means every service, "*") into (name, seconds)."""
    name, equals, duration = text.rpartition("=")
    if not equals:
        return "*", parse_ttl(text)
    if not name:
        raise ValueError(f"invalid service ttl {text!r}: expected NAME=DURATION, such as web=10s")
    return name, parse_ttl(duration)


def parse_recursor(text: str) -> tuple[str, int]:
    """Parse "IP", "IP:PORT", "[IPv6]:PORT" or a bare IPv6 address into (ip, port); port 53 if omitted."""
    value = text.strip()
    host, port_text = value, ""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid recursor {text!r}: expected [IPv6]:PORT, such as [::1]:53")
        port_text = rest[1:]
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"invalid recursor {text!r}: expected an IP address with an optional port, such as 127.0.0.1:53"
        ) from None
    if not port_text:
        return str(address), RECURSOR_PORT
    # isascii() too, because isdigit() also accepts superscripts, which int() rejects.
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid recursor port in {text!r}: expected 1 to 65535")
    return str(address), int(port_text)
