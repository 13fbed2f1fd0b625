"""Consul's catalog and health endpoints, with the agent's self and status ones, in Consul's JSON shapes.

Every list is a blocking query (`?index`, `?wait`) with an index of its
own. A query on one service (`/v1/catalog/service/web`,
`/v1/health/service/web`, `/v1/health/checks/web`) returns, and blocks
on, the index of that service name. That index moves only when an
instance of the service, one of their checks or one of their nodes
changes, so a change to `db` does not wake a watcher of `web`. A query
on one node does the same with the node's index. The whole-catalog
lists use the index of the store prefixes they read.

The write endpoints follow Consul's request bodies: JSON field names
match case-insensitively, as Go's decoder matches them, and a check that
names a service needs that service on the same node.
"""

from __future__ import annotations

import ipaddress
import random
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

import corral
from corral.api.common import (
    STATE_KEY,
    block,
    blocking_params,
    check_consistency,
    check_datacenter,
    json_response,
    set_index_headers,
    state_of,
    text_error,
)
from corral.duration import format_duration, parse_duration
from corral.state import State
from corral.state.catalog_index import CatalogIndex
from corral.state.records import (
    CHECKS,
    NODES,
    SERVICES,
    Check,
    Node,
    Service,
    check_key,
    default_service_weights,
    node_key,
    service_key,
)
from corral.state.state import CatalogError
from corral.types import CheckStatus

SERVER_INFO_KEY = web.AppKey("server_info", dict)
CATALOG_INDEX_KEY = web.AppKey("catalog_index", CatalogIndex)

# The states /v1/health/state accepts. Consul spells a check in maintenance as critical.
HEALTH_STATES = ("any", CheckStatus.PASSING.value, CheckStatus.WARNING.value, CheckStatus.CRITICAL.value)
REGISTRABLE_STATUSES = (CheckStatus.PASSING.value, CheckStatus.WARNING.value, CheckStatus.CRITICAL.value)

# Consul's limits on service metadata (agent/structs/structs.go).
META_MAX_PAIRS = 64
META_KEY_MAX_LENGTH = 128
META_VALUE_MAX_LENGTH = 512
META_RESERVED_PREFIX = "consul-"
_META_KEY = re.compile(r"[A-Za-z0-9_-]+")

# The largest SRV weight, which Service.Weights may not exceed.
DNS_WEIGHT_MAX = 65535
# The service tagged addresses whose address must be an IP of one family.
_TAGGED_ADDRESS_IP_VERSIONS = {"lan_ipv4": 4, "wan_ipv4": 4, "lan_ipv6": 6, "wan_ipv6": 6}

# Go's strconv.ParseBool, which Consul uses for ?passing.
_TRUE_WORDS = ("1", "t", "T", "TRUE", "true", "True")
_FALSE_WORDS = ("0", "f", "F", "FALSE", "false", "False")


# JSON shapes


def _revisions(state: State, key: bytes) -> tuple[int, int]:
    kv = state.view.get(key)
    if kv is None:
        return 0, 0
    return kv.create_revision, kv.mod_revision


def node_id(name: str) -> str:
    """Return a stable UUID for a node name, since Consul clients expect a node ID."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.node.corral"))


def node_to_api(state: State, node: Node) -> dict:
    create, modify = _revisions(state, node_key(node.name))
    return {
        "ID": node_id(node.name),
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": node.tagged_addresses or {"lan": node.address, "wan": node.address},
        "Meta": node.meta,
        "CreateIndex": create,
        "ModifyIndex": modify,
    }


def service_to_api(state: State, service: Service) -> dict:
    """Return Consul's NodeService object, as /v1/health and /v1/catalog/node show it."""
    create, modify = _revisions(state, service_key(service.node, service.id))
    body = {
        "ID": service.id,
        "Service": service.name,
        "Tags": service.tags,
        "Address": service.address,
        "Meta": service.meta,
        "Port": service.port,
    }
    # Consul leaves TaggedAddresses out when a service has none.
    if service.tagged_addresses:
        body["TaggedAddresses"] = service.tagged_addresses
    body["Weights"] = service.weights
    body["EnableTagOverride"] = service.enable_tag_override
    body["CreateIndex"] = create
    body["ModifyIndex"] = modify
    return body


