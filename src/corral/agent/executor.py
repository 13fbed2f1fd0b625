"""The executor: a small process per task run that starts the task, supervises it and outlives the agent.

The agent runs `python -m corral.agent.executor --sandbox DIR` in a new
session. That process forks the executor and exits as soon as the task has
started or failed to start. So the executor's parent is init (or the
nearest subreaper), not the agent. An agent that crashes or is stopped
leaves it running, and a restarted agent finds it again through the files
below. The executor:

- makes itself the child subreaper (prctl PR_SET_CHILD_SUBREAPER), so that
  the task's orphaned descendants become its children and it reaps them;
- puts the task in a cgroup of its own with the task's CPU and memory
  limits (corral.agent.cgroups), or sets RLIMIT_DATA where no cgroup can
  be made;
- starts the task in a new session, so that it leads its own process group;
- on SIGTERM (the agent's kill request) sends SIGTERM to the task's process
  group and to every other descendant, then SIGKILL once the grace period
  runs out;
- when the task's main process exits, kills whatever it left behind (inside
  or outside its process group), reaps it all, removes the cgroup, records
  the exit status and exits.

The agent and the executor share only files in <sandbox>/executor/, each
written whole through a temporary file and a rename:

    launch.json    written by the agent: the command, environment and limits
    executor.json  the executor's pid and create time, written first
    task.json      the task's pid, create time and cgroup, once it started
    kill.json      written by the agent before its SIGTERM: the grace period
    exit.json      how the task ended (or why it did not start), written last
    executor.log   the executor's own log

The task's output goes to <sandbox>/stdout and <sandbox>/stderr, appended
across runs.

NOTE: the executor stays in the agent's own cgroup (only the task moves to
a cgroup of its own), so a service manager that kills a whole cgroup when
the agent stops, such as systemd with KillMode=control-group, kills the
executors and their tasks too.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import resource
import select
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from corral.agent.cgroups import (
    CgroupError,
    Limits,
    LimitMode,
    TaskCgroup,
    create_task_cgroup,
    memory_rlimit,
)

log = logging.getLogger("corral.agent.executor")

STATE_FORMAT = 1
STATE_FOLDER = "executor"

# linux/prctl.h
_PR_SET_CHILD_SUBREAPER = 36

# How long the executor keeps killing and reaping what the task left behind.
LEFTOVER_TIMEOUT = 5.0
# The maximum time one select() waits. SIGCHLD and SIGTERM wake it sooner.
_TICK = 1.0

# Launch outcomes that the executor writes to the process that forked it, over a pipe.
_REPORT_STARTED = b"S"
_REPORT_LAUNCH_FAILED = b"E"
EXIT_STARTED = 0
EXIT_BROKEN = 1
EXIT_LAUNCH_FAILED = 2


class ExecutorStateError(Exception):
    """A state file of the executor is unreadable or malformed."""


# ---------------------------------------------------------------------------
# State files


class ExecutorFiles:
    """The paths of one sandbox's executor state files."""

    def __init__(self, sandbox: Path) -> None:
        self.sandbox = Path(sandbox)
        self.folder = self.sandbox / STATE_FOLDER
        self.launch = self.folder / "launch.json"
        self.executor = self.folder / "executor.json"
        self.task = self.folder / "task.json"
        self.kill = self.folder / "kill.json"
        self.exit = self.folder / "exit.json"
        self.log = self.folder / "executor.log"
        self.stdout = self.sandbox / "stdout"
        self.stderr = self.sandbox / "stderr"

    def reset(self) -> None:
        """Remove the state of an earlier run, before a new executor starts in this sandbox."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in (self.launch, self.executor, self.task, self.kill, self.exit):
            path.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file whole: a reader sees the old file, the new one, or none."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump({"format": STATE_FORMAT, **data}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    """Return a state file's content, or None when it does not exist. Raises ExecutorStateError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ExecutorStateError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ExecutorStateError(f"invalid JSON in {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise ExecutorStateError(f"{path} is not executor state of format {STATE_FORMAT}")
    return data


