"""ServerConnection over the server's HTTP API, for agents in their own process.

Reads of the KV store use Consul's /v1/kv endpoint. Everything else uses
the agent endpoints under /v1/agents (corral.api.agents), which take
records as JSON objects with their field names. Waits are blocking queries (`?index=`
and `?wait=`).

Every request is retried while the server is unreachable or answers 5xx,
with exponential backoff from `retry_min` to `retry_max` seconds and
jitter; each retry is logged with its error. Task updates send absolute
field values, so a retry after a lost response does no harm.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from corral.agent.connection import ServerConnection
from corral.state.records import AgentInfo, Check, KVEntry, Node, Service, Task
from corral.types import CheckStatus

log = logging.getLogger(__name__)

# The task fields an agent owns; the scheduler owns the others (desired, node, spec, ...).
AGENT_TASK_FIELDS = ("state", "message", "ports", "pid", "pid_create_time", "restarts")

# Seconds a request may take beyond a blocking query's wait: Consul adds up to wait/16 of
# jitter, and the response still has to travel.
_WAIT_MARGIN = 5.0
_REQUEST_TIMEOUT = 30.0
# The heartbeat interval used until the server suggests one.
DEFAULT_HEARTBEAT_INTERVAL = 2.0


class ServerRequestError(Exception):
    """The server rejected a request (4xx); the message names the request and the server's error."""

    def __init__(self, method: str, path: str, status: int, body: str):
        super().__init__(f"{method} {path} failed with HTTP {status}: {body.strip()}")
        self.status = status


@dataclasses.dataclass(slots=True)
class _Answer:
    status: int
    body: bytes
    index: int

    def json(self) -> Any:
        return orjson.loads(self.body)