def check_to_api(state: State, check: Check, service_tags: list[str]) -> dict:
    create, modify = _revisions(state, check_key(check.node, check.id))
    return {
        "Node": check.node,
        "CheckID": check.id,
        "Name": check.name,
        "Status": check.status.value,
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": check.service_id,
        "ServiceName": check.service_name,
        "ServiceTags": service_tags if check.service_id else [],
        "Type": check.type,
        "Interval": check.interval,
        "Timeout": check.timeout,
        "CreateIndex": create,
        "ModifyIndex": modify,
    }


def catalog_service_entry(state: State, node: Node, service: Service) -> dict:
    """Return one element of /v1/catalog/service/NAME: the node's fields and the Service* fields."""
    node_fields = node_to_api(state, node)
    create, modify = _revisions(state, service_key(service.node, service.id))
    entry = {
        "ID": node_fields["ID"],
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": node_fields["TaggedAddresses"],
        "NodeMeta": node.meta,
        "ServiceKind": "",
        "ServiceID": service.id,
        "ServiceName": service.name,
        "ServiceTags": service.tags,
        "ServiceAddress": service.address,
    }
    # Consul leaves ServiceTaggedAddresses out when the service has none.
    if service.tagged_addresses:
        entry["ServiceTaggedAddresses"] = service.tagged_addresses
    entry["ServiceWeights"] = service.weights
    entry["ServiceMeta"] = service.meta
    entry["ServicePort"] = service.port
    entry["ServiceEnableTagOverride"] = service.enable_tag_override
    entry["CreateIndex"] = create
    entry["ModifyIndex"] = modify
    return entry


def _checks_to_api(state: State, checks: list[Check]) -> list[dict]:
    tags_by_service = {(service.node, service.id): service.tags for service in state.services()}
    return [check_to_api(state, check, tags_by_service.get((check.node, check.service_id), [])) for check in checks]


# Query parameters


@dataclass(frozen=True, slots=True)
class ReadOptions:
    """The filters every catalog and health read accepts."""

    node_meta: dict[str, str]
    tags: list[str]

    def node_matches(self, node: Node) -> bool:
        return all(node.meta.get(key) == value for key, value in self.node_meta.items())

    def tags_match(self, service: Service) -> bool:
        # Consul compares tags case-insensitively, and every ?tag given must match.
        tags = {tag.lower() for tag in service.tags}
        return all(tag.lower() in tags for tag in self.tags)


def read_options(request: web.Request) -> ReadOptions:
    """Check `?dc` and `?filter`, and read `?node-meta` and `?tag`.

    `?near` is accepted and ignored.
    NOTE: corral keeps no network coordinates, so `?near` does not sort the results.
    """
    check_datacenter(request)
    if "filter" in request.query:
        raise text_error(400, "Invalid ?filter: corral does not support filter expressions; filter on the client")
    node_meta = {}
    for pair in request.query.getall("node-meta", []):
        # As Consul parses it: split at the first colon; a pair without one means an empty value.
        key, _, value = pair.partition(":")
        node_meta[key] = value
    return ReadOptions(node_meta, request.query.getall("tag", []))


def _passing_only(request: web.Request) -> bool:
    if "passing" not in request.query:
        return False
    value = request.query["passing"]
    if value == "" or value in _TRUE_WORDS:
        return True
    if value in _FALSE_WORDS:
        return False
    raise text_error(400, "Invalid value for ?passing")


async def _block_on(
    request: web.Request,
    current_index: Callable[[], int],
    wait: Callable[[int, float], Awaitable[None]],
) -> int:
    """Wait for a blocking query with `wait(index, timeout)`, then return the index to respond with.

    Like Consul, the wait gets up to wait/16 of random jitter so that many
    watchers do not return in step.
    """
    check_consistency(request)
    index, timeout = blocking_params(request)
    if index and current_index() <= index:
        await wait(index, timeout + random.uniform(0, timeout / 16))
    return current_index()


def _catalog_index(request: web.Request) -> CatalogIndex:
    return request.app[CATALOG_INDEX_KEY]


HEALTH_BODY_CACHE_KEY = web.AppKey("health_body_cache", dict)
_HEALTH_BODY_CACHE_SIZE = 1024


