"""Launch and supervise one task's command through its executor, on asyncio.

TaskProcess starts a task through `python -m corral.agent.executor`
(corral.agent.executor), which runs the task in its own process group and
session, limits it, reaps it and records its exit status in the sandbox,
and which keeps running when the agent stops. TaskProcess watches the
executor through a pidfd, requests a kill with SIGTERM to the executor,
and reads the outcome from the executor's state files. After the agent
itself restarted, recover_task_process finds a task's executor again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from corral.agent.launcher import LauncherUnavailable, shared_client
from corral.agent.cgroups import Limits, TaskCgroup
from corral.agent.executor import (
    EXIT_LAUNCH_FAILED,
    ExecutorFiles,
    ExecutorStateError,
    LaunchRecord,
    read_json,
    write_json,
)

logger = logging.getLogger(__name__)

# psutil derives create_time from the boot time and the start tick, and the boot
# time it reads can shift by up to a second between reads, so an exact comparison
# would reject the right process.
CREATE_TIME_TOLERANCE = 1.0

# How often kill_process_group polls for a process that is not our child.
_POLL_INTERVAL = 0.05

# How often an executor is polled where the kernel has no pidfd.
_EXECUTOR_POLL_INTERVAL = 0.1

# How long the executor may take to report that the task started or failed to start.
LAUNCH_TIMEOUT = 30.0
# How long past the kill grace period stop() waits for the executor before killing it.
EXECUTOR_STOP_MARGIN = 5.0

class LaunchError(Exception):
    """Raised when a task's command cannot be started."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one task's process."""

    task_id: str
    # argv[0] is looked up on env["PATH"] (os.defpath when env has no PATH) unless
    # it contains a slash, in which case it is taken relative to the working directory.
    argv: list[str]
    # The complete environment of the process: nothing is inherited from the agent.
    env: dict[str, str]
    # Working directory, or None for the sandbox.
    cwd: str | None
    # The task's sandbox folder, created if missing. The process's stdout and stderr
    # are appended to sandbox/"stdout" and sandbox/"stderr".
    sandbox: Path
    # Seconds between SIGTERM and SIGKILL when stopping.
    kill_timeout: float
    # The job the task belongs to, recorded in the sandbox for garbage collection.
    job: str = ""
    # CPU and memory limits; empty means none.
    limits: Limits = field(default_factory=Limits)
    # False makes the executor use rlimits even where cgroups work.
    use_cgroups: bool = True


@dataclass(frozen=True)
class ExitStatus:
    """The end of a process: an exit code, or the signal that killed it.

    oom_killed is set when the kernel's OOM killer ended a process of the task
    at its cgroup memory limit. unknown_reason is set instead of a code and a
    signal when no exit status was recorded, and gives the reason.
    """

    code: int | None
    signal: int | None
    oom_killed: bool = False
    memory_limit_mb: int | None = None
    unknown_reason: str = ""

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """Build a status from a subprocess return code, where -N means signal N."""
        if returncode < 0:
            return cls(code=None, signal=-returncode)
        return cls(code=returncode, signal=None)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ExitStatus:
        """Build a status from the executor's exit.json."""
        return cls(
            code=record.get("code"),
            signal=record.get("signal"),
            oom_killed=bool(record.get("oom_killed")),
            memory_limit_mb=record.get("memory_limit_mb"),
            unknown_reason=record.get("unknown_reason") or "",
        )

    @classmethod
    def unknown(cls, reason: str) -> ExitStatus:
        return cls(code=None, signal=None, unknown_reason=reason)

    @property
    def success(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        """Return e.g. "exited with code 3", "killed by signal 9 (SIGKILL)" or an out-of-memory reason."""
        if self.unknown_reason:
            return f"exit status unknown: {self.unknown_reason}"
        if self.signal is not None:
            ending = f"killed by signal {self.signal} ({_signal_name(self.signal)})"
        else:
            ending = f"exited with code {self.code}"
        if not self.oom_killed:
            return ending
        limit = "its memory limit"
        if self.memory_limit_mb is not None:
            limit = f"its memory limit of {self.memory_limit_mb} MB"
        if self.signal == signal.SIGKILL:
            return f"out of memory: reached {limit} and was killed by the kernel's OOM killer (signal 9, SIGKILL)"
        return f"{ending} after the kernel's OOM killer ended one of its processes at {limit}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def _resolve_command(spec: LaunchSpec, workdir: Path) -> str:
    """Find the executable for argv[0] the way execvp would, or raise LaunchError.

    Relative PATH entries (and an empty entry, meaning ".") are taken relative to
    the task's working directory, because execvp resolves them after the chdir.
    """
    command = spec.argv[0]
    if "/" in command:
        # The kernel resolves it at exec time, and an OSError from there is
        # turned into a LaunchError by the caller.
        return command

    search_path = spec.env.get("PATH", os.defpath)
    not_executable: str | None = None
    for entry in search_path.split(os.pathsep):
        candidate = workdir / (entry or ".") / command
        if not candidate.is_file():
            continue
        if os.access(candidate, os.X_OK):
            return str(candidate)
        not_executable = not_executable or str(candidate)

    if not_executable is not None:
        reason = f"{not_executable} is not executable"
    else:
        reason = f"command not found on PATH {search_path!r}"
    raise LaunchError(f"task {spec.task_id}: failed to launch {command!r}: {reason}")


def _is_safe_group(pgid: int) -> bool:
    """Return whether signalling process group pgid cannot hit init or the agent."""
    return pgid > 1 and pgid != os.getpgrp()


def _signal_group(pgid: int, signum: int) -> bool:
    """Send signum to group pgid. Return False when no process of the group exists."""
    if not _is_safe_group(pgid):
        raise ValueError(f"refusing to signal process group {pgid}")
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


class TaskProcess:
    """One task run, started and supervised through its executor.

    pid is the task's main process, which leads its own session and process
    group; the executor is a separate process that outlives the agent.
    """

    def __init__(self, spec: LaunchSpec) -> None:
        if not spec.argv:
            raise ValueError(f"task {spec.task_id}: argv is empty")
        self.spec = spec
        self.files = ExecutorFiles(spec.sandbox)
        self.pid: int | None = None
        # psutil's create time of the process, saved so that a restarted agent can
        # tell the task's process from an unrelated one that reused the pid.
        self.create_time: float | None = None
        self.executor_pid: int | None = None
        self.executor_create_time: float | None = None
        self._started = False
        self._pidfd: int | None = None
        self._poll_executor = False
        self._cgroup_record: dict | None = None
        self._watcher: asyncio.Task[ExitStatus] | None = None
        self._exit_status: ExitStatus | None = None
        self._stop_lock = asyncio.Lock()
        self._released = False
        # Why the executor was killed from here, for the status recorded in its place.
        self._kill_reason = ""

    @property
    def pgid(self) -> int | None:
        """The process group id, equal to the pid because the process leads its own session."""
        return self.pid

    @property
    def running(self) -> bool:
        """Whether the task has started and its end has not been seen yet."""
        return self.pid is not None and self._exit_status is None

    @property
    def exit_status(self) -> ExitStatus | None:
        """How the process ended, or None while it runs or before start()."""
        return self._exit_status

    @property
    def released(self) -> bool:
        """Whether release() handed the process back to its executor alone."""
        return self._released

    # Launch

    async def start(self) -> int:
        """Start the executor, which starts the command; return the command's pid.

        Raises LaunchError naming the task, argv[0] and the reason when the
        sandbox, the working directory or the command is missing or unusable,
        or when the executor cannot start.
        """
        if self._started:
            raise RuntimeError(f"task {self.spec.task_id}: process already started")
        self._started = True
        spec = self.spec
        command = spec.argv[0]
        try:
            spec.sandbox.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LaunchError(
                f"task {spec.task_id}: failed to launch {command!r}: "
                f"cannot create sandbox {spec.sandbox}: {exc}"
            ) from exc
        # Absolute, because the executor runs from "/" and may outlive the agent's cwd.
        workdir = Path(os.path.abspath(spec.cwd if spec.cwd is not None else spec.sandbox))
        executable = _resolve_command(spec, workdir)
        record = LaunchRecord(
            task_id=spec.task_id,
            job=spec.job,
            argv=list(spec.argv),
            executable=executable,
            env=dict(spec.env),
            cwd=str(workdir),
            kill_timeout=spec.kill_timeout,
            limits=spec.limits,
            use_cgroups=spec.use_cgroups,
        )
        try:
            # One thread job for both steps. A second to_thread call would queue behind every
            # launch that waits for the default executor's few threads. So when many tasks start
            # at once, none would be seen running until nearly all of them had launched.
            returncode, (executor, task, ended) = await asyncio.to_thread(self._launch_and_read, record)
        except (OSError, ExecutorStateError) as exc:
            raise LaunchError(f"task {spec.task_id}: failed to launch {command!r}: executor: {exc}") from exc
        if ended is not None and "launch_error" in ended:
            raise LaunchError(f"task {spec.task_id}: failed to launch {command!r}: {ended['launch_error']}")
        if executor is None or task is None:
            raise LaunchError(
                f"task {spec.task_id}: failed to launch {command!r}: the executor exited with code "
                f"{returncode} before starting it; see {self.files.log}"
            )
        self._take_records(executor, task)
        self._attach_executor()
        self._start_watcher()
        logger.debug("task %s: started %r as pid %d under executor pid %d",
                     spec.task_id, command, self.pid, self.executor_pid)
        return self.pid

    def _launch_and_read(self, record: LaunchRecord) -> tuple[int, tuple[dict | None, dict | None, dict | None]]:
        returncode = self._run_executor(record)
        return returncode, self._read_launch_outcome()

    def _run_executor(self, record: LaunchRecord) -> int:
        """Write launch.json, run the executor's launcher and return its exit code. Blocks.

        The launcher runs in a child of the agent's fork server (corral.agent.launcher),
        or in a new `python -m corral.agent.executor` process when the fork server
        cannot be used.
        """
        self.files.reset()
        write_json(self.files.launch, record.to_dict())
        try:
            return shared_client().launch(self.spec.sandbox, LAUNCH_TIMEOUT)
        except TimeoutError:
            # NOTE: unlike the fallback below, this leaves the launcher running in the fork
            # server, so an executor that reports late may still start the task.
            raise OSError(f"no report within {LAUNCH_TIMEOUT:g}s; see {self.files.log}") from None
        except LauncherUnavailable as exc:
            logger.warning("task %s: %s; starting the executor in a new Python process", self.spec.task_id, exc)
        with open(self.files.log, "ab") as log_file:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "corral.agent.executor", "--sandbox", os.path.abspath(self.spec.sandbox)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                cwd="/",
                # Its own session: a signal to the agent's process group never reaches the executor.
                start_new_session=True,
                close_fds=True,
            )
        try:
            return launcher.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
            raise OSError(f"no report within {LAUNCH_TIMEOUT:g}s; see {self.files.log}") from None

    def _read_launch_outcome(self) -> tuple[dict | None, dict | None, dict | None]:
        return read_json(self.files.executor), read_json(self.files.task), read_json(self.files.exit)

    def _take_records(self, executor: dict, task: dict) -> None:
        self.executor_pid = executor["pid"]
        self.executor_create_time = executor.get("create_time")
        self.pid = task["pid"]
        self.create_time = task.get("create_time")
        self._cgroup_record = task.get("cgroup")

    # Watching the executor

    def _attach_executor(self) -> bool:
        """Open a pidfd on the recorded executor; return False when that process is gone.

        The create time is compared after the pidfd is open, so the pidfd cannot
        refer to another process that reused the pid.
        """
        assert self.executor_pid is not None
        try:
            pidfd = os.pidfd_open(self.executor_pid)
        except ProcessLookupError:
            return False
        except OSError as exc:
            # pidfd_open needs Linux 5.3; older kernels get polled.
            logger.debug("task %s: no pidfd for the executor (%s); polling it", self.spec.task_id, exc)
            self._poll_executor = True
            return _same_process(self.executor_pid, self.executor_create_time)
        if not _same_process(self.executor_pid, self.executor_create_time):
            os.close(pidfd)
            return False
        self._pidfd = pidfd
        return True

    def _start_watcher(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name=f"executor of task {self.spec.task_id}")

    async def _watch(self) -> ExitStatus:
        if self._pidfd is not None:
            loop = asyncio.get_running_loop()
            exited = loop.create_future()
            # A pidfd turns readable when its process exits.
            loop.add_reader(self._pidfd, lambda: exited.done() or exited.set_result(None))
            try:
                await exited
            finally:
                loop.remove_reader(self._pidfd)
                self._close_pidfd()
        elif self._poll_executor:
            while _same_process(self.executor_pid, self.executor_create_time):
                await asyncio.sleep(_EXECUTOR_POLL_INTERVAL)
        status = await asyncio.to_thread(self._read_exit_status)
        self._exit_status = status
        return status

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _read_exit_status(self) -> ExitStatus:
        """Read exit.json after the executor exited; clean up after an executor that did not write it."""
        try:
            record = read_json(self.files.exit)
        except ExecutorStateError as exc:
            logger.error("task %s: %s", self.spec.task_id, exc)
            record = None
        if record is not None and "launch_error" not in record:
            return ExitStatus.from_record(record)
        reason = self._kill_reason or (
            f"its executor (pid {self.executor_pid}) ended without recording how the task ended"
        )
        return self._record_lost(reason)

    def _record_lost(self, reason: str) -> ExitStatus:
        """Clean up after an executor that is gone, and record an unknown exit status in its place. Blocks.

        The record lets garbage collection and a restarted agent treat the run as ended.
        """
        logger.error("task %s: %s; killing what is left of the task", self.spec.task_id, reason)
        self._kill_without_executor()
        try:
            if not self.files.exit.exists():
                write_json(self.files.exit, {"code": None, "signal": None, "unknown_reason": reason,
                                             "ended_at": time.time()})
        except OSError as exc:
            logger.error("task %s: exit status not recorded in %s: %s", self.spec.task_id, self.files.exit, exc)
        return ExitStatus.unknown(reason)

    def _kill_without_executor(self) -> None:
        """Kill the task's process group and cgroup when its executor is gone. Blocks."""
        # NOTE: descendants that left the task's process group escape this when the
        # task has no cgroup. Only the executor could find them, as their subreaper.
        if self.pid is not None:
            kill_process_group(self.pid, self.create_time, timeout=0)
        if self._cgroup_record is not None:
            try:
                TaskCgroup.from_record(self._cgroup_record).remove()
            except (KeyError, ValueError) as exc:
                logger.error("task %s: invalid cgroup record %r: %s", self.spec.task_id, self._cgroup_record, exc)

    def _signal_executor(self, signum: int) -> None:
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signum)
            elif self.executor_pid is not None and _same_process(self.executor_pid, self.executor_create_time):
                os.kill(self.executor_pid, signum)
        except ProcessLookupError:
            pass

    # Waiting and stopping

    async def wait(self) -> ExitStatus:
        """Wait for the task's main process to exit and return how it ended."""
        watcher = self._require_started()
        if self._exit_status is not None:
            return self._exit_status
        return await asyncio.shield(watcher)

    async def stop(self, timeout: float | None = None) -> ExitStatus:
        """Stop the whole task and return the main process's exit status.

        Asks the executor (SIGTERM) to send SIGTERM to the task's process group
        and other descendants and SIGKILL after timeout seconds (default
        spec.kill_timeout). The executor kills whatever outlives the main
        process. If the executor itself does not end within
        EXECUTOR_STOP_MARGIN seconds after that, it is killed and the task's
        group killed from here. Safe to call twice, concurrently, and after
        the process exited on its own.
        """
        watcher = self._require_started()
        if timeout is None:
            timeout = self.spec.kill_timeout
        async with self._stop_lock:
            if not watcher.done():
                await self._request_kill(watcher, timeout)
            return await self.wait()

    async def _request_kill(self, watcher: asyncio.Task[ExitStatus], timeout: float) -> None:
        await asyncio.to_thread(write_json, self.files.kill, {"grace": timeout})
        self._signal_executor(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout + EXECUTOR_STOP_MARGIN):
                await asyncio.shield(watcher)
            return
        except TimeoutError:
            pass
        waited = timeout + EXECUTOR_STOP_MARGIN
        # The watcher notices the executor's death, then kills the task and records this reason.
        self._kill_reason = (
            f"its executor (pid {self.executor_pid}) did not stop the task within {waited:.1f}s and was killed"
        )
        self._signal_executor(signal.SIGKILL)

    def release(self) -> None:
        """Stop watching without stopping the task, which keeps running under its executor.

        A restarted agent finds it again with recover_task_process.
        """
        self._released = True
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
            # A watcher cancelled before it first ran never reaches its own cleanup.
            self._watcher.add_done_callback(lambda _: self._close_pidfd())
        else:
            self._close_pidfd()

    def _require_started(self) -> asyncio.Task[ExitStatus]:
        if self._watcher is None:
            raise RuntimeError(f"task {self.spec.task_id}: process not started")
        return self._watcher


