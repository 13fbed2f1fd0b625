"""What every handler of the HTTP API shares: JSON bodies, errors and blocking queries.

Consul's blocking queries: a read with `?index=N` waits until the index of
what it reads exceeds N, or until `?wait` runs out (5 minutes by default,
at most 10), and every read answers with the index in `X-Consul-Index`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from corral.duration import parse_duration
from corral.state import State

DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0

STATE_KEY = web.AppKey("state", State)


def state_of(request: web.Request) -> State:
    return request.app[STATE_KEY]


def json_response(data: Any, status: int = 200, index: int | None = None) -> web.Response:
    response = web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json"
    )
    if index is not None:
        set_index_headers(response, index)
    return response


def set_index_headers(response: web.StreamResponse, index: int) -> None:
    response.headers["X-Consul-Index"] = str(max(index, 1))
    response.headers["X-Consul-KnownLeader"] = "true"
    response.headers["X-Consul-LastContact"] = "0"


def text_error(status: int, message: str) -> web.HTTPException:
    """Return an error with a plain-text body, as Consul sends its errors."""
    error_class = web.HTTPException
    for candidate in (
        web.HTTPBadRequest,
        web.HTTPNotFound,
        web.HTTPMethodNotAllowed,
        web.HTTPConflict,
        web.HTTPRequestEntityTooLarge,
        web.HTTPInternalServerError,
    ):
        if candidate.status_code == status:
            error_class = candidate
            break
    if error_class is web.HTTPRequestEntityTooLarge:
        return web.HTTPRequestEntityTooLarge(max_size=0, actual_size=0, text=message)
    if error_class is web.HTTPMethodNotAllowed:
        return web.HTTPMethodNotAllowed("", [], text=message)
    return error_class(text=message)


def json_error(status: int, body: dict[str, Any]) -> web.HTTPException:
    """Return an error with a JSON body, for corral's own endpoints."""
    error = text_error(status, "")
    error.body = orjson.dumps(body)
    error.content_type = "application/json"
    return error


async def read_json(request: web.Request) -> Any:
    """Decode the request body as JSON, or raise 400 naming the problem."""
    raw = await request.read()
    if not raw:
        raise json_error(400, {"error": "invalid request body: expected JSON, got an empty body"})
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise json_error(400, {"error": f"invalid request body: malformed JSON: {exc}"}) from None


def kv_key_problem(key: str) -> str | None:
    """Return why `key` is not a valid KV key, or None; the rules of /v1/kv, for /v1/txn too.

    A key must not start with '/', have an empty segment or a '..' segment, or hold NUL.
    A trailing '/' is allowed, as keys like "folder/" are common in Consul.
    """
    if key.startswith("/"):
        return f"Invalid key name {key!r}: a key must not start with '/'"
    segments = key.split("/")
    if any(segment == "" for segment in segments[:-1]) or ".." in segments:
        return f"Invalid key name {key!r}: empty segments and '..' are not allowed"
    if "\x00" in key:
        return f"Invalid key name {key!r}: NUL is not allowed"
    return None


def check_datacenter(request: web.Request) -> None:
    """Raise Consul's 500 "No path to datacenter" when `?dc` names a datacenter not served here."""
    wanted = request.query.get("dc")
    if wanted and wanted != state_of(request).datacenter:
        raise text_error(500, f"No path to datacenter: {wanted!r} is not served here")


def flag_present(request: web.Request, name: str) -> bool:
    """Tell whether a Consul-style flag such as `?recurse` is set; `?recurse=false` counts as unset."""
    if name not in request.query:
        return False
    return request.query[name].lower() not in ("false", "0")


def parse_uint(
    request: web.Request, name: str, message: str, empty_allowed: bool = False, exact_message: bool = False
) -> int | None:
    """Read an unsigned integer query parameter, or raise 400 with `message` and the value given.

    Returns None when the parameter is absent. Like Consul, which parses ?cas and
    ?flags whenever they are present, an empty value is invalid unless `empty_allowed`.
    With `exact_message`, the error is `message` alone, for texts that Consul clients match.
    """
    text = request.query.get(name)
    if text is None or (text == "" and empty_allowed):
        return None
    error = message if exact_message else f"{message}, got {text!r}"
    # str.isdigit() also accepts digits of other scripts and superscripts, which Go's
    # ParseUint rejects and int() either rejects or reads as other numbers.
    if not (text.isascii() and text.isdigit()):
        raise text_error(400, error)
    value = int(text)
    if value >= 2**64:
        raise text_error(400, error)
    return value


def check_consistency(request: web.Request) -> None:
    """Raise 400 for `?stale` with `?consistent`, as Consul does on the reads of its state store.

    Consul's agent and event endpoints read no consistency mode, so only the
    KV, session, catalog and health reads call this.
    """
    if "stale" in request.query and "consistent" in request.query:
        raise text_error(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")


def blocking_params(request: web.Request) -> tuple[int | None, float]:
    """Read `?index` and `?wait`; return the index (None if absent) and the wait in seconds."""
    index = parse_uint(request, "index", "Invalid index", empty_allowed=True, exact_message=True)
    wait = DEFAULT_WAIT
    text = request.query.get("wait")
    if text:
        try:
            wait = parse_duration(text)
        except (TypeError, ValueError):
            raise text_error(400, "Invalid wait time") from None
        if wait < 0:
            raise text_error(400, "Invalid wait time")
        # Consul reads a zero wait as the default, so a client that sends "0s" for an
        # unset wait long-polls instead of spinning on immediate responses.
        wait = min(wait, MAX_WAIT) if wait > 0 else DEFAULT_WAIT
    return index, wait


async def block(
    request: web.Request,
    current_index: Callable[[], int],
    watched: bytes | tuple[bytes, ...],
) -> int:
    """Wait as a blocking query asks, then return the index to answer with.

    `watched` is the store prefix (or prefixes) whose changes can move
    `current_index`. Without `?index`, or with an index the data has
    already passed, this returns at once. Like Consul, the wait gets up to
    wait/16 of random jitter so that many watchers do not return in step.
    """
    check_consistency(request)
    index, wait = blocking_params(request)
    if not index or current_index() > index:
        return current_index()
    view = state_of(request).view
    prefixes = (watched,) if isinstance(watched, bytes) else watched
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait + random.uniform(0, wait / 16)
    while current_index() <= index:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        if not await view.wait_for_next_change(prefixes, remaining):
            break
    return current_index()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
