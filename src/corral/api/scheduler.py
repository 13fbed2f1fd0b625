"""Mesos's v1 scheduler HTTP API, in JSON, and the operator views of frameworks and roles.

    POST /api/v1/scheduler    SUBSCRIBE returns 200 with a RecordIO event stream and a
                              Mesos-Stream-Id header. Every other call returns 202.
    GET  /v1/frameworks       the frameworks with their tasks, resources and DRF shares
    GET  /v1/roles            the roles with their weights, frameworks and DRF shares
    POST /v1/frameworks/ID/executor-messages  an agent passes an executor's MESSAGE to its framework
    POST /v1/frameworks/ID/executor-exits     an agent reports that an executor exited (a FAILURE event)

A RecordIO record is the byte length of a JSON event in decimal, a newline,
and the event. The stream starts with SUBSCRIBED, then carries OFFERS,
RESCIND, UPDATE, FAILURE, ERROR and a HEARTBEAT whenever nothing else was
sent for heartbeat_interval_seconds. Calls other than SUBSCRIBE must name
their `framework_id` and send the stream's id in the Mesos-Stream-Id header.
Errors are plain text, as Mesos sends them: 400 for an invalid call or an
unknown framework, and 403 for a framework that is not subscribed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from corral.api.common import json_response
from corral.master import protocol
from corral.master.master import CallError, Master, Subscription
from corral.master.protocol import ProtocolError

log = logging.getLogger(__name__)

MASTER_KEY = web.AppKey("master", Master)

STREAM_ID_HEADER = "Mesos-Stream-Id"

# How often a stream with nothing to send checks whether its client went away.
_DISCONNECT_POLL_SECONDS = 1.0


def _master(request: web.Request) -> Master:
    return request.app[MASTER_KEY]


def _error(status: int, message: str) -> web.HTTPException:
    classes = {400: web.HTTPBadRequest, 403: web.HTTPForbidden, 404: web.HTTPNotFound,
               406: web.HTTPNotAcceptable, 415: web.HTTPUnsupportedMediaType, 501: web.HTTPNotImplemented}
    error_class = classes.get(status, web.HTTPBadRequest)
    if error_class is web.HTTPUnsupportedMediaType:
        return web.HTTPUnsupportedMediaType(text=message)
    return error_class(text=message)


def encode_record(event: dict[str, Any]) -> bytes:
    """Frame one event as a RecordIO record."""
    data = orjson.dumps(event)
    return str(len(data)).encode() + b"\n" + data


async def _read_call(request: web.Request) -> dict[str, Any]:
    content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise _error(415, f"Expecting 'Content-Type' of application/json; got {content_type!r} "
                          "(corral speaks only the JSON form of the scheduler API)")
    accept = request.headers.get("Accept", "application/json")
    if not any(kind.split(";")[0].strip() in ("application/json", "*/*", "application/*")
               for kind in accept.split(",")):
        raise _error(406, "Expecting 'Accept' to allow 'application/json'")
    raw = await request.read()
    try:
        call = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _error(400, f"Failed to parse body into JSON: {exc}") from None
    if not isinstance(call, dict):
        raise _error(400, "Failed to validate scheduler::Call: expected a JSON object")
    if not isinstance(call.get("type"), str):
        raise _error(400, "Failed to validate scheduler::Call: Expecting 'type' to be present")
    return call


async def scheduler_call(request: web.Request) -> web.StreamResponse:
    call = await _read_call(request)
    kind = call["type"]
    try:
        if kind == "SUBSCRIBE":
            return await _subscribe(request, call)
        return await _call(request, kind, call)
    except ProtocolError as exc:
        raise _error(400, f"Failed to validate scheduler::Call: {exc}") from None
    except CallError as exc:
        raise _error(exc.status, exc.message) from None


# --- SUBSCRIBE ---------------------------------------------------------------------


async def _subscribe(request: web.Request, call: dict[str, Any]) -> web.StreamResponse:
    if STREAM_ID_HEADER in request.headers:
        raise _error(400, "Subscribe calls should not include the 'Mesos-Stream-Id' header")
    body = protocol.read_object(call.get("subscribe"), "subscribe")
    info = protocol.read_object(body.get("framework_info"), "subscribe.framework_info")
    if "framework_id" in call:
        framework_id = protocol.read_id(call["framework_id"], "framework_id")
        info_id = info.get("id")
        if info_id is None:
            info = {**info, "id": {"value": framework_id}}
        elif protocol.read_id(info_id, "subscribe.framework_info.id") != framework_id:
            raise ProtocolError("'framework_id' differs from 'subscribe.framework_info.id'")
    master = _master(request)
    subscription = await master.subscribe(info)
    response = web.StreamResponse(status=200)
    response.content_type = "application/json"
    response.headers[STREAM_ID_HEADER] = subscription.stream_id
    response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        await _stream(request, response, subscription, master.config.heartbeat_interval)
    except ConnectionError as exc:
        log.info("subscription stream closed framework=%s: %s", subscription.framework_id, exc)
    finally:
        master.disconnected(subscription)
    return response


async def _stream(
    request: web.Request, response: web.StreamResponse, subscription: Subscription, heartbeat: float
) -> None:
    """Write the subscription's events until it ends or the client goes away."""
    last_write = time.monotonic()
    while True:
        if _client_gone(request):
            log.info("framework connection lost framework=%s", subscription.framework_id)
            return
        wait = min(_DISCONNECT_POLL_SECONDS, max(heartbeat - (time.monotonic() - last_write), 0.0))
        try:
            event = await subscription.next(wait)
        except TimeoutError:
            if time.monotonic() - last_write < heartbeat:
                continue
            event = protocol.HEARTBEAT_EVENT
        if event is None:
            return
        await response.write(encode_record(event))
        last_write = time.monotonic()


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# --- Other calls ----------------------------------------------------------------------------


