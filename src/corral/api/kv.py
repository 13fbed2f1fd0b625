"""Consul's key/value endpoint, `/v1/kv/<key>`.

GET reads one key, or with `?recurse` every key that starts with the key as
a raw string prefix, or with `?keys` only the key names (cut after
`?separator`). PUT stores the body as the value and answers the JSON
literal `true` or `false`; DELETE removes one key or a prefix. `?cas`
makes a write conditional on the key's ModifyIndex, 0 meaning "only if
absent".
"""

from __future__ import annotations

import base64

import orjson
from aiohttp import web

from corral.api.common import (
    block,
    check_datacenter,
    flag_present,
    json_response,
    kv_key_problem,
    parse_uint,
    set_index_headers,
    state_of,
    text_error,
)
from corral.state import State
from corral.state.kvlocks import InvalidSessionError
from corral.state.records import KVEntry, kv_key

# Consul's default limit on a KV value (kv_max_value_size).
MAX_VALUE_SIZE = 512 * 1024

# The limit this application applies, from corral dev's --kv-max-value-size.
MAX_VALUE_SIZE_KEY = web.AppKey("kv_max_value_size", int)


def _key_of(request: web.Request, required: bool) -> str:
    """Return the key from the path, decoded once, or raise 400 for a malformed one."""
    key = request.match_info.get("key", "")
    if required and key == "":
        raise text_error(400, "Missing key name")
    problem = kv_key_problem(key)
    if problem is not None:
        raise text_error(400, problem)
    return key


def entry_to_api(entry: KVEntry) -> dict:
    data = {
        "LockIndex": entry.lock_index,
        "Key": entry.key,
        "Flags": entry.flags,
        "Value": base64.b64encode(entry.value).decode() if entry.value else None,
        "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index,
    }
    if entry.session:
        data["Session"] = entry.session
    return data


async def get_kv(request: web.Request) -> web.StreamResponse:
    check_datacenter(request)
    state = state_of(request)
    key = _key_of(request, required=False)
    recurse = flag_present(request, "recurse")
    list_keys = "keys" in request.query
    if list_keys and recurse:
        raise text_error(400, "Conflicting flags: ?keys and ?recurse cannot be used together")
    prefix_read = recurse or list_keys
    if not prefix_read and key == "":
        raise text_error(400, "Missing key name")

    def current_index() -> int:
        return state.kv_index(key, recurse=prefix_read)

    index = await block(request, current_index, kv_key(key))
    if list_keys:
        # "seperator" is an old misspelling that Consul still accepts.
        separator = request.query.get("separator", request.query.get("seperator", ""))
        return _keys_response(state.kv_list(key), key, separator, index)
    if not recurse and "raw" not in request.query:
        cached = cached_body(request.app[BODY_CACHE_KEY], state, key)
        if cached is not None:
            return _json_body_response(cached, index)
    entries = state.kv_list(key) if recurse else [e for e in [state.kv_get(key)] if e is not None]
    if not entries:
        response = web.Response(status=404)
        set_index_headers(response, index)
        return response
    if flag_present(request, "raw") and not recurse:
        response = web.Response(body=entries[0].value, content_type="text/plain")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = "sandbox"
        set_index_headers(response, index)
        return response
    return json_response([entry_to_api(entry) for entry in entries], index=index)


# Encoded GET bodies of single keys by key, with the modify revision they were made
# at: every change of a key's value, flags or lock gives it a new modify revision,
# so thousands of blocking queries woken by one write encode its body once. One
# cache per application, because each serves its own store.
BODY_CACHE_KEY = web.AppKey("kv_body_cache", dict)
_BODY_CACHE_SIZE = 4096


def cached_body(cache: dict[str, tuple[int, bytes]], state: State, key: str) -> bytes | None:
    """Return the JSON body of a GET of `key`, encoding it at most once per revision; None if missing."""
    kv = state.view.get(kv_key(key))
    if kv is None:
        return None
    cached = cache.get(key)
    if cached is not None and cached[0] == kv.mod_revision:
        return cached[1]
    entry = state.kv_get(key)
    body = orjson.dumps([entry_to_api(entry)])
    if len(cache) >= _BODY_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = (kv.mod_revision, body)
    return body


def _json_body_response(body: bytes, index: int) -> web.Response:
    response = web.Response(body=body, content_type="application/json")
    set_index_headers(response, index)
    return response


def _keys_response(entries: list[KVEntry], prefix: str, separator: str, index: int) -> web.Response:
    names: list[str] = []
    for entry in entries:
        name = entry.key
        if separator:
            cut = name.find(separator, len(prefix))
            if cut != -1:
                name = name[: cut + len(separator)]
        if not names or names[-1] != name:
            names.append(name)
    # Like Consul, an empty listing of the root is [] and of any other prefix 404.
    if not names and prefix != "":
        response = web.Response(status=404)
        set_index_headers(response, index)
        return response
    return json_response(names, index=index)


async def put_kv(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    key = _key_of(request, required=True)
    lock_flags = [name for name in ("cas", "acquire", "release") if name in request.query]
    if len(lock_flags) > 1:
        raise text_error(400, f"Conflicting flags: {'&'.join(lock_flags)}")
    flags = parse_uint(request, "flags", "Invalid flags: expected an unsigned 64-bit integer") or 0
    cas = parse_uint(request, "cas", "Invalid cas index: expected an unsigned integer")
    value = await _read_value(request)
    for lock_flag in ("acquire", "release"):
        if lock_flag in request.query:
            session_id = request.query[lock_flag]
            try:
                stored = await state.kv_lock(key, value, flags, session_id, acquire=lock_flag == "acquire")
            except InvalidSessionError as exc:
                raise text_error(500, str(exc)) from None
            return json_response(stored)
    stored = await state.kv_put(key, value, flags=flags, cas=cas)
    return json_response(stored)


async def _read_value(request: web.Request) -> bytes:
    """Read the whole request body, or raise 413 once it exceeds the KV value size limit."""
    limit = request.app.get(MAX_VALUE_SIZE_KEY, MAX_VALUE_SIZE)
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(f"{request.content_length} bytes", limit)
    # StreamReader.read(n) returns only what has arrived so far, so a body that
    # comes in several TCP segments or chunks is read in a loop.
    chunks = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"at least {size} bytes", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: str, limit: int) -> web.HTTPException:
    return text_error(
        413,
        f"Request body({size}) too large, max size: {limit} bytes. "
        "See https://developer.hashicorp.com/consul/docs/agent/config/config-files#kv_max_value_size.",
    )


async def delete_kv(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    recurse = flag_present(request, "recurse")
    key = _key_of(request, required=not recurse)
    cas = parse_uint(request, "cas", "Invalid cas index: expected an unsigned integer")
    if recurse and cas is not None:
        raise text_error(400, "Conflicting flags: ?cas and ?recurse cannot be used together")
    deleted = await state.kv_delete(key, recurse=recurse, cas=cas)
    return json_response(deleted)


def add_routes(app: web.Application) -> None:
    app[BODY_CACHE_KEY] = {}
    app.router.add_get("/v1/kv/{key:.*}", get_kv)
    app.router.add_put("/v1/kv/{key:.*}", put_kv)
    app.router.add_delete("/v1/kv/{key:.*}", delete_kv)
