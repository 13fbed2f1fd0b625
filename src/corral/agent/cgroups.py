"""CPU and memory limits for one task: a cgroup of its own where the kernel allows it, rlimits otherwise.

The executor (corral.agent.executor) creates one cgroup per task run and
puts the task's process in it before exec, so that every descendant is
counted too. Both layouts of the kernel are handled:

- cgroup v1, one hierarchy per controller (memory, cpu), as Mesos's
  cgroups/mem and cgroups/cpu isolators use them: memory.limit_in_bytes,
  cpu.shares, and with a hard CPU limit cpu.cfs_quota_us;
- cgroup v2, one unified hierarchy: memory.max, cpu.weight, cpu.max.

A task's cgroup is <hierarchy>/<the executor's own cgroup>/corral/<task id>,
so that tasks stay inside whatever limits the agent itself runs under (on a
host where the agent sits in the root cgroup, that is /sys/fs/cgroup/memory/
corral/<task id>). When neither layout is writable, only RLIMIT_DATA limits
the task's memory, and nothing limits its CPU.

CPU follows Mesos's cgroups/cpu isolator: cpu.shares always, which only
weighs CPU time under contention, and a CFS quota over a 100 ms period only
with cpu_hard_limit, because a quota throttles a task even on an idle
machine.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_FOLDER = "corral"
# 1024 is the kernel's default cpu.shares of a cgroup, so one CPU weighs as much
# as an unlimited neighbour. The 100 ms CFS period is Mesos's.
CPU_SHARES_PER_CPU = 1024
MIN_CPU_SHARES = 2
CFS_PERIOD_US = 100_000
MIN_CFS_QUOTA_US = 1_000
MEBIBYTE = 1024 * 1024

_PROC_CGROUP = Path("/proc/self/cgroup")
_MOUNTINFO = Path("/proc/self/mountinfo")

# How long remove() keeps retrying while the kernel still counts a process in the cgroup.
_REMOVE_TIMEOUT = 5.0
_POLL_INTERVAL = 0.05


class LimitMode(enum.StrEnum):
    """The mechanism that enforces a task's limits, as recorded in the executor's state files."""

    CGROUP_V1 = "cgroup-v1"
    CGROUP_V2 = "cgroup-v2"
    RLIMIT = "rlimit"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Limits:
    """The resources one task may use: CPUs as a fraction of cores, memory in MiB (Mesos's MB)."""

    cpus: float | None = None
    memory_mb: int | None = None
    # Also cap CPU time with a CFS quota, not only weigh it with shares.
    cpu_hard_limit: bool = False

    @property
    def empty(self) -> bool:
        return self.cpus is None and self.memory_mb is None


class CgroupError(Exception):
    """A cgroup cannot be created or configured; the message names the file and the error."""


# ---------------------------------------------------------------------------
# Where the hierarchies are


@dataclass(frozen=True, slots=True)
class Hierarchies:
    """The cgroup mounts of this process and its own cgroup in each."""

    # cgroup v1: controller name -> (mount point, this process's cgroup path in it).
    v1: dict[str, tuple[Path, str]]
    # cgroup v2: (mount point, this process's cgroup path), or None when not mounted.
    v2: tuple[Path, str] | None


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """Parse /proc/PID/cgroup into {v1 controller: path} and the v2 path (the "0::" line)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            v2 = path
            continue
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return v1, v2


def parse_mountinfo(text: str) -> tuple[dict[str, Path], Path | None]:
    """Parse /proc/PID/mountinfo into {v1 controller: mount point} and the v2 mount point.

    Only mounts of a hierarchy's root are used ("/" as the mount's root field).
    """
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        separator = fields.index("-")
        if separator < 5 or len(fields) < separator + 4:
            continue
        root, mount_point = fields[3], fields[4]
        fs_type, super_options = fields[separator + 1], fields[separator + 3]
        if root != "/":
            continue
        if fs_type == "cgroup2" and v2 is None:
            v2 = Path(_unescape_mount_path(mount_point))
        elif fs_type == "cgroup":
            for option in super_options.split(","):
                v1.setdefault(option, Path(_unescape_mount_path(mount_point)))
    return v1, v2


def _unescape_mount_path(path: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(escaped, plain)
    return path


def detect_hierarchies() -> Hierarchies:
    """Read this process's cgroup mounts and paths from /proc."""
    try:
        v1_paths, v2_path = parse_proc_cgroup(_PROC_CGROUP.read_text())
        v1_mounts, v2_mount = parse_mountinfo(_MOUNTINFO.read_text())
    except OSError as exc:
        log.warning("cgroups not detected: cannot read /proc: %s", exc)
        return Hierarchies(v1={}, v2=None)
    v1 = {
        controller: (v1_mounts[controller], path)
        for controller, path in v1_paths.items()
        if controller in v1_mounts
    }
    v2 = (v2_mount, v2_path) if v2_mount is not None and v2_path is not None else None
    return Hierarchies(v1=v1, v2=v2)


