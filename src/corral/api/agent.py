"""Consul's /v1/agent endpoints, served from the local agent's registry.

These read and change the agent's own services and checks, not the
catalog: the registry syncs each change to the catalog before the request
returns, as Consul's agent does. Request bodies are decoded the way Go's
JSON decoder and Consul's aliases decode them: field names match whatever
their case, and snake_case spellings (tagged_addresses, service_id, ...)
match too. The list endpoints support Consul's hash-based blocking:
every response carries X-Consul-ContentHash, and `?hash=H&wait=W` waits
up to W until the content no longer hashes to H.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import random
import re
from collections.abc import Callable
from typing import Any

import orjson
import yarl
from aiohttp import web

import corral
from corral.agent.agent import Agent
from corral.agent.registry import (
    CheckDefinition,
    CheckKind,
    CheckRequest,
    ConfigSource,
    LocalCheck,
    LocalRegistry,
    LocalService,
    RegistryError,
    aggregated_status,
)
from corral.agent.checks import split_grpc_target
from corral.api.catalog import node_id
from corral.api.common import blocking_params, text_error
from corral.duration import format_duration, parse_duration
from corral.types import CheckStatus

AGENT_KEY = web.AppKey("agent", Agent)

# Consul's limits on service metadata (structs.ValidateServiceMetadata).
MAX_META_PAIRS = 64
MAX_META_KEY_LENGTH = 128
MAX_META_VALUE_LENGTH = 512
_META_KEY = re.compile(r"[A-Za-z0-9_-]+")

# Check fields of Consul check types that corral does not run.
_UNSUPPORTED_CHECK_FIELDS = {
    "dockercontainerid": "DockerContainerID",
    "h2ping": "H2PING",
    "udp": "UDP",
    "osservice": "OSService",
    "aliasnode": "AliasNode",
    "aliasservice": "AliasService",
    "script": "Script",
}

_HEALTH_HTTP_STATUS = {"passing": 200, "warning": 429}
_STATUSES = {status.value: status for status in (CheckStatus.PASSING, CheckStatus.WARNING, CheckStatus.CRITICAL)}


def registry_of(request: web.Request) -> LocalRegistry:
    return request.app[AGENT_KEY].registry


# Request bodies


class Fields:
    """A JSON object whose field names match case-insensitively and without underscores.

    `path` names the object in error messages, such as "Checks[1]".
    """

    def __init__(self, value: Any, path: str = ""):
        if not isinstance(value, dict):
            where = path or "request body"
            raise text_error(400, f"Request decode failed: {where} must be a JSON object, got {_show(value)}")
        self.path = path
        self._values: dict[str, Any] = {}
        self._names: dict[str, str] = {}
        for name, field_value in value.items():
            key = name.lower().replace("_", "")
            self._values[key] = field_value
            self._names[key] = name

    def has_any_field(self) -> bool:
        """Tell whether any field is set; Consul skips a check definition with none."""
        return any(value not in (None, "", [], {}, False, 0) for value in self._values.values())

    def has(self, *names: str) -> bool:
        return any(self._values.get(name.lower()) not in (None, "", [], {}) for name in names)

    def raw(self, *names: str) -> tuple[str, Any]:
        """Return the first of `names` that is present (as written by the client) and its value."""
        for name in names:
            key = name.lower()
            if self._values.get(key) is not None:
                return self._names[key], self._values[key]
        return names[0], None

    def invalid(self, name: str, value: Any, expected: str) -> web.HTTPException:
        label = f"{self.path}.{name}" if self.path else name
        return text_error(400, f"Invalid {label} {_show(value)}: expected {expected}")

    def string(self, *names: str) -> str:
        name, value = self.raw(*names)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.invalid(name, value, "a string")
        return value

    def boolean(self, *names: str) -> bool:
        name, value = self.raw(*names)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self.invalid(name, value, "true or false")
        return value

    def integer(self, *names: str, minimum: int = 0, maximum: int = 2**31 - 1) -> int | None:
        name, value = self.raw(*names)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self.invalid(name, value, f"an integer from {minimum} to {maximum}")
        return value

    def string_list(self, *names: str) -> list[str]:
        name, value = self.raw(*names)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.invalid(name, value, "a list of strings")
        return list(value)

    def string_map(self, *names: str) -> dict[str, str]:
        name, value = self.raw(*names)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
            raise self.invalid(name, value, "an object of string values")
        return dict(value)

    def duration(self, *names: str) -> float:
        """Read a Go duration string such as "10s", or a number of nanoseconds as Go's JSON has it."""
        name, value = self.raw(*names)
        if value is None or value == "":
            return 0.0
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError:
                raise self.invalid(name, value, 'a duration such as "10s" or "1m30s"') from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value / 1e9
        raise self.invalid(name, value, 'a duration such as "10s" or "1m30s"')

    def object(self, *names: str) -> Fields | None:
        name, value = self.raw(*names)
        if value is None:
            return None
        return Fields(value, f"{self.path}.{name}" if self.path else name)


