"""Domain records and how each is encoded as a key and a value in the store.

Key layout (every key is bytes, every record value is JSON):

    kv/<key>                       a KV entry: a JSON header line, then the raw value
    kvlock/<key>                   an empty marker rewritten by every acquire of the key
    jobs/<job>                     a submitted job and its spec
    jobstatus/<job>                the scheduler's placement results for a job
    tasks/<task id>                a task: where it runs, its desired and actual state
    agents/<node>                  an agent's resources
    nodes/<node>                   a catalog node
    services/<node>/<service id>   a catalog service instance
    checks/<node>/<check id>       a catalog health check
    sessions/<session id>          a Consul session, attached to a store lease when it has a TTL
    frameworks/<framework id>      a framework subscribed to the master
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import orjson

from corral.types import CheckStatus, DesiredState, SessionBehavior, TaskState

KV = b"kv/"
KV_LOCK = b"kvlock/"
JOBS = b"jobs/"
JOB_STATUS = b"jobstatus/"
TASKS = b"tasks/"
AGENTS = b"agents/"
NODES = b"nodes/"
SERVICES = b"services/"
CHECKS = b"checks/"
SESSIONS = b"sessions/"
FRAMEWORKS = b"frameworks/"


def kv_key(key: str) -> bytes:
    return KV + key.encode()


def kv_lock_key(key: str) -> bytes:
    # NOTE: markers are not deleted with their keys; one stays for each key ever acquired.
    return KV_LOCK + key.encode()


def job_key(name: str) -> bytes:
    return JOBS + name.encode()


def job_status_key(name: str) -> bytes:
    return JOB_STATUS + name.encode()


def task_key(task_id: str) -> bytes:
    return TASKS + task_id.encode()


def agent_key(node: str) -> bytes:
    return AGENTS + node.encode()


def node_key(node: str) -> bytes:
    return NODES + node.encode()


def service_key(node: str, service_id: str) -> bytes:
    return SERVICES + f"{node}/{service_id}".encode()


def check_key(node: str, check_id: str) -> bytes:
    return CHECKS + f"{node}/{check_id}".encode()


def session_key(session_id: str) -> bytes:
    return SESSIONS + session_id.encode()


def framework_key(framework_id: str) -> bytes:
    return FRAMEWORKS + framework_id.encode()


def encode(record: Any) -> bytes:
    return orjson.dumps(dataclasses.asdict(record))


@dataclass(slots=True)
class KVEntry:
    """A Consul KV entry; the indexes come from the store, the rest from the value."""

    key: str
    value: bytes
    flags: int = 0
    lock_index: int = 0
    session: str = ""
    create_index: int = 0
    modify_index: int = 0

    def encode(self) -> bytes:
        header = {"flags": self.flags, "lock_index": self.lock_index, "session": self.session}
        return orjson.dumps(header) + b"\n" + self.value

    @classmethod
    def decode(cls, key: str, raw: bytes, create_index: int, modify_index: int) -> KVEntry:
        header, _, value = raw.partition(b"\n")
        fields = orjson.loads(header)
        return cls(
            key=key,
            value=value,
            flags=fields["flags"],
            lock_index=fields["lock_index"],
            session=fields["session"],
            create_index=create_index,
            modify_index=modify_index,
        )


@dataclass(slots=True)
class Node:
    name: str
    address: str
    datacenter: str
    meta: dict[str, str] = field(default_factory=dict)
    tagged_addresses: dict[str, str] = field(default_factory=dict)

    @classmethod
    def decode(cls, raw: bytes) -> Node:
        return cls(**orjson.loads(raw))


def default_service_weights() -> dict[str, int]:
    """Return Consul's default DNS weights of a service instance."""
    return {"Passing": 1, "Warning": 1}


@dataclass(slots=True)
class Service:
    """A service instance in the catalog; `task_id` is set for instances corral runs."""

    node: str
    id: str
    name: str
    address: str
    port: int
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    task_id: str = ""
    # Consul's Weights, TaggedAddresses and EnableTagOverride, with inner keys spelled as in
    # Consul's API. Records stored before these fields existed decode with the defaults.
    weights: dict[str, int] = field(default_factory=default_service_weights)  # SRV weight by health
    tagged_addresses: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"lan": {"Address", "Port"}}
    enable_tag_override: bool = False  # anti-entropy keeps tags changed in the catalog

    @classmethod
    def decode(cls, raw: bytes) -> Service:
        return cls(**orjson.loads(raw))


@dataclass(slots=True)
class Check:
    node: str
    id: str
    name: str
    status: CheckStatus
    output: str = ""
    notes: str = ""
    service_id: str = ""
    service_name: str = ""
    type: str = ""
    interval: str = ""
    timeout: str = ""

    @classmethod
    def decode(cls, raw: bytes) -> Check:
        fields = orjson.loads(raw)
        fields["status"] = CheckStatus(fields["status"])
        return cls(**fields)


@dataclass(slots=True)
class Session:
    """A Consul session: locks held through it are released (or deleted) when it is invalidated.

    `lock_delay` and `ttl` are in seconds; a `ttl` of 0 means no TTL. `lease`
    is the store lease whose expiry deletes the session's key.
    """

    id: str
    name: str
    node: str
    checks: list[str]
    behavior: SessionBehavior
    lock_delay: float
    ttl: float = 0.0
    lease: int = 0
    service_checks: list[str] = field(default_factory=list)

    @classmethod
    def decode(cls, raw: bytes) -> Session:
        fields = orjson.loads(raw)
        fields["behavior"] = SessionBehavior(fields["behavior"])
        return cls(**fields)


