"""Consul's transaction endpoint, `PUT /v1/txn`, for KV operations.

The body is a JSON array of up to 128 operations such as
`{"KV": {"Verb": "cas", "Key": "k", "Value": "<base64>", "Index": 7}}`.
Field names match case-insensitively, as Go's JSON decoder matches them
in Consul. The response is 200 with `Results` when every operation applied,
or 409 with `Errors` (`OpIndex` and `What` for each failed operation) when
none did. A body that cannot be read as operations gets 400, and one over
the limits gets 413, both with a plain-text message as Consul sends.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

import orjson
from aiohttp import web

from corral.api.common import check_datacenter, json_response, kv_key_problem, state_of, text_error
from corral.api.kv import MAX_VALUE_SIZE, entry_to_api
from corral.state.txn import KVOp, KVVerb, TxnOutcome, apply_kv_txn

log = logging.getLogger(__name__)

# Consul's limit on the operations of one transaction: 128 in Consul's current
# documentation, where older versions allowed 64.
MAX_OPS = 128

# The limit on the whole request body: Consul's txn_max_req_len, which defaults to
# 512 KiB and is never below kv_max_value_size. A base64 value in a body this size is
# at most 3/4 of it, so values need no limit of their own.
MAX_BODY_SIZE = max(512 * 1024, MAX_VALUE_SIZE)

_MAX_UINT64 = 2**64 - 1

# Operation types of Consul's API that corral does not implement in transactions.
_UNSUPPORTED_TYPES = ("node", "service", "check", "session")


async def put_txn(request: web.Request) -> web.Response:
    check_datacenter(request)
    ops = _parse_ops(await _read_body(request))
    outcome = await apply_kv_txn(state_of(request), ops)
    log.debug(
        "kv txn done ops=%d read_only=%s errors=%d index=%d",
        len(ops), outcome.read_only, len(outcome.errors), outcome.index,
    )
    return _response(outcome)


def _response(outcome: TxnOutcome) -> web.Response:
    # Consul sends X-Consul-KnownLeader and X-Consul-LastContact for a read-only
    # transaction only, and never X-Consul-Index. Corral sends all three for a
    # read-only transaction, and for a committed write with the revision it committed at.
    if outcome.errors:
        body = {
            "Results": None,
            "Errors": [{"OpIndex": error.op_index, "What": error.what} for error in outcome.errors],
        }
        index = outcome.index if outcome.read_only else None
        return json_response(body, status=409, index=index)
    body = {"Results": [{"KV": entry_to_api(entry)} for entry in outcome.results], "Errors": None}
    return json_response(body, index=outcome.index)


async def _read_body(request: web.Request) -> bytes:
    """Read the whole request body, or raise 413 once it exceeds MAX_BODY_SIZE."""
    if request.content_length is not None and request.content_length > MAX_BODY_SIZE:
        raise _body_too_large()
    chunks = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY_SIZE:
            raise _body_too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large() -> web.HTTPException:
    return text_error(413, f"Request body too large, max size: {MAX_BODY_SIZE} bytes")


def _bad_request(message: str) -> web.HTTPException:
    return text_error(400, f"Failed to parse body: {message}")


def _parse_ops(raw: bytes) -> list[KVOp]:
    if not raw.strip():
        raise _bad_request("empty body, expected a JSON array of operations")
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad_request(f"malformed JSON: {exc}") from None
    if not isinstance(decoded, list):
        raise _bad_request(f"expected a JSON array of operations, got {_json_type(decoded)}")
    if len(decoded) > MAX_OPS:
        raise text_error(413, f"Transaction contains too many operations ({len(decoded)} > {MAX_OPS})")
    return [_parse_op(i, item) for i, item in enumerate(decoded)]


def _parse_op(i: int, item: Any) -> KVOp:
    if not isinstance(item, dict):
        raise _bad_request(f"operation {i} must be a JSON object, got {_json_type(item)}")
    fields = _lower_keys(item)
    kv = fields.get("kv")
    if kv is None:
        unsupported = [name for name in item if name.lower() in _UNSUPPORTED_TYPES]
        if unsupported:
            # NOTE: Node, Service, Check and Session operations are not built yet, so a
            # transaction with any of them is rejected whole rather than half applied.
            raise text_error(
                400,
                f"operation {i}: {unsupported[0]} operations are not supported yet, "
                "only KV operations are",
            )
        raise _bad_request(f"operation {i} has no KV field")
    if not isinstance(kv, dict):
        raise _bad_request(f"operation {i}: KV must be a JSON object, got {_json_type(kv)}")
    return _parse_kv(i, _lower_keys(kv))


def _parse_kv(i: int, fields: dict[str, Any]) -> KVOp:
    verb_text = fields.get("verb")
    if not isinstance(verb_text, str):
        raise _bad_request(f"operation {i}: missing or invalid Verb {_show(verb_text)}")
    try:
        verb = KVVerb(verb_text)
    except ValueError:
        raise _bad_request(f"operation {i}: unknown KV verb {_show(verb_text)}") from None
    key = _string_field(i, fields, "key")
    # Only delete-tree may name the empty prefix, which is every key.
    if key == "" and verb is not KVVerb.DELETE_TREE:
        raise _bad_request(f"operation {i}: missing Key for verb {_show(verb_text)}")
    # A key that /v1/kv rejects could be written here but never read or deleted there.
    problem = kv_key_problem(key)
    if problem is not None:
        raise _bad_request(f"operation {i}: {problem}")
    return KVOp(
        verb=verb,
        key=key,
        value=_value_field(i, fields.get("value")),
        flags=_uint_field(i, fields, "flags"),
        index=_uint_field(i, fields, "index"),
        session=_string_field(i, fields, "session"),
    )


def _string_field(i: int, fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad_request(f"operation {i}: invalid {name.capitalize()} {_show(value)}: expected a string")
    return value


def _uint_field(i: int, fields: dict[str, Any], name: str) -> int:
    value = fields.get(name)
    if value is None:
        return 0
    # bool is a subclass of int, but Go's decoder rejects true for a number.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_UINT64:
        raise _bad_request(
            f"operation {i}: invalid {name.capitalize()} {_show(value)}: "
            "expected an unsigned 64-bit integer"
        )
    return value


def _value_field(i: int, value: Any) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise _bad_request(f"operation {i}: invalid Value {_show(value)}: expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise _bad_request(f"operation {i}: invalid base64 in Value {_show(value)}: {exc}") from None


def _lower_keys(fields: dict[str, Any]) -> dict[str, Any]:
    return {name.lower(): value for name, value in fields.items()}


def _show(value: Any) -> str:
    """Render a request value as JSON for a message, cut to a readable length."""
    text = orjson.dumps(value).decode()
    return text if len(text) <= 80 else text[:77] + "..."


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", float: "a number"}
    if value is None:
        return "null"
    if isinstance(value, int) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def add_routes(app: web.Application) -> None:
    app.router.add_put("/v1/txn", put_txn)
