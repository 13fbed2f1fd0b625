"""The endpoints that agent processes call on the server, and GET /v1/agents.

Records travel as JSON objects with the field names of corral.state.records
(node, cpus, port_ranges, ...), not in Consul's spelling, because only
corral agents call these endpoints:

    PUT    /v1/agents/register                  {"Agent", "Node", "Checks"}; returns HeartbeatInterval
    PUT    /v1/agents/NODE/heartbeat            404 when the agent is not registered
    PUT    /v1/agents/NODE/leave                stop placing tasks on the agent; its tasks keep running
    DELETE /v1/agents/NODE                      deregister: tasks left become LOST, the node leaves the catalog
    GET    /v1/agents                           every agent with its resources, total and used
    GET    /v1/agents/NODE/tasks?index=&wait=   the tasks placed on NODE, as a blocking query
    GET    /v1/agents/NODE/tasks/ID
    PATCH  /v1/agents/NODE/tasks/ID             {"Set": {field: value}}
    GET    /v1/agents/NODE/catalog              the node's catalog services
    PUT    /v1/agents/NODE/catalog              {"Node", "Services", "Checks", "LivenessCheck"}
    PUT    /v1/agents/NODE/services             {"Service", "Checks"}
    DELETE /v1/agents/NODE/services/ID
    PUT    /v1/agents/NODE/checks/ID            {"Status", "Output"}

The agent inside the server's process (`corral dev`) cannot be registered
again, left or deregistered over HTTP: those requests get 409.

A task update sets fields to absolute values, so sending it twice gives
the same record. An update that would move a task that has ended back to
a state that has not (a late RUNNING after LOST) is rejected with 409 and
the stored record, which the agent then keeps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from aiohttp import web

from corral.api.common import block, json_error, json_response, read_json, state_of
from corral.master.agents import AgentMonitor, AgentStatus, agent_reserved_resources, lose_tasks
from corral.scheduler.service import agent_snapshots
from corral.state.records import TASKS, AgentInfo, Check, Node, Service, Task
from corral.types import CheckStatus, TaskState

MONITOR_KEY = web.AppKey("agent_monitor", AgentMonitor)

# The task fields an agent may set, with the JSON types each accepts.
_AGENT_TASK_FIELDS: dict[str, tuple[type, ...]] = {
    "state": (str,),
    "message": (str,),
    "ports": (dict,),
    "pid": (int, type(None)),
    "pid_create_time": (float, int, type(None)),
    "restarts": (int,),
}


def record_to_json(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


def record_from_json(cls, fields: Any, what: str):
    """Build a record (Node, Check, ...) from its JSON fields, or raise 400 naming `what`."""
    if not isinstance(fields, dict):
        raise json_error(400, {"error": f"invalid {what}: expected a JSON object, got {type(fields).__name__}"})
    try:
        return cls.decode(orjson.dumps(fields))
    except (TypeError, ValueError) as exc:
        raise json_error(400, {"error": f"invalid {what}: {exc}"}) from None


def _records_from_json(cls, items: Any, what: str) -> list:
    if not isinstance(items, list):
        raise json_error(400, {"error": f"invalid {what}: expected a JSON list"})
    return [record_from_json(cls, item, what) for item in items]


def _field(body: Any, name: str) -> Any:
    if not isinstance(body, dict) or name not in body:
        raise json_error(400, {"error": f"invalid request body: missing field {name!r}"})
    return body[name]


def _monitor(request: web.Request) -> AgentMonitor:
    return request.app[MONITOR_KEY]


def _reject_in_process(request: web.Request, node: str, action: str) -> None:
    """Raise 409 when `node` is the agent inside the server's process (`corral dev`)."""
    if node not in _monitor(request).in_process:
        return
    if action == "register":
        message = (f"invalid registration: node {node} is the agent inside the server's process; "
                   "start this agent with another --node")
    else:
        message = f"cannot {action} agent {node}: it runs inside the server's process and stops only with it"
    raise json_error(409, {"error": message})


# Registration and liveness


async def register(request: web.Request) -> web.Response:
    body = await read_json(request)
    agent = record_from_json(AgentInfo, _field(body, "Agent"), "Agent")
    node = record_from_json(Node, _field(body, "Node"), "Node")
    checks = _records_from_json(Check, body.get("Checks", []), "Checks")
    try:
        agent_reserved_resources(agent)
    except ValueError as exc:
        raise json_error(400, {"error": str(exc)}) from None
    if agent.node != node.name:
        raise json_error(400, {"error": f"invalid registration: Agent.node {agent.node!r} differs from "
                                        f"Node.name {node.name!r}"})
    _reject_in_process(request, agent.node, "register")
    state = state_of(request)
    await state.register_agent(agent)
    await state.register_node(node, checks)
    _monitor(request).registered(agent.node)
    return json_response({"Node": agent.node, "HeartbeatInterval": _heartbeat_interval(request)})