class HttpConnection(ServerConnection):
    """A connection to a server at `address` (HOST:PORT) for the agent of `node`."""

    def __init__(self, address: str, node: str, retry_min: float = 0.5, retry_max: float = 10.0):
        self.base_url = f"http://{address}"
        self.node = node
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self._session: aiohttp.ClientSession | None = None
        # The last registration, sent again when the server has no record of this agent.
        self._registration: dict[str, Any] | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # Transport

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        timeout: float = _REQUEST_TIMEOUT,
        expected: tuple[int, ...] = (200,),
    ) -> _Answer:
        """Send a request, retrying while the server is unreachable or fails with 5xx.

        Returns the response when its status is in `expected`, and raises
        ServerRequestError for any other status below 500.
        """
        if self._session is None:
            self._session = aiohttp.ClientSession()
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        delay = self.retry_min
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._session.request(
                    method, self.base_url + path, params=params, data=data, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as response:
                    raw = await response.read()
                    index = int(response.headers.get("X-Consul-Index", "0") or 0)
                    if response.status in expected:
                        return _Answer(response.status, raw, index)
                    if response.status < 500:
                        raise ServerRequestError(method, path, response.status, raw.decode(errors="replace"))
                    error = f"HTTP {response.status}: {raw.decode(errors='replace').strip()}"
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            wait = min(delay, self.retry_max) * random.uniform(0.8, 1.2)
            log.warning("server request failed node=%s request=%s %s attempt=%d: %s; retrying in %.1fs",
                        self.node, method, path, attempt, error, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.retry_max)

    def _agent_path(self, node: str, suffix: str = "") -> str:
        return f"/v1/agents/{quote(node, safe='')}{suffix}"

    # Registration and liveness

    async def register(self, agent: AgentInfo, node: Node, checks: Iterable[Check]) -> None:
        self._registration = {
            "Agent": dataclasses.asdict(agent),
            "Node": dataclasses.asdict(node),
            "Checks": [dataclasses.asdict(check) for check in checks],
        }
        await self._register()

    async def _register(self) -> None:
        assert self._registration is not None
        answer = await self._request("PUT", "/v1/agents/register", body=self._registration)
        self._adopt_interval(answer.json())
        log.info("agent registered with the server node=%s server=%s", self.node, self.base_url)

    async def heartbeat(self) -> None:
        """Send one heartbeat, and register again when the server returns 404 (agent not registered)."""
        answer = await self._request("PUT", self._agent_path(self.node, "/heartbeat"), expected=(200, 404))
        if answer.status == 200:
            self._adopt_interval(answer.json())
            return
        if self._registration is None:
            raise ServerRequestError("PUT", "heartbeat", 404, "agent not registered yet")
        log.warning("server does not know this agent node=%s; registering again", self.node)
        await self._register()

    def _adopt_interval(self, body: Any) -> None:
        interval = body.get("HeartbeatInterval") if isinstance(body, dict) else None
        if isinstance(interval, (int, float)) and interval > 0:
            self.heartbeat_interval = float(interval)

    async def leave(self) -> None:
        """Ask the server to place nothing more on this agent; its tasks keep running."""
        await self._request("PUT", self._agent_path(self.node, "/leave"))

    async def deregister(self) -> None:
        """Remove this agent and its node from the server; tasks still recorded on it become LOST."""
        await self._request("DELETE", self._agent_path(self.node))

    # Tasks

    async def assigned_tasks(self, node: str) -> tuple[list[Task], int]:
        answer = await self._request("GET", self._agent_path(node, "/tasks"))
        return _tasks(answer), answer.index

    async def wait_for_assignments(self, node: str, index: int, timeout: float) -> None:
        params = {"index": str(index), "wait": f"{timeout:g}s"}
        await self._request("GET", self._agent_path(node, "/tasks"), params=params, timeout=timeout + _WAIT_MARGIN)

    async def update_task(self, task_id: str, mutate: Callable[[Task], None]) -> Task | None:
        """Apply `mutate` to the server's record and send the agent fields it changed.

        Returns the stored record: the updated one, or the unchanged one when
        the server rejects the change because the task has already ended.
        """
        path = self._agent_path(self.node, f"/tasks/{quote(task_id, safe='')}")
        answer = await self._request("GET", path, expected=(200, 404))
        if answer.status == 404:
            return None
        current = Task.decode(answer.body)
        changed = copy.deepcopy(current)
        mutate(changed)
        changes = _changed_fields(current, changed)
        if not changes:
            return current
        answer = await self._request("PATCH", path, body={"Set": changes}, expected=(200, 404, 409))
        if answer.status == 404:
            return None
        if answer.status == 409:
            body = answer.json()
            log.warning("task update rejected task=%s node=%s: %s", task_id, self.node, body.get("error"))
            return _record(Task, body["Task"])
        return Task.decode(answer.body)

    # Key/value

    async def kv_get(self, key: str) -> tuple[KVEntry | None, int]:
        answer = await self._request("GET", _kv_path(key), expected=(200, 404))
        if answer.status == 404:
            return None, answer.index
        return _kv_entry(answer.json()[0]), answer.index

    async def wait_for_kv(self, key: str, index: int, timeout: float) -> None:
        params = {"index": str(index), "wait": f"{timeout:g}s"}
        await self._request("GET", _kv_path(key), params=params, timeout=timeout + _WAIT_MARGIN, expected=(200, 404))

    # Catalog

    async def register_service(self, service: Service, checks: Iterable[Check]) -> None:
        body = {"Service": dataclasses.asdict(service), "Checks": [dataclasses.asdict(check) for check in checks]}
        await self._request("PUT", self._agent_path(service.node, "/services"), body=body)

    async def deregister_service(self, node: str, service_id: str) -> None:
        await self._request("DELETE", self._agent_path(node, f"/services/{quote(service_id, safe='')}"))

    async def update_check(self, node: str, check_id: str, status: CheckStatus, output: str) -> None:
        path = self._agent_path(node, f"/checks/{quote(check_id, safe='')}")
        await self._request("PUT", path, body={"Status": status.value, "Output": output}, expected=(200, 404))

    async def node_services(self, node: str) -> list[Service]:
        answer = await self._request("GET", self._agent_path(node, "/catalog"))
        return [_record(Service, fields) for fields in answer.json()["Services"]]

    async def sync_node_catalog(
        self, node: Node, services: list[Service], checks: list[Check], liveness_check: Check
    ) -> dict[str, int]:
        body = {
            "Node": dataclasses.asdict(node),
            "Services": [dataclasses.asdict(service) for service in services],
            "Checks": [dataclasses.asdict(check) for check in checks],
            "LivenessCheck": dataclasses.asdict(liveness_check),
        }
        answer = await self._request("PUT", self._agent_path(node.name, "/catalog"), body=body)
        return answer.json()


def _record(cls, fields: dict[str, Any]):
    return cls.decode(orjson.dumps(fields))


def _tasks(answer: _Answer) -> list[Task]:
    return [_record(Task, fields) for fields in answer.json()["Tasks"]]


def _changed_fields(before: Task, after: Task) -> dict[str, Any]:
    changes = {}
    for field in dataclasses.fields(Task):
        old, new = getattr(before, field.name), getattr(after, field.name)
        if old == new or field.name == "updated_at":
            continue
        if field.name not in AGENT_TASK_FIELDS:
            raise ValueError(f"agents cannot change the task field {field.name!r} (task {before.id})")
        changes[field.name] = new
    return changes


def _kv_path(key: str) -> str:
    return "/v1/kv/" + quote(key, safe="/")


def _kv_entry(fields: dict[str, Any]) -> KVEntry:
    value = fields.get("Value")
    return KVEntry(
        key=fields["Key"],
        value=base64.b64decode(value) if value else b"",
        flags=fields.get("Flags", 0),
        lock_index=fields.get("LockIndex", 0),
        session=fields.get("Session", ""),
        create_index=fields.get("CreateIndex", 0),
        modify_index=fields.get("ModifyIndex", 0),
    )
