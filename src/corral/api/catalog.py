"""Consul's catalog, health, agent and status endpoints, in Consul's JSON shapes.

Each list answers with the index of what it reads, and blocks on it with
`?index`: the service listings wait on the catalog's service and node keys,
the health listings on those and the check keys too.
"""

from __future__ import annotations

import uuid

from aiohttp import web

import corral
from corral.api.common import block, check_datacenter, json_response, state_of, text_error
from corral.state import State
from corral.state.records import CHECKS, NODES, SERVICES, Check, Node, Service, check_key, node_key, service_key
from corral.types import CheckStatus

CATALOG_PREFIXES = (SERVICES, NODES)
HEALTH_PREFIXES = (SERVICES, NODES, CHECKS)

SERVER_INFO_KEY = web.AppKey("server_info", dict)


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
    create, modify = _revisions(state, service_key(service.node, service.id))
    return {
        "ID": service.id,
        "Service": service.name,
        "Tags": service.tags,
        "Address": service.address,
        "Meta": service.meta,
        "Port": service.port,
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
        "CreateIndex": create,
        "ModifyIndex": modify,
    }


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
    service_fields = service_to_api(state, service)
    return {
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
        "ServiceWeights": service_fields["Weights"],
        "ServiceMeta": service.meta,
        "ServicePort": service.port,
        "ServiceEnableTagOverride": False,
        "CreateIndex": service_fields["CreateIndex"],
        "ModifyIndex": service_fields["ModifyIndex"],
    }


def _has_tags(service: Service, wanted: list[str]) -> bool:
    tags = {tag.lower() for tag in service.tags}
    return all(tag.lower() in tags for tag in wanted)


async def catalog_services(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    index = await block(request, state.catalog_index, CATALOG_PREFIXES)
    names: dict[str, list[str]] = {}
    for service in state.services():
        tags = names.setdefault(service.name, [])
        tags.extend(tag for tag in service.tags if tag not in tags)
    return json_response(names, index=index)


async def catalog_service(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    name = request.match_info["name"]
    tags = request.query.getall("tag", [])
    index = await block(request, state.catalog_index, CATALOG_PREFIXES)
    entries = [
        catalog_service_entry(state, node, service)
        for node, service, _ in state.service_instances_with_checks(name)
        if _has_tags(service, tags)
    ]
    return json_response(entries, index=index)


async def catalog_nodes(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    index = await block(request, state.catalog_index, NODES)
    return json_response([node_to_api(state, node) for node in state.nodes()], index=index)


async def catalog_node(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    name = request.match_info["name"]
    index = await block(request, state.catalog_index, CATALOG_PREFIXES)
    node = state.node(name)
    if node is None:
        return json_response(None, index=index)
    services = {service.id: service_to_api(state, service) for service in state.services(name)}
    return json_response({"Node": node_to_api(state, node), "Services": services}, index=index)


async def catalog_datacenters(request: web.Request) -> web.Response:
    return json_response([state_of(request).datacenter])


async def health_service(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    name = request.match_info["name"]
    tags = request.query.getall("tag", [])
    passing_only = _passing_flag(request)
    index = await block(request, state.health_index, HEALTH_PREFIXES)
    entries = []
    for node, service, checks in state.service_instances_with_checks(name):
        if not _has_tags(service, tags):
            continue
        if passing_only and any(check.status is not CheckStatus.PASSING for check in checks):
            continue
        entries.append(
            {
                "Node": node_to_api(state, node),
                "Service": service_to_api(state, service),
                "Checks": [check_to_api(state, check, service.tags) for check in checks],
            }
        )
    return json_response(entries, index=index)


def _passing_flag(request: web.Request) -> bool:
    if "passing" not in request.query:
        return False
    value = request.query["passing"].lower()
    if value in ("", "true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise text_error(400, f"Invalid value for ?passing: {request.query['passing']!r}; expected true or false")


async def health_checks(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    name = request.match_info["name"].lower()
    index = await block(request, state.health_index, HEALTH_PREFIXES)
    tags_by_id = {(s.node, s.id): s.tags for s in state.services()}
    checks = [
        check_to_api(state, check, tags_by_id.get((check.node, check.service_id), []))
        for check in state.checks()
        if check.service_name.lower() == name
    ]
    return json_response(checks, index=index)


async def health_node(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    name = request.match_info["name"]
    index = await block(request, state.health_index, HEALTH_PREFIXES)
    tags_by_id = {s.id: s.tags for s in state.services(name)}
    checks = [check_to_api(state, check, tags_by_id.get(check.service_id, [])) for check in state.checks(name)]
    return json_response(checks, index=index)


async def health_state(request: web.Request) -> web.Response:
    check_datacenter(request)
    state = state_of(request)
    wanted = request.match_info["state"]
    if wanted != "any" and wanted not in {status.value for status in CheckStatus}:
        raise text_error(400, f"Invalid check state {wanted!r}: expected any, passing, warning or critical")
    index = await block(request, state.health_index, HEALTH_PREFIXES)
    tags_by_id = {(s.node, s.id): s.tags for s in state.services()}
    checks = [
        check_to_api(state, check, tags_by_id.get((check.node, check.service_id), []))
        for check in state.checks()
        if wanted == "any" or check.status.value == wanted
    ]
    return json_response(checks, index=index)


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
    router = app.router
    router.add_get("/v1/catalog/services", catalog_services)
    router.add_get("/v1/catalog/service/{name}", catalog_service)
    router.add_get("/v1/catalog/nodes", catalog_nodes)
    router.add_get("/v1/catalog/node/{name}", catalog_node)
    router.add_get("/v1/catalog/datacenters", catalog_datacenters)
    router.add_get("/v1/health/service/{name}", health_service)
    router.add_get("/v1/health/checks/{name}", health_checks)
    router.add_get("/v1/health/node/{name}", health_node)
    router.add_get("/v1/health/state/{state}", health_state)
    router.add_get("/v1/agent/self", agent_self)
    router.add_get("/v1/status/leader", status_leader)
    router.add_get("/v1/status/peers", status_peers)