def _same_process(pid: int, create_time: float | None) -> bool:
    """Return whether pid is alive (not a zombie) and, when create_time is given, was created then."""
    try:
        process = psutil.Process(pid)
        if create_time is not None and abs(process.create_time() - create_time) > CREATE_TIME_TOLERANCE:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------------------
# Recovery after an agent restart


@dataclass(frozen=True)
class RecoveredTask:
    """The state of a task's last run, as a restarted agent finds it in the sandbox.

    Exactly one field is set. process is the live process, watched again.
    exit_status is how a run ended while no agent watched it. problem is the
    reason why neither is known.
    """

    process: TaskProcess | None = None
    exit_status: ExitStatus | None = None
    problem: str = ""


async def recover_task_process(task_id: str, sandbox: Path) -> RecoveredTask:
    """Find the executor of the task's last run and watch it again, or read how that run ended.

    Never starts anything. A run whose executor died without recording the
    exit status has its process group and cgroup killed.
    """
    files = ExecutorFiles(sandbox)
    try:
        launch, executor, ended = await asyncio.to_thread(
            lambda: (read_json(files.launch), read_json(files.executor), read_json(files.exit))
        )
    except ExecutorStateError as exc:
        return RecoveredTask(problem=f"its executor state is unreadable: {exc}")
    if launch is None or executor is None:
        return RecoveredTask(problem="no executor was started for it")
    if ended is not None:
        return _ended_run(ended)
    try:
        spec = _spec_from_launch(LaunchRecord.from_dict(launch), sandbox)
    except (TypeError, ValueError) as exc:
        return RecoveredTask(problem=f"its launch record {files.launch} is invalid: {exc}")
    process = TaskProcess(spec)
    process._started = True
    process.executor_pid = executor["pid"]
    process.executor_create_time = executor.get("create_time")
    alive = process._attach_executor()
    task = await _wait_for_task_record(files, process) if alive else await asyncio.to_thread(read_json, files.task)
    if task is not None:
        process.pid = task["pid"]
        process.create_time = task.get("create_time")
        process._cgroup_record = task.get("cgroup")
    if alive and task is not None:
        process._start_watcher()
        return RecoveredTask(process=process)
    process._close_pidfd()
    # The executor may have finished between the first read and now.
    ended = await asyncio.to_thread(read_json, files.exit)
    if ended is not None:
        return _ended_run(ended)
    problem = f"its executor (pid {process.executor_pid}) had ended without recording how the task ended"
    await asyncio.to_thread(process._record_lost, problem)
    return RecoveredTask(problem=problem)