def _show(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


async def read_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise text_error(400, f"Request decode failed: malformed JSON: {exc}") from None


def parse_service(body: Any) -> tuple[LocalService, list[CheckRequest]]:
    """Validate a service definition as /v1/agent/service/register accepts it."""
    fields = Fields(body)
    name = fields.string("Name")
    if not name:
        raise text_error(400, "Missing service name")
    kind = fields.string("Kind")
    if kind:
        raise text_error(400, f"Invalid Kind {_show(kind)}: corral registers only typical services, which have no Kind")
    address = fields.string("Address")
    if address in ("0.0.0.0", "::", "[::]"):
        raise text_error(400, f"Invalid service address {_show(address)}: an unspecified address cannot be reached")
    port = fields.integer("Port", maximum=65535) or 0
    service = LocalService(
        id=fields.string("ID") or name,
        name=name,
        address=address,
        port=port,
        tags=fields.string_list("Tags"),
        meta=_service_meta(fields),
        tagged_addresses=_tagged_addresses(fields),
        enable_tag_override=fields.boolean("EnableTagOverride"),
        source=ConfigSource.REMOTE,
    )
    weights = fields.object("Weights")
    if weights is not None:
        passing = weights.integer("Passing", maximum=65535)
        warning = weights.integer("Warning", maximum=65535)
        if passing is None or passing < 1:
            raise text_error(400, f"Invalid Weights: Passing must be from 1 to 65535, got {_show(passing)}")
        service.weights = {"Passing": passing, "Warning": warning or 0}

    checks = []
    single = fields.object("Check")
    if single is not None and single.has_any_field():
        checks.append(parse_check(single, with_identity=False))
    _, many = fields.raw("Checks")
    if many is not None:
        if not isinstance(many, list):
            raise fields.invalid("Checks", many, "a list of check definitions")
        for index, item in enumerate(many):
            check_fields = Fields(item, f"Checks[{index}]")
            if check_fields.has_any_field():
                checks.append(parse_check(check_fields, with_identity=False))
    return service, checks


def _service_meta(fields: Fields) -> dict[str, str]:
    meta = fields.string_map("Meta")
    if len(meta) > MAX_META_PAIRS:
        raise text_error(400, f"Invalid Service Meta: {len(meta)} pairs given, at most {MAX_META_PAIRS} allowed")
    for key, value in meta.items():
        if not _META_KEY.fullmatch(key):
            raise text_error(
                400, f"Invalid Service Meta: key {_show(key)} may contain only letters, digits, '_' and '-'"
            )
        if len(key) > MAX_META_KEY_LENGTH:
            raise text_error(
                400, f"Invalid Service Meta: key {_show(key)} is longer than {MAX_META_KEY_LENGTH} characters"
            )
        if key.startswith("consul-"):
            raise text_error(400, f"Invalid Service Meta: key {_show(key)} uses the reserved prefix 'consul-'")
        if len(value) > MAX_META_VALUE_LENGTH:
            raise text_error(
                400, f"Invalid Service Meta: value of {_show(key)} is longer than {MAX_META_VALUE_LENGTH} characters"
            )
    return meta


def _tagged_addresses(fields: Fields) -> dict[str, dict]:
    name, value = fields.raw("TaggedAddresses")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fields.invalid(name, value, 'an object such as {"lan": {"Address": "10.0.0.1", "Port": 80}}')
    addresses = {}
    for tag, entry in value.items():
        entry_fields = Fields(entry, f"TaggedAddresses.{tag}")
        address = entry_fields.string("Address")
        port = entry_fields.integer("Port", maximum=65535) or 0
        if tag in ("lan_ipv4", "wan_ipv4", "lan_ipv6", "wan_ipv6"):
            _require_ip(tag, address, 4 if tag.endswith("ipv4") else 6)
        addresses[tag] = {"Address": address, "Port": port}
    return addresses


def _require_ip(tag: str, address: str, version: int) -> None:
    try:
        valid = ipaddress.ip_address(address).version == version
    except ValueError:
        valid = False
    if not valid:
        raise text_error(400, f"Invalid TaggedAddresses.{tag} {_show(address)}: expected an IPv{version} address")


def parse_check(fields: Fields, with_identity: bool) -> CheckRequest:
    """Validate one check definition; with_identity reads Name, ID and ServiceID as /check/register does."""
    for key, label in _UNSUPPORTED_CHECK_FIELDS.items():
        if fields.has(key):
            hint = "; use Args for a script check" if key == "script" else ""
            raise text_error(400, f"Invalid check: {label} checks are not supported by corral{hint}")
    request = CheckRequest(
        definition=_check_definition(fields),
        id=fields.string("CheckID", "ID"),
        name=fields.string("Name"),
        notes=fields.string("Notes"),
    )
    status = fields.string("Status")
    if status:
        if status not in _STATUSES:
            raise text_error(400, f"Invalid check Status {_show(status)}: expected passing, warning or critical")
        request.status = _STATUSES[status]
    if with_identity:
        if not request.name:
            raise text_error(400, "Missing check name")
        request.id = request.id or request.name
        request.service_id = fields.string("ServiceID")
    return request


def _check_definition(fields: Fields) -> CheckDefinition:
    args = fields.string_list("Args", "ScriptArgs")
    targets = {
        CheckKind.SCRIPT: bool(args),
        CheckKind.HTTP: fields.has("HTTP"),
        CheckKind.TCP: fields.has("TCP"),
        CheckKind.GRPC: fields.has("GRPC"),
    }
    chosen = [kind for kind, present in targets.items() if present]
    if len(chosen) > 1:
        raise text_error(400, "Invalid check: set only one of Args, HTTP, TCP and GRPC")
    definition = CheckDefinition(
        kind=chosen[0] if chosen else CheckKind.TTL,
        interval=fields.duration("Interval"),
        timeout=fields.duration("Timeout"),
        ttl=fields.duration("TTL"),
        http=fields.string("HTTP"),
        method=fields.string("Method"),
        header=_header(fields),
        body=fields.string("Body"),
        tls_skip_verify=fields.boolean("TLSSkipVerify"),
        tcp=fields.string("TCP"),
        grpc=fields.string("GRPC"),
        grpc_use_tls=fields.boolean("GRPCUseTLS"),
        args=args,
        deregister_critical_after=fields.duration("DeregisterCriticalServiceAfter"),
        success_before_passing=fields.integer("SuccessBeforePassing") or 0,
        failures_before_critical=fields.integer("FailuresBeforeCritical") or 0,
        failures_before_warning=fields.integer("FailuresBeforeWarning"),
    )
    _validate_definition(definition)
    return definition


def _header(fields: Fields) -> dict[str, list[str]]:
    name, value = fields.raw("Header")
    if value is None:
        return {}
    valid = isinstance(value, dict) and all(
        isinstance(values, list) and all(isinstance(item, str) for item in values) for values in value.values()
    )
    if not valid:
        raise fields.invalid(name, value, 'an object of string lists such as {"X-Probe": ["1"]}')
    return {header: list(values) for header, values in value.items()}


def _validate_definition(definition: CheckDefinition) -> None:
    kind = definition.kind
    if definition.interval > 0 and definition.ttl > 0:
        raise text_error(400, "Invalid check: Interval and TTL cannot both be specified")
    if kind is not CheckKind.TTL and definition.interval <= 0:
        raise text_error(400, "Invalid check: Interval must be > 0 for script, HTTP, TCP and gRPC checks")
    if kind is CheckKind.TTL and definition.ttl <= 0:
        raise text_error(
            400, "Invalid check: TTL must be > 0 for TTL checks; a check needs TTL, or Interval with "
            "one of Args, HTTP, TCP and GRPC"
        )
    if definition.timeout < 0:
        raise text_error(400, f"Invalid check: Timeout must not be negative, got {format_duration(definition.timeout)}")
    warning = definition.failures_before_warning
    if warning is not None and warning > definition.failures_before_critical:
        raise text_error(400, "Invalid check: FailuresBeforeWarning can't be higher than FailuresBeforeCritical")
    if kind is CheckKind.HTTP:
        url = yarl.URL(definition.http)
        if url.scheme not in ("http", "https") or not url.host:
            raise text_error(400, f"Invalid check HTTP {_show(definition.http)}: expected an http:// or https:// URL")
    if kind is CheckKind.TCP and not _host_port(definition.tcp):
        raise text_error(400, f"Invalid check TCP {_show(definition.tcp)}: expected HOST:PORT")
    if kind is CheckKind.GRPC:
        if definition.grpc_use_tls and definition.tls_skip_verify:
            raise text_error(
                400, "Invalid check: TLSSkipVerify is not supported for gRPC checks; the server's "
                "certificate must verify against the system's CA certificates"
            )
        address, _ = split_grpc_target(definition.grpc)
        if not _host_port(address):
            raise text_error(400, f"Invalid check GRPC {_show(definition.grpc)}: expected HOST:PORT or HOST:PORT/SERVICE")


def _host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isascii() and port.isdigit() and 0 < int(port) <= 65535


def _bool_query(request: web.Request, name: str) -> bool:
    """Read a query flag as Go's strconv.ParseBool does, and raise Consul's 400 errors."""
    if name not in request.query:
        raise text_error(400, f"Missing value for {name}")
    raw = request.query[name]
    if raw in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if raw in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise text_error(400, f"Invalid value for {name}: {_show(raw)}; expected true or false")


def _registry_error(exc: RegistryError) -> web.HTTPException:
    if exc.status == 403:
        return web.HTTPForbidden(text=exc.message)
    return text_error(exc.status, exc.message)


# Response bodies


def service_to_api(service: LocalService, datacenter: str) -> dict[str, Any]:
    """Return Consul's AgentService object."""
    body: dict[str, Any] = {
        "ID": service.id,
        "Service": service.name,
        "Tags": list(service.tags),
        "Meta": dict(service.meta),
        "Port": service.port,
        "Address": service.address,
    }
    if service.tagged_addresses:
        body["TaggedAddresses"] = service.tagged_addresses
    body["Weights"] = dict(service.weights)
    body["EnableTagOverride"] = service.enable_tag_override
    body["Datacenter"] = datacenter
    return body


def check_to_api(check: LocalCheck, node: str, registry: LocalRegistry) -> dict[str, Any]:
    """Return Consul's HealthCheck object for a check of the local agent."""
    service = registry.service(check.service_id) if check.service_id else None
    definition = check.definition
    return {
        "Node": node,
        "CheckID": check.id,
        "Name": check.name,
        "Status": check.status.value,
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": check.service_id,
        "ServiceName": check.service_name,
        "ServiceTags": list(service.tags) if service else [],
        "Type": definition.kind.value,
        "Interval": format_duration(definition.interval) if definition.interval else "",
        "Timeout": format_duration(definition.timeout) if definition.timeout else "",
        "ExposedPort": 0,
        "Definition": definition.to_api(),
        "CreateIndex": 0,
        "ModifyIndex": 0,
    }


def content_hash(body: Any) -> str:
    """Return a short hash of a JSON-able value, for X-Consul-ContentHash."""
    return hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


async def hash_blocking(request: web.Request, render: Callable[[], Any], embed_hash: bool = False) -> web.Response:
    """Respond with render()'s JSON, waiting first as a hash-based blocking query asks.

    With `?hash=H`, wait until the content no longer hashes to H, or until
    `?wait` (5 minutes by default, at most 10, plus up to wait/16 of jitter)
    runs out. With embed_hash, the hash also goes into the body as ContentHash.
    """
    registry = registry_of(request)
    wanted = request.query.get("hash", "")
    _, wait = blocking_params(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait + random.uniform(0, wait / 16)
    while True:
        version = registry.version
        body = render()
        digest = content_hash(body)
        remaining = deadline - loop.time()
        if not wanted or digest != wanted or remaining <= 0:
            break
        await registry.wait_for_change(version, remaining)
    if embed_hash:
        body["ContentHash"] = digest
    response = web.Response(body=orjson.dumps(body), content_type="application/json")
    response.headers["X-Consul-ContentHash"] = digest
    return response


# Handlers: members, services and checks


async def members(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    datacenter = agent.datacenter
    name = agent.node
    if request.query.get("wan"):
        name = f"{agent.node}.{datacenter}"
    member = {
        "Name": name,
        "Addr": agent.address,
        # NOTE: corral has no gossip layer, and agents reach servers over the HTTP API.
        # So the member's port is the HTTP API's, not a Serf LAN port.
        "Port": request.url.port or 0,
        "Tags": {
            "role": "consul",
            "dc": datacenter,
            "id": node_id(agent.node),
            "build": corral.__version__,
        },
        "Status": 1,
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }
    return web.Response(body=orjson.dumps([member]), content_type="application/json")


async def list_services(request: web.Request) -> web.Response:
    registry = registry_of(request)
    datacenter = request.app[AGENT_KEY].datacenter
    return await hash_blocking(
        request,
        lambda: {service.id: service_to_api(service, datacenter) for service in registry.services.values()},
    )


# Paths under /v1/agent/service/ that Consul routes to its PUT-only endpoints (besides
# "register"), so a GET of them returns 405 rather than looking up a service of that ID.
_PUT_ONLY_SERVICE_PREFIXES = ("deregister/", "maintenance/")


async def get_service(request: web.Request) -> web.Response:
    registry = registry_of(request)
    service_id = request.match_info["service_id"]
    if service_id == "register" or service_id.startswith(_PUT_ONLY_SERVICE_PREFIXES):
        raise web.HTTPMethodNotAllowed("GET", ["PUT"])
    datacenter = request.app[AGENT_KEY].datacenter

    def render() -> dict[str, Any]:
        service = registry.service(service_id)
        if service is None:
            raise text_error(404, f"unknown service ID: {service_id}")
        return service_to_api(service, datacenter)

    return await hash_blocking(request, render, embed_hash=True)


async def list_checks(request: web.Request) -> web.Response:
    registry = registry_of(request)
    node = request.app[AGENT_KEY].node
    return await hash_blocking(
        request, lambda: {check.id: check_to_api(check, node, registry) for check in registry.checks.values()}
    )


async def register_service(request: web.Request) -> web.Response:
    service, checks = parse_service(await read_body(request))
    replace = request.query.get("replace-existing-checks")
    registry = registry_of(request)
    try:
        await registry.add_service(service, checks, replace_existing_checks=replace in ("", "true"))
    except RegistryError as exc:
        raise _registry_error(exc) from None
    await registry.sync()
    return web.Response()


async def deregister_service(request: web.Request) -> web.Response:
    registry = registry_of(request)
    try:
        await registry.remove_service(request.match_info["service_id"])
    except RegistryError as exc:
        raise _registry_error(exc) from None
    await registry.sync()
    return web.Response()


async def register_check(request: web.Request) -> web.Response:
    check = parse_check(Fields(await read_body(request)), with_identity=True)
    registry = registry_of(request)
    try:
        await registry.add_check(check, ConfigSource.REMOTE)
    except RegistryError as exc:
        raise _registry_error(exc) from None
    await registry.sync()
    return web.Response()


async def deregister_check(request: web.Request) -> web.Response:
    registry = registry_of(request)
    try:
        await registry.remove_check(request.match_info["check_id"])
    except RegistryError as exc:
        raise _registry_error(exc) from None
    await registry.sync()
    return web.Response()


def ttl_update(status: CheckStatus):
    """Return the handler of PUT /v1/agent/check/pass|warn|fail/ID?note=, whose note becomes the output."""

    async def handler(request: web.Request) -> web.Response:
        return await _set_ttl(request, status, request.query.get("note", ""))

    return handler


async def update_check(request: web.Request) -> web.Response:
    body = await read_body(request)
    fields = Fields(body if body is not None else {})
    status = fields.string("Status")
    if status not in _STATUSES:
        raise text_error(400, f"Invalid check status: {_show(status)}; expected passing, warning or critical")
    return await _set_ttl(request, _STATUSES[status], fields.string("Output"))


async def _set_ttl(request: web.Request, status: CheckStatus, output: str) -> web.Response:
    registry = registry_of(request)
    try:
        await registry.update_ttl(request.match_info["check_id"], status, output)
    except RegistryError as exc:
        raise _registry_error(exc) from None
    await registry.sync()
    return web.Response()


# Handlers: maintenance


async def service_maintenance(request: web.Request) -> web.Response:
    enable = _bool_query(request, "enable")
    registry = registry_of(request)
    try:
        await registry.set_service_maintenance(
            request.match_info["service_id"], enable, request.query.get("reason", "")
        )
    except RegistryError as exc:
        raise _registry_error(exc) from None
    await registry.sync()
    return web.Response()


async def node_maintenance(request: web.Request) -> web.Response:
    enable = _bool_query(request, "enable")
    registry = registry_of(request)
    await registry.set_node_maintenance(enable, request.query.get("reason", ""))
    await registry.sync()
    return web.Response()


# Handlers: local service health


def _wants_text(request: web.Request) -> bool:
    if request.headers.get("Accept", "").startswith("text/plain"):
        return True
    return request.query.get("format") == "text"


def _health_entry(registry: LocalRegistry, service: LocalService, node: str, datacenter: str) -> tuple[str, dict]:
    checks = registry.checks_for_service(service.id, include_node=True)
    status = aggregated_status(checks)
    entry = {
        "AggregatedStatus": status,
        "Service": service_to_api(service, datacenter),
        "Checks": [check_to_api(check, node, registry) for check in checks],
    }
    return status, entry


def _health_response(request: web.Request, code: int, status_text: str, body: Any) -> web.Response:
    if _wants_text(request):
        return web.Response(status=code, text=status_text)
    return web.Response(status=code, body=orjson.dumps(body), content_type="application/json")


async def health_by_name(request: web.Request) -> web.Response:
    """Return every local instance of a service with its health, under the worst instance's HTTP status."""
    agent = request.app[AGENT_KEY]
    registry = agent.registry
    name = request.match_info["name"]
    code, status_text = 404, f"ServiceName {name} Not Found"
    entries = []
    for service in registry.services_named(name):
        status, entry = _health_entry(registry, service, agent.node, agent.datacenter)
        entries.append(entry)
        instance_code = _HEALTH_HTTP_STATUS.get(status, 503)
        if code == 404 or instance_code > code:
            code, status_text = instance_code, status
    return _health_response(request, code, status_text, entries)


async def health_by_id(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    registry = agent.registry
    service_id = request.match_info["service_id"]
    service = registry.service(service_id)
    if service is None:
        message = f"ServiceId {service_id} not found"
        body = {"AggregatedStatus": CheckStatus.CRITICAL.value, "Service": None, "Checks": None}
        return _health_response(request, 404, message, body)
    status, entry = _health_entry(registry, service, agent.node, agent.datacenter)
    return _health_response(request, _HEALTH_HTTP_STATUS.get(status, 503), status, entry)


def add_routes(app: web.Application, agent: Agent) -> None:
    app[AGENT_KEY] = agent
    router = app.router
    router.add_get("/v1/agent/members", members)
    router.add_get("/v1/agent/services", list_services)
    router.add_get("/v1/agent/checks", list_checks)
    router.add_put("/v1/agent/service/register", register_service)
    router.add_put("/v1/agent/service/deregister/{service_id:.+}", deregister_service)
    router.add_put("/v1/agent/service/maintenance/{service_id:.+}", service_maintenance)
    router.add_get("/v1/agent/service/{service_id:.+}", get_service)
    router.add_put("/v1/agent/maintenance", node_maintenance)
    router.add_put("/v1/agent/check/register", register_check)
    router.add_put("/v1/agent/check/deregister/{check_id:.+}", deregister_check)
    router.add_put("/v1/agent/check/pass/{check_id:.+}", ttl_update(CheckStatus.PASSING))
    router.add_put("/v1/agent/check/warn/{check_id:.+}", ttl_update(CheckStatus.WARNING))
    router.add_put("/v1/agent/check/fail/{check_id:.+}", ttl_update(CheckStatus.CRITICAL))
    router.add_put("/v1/agent/check/update/{check_id:.+}", update_check)
    router.add_get("/v1/agent/health/service/name/{name:.+}", health_by_name)
    router.add_get("/v1/agent/health/service/id/{service_id:.+}", health_by_id)