async def _block_on_service(request: web.Request, name: str) -> int:
    index = _catalog_index(request)
    return await _block_on(
        request,
        lambda: index.service_index(name),
        lambda after, timeout: index.wait_for_service(name, after, timeout),
    )


async def _block_on_node(request: web.Request, name: str) -> int:
    index = _catalog_index(request)
    return await _block_on(
        request,
        lambda: index.node_index(name),
        lambda after, timeout: index.wait_for_node(name, after, timeout),
    )


def _instances(state: State, name: str, options: ReadOptions) -> list[tuple[Node, Service, list[Check]]]:
    found = [
        (node, service, checks)
        for node, service, checks in state.service_instances_with_checks(name)
        if options.tags_match(service) and options.node_matches(node)
    ]
    found.sort(key=lambda instance: (instance[0].name, instance[1].id))
    return found


# Catalog reads


async def catalog_datacenters(request: web.Request) -> web.Response:
    return json_response([state_of(request).datacenter])


async def catalog_nodes(request: web.Request) -> web.Response:
    options = read_options(request)
    state = state_of(request)
    index = await block(request, lambda: state.view.index(NODES), NODES)
    nodes = [node_to_api(state, node) for node in state.nodes() if options.node_matches(node)]
    return json_response(nodes, index=index)


async def catalog_services(request: web.Request) -> web.Response:
    options = read_options(request)
    state = state_of(request)
    index = await block(request, state.catalog_index, (SERVICES, NODES))
    nodes = {node.name: node for node in state.nodes()}
    names: dict[str, list[str]] = {}
    for service in state.services():
        node = nodes.get(service.node)
        if node is None or not options.node_matches(node):
            continue
        tags = names.setdefault(service.name, [])
        tags.extend(tag for tag in service.tags if tag not in tags)
    return json_response(names, index=index)


async def catalog_service(request: web.Request) -> web.Response:
    options = read_options(request)
    name = request.match_info["name"]
    index = await _block_on_service(request, name)
    state = state_of(request)
    entries = [catalog_service_entry(state, node, service) for node, service, _ in _instances(state, name, options)]
    return json_response(entries, index=index)


async def catalog_node(request: web.Request) -> web.Response:
    read_options(request)
    name = request.match_info["name"]
    index = await _block_on_node(request, name)
    state = state_of(request)
    node = state.find_node(name)
    if node is None:
        return json_response(None, index=index)
    services = {service.id: service_to_api(state, service) for service in state.services(node.name)}
    return json_response({"Node": node_to_api(state, node), "Services": services}, index=index)


async def catalog_node_services(request: web.Request) -> web.Response:
    read_options(request)
    name = request.match_info["name"]
    index = await _block_on_node(request, name)
    state = state_of(request)
    node = state.find_node(name)
    if node is None:
        return json_response({"Node": None, "Services": None}, index=index)
    services = [service_to_api(state, service) for service in state.services(node.name)]
    return json_response({"Node": node_to_api(state, node), "Services": services}, index=index)


# Health reads


async def health_service(request: web.Request) -> web.Response:
    options = read_options(request)
    passing_only = _passing_only(request)
    name = request.match_info["name"]
    index = await _block_on_service(request, name)
    # The service's index moves with every change to its instances, their checks and
    # their nodes, so many watchers woken by one change share one encoded body.
    cache_key = (
        name.lower(),
        passing_only,
        tuple(tag.lower() for tag in options.tags),
        tuple(sorted(options.node_meta.items())),
        index,
    )
    cache: dict = request.app[HEALTH_BODY_CACHE_KEY]
    body = cache.get(cache_key)
    if body is None:
        body = orjson.dumps(_health_entries(state_of(request), name, options, passing_only))
        if len(cache) >= _HEALTH_BODY_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[cache_key] = body
    response = web.Response(body=body, content_type="application/json")
    set_index_headers(response, index)
    return response


def _health_entries(state: State, name: str, options: ReadOptions, passing_only: bool) -> list[dict]:
    entries = []
    for node, service, checks in _instances(state, name, options):
        # A warning is not passing, and the node's own checks count too.
        if passing_only and any(check.status is not CheckStatus.PASSING for check in checks):
            continue
        entries.append(
            {
                "Node": node_to_api(state, node),
                "Service": service_to_api(state, service),
                "Checks": [check_to_api(state, check, service.tags) for check in checks],
            }
        )
    return entries


