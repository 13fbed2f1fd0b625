"""Consul's session endpoints, `/v1/session/*`.

Errors keep Consul's statuses and texts, because client libraries match
on them: python-consul and Patroni read a 500 whose body starts with
"Invalid Session TTL" or "invalid session".
"""

from __future__ import annotations

import orjson
from aiohttp import web

from corral.api.catalog import SERVER_INFO_KEY
from corral.api.common import block, check_datacenter, json_response, state_of, text_error
from corral.state.records import SESSIONS
from corral.state.sessions import SessionError, SessionManager, parse_session_request, session_to_api

SESSIONS_KEY = web.AppKey("sessions", SessionManager)


def _sessions(request: web.Request) -> SessionManager:
    return request.app[SESSIONS_KEY]


async def create_session(request: web.Request) -> web.Response:
    check_datacenter(request)
    raw = await request.read()
    body: object = {}
    if raw.strip():
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise text_error(400, f"Request decode failed: {exc}") from None
    if not isinstance(body, dict):
        raise text_error(400, "Request decode failed: expected a JSON object")
    try:
        session_request = parse_session_request(body, request.app[SERVER_INFO_KEY]["node"])
        session = await _sessions(request).create(session_request)
    except SessionError as exc:
        raise text_error(exc.status, str(exc)) from None
    state = state_of(request)
    return json_response({"ID": session.id}, index=state.view.index(SESSIONS))


async def destroy_session(request: web.Request) -> web.Response:
    check_datacenter(request)
    await _sessions(request).destroy(request.match_info["id"])
    return json_response(True)


async def renew_session(request: web.Request) -> web.Response:
    check_datacenter(request)
    session_id = request.match_info["id"]
    session = await _sessions(request).renew(session_id)
    if session is None:
        raise text_error(404, f"Session id '{session_id}' not found")
    state = state_of(request)
    return json_response([session_to_api(state, session)], index=state.view.index(SESSIONS))


async def session_info(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    session_id = request.match_info["id"]
    index = await block(request, lambda: state.view.index(SESSIONS), SESSIONS)
    session = state.session(session_id)
    return json_response([session_to_api(state, session)] if session else [], index=index)


async def node_sessions(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    node = request.match_info["node"]
    index = await block(request, lambda: state.view.index(SESSIONS), SESSIONS)
    # Node names match case-insensitively, as in Consul.
    stored = state.find_node(node)
    if stored is not None:
        node = stored.name
    return json_response([session_to_api(state, s) for s in state.sessions(node=node)], index=index)


async def list_sessions(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    index = await block(request, lambda: state.view.index(SESSIONS), SESSIONS)
    return json_response([session_to_api(state, s) for s in state.sessions()], index=index)


def add_routes(app: web.Application, sessions: SessionManager) -> None:
    app[SESSIONS_KEY] = sessions
    router = app.router
    router.add_put("/v1/session/create", create_session)
    router.add_put("/v1/session/destroy/{id}", destroy_session)
    router.add_put("/v1/session/renew/{id}", renew_session)
    router.add_get("/v1/session/info/{id}", session_info)
    router.add_get("/v1/session/node/{node}", node_sessions)
    router.add_get("/v1/session/list", list_sessions)
