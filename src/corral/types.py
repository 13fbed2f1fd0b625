"""States shared by every layer, as enums so that no layer compares bare strings."""

from __future__ import annotations

import enum


class TaskState(enum.StrEnum):
    """A task's state, following Mesos's TaskState (without the TASK_ prefix)."""

    STAGING = "STAGING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    KILLING = "KILLING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    ERROR = "ERROR"
    LOST = "LOST"
    # The agent of the task was declared failed; the task is reported so to partition-aware frameworks.
    UNREACHABLE = "UNREACHABLE"
    # The agent of the task left the cluster for good.
    GONE = "GONE"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL_TASK_STATES


# FAILED is missing because a job task that exits is restarted in place (FAILED, then
# STARTING again); a framework task that fails ends there (see Task.ended).
# UNREACHABLE is missing too, as in Mesos, because the task's agent may come back.
# corral.master.agents describes what happens to such a task then.
_TERMINAL_TASK_STATES = frozenset(
    {
        TaskState.FINISHED,
        TaskState.KILLED,
        TaskState.ERROR,
        TaskState.LOST,
        TaskState.GONE,
    }
)


class DesiredState(enum.StrEnum):
    """What the scheduler wants of a task; the agent converges its process on it."""

    RUN = "run"
    STOP = "stop"


class CheckStatus(enum.StrEnum):
    """A health check's status, spelled as Consul's API spells it."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"
    MAINTENANCE = "maintenance"


class JobType(enum.StrEnum):
    SERVICE = "service"


class SessionBehavior(enum.StrEnum):
    """What happens to a session's locks when it is invalidated, as Consul spells it."""

    RELEASE = "release"
    DELETE = "delete"
