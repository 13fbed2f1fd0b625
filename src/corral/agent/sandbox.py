"""Task sandboxes on an agent: where they are, and garbage collection of those of ended tasks.

Each task has one sandbox folder, <agent data>/sandboxes/<task id>, that
contains its stdout and stderr (appended across restarts in place) and its
executor's state (corral.agent.executor). A sandbox outlives its task so
that its logs can still be read; the agent removes it once the task has
ended and the sandbox is older than max_age, or sooner when more than
max_per_job ended sandboxes of the same job exist (the oldest go first).
Mesos does the same with --gc_delay (one week by default), without the
per-job cap.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corral.agent.executor import ExecutorFiles, ExecutorStateError, read_json

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE = 3600.0
DEFAULT_MAX_PER_JOB = 5
DEFAULT_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class SandboxRetention:
    """How long the sandboxes of ended tasks are kept. Times are in seconds."""

    max_age: float = DEFAULT_MAX_AGE
    max_per_job: int = DEFAULT_MAX_PER_JOB
    # Seconds between two garbage collection passes.
    interval: float = DEFAULT_INTERVAL

    def __post_init__(self) -> None:
        if self.max_age < 0:
            raise ValueError(f"sandbox max_age must not be negative, got {self.max_age}")
        if self.max_per_job < 0:
            raise ValueError(f"sandbox max_per_job must not be negative, got {self.max_per_job}")
        if self.interval <= 0:
            raise ValueError(f"sandbox collection interval must be positive, got {self.interval}")


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    """One sandbox on disk: its task, job, and when it last changed (Unix time)."""

    task_id: str
    job: str
    path: Path
    changed_at: float


def sandbox_path(root: Path, task_id: str) -> Path:
    """Return the sandbox of task_id under root; raise ValueError for an id that would leave root."""
    if not task_id or "/" in task_id or task_id in (".", ".."):
        raise ValueError(f"invalid task id {task_id!r}")
    return root / task_id


def _job_of(files: ExecutorFiles, task_id: str) -> str:
    try:
        launch = read_json(files.launch)
    except ExecutorStateError:
        launch = None
    if launch is not None and isinstance(launch.get("job"), str) and launch["job"]:
        return launch["job"]
    # Task ids are "<job>.<instance>.<suffix>", and job names contain no dot.
    return task_id.split(".", 1)[0]


def _changed_at(files: ExecutorFiles) -> float:
    latest = 0.0
    for path in (files.sandbox, files.stdout, files.stderr, files.folder, files.exit, files.log):
        try:
            latest = max(latest, path.stat().st_mtime)
        except OSError:
            continue
    return latest


def executor_running(files: ExecutorFiles) -> bool:
    """Return whether the sandbox's executor may still run: it started and recorded no exit yet."""
    return files.executor.exists() and not files.exit.exists()


def scan_sandboxes(root: Path) -> list[SandboxInfo]:
    """Return every sandbox under root. Blocks; run it in a thread from async code."""
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return []
    found = []
    for path in entries:
        if not path.is_dir():
            continue
        files = ExecutorFiles(path)
        found.append(SandboxInfo(path.name, _job_of(files, path.name), path, _changed_at(files)))
    return found


def select_for_removal(
    sandboxes: Iterable[SandboxInfo], keep: set[str], now: float, retention: SandboxRetention
) -> list[SandboxInfo]:
    """Return the sandboxes to remove: those not in keep that are too old or too many for their job.

    keep contains the ids of tasks that still run or may run again.
    """
    by_job: dict[str, list[SandboxInfo]] = defaultdict(list)
    for sandbox in sandboxes:
        if sandbox.task_id not in keep:
            by_job[sandbox.job].append(sandbox)
    chosen = []
    for ended in by_job.values():
        ended.sort(key=lambda sandbox: sandbox.changed_at, reverse=True)
        for rank, sandbox in enumerate(ended):
            if rank >= retention.max_per_job or now - sandbox.changed_at > retention.max_age:
                chosen.append(sandbox)
    return chosen


def collect_sandboxes(root: Path, keep: set[str], retention: SandboxRetention, node: str = "") -> list[str]:
    """Remove the sandboxes of ended tasks that retention no longer keeps; return their task ids.

    A sandbox whose executor has not recorded an exit is kept even when it is
    not in keep. Blocks; run it in a thread from async code.
    """
    now = time.time()
    sandboxes = [
        sandbox for sandbox in scan_sandboxes(root) if not executor_running(ExecutorFiles(sandbox.path))
    ]
    removed = []
    for sandbox in select_for_removal(sandboxes, keep, now, retention):
        try:
            shutil.rmtree(sandbox.path)
        except OSError as exc:
            log.error("sandbox not removed node=%s task=%s path=%s: %s", node, sandbox.task_id, sandbox.path, exc)
            continue
        removed.append(sandbox.task_id)
        log.info("sandbox removed node=%s task=%s job=%s age=%.0fs",
                 node, sandbox.task_id, sandbox.job, now - sandbox.changed_at)
    return removed