async def heartbeat(request: web.Request) -> web.Response:
    node = request.match_info["node"]
    if not _monitor(request).heartbeat(node):
        raise json_error(404, {"error": f"agent {node} is not registered (or was declared failed); register again"})
    return json_response({"Node": node, "HeartbeatInterval": _heartbeat_interval(request)})


def _heartbeat_interval(request: web.Request) -> float:
    # Three heartbeats per timeout, so that one lost or late heartbeat does not fail an agent.
    return _monitor(request).timeout / 3


async def leave(request: web.Request) -> web.Response:
    node = request.match_info["node"]
    _reject_in_process(request, node, "remove")
    _monitor(request).forget(node)
    removed = await state_of(request).deregister_agent(node)
    return json_response({"Node": node, "Removed": removed})


async def deregister(request: web.Request) -> web.Response:
    node = request.match_info["node"]
    _reject_in_process(request, node, "deregister")
    state = state_of(request)
    _monitor(request).forget(node)
    await state.deregister_agent(node)
    lost = await lose_tasks(state, node, f"agent on node {node} left the cluster")
    await state.deregister_node(node)
    return json_response({"Node": node, "TasksLost": len(lost)})


async def list_agents(request: web.Request) -> web.Response:
    state = state_of(request)
    monitor = _monitor(request)
    agents = state.agents()
    snapshots = {snapshot.node: snapshot for snapshot in agent_snapshots(agents, state.tasks())}
    now = monitor.clock()
    result = []
    for agent in agents:
        snapshot = snapshots[agent.node]
        seen = monitor.last_seen.get(agent.node)
        result.append(
            {
                **_agent_fields(agent, state),
                "Status": AgentStatus.ALIVE,
                # None for an agent in the server's process, which sends no heartbeats.
                "LastHeartbeatAgo": round(now - seen, 3) if seen is not None else None,
                "InProcess": agent.node in monitor.in_process,
                "Used": {"cpus": snapshot.used_cpus, "memory": snapshot.used_memory, "ports": snapshot.used_ports},
            }
        )
    for node, failed in sorted(monitor.failed.items()):
        if state.agent(node) is None:
            result.append({**_agent_fields(failed.info, state), "Status": AgentStatus.FAILED,
                           "FailedAt": failed.failed_at})
    return json_response(result)


def _agent_fields(agent: AgentInfo, state) -> dict[str, Any]:
    node = state.node(agent.node)
    ports = sum(high - low + 1 for low, high in agent.port_ranges)
    return {
        "Node": agent.node,
        "Address": agent.address,
        "Attributes": node.meta if node is not None else {},
        "RegisteredAt": agent.registered_at,
        "Total": {"cpus": agent.cpus, "memory": agent.memory, "disk": agent.disk, "ports": ports,
                  "port_ranges": agent.port_ranges},
        # Static reservations by role, on top of the unreserved Total.
        "Reserved": agent.reserved,
    }


# Tasks


async def node_tasks(request: web.Request) -> web.Response:
    node = request.match_info["node"]
    state = state_of(request)
    index = await block(request, lambda: state.view.index(TASKS), TASKS)
    tasks = [record_to_json(task) for task in state.tasks(node=node)]
    return json_response({"Tasks": tasks}, index=index)


def _task_on_node(request: web.Request) -> Task:
    node, task_id = request.match_info["node"], request.match_info["task_id"]
    task = state_of(request).task(task_id)
    if task is None or task.node != node:
        raise json_error(404, {"error": f"task {task_id} not found on node {node}"})
    return task


async def get_task(request: web.Request) -> web.Response:
    return json_response(record_to_json(_task_on_node(request)))


async def update_task(request: web.Request) -> web.Response:
    current = _task_on_node(request)
    changes = _task_changes(_field(await read_json(request), "Set"))
    new_state = changes.get("state", current.state)
    if current.state.is_terminal and not new_state.is_terminal:
        raise _ended_error(current, new_state)

    def apply(record: Task) -> None:
        if record.state.is_terminal and not new_state.is_terminal:
            raise _ended_error(record, new_state)
        for name, value in changes.items():
            setattr(record, name, value)

    updated = await state_of(request).update_task(current.id, apply)
    if updated is None:
        raise json_error(404, {"error": f"task {current.id} not found on node {current.node}"})
    return json_response(record_to_json(updated))


def _ended_error(task: Task, new_state: TaskState) -> web.HTTPException:
    return json_error(409, {
        "error": f"task {task.id} has ended in state {task.state.value}; it cannot change to {new_state.value}",
        "Task": record_to_json(task),
    })


