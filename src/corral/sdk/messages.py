"""Messages of the v1 scheduler API as Python types: task states, task statuses, FrameworkInfo."""

from __future__ import annotations

import base64
import dataclasses
import enum
import getpass
import logging
import math
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from corral.sdk.resources import id_value

log = logging.getLogger(__name__)

# FrameworkInfo.Capability.Type values of Mesos 1.x's v1 API.
CAPABILITIES = frozenset({
    "REVOCABLE_RESOURCES", "TASK_KILLING_STATE", "GPU_RESOURCES", "SHARED_RESOURCES",
    "PARTITION_AWARE", "MULTI_ROLE", "RESERVATION_REFINEMENT", "REGION_AWARE",
})


class TaskState(enum.StrEnum):
    """A task's state as the v1 API spells it (Mesos's TaskState)."""

    TASK_STAGING = "TASK_STAGING"
    TASK_STARTING = "TASK_STARTING"
    TASK_RUNNING = "TASK_RUNNING"
    TASK_KILLING = "TASK_KILLING"
    TASK_FINISHED = "TASK_FINISHED"
    TASK_FAILED = "TASK_FAILED"
    TASK_KILLED = "TASK_KILLED"
    TASK_ERROR = "TASK_ERROR"
    TASK_LOST = "TASK_LOST"
    TASK_DROPPED = "TASK_DROPPED"
    TASK_UNREACHABLE = "TASK_UNREACHABLE"
    TASK_GONE = "TASK_GONE"
    TASK_GONE_BY_OPERATOR = "TASK_GONE_BY_OPERATOR"
    TASK_UNKNOWN = "TASK_UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        """Whether the task will not run again; TASK_LOST counts, as in Mesos's isTerminalState."""
        return self in _TERMINAL_STATES


_TERMINAL_STATES = frozenset({
    TaskState.TASK_FINISHED, TaskState.TASK_FAILED, TaskState.TASK_KILLED, TaskState.TASK_ERROR,
    TaskState.TASK_LOST, TaskState.TASK_DROPPED, TaskState.TASK_GONE, TaskState.TASK_GONE_BY_OPERATOR,
})


@dataclasses.dataclass(frozen=True)
class TaskStatus:
    """A task status update (Mesos's TaskStatus), as UPDATE events and reconciliation deliver it.

    `uuid` is the base64 text that the update carried; only updates with a
    uuid are acknowledged. `raw` is the JSON as the master sent it.
    """

    task_id: str
    state: TaskState
    agent_id: str | None = None
    executor_id: str | None = None
    uuid: str | None = None
    message: str = ""
    reason: str = ""
    source: str = ""
    timestamp: float | None = None
    healthy: bool | None = None
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> TaskStatus:
        state_text = raw.get("state", "")
        try:
            state = TaskState(state_text)
        except ValueError:
            log.warning("status update of task %s has unknown state %r; reading it as TASK_UNKNOWN",
                        raw.get("task_id"), state_text)
            state = TaskState.TASK_UNKNOWN
        return cls(
            task_id=id_value(raw["task_id"]),
            state=state,
            agent_id=id_value(raw["agent_id"]) if raw.get("agent_id") else None,
            executor_id=id_value(raw["executor_id"]) if raw.get("executor_id") else None,
            uuid=raw.get("uuid") or None,
            message=raw.get("message", ""),
            reason=raw.get("reason", ""),
            source=raw.get("source", ""),
            timestamp=raw.get("timestamp"),
            healthy=raw.get("healthy"),
            raw=raw,
        )

    @property
    def uuid_bytes(self) -> bytes | None:
        """The update's uuid decoded from base64, or None when it has none."""
        return base64.b64decode(self.uuid) if self.uuid else None

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal


@dataclasses.dataclass
class FrameworkInfo:
    """The description of a framework that SUBSCRIBE sends to the master (Mesos's FrameworkInfo).

    One role is sent as `role`; several are sent as `roles` with the
    MULTI_ROLE capability, as Mesos expects. `failover_timeout` is how many
    seconds the master keeps the framework's tasks after its scheduler
    disconnects. `id` resumes an earlier framework, and the driver sets it
    once the master has assigned one.
    """

    name: str
    user: str = dataclasses.field(default_factory=getpass.getuser)
    roles: Sequence[str] = ("*",)
    failover_timeout: float = 0.0
    checkpoint: bool = False
    capabilities: Sequence[str] = ()
    id: str | None = None
    hostname: str = dataclasses.field(default_factory=socket.gethostname)
    principal: str | None = None
    webui_url: str | None = None
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("FrameworkInfo.name must be a non-empty string")
        if isinstance(self.roles, str):
            self.roles = (self.roles,)
        if not self.roles or not all(isinstance(role, str) and role for role in self.roles):
            raise ValueError(f"invalid roles {self.roles!r}: expected one or more non-empty role names")
        if not isinstance(self.failover_timeout, (int, float)) or not math.isfinite(self.failover_timeout) \
                or self.failover_timeout < 0:
            raise ValueError(f"invalid failover_timeout {self.failover_timeout!r}: expected seconds, 0 or more")
        unknown = sorted(set(self.capabilities) - CAPABILITIES)
        if unknown:
            raise ValueError(f"unknown framework capabilities {unknown}: expected some of {sorted(CAPABILITIES)}")

    def to_json(self) -> dict[str, Any]:
        capabilities = list(dict.fromkeys(self.capabilities))
        info: dict[str, Any] = {
            "name": self.name,
            "user": self.user,
            "failover_timeout": float(self.failover_timeout),
            "checkpoint": self.checkpoint,
            "hostname": self.hostname,
        }
        if len(self.roles) == 1 and "MULTI_ROLE" not in capabilities:
            info["role"] = self.roles[0]
        else:
            info["roles"] = list(self.roles)
            if "MULTI_ROLE" not in capabilities:
                capabilities.append("MULTI_ROLE")
        if capabilities:
            info["capabilities"] = [{"type": capability} for capability in capabilities]
        if self.id:
            info["id"] = {"value": self.id}
        if self.principal:
            info["principal"] = self.principal
        if self.webui_url:
            info["webui_url"] = self.webui_url
        if self.labels:
            info["labels"] = {"labels": [{"key": key, "value": str(value)} for key, value in self.labels.items()]}
        return info
