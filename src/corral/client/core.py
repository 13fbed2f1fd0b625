"""Addresses, requests, responses and errors, shared by the blocking and the asyncio client.

Nothing here does I/O. Each client turns a `Request` into a `Response` over
its own transport, and every decoding step reads a `Response`.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from corral.duration import format_duration, parse_duration

DEFAULT_HTTP_ADDR = "127.0.0.1:8500"
HTTP_ADDR_ENV = "CORRAL_HTTP_ADDR"
DEFAULT_TIMEOUT = 30.0

# Consul's server waits up to wait/16 longer than asked, to spread watchers out,
# so the socket timeout of a blocking query leaves that much and a margin.
_BLOCKING_MARGIN = 5.0


class CorralError(Exception):
    """A request that failed.

    `status` is the HTTP status, or None when there is none; `text` is the
    server's error text as Consul sends it (plain text, or the "error" field
    of corral's own JSON errors). `unreachable` is True when no response came
    because the server could not be reached or the connection broke.
    """

    def __init__(self, message: str, status: int | None = None, text: str = "", unreachable: bool = False):
        super().__init__(message)
        self.status = status
        self.text = text
        self.unreachable = unreachable


def parse_address(text: str, flag: str = "HTTP address") -> tuple[str, int]:
    """Parse HOST:PORT (an http:// prefix is allowed), or raise ValueError naming `flag`."""
    address = text.strip()
    if address.startswith("http://"):
        address = address[len("http://"):].rstrip("/")
    host, colon, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid {flag} {text!r}: expected HOST:PORT, such as 127.0.0.1:8500")
    return host, int(port_text)


def resolve_address(address: str | None) -> tuple[str, int]:
    """Return the server's host and port: `address`, else $CORRAL_HTTP_ADDR, else 127.0.0.1:8500."""
    if address is None:
        address = os.environ.get(HTTP_ADDR_ENV) or DEFAULT_HTTP_ADDR
        return parse_address(address, HTTP_ADDR_ENV if HTTP_ADDR_ENV in os.environ else "HTTP address")
    return parse_address(address)


def duration_text(value: str | float) -> str:
    """Return a Go duration string for seconds or for a duration string; raise ValueError if invalid."""
    return format_duration(parse_duration(value))


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    # Seconds to wait for the response; None means the client's default.
    timeout: float | None = None

    def target(self) -> str:
        """Return the path with its query, percent-encoded, as the request line carries it."""
        target = urllib.parse.quote(self.path, safe="/")
        if self.query:
            target += "?" + urllib.parse.urlencode(self.query)
        return target

    def describe(self) -> str:
        return f"{self.method} {self.path}"


def json_request(method: str, path: str, data: Any = None, **kwargs: Any) -> Request:
    body = json.dumps(data).encode() if data is not None else None
    return Request(method, path, body=body, **kwargs)


def blocking_query(index: int, wait: float) -> list[tuple[str, str]]:
    """Return the query parameters of a blocking read at `index`; index 0 reads without blocking."""
    if index <= 0:
        return []
    return [("index", str(index)), ("wait", f"{max(1, round(wait * 1000))}ms")]


def blocking_timeout(wait: float) -> float:
    return wait + wait / 16 + _BLOCKING_MARGIN


@dataclass
class Response:
    status: int
    body: bytes
    # Header names as the server sent them; look them up with header().
    headers: dict[str, str]

    def header(self, name: str, default: str = "") -> str:
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return default

    @property
    def index(self) -> int:
        """X-Consul-Index, or 0 when it is missing or malformed."""
        text = self.header("X-Consul-Index")
        return int(text) if text.isdigit() else 0

    def json(self) -> Any:
        return json.loads(self.body)


def error_text(response: Response) -> str:
    """Return the server's error text: plain text as Consul sends it, or corral's JSON "error" field."""
    try:
        decoded = json.loads(response.body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and "error" in decoded:
        return str(decoded["error"])
    return response.body.decode("utf-8", errors="replace").strip()


def raise_for_status(request: Request, response: Response) -> Response:
    """Return `response`, or raise CorralError with the server's text if its status is 400 or more."""
    if response.status < 400:
        return response
    text = error_text(response)
    message = f"{request.describe()} failed with HTTP {response.status}"
    if text:
        message += f": {text}"
    raise CorralError(message, response.status, text)


def unreachable(base_url: str, reason: object) -> CorralError:
    return CorralError(f"cannot reach corral at {base_url} ({reason})", unreachable=True)
