"""GET /v1/agent/metrics, and the middleware that counts every HTTP request.

Requests are labelled by route pattern (/v1/kv/{key}), never by raw path,
so that the number of label values stays bounded by the routes.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from corral.api.common import json_response, text_error
from corral.metrics import PROMETHEUS_CONTENT_TYPE, Metrics

METRICS_KEY = web.AppKey("metrics", Metrics)

# The route whose answers count toward the discovery rate, with DNS responses.
HEALTH_SERVICE_ROUTE = "/v1/health/service/{name}"

# Status recorded for a request whose client disconnected before the response, as nginx logs it.
CLIENT_CLOSED_STATUS = 499


def route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def is_blocking(request: web.Request) -> bool:
    """Tell whether a request is a blocking query: ?index above 0, or ?hash for the agent's lists.

    NOTE: aiohttp does not cancel a handler when its client disconnects (handler_cancellation
    is off), so a blocking query whose client went away stays counted until its wait ends.
    """
    if request.method != "GET":
        return False
    index = request.query.get("index", "")
    return (index != "" and index != "0") or bool(request.query.get("hash"))


@web.middleware
async def record_metrics(request: web.Request, handler) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    blocking = is_blocking(request)
    if blocking:
        metrics.blocking_queries += 1
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED_STATUS
        raise
    finally:
        if blocking:
            metrics.blocking_queries -= 1
        route = route_label(request)
        metrics.observe_http(request.method, route, status, time.perf_counter() - started)
        if route == HEALTH_SERVICE_ROUTE and status == 200:
            metrics.observe_health_lookup()


async def agent_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    output_format = request.query.get("format", "")
    if output_format == "prometheus":
        return web.Response(body=metrics.to_prometheus(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})
    if output_format:
        raise text_error(400, f"Invalid format {output_format!r}: expected prometheus, or no format for JSON")
    return json_response(metrics.to_consul_json())


def add_routes(app: web.Application, metrics: Metrics) -> None:
    app[METRICS_KEY] = metrics
    app.router.add_get("/v1/agent/metrics", agent_metrics)