async def health_checks(request: web.Request) -> web.Response:
    options = read_options(request)
    if options.tags:
        # Consul's Health.ServiceChecks rejects tag filtering with this text.
        raise text_error(400, "Tag filtering is not supported")
    name = request.match_info["name"]
    index = await _block_on_service(request, name)
    state = state_of(request)
    checks = []
    for _, _, instance_checks in _instances(state, name, options):
        checks += [check for check in instance_checks if check.service_id]
    return json_response(_checks_to_api(state, checks), index=index)


async def health_node(request: web.Request) -> web.Response:
    read_options(request)
    name = request.match_info["name"]
    index = await _block_on_node(request, name)
    state = state_of(request)
    node = state.find_node(name)
    checks = state.checks(node.name) if node is not None else []
    return json_response(_checks_to_api(state, checks), index=index)


async def health_state(request: web.Request) -> web.Response:
    options = read_options(request)
    requested = request.match_info["state"]
    if requested not in HEALTH_STATES:
        # NOTE: Consul itself returns an empty list for an unknown state; corral rejects it,
        # so that a misspelled state does not read as "no checks".
        raise text_error(400, f"Invalid check state {requested!r}: expected any, passing, warning or critical")
    state = state_of(request)
    index = await block(request, lambda: max(state.view.index(CHECKS), state.view.index(NODES)), (CHECKS, NODES))
    nodes = {node.name: node for node in state.nodes()}
    checks = [
        check
        for check in state.checks()
        if (requested == "any" or check.status.value == requested)
        and (not options.node_meta or (check.node in nodes and options.node_matches(nodes[check.node])))
    ]
    return json_response(_checks_to_api(state, checks), index=index)


async def missing_name(request: web.Request) -> web.Response:
    """Reject a catalog or health path whose name segment is empty, with Consul's text."""
    path = request.path
    if path.startswith("/v1/health/state/"):
        raise text_error(400, "Missing check state")
    if "/node" in path:
        raise text_error(400, "Missing node name")
    raise text_error(400, "Missing service name")


# Registration


class RegistrationError(Exception):
    """A register or deregister body that Consul rejects; the message is what the client reads."""


def _fields(value: Any, where: str) -> dict[str, Any]:
    """Return a JSON object with its keys lowercased, as Go's decoder matches struct fields."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RegistrationError(f"Request decode failed: {where}: expected a JSON object, got {value!r}")
    return {str(key).lower(): field for key, field in value.items()}


def _string(fields: dict[str, Any], name: str, where: str) -> str:
    value = fields.get(name.lower())
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RegistrationError(f"Request decode failed: {where}{name}: expected a string, got {value!r}")
    return value


def _string_map(fields: dict[str, Any], name: str, where: str) -> dict[str, str]:
    value = fields.get(name.lower())
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise RegistrationError(f"Request decode failed: {where}{name}: expected an object of strings, got {value!r}")
    return dict(value)


def _string_list(fields: dict[str, Any], name: str, where: str) -> list[str]:
    value = fields.get(name.lower())
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RegistrationError(f"Request decode failed: {where}{name}: expected a list of strings, got {value!r}")
    return list(value)


def _integer(fields: dict[str, Any], name: str, where: str) -> int:
    value = fields.get(name.lower())
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise RegistrationError(f"Request decode failed: {where}{name}: expected an integer, got {value!r}")
    return value


def _boolean(fields: dict[str, Any], name: str, where: str) -> bool:
    value = fields.get(name.lower())
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RegistrationError(f"Request decode failed: {where}{name}: expected true or false, got {value!r}")
    return value


def _duration(fields: dict[str, Any], name: str, where: str) -> str:
    """Read a duration as Consul does: a Go duration string, or a number of nanoseconds."""
    value = fields.get(name.lower())
    if value is None or value == "":
        return ""
    try:
        if isinstance(value, str):
            seconds = parse_duration(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = value / 1e9
        else:
            raise TypeError(f"expected a duration such as \"10s\", got {value!r}")
        return format_duration(seconds)
    except (TypeError, ValueError) as exc:
        raise RegistrationError(f"Request decode failed: {where}{name}: {exc}") from None


def _validate_meta(meta: dict[str, str]) -> str | None:
    """Return Consul's complaint about a metadata map, or None when it is valid."""
    if len(meta) > META_MAX_PAIRS:
        return f"Node metadata cannot contain more than {META_MAX_PAIRS} key/value pairs"
    for key, value in meta.items():
        problem = None
        if key == "":
            problem = "Key cannot be blank"
        elif not _META_KEY.fullmatch(key):
            problem = "Key contains invalid characters"
        elif len(key) > META_KEY_MAX_LENGTH:
            problem = f"Key is too long (limit: {META_KEY_MAX_LENGTH} characters)"
        elif key.startswith(META_RESERVED_PREFIX):
            problem = f"Key prefix '{META_RESERVED_PREFIX}' is reserved for internal use"
        elif len(value) > META_VALUE_MAX_LENGTH:
            problem = f"Value is too long (limit: {META_VALUE_MAX_LENGTH} characters)"
        if problem is not None:
            return f"Couldn't load metadata pair ('{key}', '{value}'): {problem}"
    return None