@dataclass(slots=True)
class JobRecord:
    """A submitted job: its canonical spec and versions.

    `version` grows with every change; `task_version` only when the task or
    service part changes, so that scaling a job does not replace its tasks.
    """

    name: str
    spec: dict[str, Any]
    version: int
    task_version: int
    stopped: bool = False
    submitted_at: float = 0.0

    @classmethod
    def decode(cls, raw: bytes) -> JobRecord:
        return cls(**orjson.loads(raw))


@dataclass(slots=True)
class JobStatus:
    """The scheduler's last word on a job: the instances it could not place, and why."""

    name: str
    unplaced: dict[str, str] = field(default_factory=dict)  # instance index -> reason

    @classmethod
    def decode(cls, raw: bytes) -> JobStatus:
        return cls(**orjson.loads(raw))


@dataclass(slots=True)
class Task:
    """One task placed on a node: an instance of a job, or a task a framework launched.

    The scheduler (the job scheduler or the master) creates the record and
    sets `desired`; the node's agent updates the rest. `spec_version` is the
    job's `task_version` whose spec the task runs. A framework's task has a
    `framework_id`, runs once instead of being restarted, and carries the
    latest status update sent to its framework in `status` (Mesos's v1
    TaskStatus JSON) until the framework acknowledges it.
    """

    id: str
    job: str
    instance: int
    node: str
    spec_version: int
    desired: DesiredState
    state: TaskState
    cpus: float
    memory: int
    port_labels: list[str] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)  # the job spec the task was placed from
    ports: dict[str, int] = field(default_factory=dict)
    pid: int | None = None
    pid_create_time: float | None = None
    message: str = ""
    restarts: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    # Framework tasks only: the framework, the task's name and id as the framework gave them,
    # its command ({"shell": true, "value": "..."} or {"shell": false, "value": program,
    # "arguments": [...]}), its environment and its disk in MB.
    framework_id: str = ""
    name: str = ""
    framework_task_id: str = ""
    command: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    disk: float = 0.0
    status: dict[str, Any] | None = None
    status_acknowledged: bool = True
    # Tasks of a custom executor only: its executor id, the TaskInfo JSON (with its ExecutorInfo)
    # that the executor receives in LAUNCH, and the FrameworkInfo JSON it receives in SUBSCRIBED.
    executor_id: str = ""
    task_info: dict[str, Any] = field(default_factory=dict)
    framework_info: dict[str, Any] = field(default_factory=dict)
    # Framework messages for the task's executor, [{"seq": int, "data": base64}], oldest first;
    # the agent delivers those with a seq above the last it delivered.
    executor_messages: list[dict[str, Any]] = field(default_factory=list)
    # Set by the framework's SHUTDOWN call: the agent shuts the task's executor down.
    executor_shutdown: bool = False

    @classmethod
    def decode(cls, raw: bytes) -> Task:
        fields = orjson.loads(raw)
        fields["desired"] = DesiredState(fields["desired"])
        fields["state"] = TaskState(fields["state"])
        return cls(**fields)

    @property
    def ended(self) -> bool:
        """Whether the task will not run again: a terminal state, or FAILED for a framework task."""
        return self.state.is_terminal or (bool(self.framework_id) and self.state is TaskState.FAILED)

    @property
    def holds_resources(self) -> bool:
        """Whether the task's cpus, memory and ports count as used on its node."""
        return not self.ended

    def to_api(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Job": self.job,
            "Instance": self.instance,
            "Node": self.node,
            "State": self.state.value,
            "DesiredState": self.desired.value,
            "Ports": self.ports,
            "PID": self.pid,
            "Message": self.message,
            "Restarts": self.restarts,
            "Resources": {"cpus": self.cpus, "memory": self.memory},
            "JobVersion": self.spec_version,
            "Framework": self.framework_id,
            "Executor": self.executor_id,
            "Name": self.name,
            "CreatedAt": self.created_at,
            "UpdatedAt": self.updated_at,
        }


@dataclass(slots=True)
class AgentInfo:
    """A registered agent. cpus, memory, disk (MB) and port_ranges are its unreserved resources.

    `reserved` maps a role to the resources statically reserved for it on
    this agent, as {"cpus", "memory", "disk", "port_ranges"}.
    """

    node: str
    address: str
    cpus: float
    memory: int
    disk: int
    port_ranges: list[list[int]]
    registered_at: float = 0.0
    reserved: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def decode(cls, raw: bytes) -> AgentInfo:
        return cls(**orjson.loads(raw))


@dataclass(slots=True)
class FrameworkRecord:
    """A framework as it subscribed, from Mesos's FrameworkInfo, kept across server restarts.

    `failover_timeout` is in seconds; `capabilities` are Mesos's capability
    types, such as PARTITION_AWARE. `registered_at` is wall-clock seconds.
    """

    id: str
    name: str
    user: str
    role: str
    failover_timeout: float = 0.0
    capabilities: list[str] = field(default_factory=list)
    hostname: str = ""
    principal: str = ""
    webui_url: str = ""
    registered_at: float = 0.0

    @classmethod
    def decode(cls, raw: bytes) -> FrameworkRecord:
        return cls(**orjson.loads(raw))
