"""A fork server that starts task executors without a new Python interpreter per task.

Starting `python -m corral.agent.executor` costs about 100 ms of CPU per
task, nearly all of it interpreter start-up and imports (measured with
`python -X importtime` on a 2-CPU AMD EPYC machine, Python 3.11), so 200
launches keep two cores busy for about 10 s. The fork server is one
process that imports corral.agent.executor once and, for each sandbox
path it reads, forks a child that does what the separate launcher process
did: it starts a new session, sends its output to the sandbox's
executor.log, and runs corral.agent.executor's main(), which forks the
executor and exits once the task has started or failed to start.

Protocol, one line per message on the server's stdin and stdout:

    request  "ID SANDBOX\\n"   ID is the client's request number
    reply    "ID CODE\\n"      CODE is the launcher's exit code (EXIT_STARTED, ...)

The server is single-threaded, so fork() is safe in it, and it handles
any number of launches at once. It exits at the end of its stdin, which
the kernel closes when the agent exits, so it never outlives the agent by
more than its pending launches. Executors do not depend on it: each one
is detached from its launcher exactly as before.

LaunchClient is the agent's side: it starts the server on first use and
sends requests from any thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

from corral.agent import executor

log = logging.getLogger(__name__)

# How long the server waits for pending launchers once its stdin has closed.
_DRAIN_TIMEOUT = 30.0


class LauncherUnavailable(Exception):
    """The fork server cannot be started or stopped replying; the caller starts the launcher itself."""


# ---------------------------------------------------------------------------
# The server process


def _run_launcher(sandbox: str, wakeup_fds: tuple[int, int]) -> None:
    """In a forked child: become the launcher for `sandbox` and exit with its code. Never returns."""
    code = executor.EXIT_BROKEN
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in wakeup_fds:
            os.close(fd)
        # Its own session, so that a signal to the agent's process group never reaches the executor.
        os.setsid()
        files = executor.ExecutorFiles(Path(sandbox))
        stdin = os.open(os.devnull, os.O_RDONLY)
        output = os.open(files.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        for source, target in ((stdin, 0), (output, 1), (output, 2)):
            os.dup2(source, target)
        os.close(stdin)
        os.close(output)
        os.chdir("/")
        code = executor.main(["--sandbox", sandbox])
    except BaseException as exc:  # noqa: BLE001 - report and leave, whatever happened
        try:
            os.write(2, f"launcher for sandbox {sandbox} failed: {exc!r}\n".encode())
        except OSError:
            pass
    os._exit(code)


def serve(requests: int = 0, replies: int = 1) -> int:
    """Read launch requests from fd `requests` and write replies to fd `replies` until end of input."""
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_read, False)
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)
    # A handler (not SIG_DFL), so that SIGCHLD writes to the wakeup fd.
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    pending: dict[int, str] = {}
    buffer = b""
    open_input = True
    while open_input or pending:
        timeout = None if open_input else _DRAIN_TIMEOUT
        watched = [wakeup_read, requests] if open_input else [wakeup_read]
        readable, _, _ = select.select(watched, [], [], timeout)
        if not readable:
            break

        if wakeup_read in readable:
            _drain(wakeup_read)
        _reap(pending, replies)

        if requests in readable:
            chunk = os.read(requests, 65536)
            if not chunk:
                open_input = False
                continue
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                _start_launcher(line, pending, replies, (wakeup_read, wakeup_write))
    return 0


def _start_launcher(line: bytes, pending: dict[int, str], replies: int, wakeup_fds: tuple[int, int]) -> None:
    request_id, _, sandbox = line.decode("utf-8", errors="replace").partition(" ")
    if not request_id or not sandbox:
        os.write(2, f"launcher fork server: invalid request {line!r}: expected 'ID SANDBOX'\n".encode())
        return
    try:
        pid = os.fork()
    except OSError as exc:
        os.write(2, f"launcher fork server: fork failed for sandbox {sandbox}: {exc}\n".encode())
        _reply(replies, request_id, executor.EXIT_BROKEN)
        return
    if pid == 0:
        _run_launcher(sandbox, wakeup_fds)
    pending[pid] = request_id


def _reap(pending: dict[int, str], replies: int) -> None:
    """Collect every launcher that exited and reply with its exit code."""
    while pending:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        request_id = pending.pop(pid, None)
        if request_id is not None:
            _reply(replies, request_id, os.waitstatus_to_exitcode(status))


def _reply(replies: int, request_id: str, code: int) -> None:
    try:
        os.write(replies, f"{request_id} {code}\n".encode())
    except BrokenPipeError:
        # The agent is gone; the launches go on without a reader of their outcome.
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


# ---------------------------------------------------------------------------
# The agent's side


class LaunchClient:
    """Sends launch requests to one fork server, started on first use; safe to use from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        # Request id to [event, exit code or None, the server process it was sent to].
        self._waiters: dict[int, list] = {}
        self._next_id = 0

    def launch(self, sandbox: Path, timeout: float) -> int:
        """Run the launcher for `sandbox` and return its exit code.

        Raises LauncherUnavailable when the fork server cannot be started or
        exits before it replies, and TimeoutError after `timeout` seconds.
        """
        done = threading.Event()
        with self._lock:
            process = self._ensure_started()
            self._next_id += 1
            request_id = self._next_id
            waiter = [done, None, process]
            self._waiters[request_id] = waiter
            try:
                process.stdin.write(f"{request_id} {os.path.abspath(sandbox)}\n".encode())
                process.stdin.flush()
            except (OSError, ValueError) as exc:
                # ValueError: its stdin is closed already.
                del self._waiters[request_id]
                self._forget(process)
                raise LauncherUnavailable(f"the launcher fork server (pid {process.pid}) is gone: {exc}") from None
        if not done.wait(timeout):
            with self._lock:
                self._waiters.pop(request_id, None)
            raise TimeoutError(f"no reply from the launcher fork server within {timeout:g}s")
        code = waiter[1]
        if code is None:
            raise LauncherUnavailable("the launcher fork server exited before it replied")
        return code

    def close(self) -> None:
        """Close the server's input and wait for it to exit; safe to call twice."""
        with self._lock:
            process, reader = self._process, self._reader
            self._process = self._reader = None
        if process is None or reader is None:
            return
        _close_quietly(process.stdin)
        # The reader sees the end of the server's output, then reaps it.
        reader.join(_DRAIN_TIMEOUT + 5)
        if reader.is_alive():
            process.kill()
            reader.join(5)

    def _ensure_started(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "corral.agent.launcher"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise LauncherUnavailable(f"the launcher fork server cannot start: {exc}") from None
        self._process = process
        self._reader = threading.Thread(target=self._read_replies, args=(process,), name="launcher replies",
                                        daemon=True)
        self._reader.start()
        log.info("launcher fork server started pid=%d", process.pid)
        return process

    def _read_replies(self, process: subprocess.Popen) -> None:
        """Hand each reply to its waiter until the server's output ends, then reap the server."""
        try:
            for line in process.stdout:
                request_id, _, code = line.decode(errors="replace").partition(" ")
                with self._lock:
                    waiter = self._waiters.pop(int(request_id), None)
                if waiter is not None:
                    waiter[1] = int(code)
                    waiter[0].set()
        finally:
            with self._lock:
                self._forget(process)
            _close_quietly(process.stdin)
            try:
                process.wait(timeout=_DRAIN_TIMEOUT + 5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()

    def _forget(self, process: subprocess.Popen) -> None:
        """Fail every waiter of `process` and drop it, so that the next launch starts a new server. Locked."""
        if self._process is process:
            self._process = None
            log.warning("launcher fork server exited pid=%d; the next launch starts a new one", process.pid)
        for request_id, waiter in list(self._waiters.items()):
            if waiter[2] is process:
                del self._waiters[request_id]
                waiter[0].set()


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except (OSError, ValueError):
        # A broken pipe while flushing: the server is gone already.
        pass


_client: LaunchClient | None = None
_client_lock = threading.Lock()


def shared_client() -> LaunchClient:
    """Return this process's LaunchClient, closed when the process exits."""
    global _client
    with _client_lock:
        if _client is None:
            _client = LaunchClient()
            atexit.register(_client.close)
        return _client


if __name__ == "__main__":
    sys.exit(serve())
