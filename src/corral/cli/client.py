"""A small blocking HTTP client for the command line, on the standard library.

Commands find the server through --http-addr or CORRAL_HTTP_ADDR, as
Consul's commands do with CONSUL_HTTP_ADDR.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

DEFAULT_HTTP_ADDR = "127.0.0.1:8500"
HTTP_ADDR_ENV = "CORRAL_HTTP_ADDR"


class ClientError(Exception):
    """A request that failed: the server is unreachable or answered with an error."""

    def __init__(self, message: str, status: int | None = None, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """Parse HOST:PORT (an http:// prefix is allowed), or raise ValueError naming `flag`."""
    address = text.strip()
    if address.startswith("http://"):
        address = address[len("http://"):].rstrip("/")
    host, colon, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid {flag} {text!r}: expected HOST:PORT, such as 127.0.0.1:8500")
    return host, int(port_text)


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    def __init__(self, address: str, timeout: float = 30.0):
        host, port = parse_address(address, "HTTP address")
        self.base = f"http://{host}:{port}"
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        query: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send one request; return any answer, raising ClientError only when the server is unreachable."""
        url = self.base + urllib.parse.quote(path, safe="/")
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as answer:
                return Response(answer.status, answer.read(), dict(answer.headers))
        except urllib.error.HTTPError as error:
            return Response(error.code, error.read(), dict(error.headers))
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ClientError(
                f"cannot reach corral at {self.base} ({reason}); is `corral dev` running? "
                f"Set {HTTP_ADDR_ENV} or --http-addr to its HTTP address"
            ) from None

    def json(self, method: str, path: str, data: Any = None, **kwargs) -> Any:
        """Send a request with a JSON body and return the decoded answer, raising ClientError on an error status."""
        body = json.dumps(data).encode() if data is not None else None
        response = self.request(method, path, body=body, **kwargs)
        if response.status >= 400:
            raise ClientError(_error_message(response), response.status, _decode_or_none(response.body))
        return response.json()


def _decode_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _error_message(response: Response) -> str:
    decoded = _decode_or_none(response.body)
    if isinstance(decoded, dict) and "error" in decoded:
        return str(decoded["error"])
    text = response.body.decode("utf-8", errors="replace").strip()
    return text or f"HTTP {response.status}"