def _parse_weights(fields: dict[str, Any]) -> dict[str, int]:
    """Read Service.Weights; a missing or empty object gives Consul's default of 1 and 1.

    As with Go's decoder, a Warning left out of a non-empty object is 0.
    """
    weights = _fields(fields.get("weights"), "Service.Weights")
    if not weights:
        return default_service_weights()
    passing = _integer(weights, "Passing", "Service.Weights.")
    warning = _integer(weights, "Warning", "Service.Weights.")
    # The rules of Consul's structs.ValidateWeights; its text comes first, then the value given.
    # NOTE: Consul's catalog stores the default weights in place of invalid ones without an
    # error; corral rejects them, so that a mistyped weight does not go unnoticed.
    if passing < 1:
        raise RegistrationError(f"Passing must be greater than 0: Service.Weights.Passing is {passing}")
    if warning < 0:
        raise RegistrationError(f"Warning must be greater or equal than 0: Service.Weights.Warning is {warning}")
    if passing > DNS_WEIGHT_MAX or warning > DNS_WEIGHT_MAX:
        raise RegistrationError(
            f"DNS Weight must be between 0 and {DNS_WEIGHT_MAX}: "
            f"Service.Weights.Passing is {passing} and Service.Weights.Warning is {warning}"
        )
    return {"Passing": passing, "Warning": warning}