def _join(mount: Path, cgroup_path: str) -> Path:
    return mount / cgroup_path.lstrip("/")


def _cgroup_name(task_id: str) -> str:
    """Return a folder name for a task id: '/' and a leading '.' would escape the parent."""
    name = task_id.replace("/", "_")
    if name in ("", ".", ".."):
        raise ValueError(f"task id {task_id!r} cannot name a cgroup")
    return name


# ---------------------------------------------------------------------------
# One task's cgroup


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from exc


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_counter(path: Path, name: str) -> int | None:
    """Read the counter `name` from a flat keyed file such as memory.events."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(" ")
        if key == name:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def cpu_shares(cpus: float) -> int:
    return max(MIN_CPU_SHARES, round(cpus * CPU_SHARES_PER_CPU))


def cfs_quota_us(cpus: float) -> int:
    return max(MIN_CFS_QUOTA_US, round(cpus * CFS_PERIOD_US))


def cpu_weight(cpus: float) -> int:
    """Map cpu.shares (2..262144) linearly onto cgroup v2's cpu.weight (1..10000)."""
    shares = min(cpu_shares(cpus), 262144)
    return 1 + ((shares - MIN_CPU_SHARES) * 9999) // 262142


class TaskCgroup:
    """The cgroup folders of one task run: one per v1 controller, or one in the v2 hierarchy."""

    def __init__(self, mode: LimitMode, folders: dict[str, Path]) -> None:
        self.mode = mode
        # v1: controller -> folder; v2: {"unified": folder}.
        self.folders = folders

    # Records, so that a restarted agent can clean up after a crashed executor

    def to_record(self) -> dict:
        return {"mode": self.mode.value, "folders": {name: str(path) for name, path in self.folders.items()}}

    @classmethod
    def from_record(cls, record: dict) -> TaskCgroup:
        return cls(LimitMode(record["mode"]), {name: Path(path) for name, path in record["folders"].items()})

    # Processes

    def procs_files(self) -> list[Path]:
        """Return the cgroup.procs files that a new task process writes its pid into."""
        return [folder / "cgroup.procs" for folder in self.folders.values()]

    def pids(self) -> set[int]:
        """Return the pids in any of the folders (processes that already exited are gone)."""
        found: set[int] = set()
        for folder in self.folders.values():
            try:
                text = (folder / "cgroup.procs").read_text()
            except OSError:
                continue
            found.update(int(line) for line in text.split() if line.isdigit())
        return found

    def kill_all(self) -> int:
        """SIGKILL every process in the cgroup once; return how many were signalled."""
        count = 0
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
                count += 1
            except ProcessLookupError:
                continue
        return count

    # Memory

    @property
    def _memory_folder(self) -> Path | None:
        if self.mode is LimitMode.CGROUP_V1:
            return self.folders.get("memory")
        return self.folders.get("unified")

    def oom_kills(self) -> int | None:
        """Return how many processes the kernel's OOM killer ended in this cgroup, or None when not counted."""
        folder = self._memory_folder
        if folder is None:
            return None
        if self.mode is LimitMode.CGROUP_V2:
            return _read_counter(folder / "memory.events", "oom_kill")
        # memory.oom_control has "oom_kill" since Linux 4.13.
        return _read_counter(folder / "memory.oom_control", "oom_kill")

    def memory_failures(self) -> int | None:
        """Return how often usage hit the limit (v1 memory.failcnt, v2 the "max" event)."""
        folder = self._memory_folder
        if folder is None:
            return None
        if self.mode is LimitMode.CGROUP_V2:
            return _read_counter(folder / "memory.events", "max")
        return _read_int(folder / "memory.failcnt")

    def memory_peak(self) -> int | None:
        """Return the largest memory use seen, in bytes, where the kernel records it."""
        folder = self._memory_folder
        if folder is None:
            return None
        if self.mode is LimitMode.CGROUP_V2:
            return _read_int(folder / "memory.peak")
        return _read_int(folder / "memory.max_usage_in_bytes")

    # Removal

    def remove(self, timeout: float = _REMOVE_TIMEOUT) -> bool:
        """Kill what is left, remove the folders, and return whether all of them are gone.

        The kernel refuses (EBUSY) while a process still counts as a member,
        which lasts until its parent has reaped it, so this retries until timeout.
        """
        deadline = time.monotonic() + timeout
        remaining = dict(self.folders)
        while remaining:
            self.kill_all()
            for name, folder in list(remaining.items()):
                try:
                    folder.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        log.warning("cgroup not removed path=%s: %s", folder, exc.strerror or exc)
                        return False
                    continue
                del remaining[name]
                _remove_if_empty(folder.parent)
            if remaining:
                time.sleep(_POLL_INTERVAL)
        return True