async def _call(request: web.Request, kind: str, call: dict[str, Any]) -> web.Response:
    handler = _HANDLERS.get(kind)
    if handler is None:
        if kind in _UNSUPPORTED:
            raise _error(501, f"Call type {kind} is not supported by corral")
        raise _error(400, f"Failed to validate scheduler::Call: unknown call type {kind!r}")
    if "framework_id" not in call:
        raise _error(400, "Failed to validate scheduler::Call: Expecting 'framework_id' to be present")
    framework_id = protocol.read_id(call["framework_id"], "framework_id")
    master = _master(request)
    master.framework_for_call(framework_id, request.headers.get(STREAM_ID_HEADER))
    field = kind.lower()
    body = call.get(field, {})
    if body is None:
        body = {}
    protocol.read_object(body, field)
    await handler(master, framework_id, body)
    return web.Response(status=202)


async def _accept(master: Master, framework_id: str, body: dict[str, Any]) -> None:
    await master.accept(framework_id, body)


async def _decline(master: Master, framework_id: str, body: dict[str, Any]) -> None:
    master.decline(framework_id, body)


async def _kill(master: Master, framework_id: str, body: dict[str, Any]) -> None:
    await master.kill(framework_id, body)


async def _acknowledge(master: Master, framework_id: str, body: dict[str, Any]) -> None:
    await master.acknowledge(framework_id, body)


async def _reconcile(master: Master, framework_id: str, body: dict[str, Any]) -> None:
    master.reconcile(framework_id, body)


async def _suppress(master: Master, framework_id: str, body: dict[str, Any]) -> None:
    master.suppress(framework_id, body)


async def _revive(master: Master, framework_id: str, body: dict[str, Any]) -> None:
    master.revive(framework_id, body)


async def _teardown(master: Master, framework_id: str, body: dict[str, Any]) -> None:
    await master.teardown(framework_id)


async def _message(master: Master, framework_id: str, body: dict[str, Any]) -> None:
    await master.message(framework_id, body)


async def _shutdown(master: Master, framework_id: str, body: dict[str, Any]) -> None:
    await master.shutdown(framework_id, body)


_HANDLERS: dict[str, Callable[[Master, str, dict[str, Any]], Awaitable[None]]] = {
    "ACCEPT": _accept,
    "DECLINE": _decline,
    "KILL": _kill,
    "ACKNOWLEDGE": _acknowledge,
    "RECONCILE": _reconcile,
    "SUPPRESS": _suppress,
    "REVIVE": _revive,
    "TEARDOWN": _teardown,
    "MESSAGE": _message,
    "SHUTDOWN": _shutdown,
}

_UNSUPPORTED = frozenset({
    "REQUEST", "ACCEPT_INVERSE_OFFERS", "DECLINE_INVERSE_OFFERS",
    "ACKNOWLEDGE_OPERATION_STATUS", "RECONCILE_OPERATIONS", "UPDATE_FRAMEWORK",
})


# --- Operator views ----------------------------------------------------------------------------


async def list_frameworks(request: web.Request) -> web.Response:
    return json_response(_master(request).frameworks_view())


async def list_roles(request: web.Request) -> web.Response:
    return json_response(_master(request).roles_view())


# --- Reports of agents about custom executors -----------------------------------------------------


async def executor_message(request: web.Request) -> web.Response:
    """Pass an executor's message to its framework: {"AgentID", "ExecutorID", "Data" (base64)}."""
    framework_id = request.match_info["framework_id"]
    body = await _read_report(request, ("AgentID", "ExecutorID", "Data"))
    try:
        protocol.read_base64(body["Data"], "Data")
    except ProtocolError as exc:
        raise _error(400, str(exc)) from None
    delivered = _master(request).executor_message(framework_id, body["AgentID"], body["ExecutorID"], body["Data"])
    return json_response({"Delivered": delivered})


async def executor_exited(request: web.Request) -> web.Response:
    """Tell a framework that its executor exited: {"AgentID", "ExecutorID", "Status" (wait status or null)}."""
    framework_id = request.match_info["framework_id"]
    body = await _read_report(request, ("AgentID", "ExecutorID"))
    status = body.get("Status")
    if status is not None and (isinstance(status, bool) or not isinstance(status, int)):
        raise _error(400, f"invalid 'Status' {status!r}: expected an integer wait status or null")
    _master(request).executor_exited(framework_id, body["AgentID"], body["ExecutorID"], status)
    return json_response({})


async def _read_report(request: web.Request, names: tuple[str, ...]) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise _error(400, f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise _error(400, "invalid body: expected a JSON object")
    for name in names:
        if not isinstance(body.get(name), str) or not body[name]:
            raise _error(400, f"invalid '{name}' {body.get(name)!r}: expected a non-empty string")
    return body


def add_routes(app: web.Application, master: Master) -> None:
    app[MASTER_KEY] = master
    app.router.add_post("/api/v1/scheduler", scheduler_call)
    app.router.add_get("/v1/frameworks", list_frameworks)
    app.router.add_get("/v1/roles", list_roles)
    app.router.add_post("/v1/frameworks/{framework_id}/executor-messages", executor_message)
    app.router.add_post("/v1/frameworks/{framework_id}/executor-exits", executor_exited)
