"""Mesos's v1 executor HTTP API, in JSON, served by an agent for its custom executors.

    POST /api/v1/executor    SUBSCRIBE returns 200 with a RecordIO event stream;
                             UPDATE and MESSAGE return 202

Every call names its `framework_id` and `executor_id`, and only an
executor that the agent started (corral.agent.custom_executor) may call.
The stream starts with SUBSCRIBED, then carries LAUNCH, KILL,
ACKNOWLEDGED, MESSAGE, SHUTDOWN, ERROR and a HEARTBEAT whenever nothing
else was sent for the heartbeat interval. Errors are plain text, as Mesos
sends them: 400 for an invalid call or an unknown executor, 415 for a body
that is not JSON, 503 when the master cannot be reached for a MESSAGE.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web

from corral.agent.custom_executor import ExecutorCallError, ExecutorManager, ExecutorRun, ExecutorStream
from corral.api.scheduler import encode_record
from corral.master import protocol
from corral.master.protocol import ProtocolError

log = logging.getLogger(__name__)

EXECUTORS_KEY = web.AppKey("executors", ExecutorManager)

# How often a stream with nothing to send checks whether its client went away.
_DISCONNECT_POLL_SECONDS = 1.0


def _manager(request: web.Request) -> ExecutorManager:
    return request.app[EXECUTORS_KEY]


def _error(status: int, message: str) -> web.HTTPException:
    classes = {400: web.HTTPBadRequest, 415: web.HTTPUnsupportedMediaType, 503: web.HTTPServiceUnavailable}
    return classes.get(status, web.HTTPBadRequest)(text=message)


async def _read_call(request: web.Request) -> dict[str, Any]:
    content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise _error(415, f"Expecting 'Content-Type' of application/json; got {content_type!r} "
                          "(corral speaks only the JSON form of the executor API)")
    try:
        call = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise _error(400, f"Failed to parse body into JSON: {exc}") from None
    if not isinstance(call, dict) or not isinstance(call.get("type"), str):
        raise _error(400, "Failed to validate executor::Call: expected a JSON object with a 'type'")
    return call


async def executor_call(request: web.Request) -> web.StreamResponse:
    call = await _read_call(request)
    kind = call["type"]
    manager = _manager(request)
    try:
        framework_id = protocol.read_id(call.get("framework_id"), "framework_id")
        executor_id = protocol.read_id(call.get("executor_id"), "executor_id")
        run = manager.run_for_call(framework_id, executor_id)
        field = kind.lower()
        body = call.get(field) or {}
        protocol.read_object(body, field)
        if kind == "SUBSCRIBE":
            return await _subscribe(request, manager, run, body)
        if kind == "UPDATE":
            status = protocol.read_object(body.get("status"), "update.status")
            await manager.update(run, status)
        elif kind == "MESSAGE":
            await manager.message(run, protocol.read_base64(body.get("data"), "message.data"))
        else:
            raise ProtocolError(f"unknown call type {kind!r}: expected SUBSCRIBE, UPDATE or MESSAGE")
    except ProtocolError as exc:
        raise _error(400, f"Failed to validate executor::Call: {exc}") from None
    except ExecutorCallError as exc:
        log.warning("executor call rejected type=%s node=%s: %s", kind, manager.node, exc.message)
        raise _error(exc.status, exc.message) from None
    return web.Response(status=202)


async def _subscribe(
    request: web.Request, manager: ExecutorManager, run: ExecutorRun, body: dict[str, Any]
) -> web.StreamResponse:
    stream = await manager.subscribe(run, body)
    response = web.StreamResponse(status=200)
    response.content_type = "application/json"
    response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        await _write_events(request, response, stream, manager.heartbeat_interval)
    except ConnectionError as exc:
        log.info("executor stream closed executor=%s framework=%s: %s", run.executor_id, run.framework_id, exc)
    finally:
        manager.unsubscribed(run, stream)
    return response


async def _write_events(
    request: web.Request, response: web.StreamResponse, stream: ExecutorStream, heartbeat: float
) -> None:
    last_write = time.monotonic()
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        wait = min(_DISCONNECT_POLL_SECONDS, max(heartbeat - (time.monotonic() - last_write), 0.0))
        try:
            event = await stream.next(wait)
        except TimeoutError:
            if time.monotonic() - last_write < heartbeat:
                continue
            event = {"type": "HEARTBEAT"}
        if event is None:
            return
        await response.write(encode_record(event))
        last_write = time.monotonic()


def add_routes(app: web.Application, manager: ExecutorManager) -> None:
    app[EXECUTORS_KEY] = manager
    app.router.add_post("/api/v1/executor", executor_call)