@dataclass(frozen=True)
class LaunchRecord:
    """launch.json: everything the executor needs to start the task."""

    task_id: str
    job: str
    argv: list[str]
    # argv[0] resolved on the task's PATH by the agent.
    executable: str
    env: dict[str, str]
    cwd: str
    kill_timeout: float
    limits: Limits = field(default_factory=Limits)
    # False makes the executor use rlimits even where cgroups work.
    use_cgroups: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["limits"] = asdict(self.limits)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LaunchRecord:
        fields = {name: value for name, value in data.items() if name != "format"}
        fields["limits"] = Limits(**fields.get("limits", {}))
        return cls(**fields)


def process_create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


# ---------------------------------------------------------------------------
# The executor


class LaunchFailure(Exception):
    """The task's process could not be started; the message names the step that failed."""


def enable_subreaper() -> bool:
    """Make this process the child subreaper of its descendants; return whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        log.warning("child subreaper not set: %s; orphans of the task go to init", os.strerror(error))
        return False
    return True


class Executor:
    """Starts one task run, supervises it to its end and records how it ended."""

    def __init__(self, files: ExecutorFiles, launch: LaunchRecord) -> None:
        self.files = files
        self.launch = launch
        self.task_pid: int | None = None
        self.cgroup: TaskCgroup | None = None
        self.limit_mode = LimitMode.NONE
        self._oom_kills_before = 0
        self._main_status: int | None = None
        self._kill_signalled = False
        self._kill_requested = False
        self._kill_deadline: float | None = None
        self._escalated = False
        self._wakeup_read, self._wakeup_write = os.pipe()
        os.set_blocking(self._wakeup_read, False)
        os.set_blocking(self._wakeup_write, False)

    @property
    def task_id(self) -> str:
        return self.launch.task_id

    def run(self, report_fd: int | None = None) -> int:
        """Run the task to its end, report the launch outcome on report_fd, and return the exit code."""
        self._install_signal_handlers()
        write_json(
            self.files.executor,
            {"pid": os.getpid(), "create_time": process_create_time(os.getpid()), "started_at": time.time()},
        )
        enable_subreaper()
        self._set_up_limits()

        try:
            self.task_pid = self._launch()
        except LaunchFailure as exc:
            log.error("task launch failed task=%s: %s", self.task_id, exc)
            self._remove_cgroup()
            write_json(self.files.exit, {"launch_error": str(exc), "ended_at": time.time()})
            _report(report_fd, _REPORT_LAUNCH_FAILED)
            return 0

        write_json(
            self.files.task,
            {
                "pid": self.task_pid,
                "create_time": process_create_time(self.task_pid),
                "limit_mode": self.limit_mode.value,
                "cgroup": self.cgroup.to_record() if self.cgroup is not None else None,
                "started_at": time.time(),
            },
        )
        log.info("task started task=%s pid=%d limits=%s", self.task_id, self.task_pid, self.limit_mode.value)
        _report(report_fd, _REPORT_STARTED)

        self._supervise()
        record = self._exit_record()
        self._kill_leftovers()
        self._remove_cgroup()
        write_json(self.files.exit, record)
        log.info("task ended task=%s pid=%d code=%s signal=%s oom_killed=%s",
                 self.task_id, self.task_pid, record["code"], record["signal"], record["oom_killed"])
        return 0

    # Signals

    def _install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wakeup_write)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_kill_signal)
        # A handler (not SIG_DFL) so that SIGCHLD writes to the wakeup fd.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        # The executor has no terminal; a stray SIGHUP must not end supervision.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _on_kill_signal(self, signum: int, frame: object) -> None:
        self._kill_signalled = True

    def _wait_for_wakeup(self, timeout: float) -> None:
        select.select([self._wakeup_read], [], [], max(0.0, timeout))
        try:
            while os.read(self._wakeup_read, 512):
                pass
        except BlockingIOError:
            pass

    # Limits

    def _set_up_limits(self) -> None:
        limits = self.launch.limits
        if limits.empty:
            return
        if self.launch.use_cgroups:
            try:
                self.cgroup = create_task_cgroup(self.task_id, limits)
            except CgroupError as exc:
                log.warning("cgroup limits not available task=%s: %s; falling back to rlimits", self.task_id, exc)
            else:
                self.limit_mode = self.cgroup.mode
                self._oom_kills_before = self.cgroup.oom_kills() or 0
                return
        # NOTE: with rlimits only, CPU is not limited at all, and RLIMIT_DATA replaces
        # the memory limit. A task that reaches it sees allocations fail (its own
        # error), not a kill, so its exit is indistinguishable from other failures.
        self.limit_mode = LimitMode.RLIMIT

    def _remove_cgroup(self) -> None:
        if self.cgroup is not None and self.cgroup.remove():
            log.info("cgroup removed task=%s", self.task_id)

    # Launch

    def _launch(self) -> int:
        """Fork and exec the task; return its pid or raise LaunchFailure with the child's error."""
        error_read, error_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(error_read)
            self._exec_task(error_write)
        os.close(error_write)
        chunks = []
        while chunk := os.read(error_read, 4096):
            chunks.append(chunk)
        os.close(error_read)
        if chunks:
            os.waitpid(pid, 0)
            raise LaunchFailure(b"".join(chunks).decode("utf-8", errors="replace"))
        return pid

    def _exec_task(self, error_fd: int) -> None:
        """In the forked child: join the cgroup, set limits, redirect output, exec. Never returns.

        The error pipe is close-on-exec, so the parent reads EOF on a successful
        exec and the reason otherwise.
        """
        launch = self.launch
        step = "prepare the process"
        try:
            signal.set_wakeup_fd(-1)
            # Ignored signals stay ignored across exec: Python ignores SIGPIPE and
            # SIGXFSZ, and the executor SIGHUP. Restore them as subprocess does.
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP,
                           signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(signum, signal.SIG_DFL)
            step = "start a new session"
            os.setsid()
            for procs_file in self.cgroup.procs_files() if self.cgroup is not None else ():
                step = f"join cgroup {procs_file.parent}"
                with open(procs_file, "w") as file:
                    file.write(str(os.getpid()))
            rlimit = memory_rlimit(launch.limits) if self.limit_mode is LimitMode.RLIMIT else None
            if rlimit is not None:
                step = "set RLIMIT_DATA"
                resource.setrlimit(resource.RLIMIT_DATA, rlimit)
            # NOTE: the files grow without rotation for as long as the task writes.
            step = "open the sandbox's stdout and stderr files"
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            stdout = os.open(self.files.stdout, flags, 0o644)
            stderr = os.open(self.files.stderr, flags, 0o644)
            stdin = os.open(os.devnull, os.O_RDONLY)
            for source, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
                os.dup2(source, target)
            step = f"change to the working directory {launch.cwd}"
            os.chdir(launch.cwd)
            step = f"execute {launch.executable}"
            os.execve(launch.executable, launch.argv, launch.env)
        except BaseException as exc:  # noqa: BLE001 - whatever happens, report it and leave
            try:
                os.write(error_fd, f"cannot {step}: {exc}".encode())
            finally:
                os._exit(127)

    # Supervision

    def _supervise(self) -> None:
        while True:
            self._reap()
            if self._main_status is not None:
                return
            self._handle_kill_request()
            timeout = _TICK
            if self._kill_deadline is not None and not self._escalated:
                timeout = min(timeout, self._kill_deadline - time.monotonic())
            self._wait_for_wakeup(timeout)

    def _reap(self) -> None:
        """Reap every child that has exited: the task, and orphans we adopted as subreaper."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.task_pid:
                self._main_status = status

    def _handle_kill_request(self) -> None:
        if self._kill_signalled and not self._kill_requested:
            self._kill_requested = True
            grace = self._kill_grace()
            log.info("kill requested task=%s pid=%s grace=%.1fs; sending SIGTERM", self.task_id, self.task_pid, grace)
            self._signal_task(signal.SIGTERM)
            self._kill_deadline = time.monotonic() + grace
        if self._kill_deadline is not None and not self._escalated and time.monotonic() >= self._kill_deadline:
            self._escalated = True
            log.info("task still running after its grace period task=%s pid=%s; sending SIGKILL",
                     self.task_id, self.task_pid)
            self._signal_task(signal.SIGKILL)

    def _kill_grace(self) -> float:
        try:
            request = read_json(self.files.kill)
        except ExecutorStateError as exc:
            log.warning("kill request file ignored task=%s: %s", self.task_id, exc)
            request = None
        if request is not None and isinstance(request.get("grace"), (int, float)):
            return max(0.0, float(request["grace"]))
        return self.launch.kill_timeout

    def _signal_task(self, signum: int) -> None:
        """Signal the task's process group (led by the live main process) and every other descendant."""
        assert self.task_pid is not None
        try:
            os.killpg(self.task_pid, signum)
        except ProcessLookupError:
            pass
        for pid in self._descendants():
            _kill_quietly(pid, signum)

    def _descendants(self) -> set[int]:
        """Return the live descendants of the executor, and the processes of the task's cgroup."""
        found = set(self.cgroup.pids()) if self.cgroup is not None else set()
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    found.add(child.pid)
            except psutil.Error:
                continue
        found.discard(os.getpid())
        return found

    def _kill_leftovers(self) -> None:
        """SIGKILL what outlived the task's main process, and reap it all."""
        deadline = time.monotonic() + LEFTOVER_TIMEOUT
        killed: set[int] = set()
        while True:
            self._reap()
            leftovers = self._descendants()
            if not leftovers:
                break
            if time.monotonic() >= deadline:
                log.warning("processes of the task still alive after %.0fs task=%s pids=%s",
                            LEFTOVER_TIMEOUT, self.task_id, sorted(leftovers))
                break
            for pid in leftovers:
                _kill_quietly(pid, signal.SIGKILL)
            killed |= leftovers
            self._wait_for_wakeup(0.05)
        self._reap_zombies(deadline)
        if killed:
            log.info("killed processes left by the task task=%s count=%d", self.task_id, len(killed))

    def _reap_zombies(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                self._wait_for_wakeup(0.05)

    def _exit_record(self) -> dict[str, Any]:
        assert self._main_status is not None
        returncode = os.waitstatus_to_exitcode(self._main_status)
        oom_killed = False
        memory_peak = None
        if self.cgroup is not None:
            kills = self.cgroup.oom_kills()
            if kills is not None:
                oom_killed = kills > self._oom_kills_before
            else:
                failures = self.cgroup.memory_failures() or 0
                oom_killed = failures > 0 and returncode == -signal.SIGKILL
            memory_peak = self.cgroup.memory_peak()
        return {
            "code": returncode if returncode >= 0 else None,
            "signal": -returncode if returncode < 0 else None,
            "oom_killed": oom_killed,
            "memory_limit_mb": self.launch.limits.memory_mb,
            "memory_peak_bytes": memory_peak,
            "limit_mode": self.limit_mode.value,
            "kill_requested": self._kill_requested,
            "ended_at": time.time(),
        }


def _kill_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _report(fd: int | None, outcome: bytes) -> None:
    if fd is None:
        return
    try:
        os.write(fd, outcome)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Entry point


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="corral executor",
        description="Start and supervise one task; started by the corral agent, not by hand.",
    )
    parser.add_argument("--sandbox", required=True, type=Path, help="the task's sandbox folder")
    parser.add_argument(
        "--foreground", action="store_true", help="supervise in this process instead of a detached child"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Start the executor of the sandbox's launch.json and return this process's exit code.

    Without --foreground, forks the executor and returns once the task has
    started (0), failed to start (2, reason in exit.json), or the executor
    broke before either (1, reason in executor.log).
    """
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s executor pid=%(process)d: %(message)s",
    )
    files = ExecutorFiles(args.sandbox)
    try:
        data = read_json(files.launch)
        if data is None:
            raise ExecutorStateError(f"{files.launch} not found")
        launch = LaunchRecord.from_dict(data)
    except (ExecutorStateError, TypeError) as exc:
        log.error("executor not started: invalid launch record: %s", exc)
        return EXIT_BROKEN
    if args.foreground:
        return Executor(files, launch).run()

    report_read, report_write = os.pipe()
    if os.fork() > 0:
        os.close(report_write)
        outcome = os.read(report_read, 1)
        return {_REPORT_STARTED: EXIT_STARTED, _REPORT_LAUNCH_FAILED: EXIT_LAUNCH_FAILED}.get(outcome, EXIT_BROKEN)
    os.close(report_read)
    try:
        code = Executor(files, launch).run(report_write)
    except Exception:
        log.exception("executor failed task=%s", launch.task_id)
        code = EXIT_BROKEN
    # Skip the forked copy of the parent's exit handlers; flush our own log first.
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
