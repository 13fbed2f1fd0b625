#!/usr/bin/env python3
"""A custom executor that runs each task's shell command, for examples/executor_framework.py.

An agent starts it with the executor environment (MESOS_AGENT_ENDPOINT,
MESOS_FRAMEWORK_ID, MESOS_EXECUTOR_ID, ...). Every task it receives carries
a shell command in its `data` field. The executor runs the command as a
subprocess in a thread of its own and reports TASK_RUNNING, then
TASK_FINISHED (exit code 0) or TASK_FAILED. It also sends the framework one
message per task: a JSON object with the task id, the executor's pid, the
exit code and the last line of the command's output. The executor replies
to a framework message "ping" with "pong <pid>". KILL stops the task's
command (SIGTERM, then SIGKILL after KILL_GRACE_SECONDS) and reports
TASK_KILLED. SHUTDOWN kills every task's command and ends the executor.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading

from corral.sdk import Executor, ExecutorDriver, id_value, task_data

# Seconds between SIGTERM and SIGKILL when a task's command is killed.
KILL_GRACE_SECONDS = 3.0


class BatchExecutor(Executor):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Task id -> the task's running command.
        self.processes: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()

    def registered(self, driver, executor_info, framework_info, agent_info):
        print(f"executor {driver.executor_id} (pid {os.getpid()}) registered on agent "
              f"{agent_info.get('id', {}).get('value')} for framework {framework_info.get('name')}", flush=True)

    def launch_task(self, driver, task):
        task_id = id_value(task["task_id"])
        command = task_data(task).decode() or "true"
        threading.Thread(target=self.run_task, args=(driver, task_id, command), name=task_id, daemon=True).start()

    def run_task(self, driver: ExecutorDriver, task_id: str, command: str) -> None:
        try:
            process = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            driver.send_status_update(task_id, "TASK_FAILED", f"command {command!r} did not start: {exc}")
            return
        with self.lock:
            self.processes[task_id] = process
        driver.send_status_update(task_id, "TASK_RUNNING", f"running {command!r} as pid {process.pid}")
        output, _ = process.communicate()
        with self.lock:
            self.processes.pop(task_id, None)
            killed = task_id in self.killed
        lines = output.decode(errors="replace").strip().splitlines()
        report = {"task_id": task_id, "executor_pid": os.getpid(), "exit_code": process.returncode,
                  "output": lines[-1] if lines else ""}
        try:
            driver.send_framework_message(json.dumps(report))
        except Exception as exc:  # a message is best effort; the status update below is not
            print(f"message about task {task_id} not sent: {exc}", file=sys.stderr, flush=True)
        if killed:
            driver.send_status_update(task_id, "TASK_KILLED", "killed by its framework")
        elif process.returncode == 0:
            driver.send_status_update(task_id, "TASK_FINISHED", "exited with code 0")
        else:
            driver.send_status_update(task_id, "TASK_FAILED", f"exited with code {process.returncode}")

    def kill_task(self, driver, task_id):
        with self.lock:
            process = self.processes.get(task_id)
            self.killed.add(task_id)
        if process is None:
            driver.send_status_update(task_id, "TASK_KILLED", "killed before it started")
            return
        threading.Thread(target=stop_process, args=(process,), daemon=True).start()

    def framework_message(self, driver, data):
        if data == b"ping":
            driver.send_framework_message(f"pong {os.getpid()}")

    def shutdown(self, driver):
        with self.lock:
            processes = list(self.processes.items())
            self.killed.update(task_id for task_id, _ in processes)
        for _, process in processes:
            stop_process(process)


def stop_process(process: subprocess.Popen) -> None:
    """Send SIGTERM to the command's process group, then SIGKILL after the grace period."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    status = ExecutorDriver(BatchExecutor()).run_forever()
    return 0 if status.value == "DRIVER_STOPPED" else 1


if __name__ == "__main__":
    sys.exit(main())