def _remove_if_empty(parent: Path) -> None:
    """Remove the shared corral folder once its last task cgroup is gone; another task may still use it."""
    if parent.name != CGROUP_FOLDER:
        return
    try:
        parent.rmdir()
    except OSError:
        pass


def create_task_cgroup(
    task_id: str, limits: Limits, hierarchies: Hierarchies | None = None
) -> TaskCgroup:
    """Create and configure the cgroup of one task run, or raise CgroupError saying why not.

    A folder left by an earlier run of the same task is reused.
    """
    if hierarchies is None:
        hierarchies = detect_hierarchies()
    name = _cgroup_name(task_id)
    wanted = []
    if limits.memory_mb is not None:
        wanted.append("memory")
    if limits.cpus is not None:
        wanted.append("cpu")
    if all(controller in hierarchies.v1 for controller in wanted):
        return _create_v1(name, limits, hierarchies, wanted)
    if hierarchies.v2 is not None:
        return _create_v2(name, limits, hierarchies.v2, wanted)
    missing = [controller for controller in wanted if controller not in hierarchies.v1]
    raise CgroupError(f"no cgroup hierarchy has the {', '.join(missing)} controller")


def _make_folder(parent: Path, name: str) -> Path:
    folder = parent / name
    # Another executor may remove the shared parent between its creation and
    # ours (see _remove_if_empty), so a vanished parent is retried.
    for attempt in range(3):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        except FileNotFoundError as exc:
            if attempt == 2:
                raise CgroupError(f"cannot create cgroup {folder}: {exc.strerror or exc}") from exc
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {folder}: {exc.strerror or exc}") from exc
    return folder


