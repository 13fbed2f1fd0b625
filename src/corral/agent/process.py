"""Launch and supervise one task's command as its own process group on asyncio."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

# psutil derives create_time from the boot time and the start tick, and the boot
# time it reads can shift by up to a second between reads, so an exact comparison
# would reject the right process.
CREATE_TIME_TOLERANCE = 1.0

# How often kill_process_group polls for a process that is not our child.
_POLL_INTERVAL = 0.05


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


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: an exit code, or the signal that killed it."""

    code: int | None
    signal: int | None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """Build a status from a subprocess return code, where -N means signal N."""
        if returncode < 0:
            return cls(code=None, signal=-returncode)
        return cls(code=returncode, signal=None)

    @property
    def success(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        """Return e.g. "exited with code 3" or "killed by signal 9 (SIGKILL)"."""
        if self.signal is not None:
            return f"killed by signal {self.signal} ({_signal_name(self.signal)})"
        return f"exited with code {self.code}"


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
    """One task's process, started in its own session so that stop() reaches its children."""

    def __init__(self, spec: LaunchSpec) -> None:
        if not spec.argv:
            raise ValueError(f"task {spec.task_id}: argv is empty")
        self.spec = spec
        self.pid: int | None = None
        # psutil's create time of the process, saved so that a restarted agent can
        # tell the task's process from an unrelated one that reused the pid.
        self.create_time: float | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._exit_status: ExitStatus | None = None
        self._stop_lock = asyncio.Lock()

    @property
    def pgid(self) -> int | None:
        """The process group id, equal to the pid because the process leads its own session."""
        return self.pid

    @property
    def running(self) -> bool:
        """Whether the process has started and has not been reaped yet."""
        return self._process is not None and self._process.returncode is None

    @property
    def exit_status(self) -> ExitStatus | None:
        """How the process ended, or None while it runs or before start()."""
        if self._exit_status is None and self._process is not None:
            if self._process.returncode is not None:
                self._exit_status = ExitStatus.from_returncode(self._process.returncode)
        return self._exit_status

    async def start(self) -> int:
        """Launch the command and return its pid.

        Raises LaunchError naming the task, argv[0] and the OS error when the
        sandbox, the working directory or the command is missing or unusable.
        """
        if self._process is not None:
            raise RuntimeError(f"task {self.spec.task_id}: process already started")
        spec = self.spec
        command = spec.argv[0]
        try:
            spec.sandbox.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LaunchError(
                f"task {spec.task_id}: failed to launch {command!r}: "
                f"cannot create sandbox {spec.sandbox}: {exc}"
            ) from exc

        workdir = Path(spec.cwd) if spec.cwd is not None else spec.sandbox
        executable = _resolve_command(spec, workdir)
        try:
            with (
                open(spec.sandbox / "stdout", "ab") as stdout,
                open(spec.sandbox / "stderr", "ab") as stderr,
            ):
                self._process = await asyncio.create_subprocess_exec(
                    *spec.argv,
                    executable=executable,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    env=spec.env,
                    cwd=workdir,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            raise LaunchError(f"task {spec.task_id}: failed to launch {command!r}: {exc}") from exc

        self.pid = self._process.pid
        try:
            self.create_time = psutil.Process(self.pid).create_time()
        except psutil.Error:
            # The process can already be gone and reaped when the command exits at once.
            self.create_time = None
        logger.debug("task %s: started %r as pid %d", spec.task_id, command, self.pid)
        return self.pid

    async def wait(self) -> ExitStatus:
        """Wait for the main process to exit and return how it ended."""
        process = self._require_started()
        returncode = await process.wait()
        self._exit_status = ExitStatus.from_returncode(returncode)
        return self._exit_status

    async def stop(self, timeout: float | None = None) -> ExitStatus:
        """Stop the whole process group and return the main process's exit status.

        Sends SIGTERM to the group, waits up to timeout seconds (default
        spec.kill_timeout) for the main process, then sends SIGKILL to the group.
        Returns once the main process is reaped, after a final SIGKILL to the group
        for children that outlived it. Safe to call twice, concurrently, and after
        the process exited on its own, which makes it the way to clean up the
        children of a task that exited.
        """
        process = self._require_started()
        if timeout is None:
            timeout = self.spec.kill_timeout
        async with self._stop_lock:
            assert self.pgid is not None
            if process.returncode is None:
                await self._terminate(process, timeout)
            status = await self.wait()
            # NOTE: the group is signalled after the main process was reaped. If no
            # member is left, the kernel may reuse the number as a pid, but a new
            # process only gets this group id if it also makes itself a group
            # leader, which is the one (unlikely) way this SIGKILL can go astray.
            if _signal_group(self.pgid, signal.SIGKILL):
                logger.info(
                    "task %s: killed processes left in group %d after its main process exited",
                    self.spec.task_id,
                    self.pgid,
                )
            return status

    async def _terminate(self, process: asyncio.subprocess.Process, timeout: float) -> None:
        assert self.pgid is not None
        task_id = self.spec.task_id
        _signal_group(self.pgid, signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(process.wait())
            return
        except TimeoutError:
            pass
        logger.info(
            "task %s: pid %d still running %.1f s after SIGTERM, sending SIGKILL",
            task_id,
            self.pid,
            timeout,
        )
        _signal_group(self.pgid, signal.SIGKILL)
        await process.wait()

    def _require_started(self) -> asyncio.subprocess.Process:
        if self._process is None:
            raise RuntimeError(f"task {self.spec.task_id}: process not started")
        return self._process


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