def _parse_tagged_addresses(fields: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Read Service.TaggedAddresses: an object of tag to {"Address": ..., "Port": ...}."""
    value = fields.get("taggedaddresses")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RegistrationError(
            f'Request decode failed: Service.TaggedAddresses: expected an object such as '
            f'{{"lan": {{"Address": "10.0.0.1", "Port": 80}}}}, got {value!r}'
        )
    addresses = {}
    for tag, entry in value.items():
        where = f"Service.TaggedAddresses.{tag}"
        entry_fields = _fields(entry, where)
        address = _string(entry_fields, "Address", f"{where}.")
        port = _integer(entry_fields, "Port", f"{where}.")
        if not 0 <= port <= 65535:
            raise RegistrationError(f"Invalid {where}.Port {port}: expected a port from 0 to 65535")
        version = _TAGGED_ADDRESS_IP_VERSIONS.get(tag)
        if version is not None and not _is_ip_version(address, version):
            # Consul's agent rejects these tags without an address of their family.
            raise RegistrationError(f"Invalid {where}.Address {address!r}: expected an IPv{version} address")
        addresses[tag] = {"Address": address, "Port": port}
    return addresses


def _is_ip_version(address: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(address).version == version
    except ValueError:
        return False


def _is_any_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_unspecified
    except ValueError:
        return False


@dataclass(slots=True)
class Registration:
    node: Node
    service: Service | None
    checks: list[Check]
    skip_node_update: bool


def parse_registration(body: Any, datacenter: str) -> Registration:
    """Validate a /v1/catalog/register body; raise RegistrationError with Consul's text."""
    fields = _fields(body, "body")
    name = _string(fields, "Node", "")
    address = _string(fields, "Address", "")
    skip_node_update = _boolean(fields, "SkipNodeUpdate", "")
    node_uuid = _string(fields, "ID", "")

    if not name:
        raise RegistrationError("Must provide node")
    if "/" in name:
        # NOTE: Consul accepts "/" in node names; corral's store keys cannot hold one.
        raise RegistrationError(f"Invalid node name {name!r}: corral node names must not contain '/'")
    if not address and not skip_node_update:
        raise RegistrationError("Must provide address if SkipNodeUpdate is not set")
    if node_uuid:
        try:
            uuid.UUID(node_uuid)
        except ValueError:
            raise RegistrationError(f"Bad node ID: {node_uuid!r} is not a UUID") from None

    node = Node(
        name=name,
        address=address,
        datacenter=datacenter,
        meta=_string_map(fields, "NodeMeta", ""),
        tagged_addresses=_string_map(fields, "TaggedAddresses", ""),
    )
    service = None
    if fields.get("service") is not None:
        service = _parse_service(_fields(fields["service"], "Service"), name)

    check_bodies = []
    if fields.get("check") is not None:
        check_bodies.append(fields["check"])
    checks_value = fields.get("checks")
    if checks_value is not None:
        if not isinstance(checks_value, list):
            raise RegistrationError(f"Request decode failed: Checks: expected a list, got {checks_value!r}")
        check_bodies += checks_value
    checks = [_parse_check(_fields(check, "Check"), name) for check in check_bodies]
    return Registration(node, service, checks, skip_node_update)


def _parse_service(fields: dict[str, Any], node: str) -> Service:
    name = _string(fields, "Service", "Service.")
    service_id = _string(fields, "ID", "Service.") or name
    if not name:
        raise RegistrationError("Must provide service name with ID" if service_id else "Must provide service name")
    kind = _string(fields, "Kind", "Service.")
    if kind:
        raise RegistrationError(f"Service kind {kind!r} is not supported by corral; register a typical service")
    address = _string(fields, "Address", "Service.")
    if _is_any_address(address):
        raise RegistrationError("Invalid service address")
    meta = _string_map(fields, "Meta", "Service.")
    problem = _validate_meta(meta)
    if problem is not None:
        raise RegistrationError(f"Invalid Service Meta for node {node} and serviceID {service_id}: {problem}")
    port = _integer(fields, "Port", "Service.")
    # An SRV record cannot carry a port outside this range, so DNS could not return the instance.
    if not 0 <= port <= 65535:
        raise RegistrationError(f"Invalid Service.Port {port}: expected a port from 0 to 65535")
    return Service(
        node=node,
        id=service_id,
        name=name,
        address=address,
        port=port,
        tags=_string_list(fields, "Tags", "Service."),
        meta=meta,
        weights=_parse_weights(fields),
        tagged_addresses=_parse_tagged_addresses(fields),
        enable_tag_override=_boolean(fields, "EnableTagOverride", "Service."),
    )


def _parse_check(fields: dict[str, Any], node: str) -> Check:
    check_node = _string(fields, "Node", "Check.") or node
    if check_node != node:
        raise RegistrationError(f'check node "{check_node}" does not match node "{node}"')
    name = _string(fields, "Name", "Check.")
    check_id = _string(fields, "CheckID", "Check.") or name
    if not check_id:
        raise RegistrationError("Must provide a CheckID or a Name for each check")
    status = _string(fields, "Status", "Check.") or CheckStatus.CRITICAL.value
    if status not in REGISTRABLE_STATUSES:
        raise RegistrationError(f"Invalid check status {status!r}: expected passing, warning or critical")
    definition = _fields(fields.get("definition"), "Check.Definition")
    check_type = _string(fields, "Type", "Check.")
    for kind in ("HTTP", "TCP", "GRPC", "H2PING"):
        if not check_type and _string(definition, kind, "Check.Definition."):
            check_type = kind.lower()
    return Check(
        node=node,
        id=check_id,
        name=name,
        status=CheckStatus(status),
        output=_string(fields, "Output", "Check."),
        notes=_string(fields, "Notes", "Check."),
        service_id=_string(fields, "ServiceID", "Check."),
        type=check_type,
        interval=_duration(definition, "Interval", "Check.Definition."),
        timeout=_duration(definition, "Timeout", "Check.Definition."),
    )


async def _read_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise text_error(400, f"Request decode failed: {exc}") from None


def _check_body_datacenter(request: web.Request, fields: dict[str, Any]) -> None:
    """Raise Consul's 500 when the body's Datacenter, or else `?dc`, names one not served here."""
    requested = fields.get("datacenter") or request.query.get("dc")
    if isinstance(requested, str) and requested and requested != state_of(request).datacenter:
        raise text_error(500, f"No path to datacenter: {requested!r} is not served here")


async def catalog_register(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _read_body(request)
    # NOTE: Consul returns these validation errors from its RPC layer with status 500,
    # because only its typed BadRequest errors become 400. corral uses 400, with the same text.
    try:
        _check_body_datacenter(request, _fields(body, "body"))
        registration = parse_registration(body, state.datacenter)
        await state.register_catalog_entry(
            registration.node, registration.service, registration.checks, registration.skip_node_update
        )
    except (RegistrationError, CatalogError) as exc:
        raise text_error(400, str(exc)) from None
    return json_response(True)


async def catalog_deregister(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await _read_body(request)
    try:
        fields = _fields(body, "body")
        _check_body_datacenter(request, fields)
        node = _string(fields, "Node", "")
        service_id = _string(fields, "ServiceID", "")
        check_id = _string(fields, "CheckID", "")
    except RegistrationError as exc:
        raise text_error(400, str(exc)) from None
    if not node:
        raise text_error(400, "Must provide node")
    # As in Consul: a service ID wins over a check ID, and either narrows the removal from
    # the whole node. Removing what is not registered is not an error.
    if service_id:
        await state.deregister_service(node, service_id)
    elif check_id:
        await state.deregister_check(node, check_id)
    else:
        await state.deregister_node(node)
    return json_response(True)


# Agent and status


async def agent_self(request: web.Request) -> web.Response:
    info = request.app[SERVER_INFO_KEY]
    state = state_of(request)
    node = state.node(info["node"])
    return json_response(
        {
            "Config": {
                "Datacenter": state.datacenter,
                "NodeName": info["node"],
                "NodeID": node_id(info["node"]),
                "Server": True,
                "Version": corral.__version__,
                "Revision": "",
            },
            "Member": {"Name": info["node"], "Addr": node.address if node else "", "Status": 1},
            "Meta": {},
        }
    )


async def status_leader(request: web.Request) -> web.Response:
    return json_response(request.app[SERVER_INFO_KEY]["rpc_addr"])


async def status_peers(request: web.Request) -> web.Response:
    return json_response([request.app[SERVER_INFO_KEY]["rpc_addr"]])


def add_routes(app: web.Application) -> None:
    """Add the routes, and a catalog index that starts and stops with the application."""
    index = CatalogIndex(app[STATE_KEY].view)
    app[CATALOG_INDEX_KEY] = index
    app[HEALTH_BODY_CACHE_KEY] = {}

    async def start_index(_: web.Application) -> None:
        index.start()

    async def stop_index(_: web.Application) -> None:
        index.stop()

    app.on_startup.append(start_index)
    app.on_cleanup.append(stop_index)
    router = app.router
    router.add_put("/v1/catalog/register", catalog_register)
    router.add_put("/v1/catalog/deregister", catalog_deregister)
    router.add_get("/v1/catalog/datacenters", catalog_datacenters)
    router.add_get("/v1/catalog/nodes", catalog_nodes)
    router.add_get("/v1/catalog/services", catalog_services)
    router.add_get("/v1/catalog/service/{name}", catalog_service)
    router.add_get("/v1/catalog/node/{name}", catalog_node)
    router.add_get("/v1/catalog/node-services/{name}", catalog_node_services)
    router.add_get("/v1/health/service/{name}", health_service)
    router.add_get("/v1/health/checks/{name}", health_checks)
    router.add_get("/v1/health/node/{name}", health_node)
    router.add_get("/v1/health/state/{state}", health_state)
    for path in (
        "/v1/catalog/service/",
        "/v1/catalog/node/",
        "/v1/catalog/node-services/",
        "/v1/health/service/",
        "/v1/health/checks/",
        "/v1/health/node/",
        "/v1/health/state/",
    ):
        router.add_get(path, missing_name)
    router.add_get("/v1/agent/self", agent_self)
    router.add_get("/v1/status/leader", status_leader)
    router.add_get("/v1/status/peers", status_peers)
