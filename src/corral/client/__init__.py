"""A Python client for corral's HTTP API, blocking (`Client`) and asyncio (`AsyncClient`).

    from corral.client import Check, Client

    client = Client()  # CORRAL_HTTP_ADDR, else 127.0.0.1:8500
    client.register_service("web", port=8080, check=Check.http("http://127.0.0.1:8080/healthz"))
    for instance in client.healthy_instances("web"):
        print(instance.address, instance.port)
    for entry in client.watch_key("config/web"):
        print(entry.text() if entry else "no value")

Both clients build the same requests and decode the same responses
(corral.client.operations); errors are CorralError, with the HTTP status
and the server's text.
"""

from corral.client.aio import AsyncClient
from corral.client.core import DEFAULT_HTTP_ADDR, HTTP_ADDR_ENV, CorralError, Request, Response, parse_address
from corral.client.models import Check, HealthCheck, KVPair, ServiceInstance
from corral.client.sync import Client

__all__ = [
    "DEFAULT_HTTP_ADDR",
    "HTTP_ADDR_ENV",
    "AsyncClient",
    "Check",
    "Client",
    "CorralError",
    "HealthCheck",
    "KVPair",
    "Request",
    "Response",
    "ServiceInstance",
    "parse_address",
]