def _ended_run(record: dict[str, Any]) -> RecoveredTask:
    if "launch_error" in record:
        return RecoveredTask(problem=f"its last launch failed: {record['launch_error']}")
    return RecoveredTask(exit_status=ExitStatus.from_record(record))


def _spec_from_launch(launch: LaunchRecord, sandbox: Path) -> LaunchSpec:
    return LaunchSpec(
        task_id=launch.task_id,
        argv=launch.argv,
        env=launch.env,
        cwd=launch.cwd,
        sandbox=sandbox,
        kill_timeout=launch.kill_timeout,
        job=launch.job,
        limits=launch.limits,
        use_cgroups=launch.use_cgroups,
    )


async def _wait_for_task_record(files: ExecutorFiles, process: TaskProcess) -> dict | None:
    """Wait while a live executor is still starting the task; return task.json, or None."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while True:
        task, ended = await asyncio.to_thread(lambda: (read_json(files.task), read_json(files.exit)))
        if task is not None or ended is not None:
            return task
        executor_alive = process.executor_pid is not None and _same_process(
            process.executor_pid, process.executor_create_time
        )
        if not executor_alive or time.monotonic() >= deadline:
            return None
        await asyncio.sleep(_POLL_INTERVAL)


def _is_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_process_group(pid: int, create_time: float | None, timeout: float) -> bool:
    """Stop the process group led by pid, for an agent recovering tasks it did not start.

    Does nothing unless a process with that pid is alive and, when create_time is
    given, was created within CREATE_TIME_TOLERANCE seconds of it. Sends SIGTERM to
    the process's group, polls up to timeout seconds for the process to exit, then
    sends SIGKILL to the group. Returns whether a matching process was found.
    Returns False without signalling anything when the group id is 0, 1 or the
    caller's own group. This call blocks, so run it in a thread from async code.
    """
    if pid <= 1 or pid == os.getpid():
        return False
    try:
        process = psutil.Process(pid)
        if create_time is not None:
            if abs(process.create_time() - create_time) > CREATE_TIME_TOLERANCE:
                return False
        if not _is_alive(process):
            return False
        pgid = os.getpgid(pid)
    except (psutil.NoSuchProcess, ProcessLookupError):
        return False

    if not _is_safe_group(pgid):
        logger.warning(
            "not stopping pid %d: its process group %d is init's or our own", pid, pgid
        )
        return False

    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_alive(process) and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL)
    # The same SIGKILL also reaches any members that outlived the leader.
    _signal_group(pgid, signal.SIGKILL)
    return True


class RestartBackoff:
    """Delays between restarts of a failing task: exponential, reset after a long run.

    The clock is passed in, so the class does no I/O and is easy to test.
    """

    def __init__(
        self,
        initial: float = 1.0,
        factor: float = 2.0,
        maximum: float = 60.0,
        reset_after: float = 60.0,
    ) -> None:
        if initial <= 0:
            raise ValueError(f"initial delay must be positive, got {initial}")
        if factor < 1:
            raise ValueError(f"backoff factor must be at least 1, got {factor}")
        if maximum < initial:
            raise ValueError(f"maximum delay {maximum} is less than initial delay {initial}")
        if reset_after < 0:
            raise ValueError(f"reset_after must not be negative, got {reset_after}")
        self.initial = initial
        self.factor = factor
        self.maximum = maximum
        self.reset_after = reset_after
        # Restarts in the current run of quick failures, including the latest one.
        self.attempts = 0
        self._next = initial

    def next_delay(self, now: float, last_started_at: float) -> float:
        """Return the seconds to wait before the next restart, and count the restart.

        A run that lasted at least reset_after seconds starts a new series at the
        initial delay. Each later quick failure multiplies the delay by factor, up
        to maximum.
        """
        if now - last_started_at >= self.reset_after:
            self.reset()
        delay = self._next
        self._next = min(self._next * self.factor, self.maximum)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Forget past failures, e.g. after a deliberate stop."""
        self.attempts = 0
        self._next = self.initial