def _create_v1(name: str, limits: Limits, hierarchies: Hierarchies, controllers: list[str]) -> TaskCgroup:
    folders: dict[str, Path] = {}
    cgroup = TaskCgroup(LimitMode.CGROUP_V1, folders)
    try:
        for controller in controllers:
            mount, own_path = hierarchies.v1[controller]
            folders[controller] = _make_folder(_join(mount, own_path) / CGROUP_FOLDER, name)
        if limits.memory_mb is not None:
            _set_v1_memory(folders["memory"], limits.memory_mb * MEBIBYTE)
        if limits.cpus is not None:
            folder = folders["cpu"]
            _write(folder / "cpu.shares", str(cpu_shares(limits.cpus)))
            quota = cfs_quota_us(limits.cpus) if limits.cpu_hard_limit else -1
            if limits.cpu_hard_limit:
                _write(folder / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(folder / "cpu.cfs_quota_us", str(quota))
    except CgroupError:
        cgroup.remove(timeout=0)
        raise
    return cgroup


def _set_v1_memory(folder: Path, limit: int) -> None:
    swap_limit = folder / "memory.memsw.limit_in_bytes"
    # memsw must stay at or above the memory limit: lower it after the memory limit
    # when shrinking, and before it when a reused folder had a lower one.
    try:
        _write(folder / "memory.limit_in_bytes", str(limit))
    except CgroupError:
        if not swap_limit.exists():
            raise
        _write(swap_limit, str(limit))
        _write(folder / "memory.limit_in_bytes", str(limit))
    if swap_limit.exists():
        try:
            # Equal limits leave no room for swap, so swapping cannot get around the memory limit.
            _write(swap_limit, str(limit))
        except CgroupError as exc:
            log.warning("swap not limited for cgroup %s: %s", folder, exc)


def _create_v2(name: str, limits: Limits, v2: tuple[Path, str], controllers: list[str]) -> TaskCgroup:
    # NOTE: this path is not exercised on the test machine, whose v2 hierarchy has
    # no memory or cpu controller. It also fails (EBUSY) when the agent's own
    # cgroup contains processes and is not the root, because cgroup v2 allows
    # processes only in leaf cgroups: such an agent needs a delegated cgroup.
    mount, own_path = v2
    own = _join(mount, own_path)
    parent = own / CGROUP_FOLDER
    try:
        available = set((own / "cgroup.controllers").read_text().split())
    except OSError:
        available = set()
    missing = [controller for controller in controllers if controller not in available]
    if missing:
        raise CgroupError(f"cgroup {own} does not offer the {', '.join(missing)} controller")

    enable = " ".join(f"+{controller}" for controller in controllers)
    _write(own / "cgroup.subtree_control", enable)
    _make_folder(own, CGROUP_FOLDER)
    _write(parent / "cgroup.subtree_control", enable)
    folder = _make_folder(parent, name)

    cgroup = TaskCgroup(LimitMode.CGROUP_V2, {"unified": folder})
    try:
        if limits.memory_mb is not None:
            _write(folder / "memory.max", str(limits.memory_mb * MEBIBYTE))
            if (folder / "memory.swap.max").exists():
                _write(folder / "memory.swap.max", "0")
        if limits.cpus is not None:
            _write(folder / "cpu.weight", str(cpu_weight(limits.cpus)))
            quota = str(cfs_quota_us(limits.cpus)) if limits.cpu_hard_limit else "max"
            _write(folder / "cpu.max", f"{quota} {CFS_PERIOD_US}")
    except CgroupError:
        cgroup.remove(timeout=0)
        raise
    return cgroup


# ---------------------------------------------------------------------------
# Without cgroups


def memory_rlimit(limits: Limits) -> tuple[int, int] | None:
    """Return the RLIMIT_DATA (soft, hard) pair that replaces a memory limit without cgroups.

    RLIMIT_DATA counts the heap and private writable mappings, which is closer
    to what a task uses than RLIMIT_AS: RLIMIT_AS also counts address space that
    is only reserved, such as glibc's 64 MiB malloc arena per thread, and so
    stops ordinary multi-threaded programs long before they use their memory.
    """
    if limits.memory_mb is None:
        return None
    value = limits.memory_mb * MEBIBYTE
    return value, value


def apply_rlimits(limits: Limits) -> None:
    """Set the task's rlimits in the calling process (the task's, between fork and exec)."""
    pair = memory_rlimit(limits)
    if pair is not None:
        resource.setrlimit(resource.RLIMIT_DATA, pair)