def _task_changes(fields: Any) -> dict[str, Any]:
    """Validate the fields of a task update and convert them to the record's types."""
    if not isinstance(fields, dict) or not fields:
        raise json_error(400, {"error": "invalid Set: expected a non-empty JSON object of task fields"})
    unknown = sorted(set(fields) - set(_AGENT_TASK_FIELDS))
    if unknown:
        allowed = ", ".join(sorted(_AGENT_TASK_FIELDS))
        raise json_error(400, {"error": f"invalid Set: agents cannot set {', '.join(unknown)}; allowed: {allowed}"})
    changes = dict(fields)
    for name, value in fields.items():
        types = _AGENT_TASK_FIELDS[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise json_error(400, {"error": f"invalid Set.{name}: {value!r} has type {type(value).__name__}"})
    if "state" in changes:
        try:
            changes["state"] = TaskState(changes["state"])
        except ValueError:
            states = ", ".join(state.value for state in TaskState)
            raise json_error(400, {"error": f"invalid Set.state {fields['state']!r}: expected one of {states}"})
    if "ports" in changes:
        ports = changes["ports"]
        if not all(isinstance(label, str) and isinstance(port, int) for label, port in ports.items()):
            raise json_error(400, {"error": f"invalid Set.ports {ports!r}: expected an object of label to port"})
    return changes


# The node's catalog entries


async def get_node_catalog(request: web.Request) -> web.Response:
    services = state_of(request).services(request.match_info["node"])
    return json_response({"Services": [record_to_json(service) for service in services]})


async def sync_node_catalog(request: web.Request) -> web.Response:
    body = await read_json(request)
    node = record_from_json(Node, _field(body, "Node"), "Node")
    _require_node(request, node.name)
    services = _records_from_json(Service, _field(body, "Services"), "Services")
    for service in services:
        _check_service_fields(service, "Services")
    checks = _records_from_json(Check, _field(body, "Checks"), "Checks")
    liveness = record_from_json(Check, _field(body, "LivenessCheck"), "LivenessCheck")
    counts = await state_of(request).sync_agent_node(node, services, checks, liveness)
    return json_response(counts)


async def register_service(request: web.Request) -> web.Response:
    body = await read_json(request)
    service = record_from_json(Service, _field(body, "Service"), "Service")
    _check_service_fields(service, "Service")
    _require_node(request, service.node)
    checks = _records_from_json(Check, body.get("Checks", []), "Checks")
    await state_of(request).register_service(service, checks)
    return json_response({"ID": service.id})


async def deregister_service(request: web.Request) -> web.Response:
    node, service_id = request.match_info["node"], request.match_info["service_id"]
    removed = await state_of(request).deregister_service(node, service_id)
    return json_response({"ID": service_id, "Removed": removed})


async def update_check(request: web.Request) -> web.Response:
    node, check_id = request.match_info["node"], request.match_info["check_id"]
    body = await read_json(request)
    try:
        status = CheckStatus(_field(body, "Status"))
    except ValueError:
        raise json_error(400, {"error": f"invalid Status {body['Status']!r}: expected a Consul check status"})
    output = body.get("Output", "")
    if not isinstance(output, str):
        raise json_error(400, {"error": "invalid Output: expected a string"})
    if not await state_of(request).update_check(node, check_id, status, output):
        raise json_error(404, {"error": f"check {check_id} not found on node {node}"})
    return json_response({"ID": check_id})


def _check_service_fields(service: Service, what: str) -> None:
    """Reject a service whose weights or tagged addresses DNS and /v1/catalog could not read."""
    weights = service.weights
    if (
        not isinstance(weights, dict)
        or set(weights) != {"Passing", "Warning"}
        or not all(isinstance(value, int) and not isinstance(value, bool) for value in weights.values())
    ):
        raise json_error(400, {"error": f"invalid {what}: service {service.id} has weights {weights!r}; "
                                        'expected {"Passing": int, "Warning": int}'})
    addresses = service.tagged_addresses
    if not isinstance(addresses, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("Address"), str) and isinstance(entry.get("Port"), int)
        for entry in addresses.values()
    ):
        raise json_error(400, {"error": f"invalid {what}: service {service.id} has tagged addresses "
                                        f'{addresses!r}; expected {{"lan": {{"Address": str, "Port": int}}}}'})


def _require_node(request: web.Request, name: str) -> None:
    node = request.match_info["node"]
    if name != node:
        raise json_error(400, {"error": f"invalid request: the body names node {name!r}, the path {node!r}"})


def add_routes(app: web.Application, monitor: AgentMonitor) -> None:
    app[MONITOR_KEY] = monitor
    router = app.router
    router.add_put("/v1/agents/register", register)
    router.add_get("/v1/agents", list_agents)
    router.add_put("/v1/agents/{node}/heartbeat", heartbeat)
    router.add_put("/v1/agents/{node}/leave", leave)
    router.add_delete("/v1/agents/{node}", deregister)
    router.add_get("/v1/agents/{node}/tasks", node_tasks)
    router.add_get("/v1/agents/{node}/tasks/{task_id}", get_task)
    router.add_patch("/v1/agents/{node}/tasks/{task_id}", update_task)
    router.add_get("/v1/agents/{node}/catalog", get_node_catalog)
    router.add_put("/v1/agents/{node}/catalog", sync_node_catalog)
    router.add_put("/v1/agents/{node}/services", register_service)
    router.add_delete("/v1/agents/{node}/services/{service_id:.+}", deregister_service)
    router.add_put("/v1/agents/{node}/checks/{check_id:.+}", update_check)
