#!/usr/bin/env python3
"""A framework that runs a batch of shell commands through one custom executor per agent.

Every task names the same ExecutorInfo (examples/batch_executor.py, started
with this Python), so the tasks that land on one agent share one executor
process. Each task's command travels in its `data` field. The framework
prints every status update and every message the executors send (one per
task, with the executor's pid and the command's last line of output), and
exits once each task has ended.

Exit status: 0 when every task ended TASK_FINISHED, 1 when any ended
otherwise, 2 when the master rejected the framework or --timeout passed.

    python examples/executor_framework.py --master http://127.0.0.1:8500 --tasks 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path

from corral.sdk import (
    CallError,
    DriverStatus,
    FrameworkInfo,
    Scheduler,
    SchedulerDriver,
    executor_info,
    executor_task,
)

EXECUTOR = Path(__file__).resolve().parent / "batch_executor.py"
# The executor's own resources, which the task that starts it on an agent takes in addition to its own.
EXECUTOR_CPUS = 0.1
EXECUTOR_MEM = 64.0
REFUSE_SECONDS = 1.0


class ExecutorFramework(Scheduler):
    """Launches `count` tasks through the batch executor and tracks each to its end."""

    def __init__(self, count: int, command: str, cpus: float, mem: float):
        self.count = count
        self.command = command
        self.cpus = cpus
        self.mem = mem
        self.started = time.monotonic()
        self.executor = executor_info("batch-executor", [sys.executable, str(EXECUTOR)], name="batch executor",
                                      cpus=EXECUTOR_CPUS, mem=EXECUTOR_MEM)
        self.pending = list(range(count))
        self.finished: set[str] = set()
        self.failed: set[str] = set()
        # Agents where an executor runs (or is being started) by this framework.
        self.executor_agents: set[str] = set()
        self.messages: list[dict] = []

    @property
    def done(self) -> bool:
        return len(self.finished) + len(self.failed) == self.count

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def registered(self, driver, framework_id, master_info):
        self.say(f"registered as framework {framework_id}; {self.count} tasks to run through {EXECUTOR.name}")

    async def resource_offers(self, driver, offers):
        for offer in offers:
            tasks = []
            # The first task on an agent starts the executor, so the offer must also hold its resources.
            overhead = (0.0, 0.0) if offer.agent_id in self.executor_agents else (EXECUTOR_CPUS, EXECUTOR_MEM)
            while self.pending and offer.fits(cpus=self.cpus + overhead[0], mem=self.mem + overhead[1]):
                index = self.pending.pop(0)
                command = self.command.replace("{index}", str(index))
                tasks.append(executor_task(offer, f"work-{index:03d}", self.executor, cpus=self.cpus, mem=self.mem,
                                           data=command, task_id=f"work-{index:03d}"))
                if overhead != (0.0, 0.0):
                    offer.allocate(cpus=overhead[0], mem=overhead[1])
                    overhead = (0.0, 0.0)
            if not tasks:
                driver.decline(offer, refuse_seconds=REFUSE_SECONDS)
                continue
            self.executor_agents.add(offer.agent_id)
            self.say(f"launching {len(tasks)} tasks on agent {offer.agent_id}")
            try:
                await driver.launch(offer, tasks, filters=REFUSE_SECONDS)
            except CallError as error:
                self.say(f"launch on offer {offer.id} failed: {error}")
                self.pending[:0] = [int(task["task_id"]["value"].split("-")[1]) for task in tasks]
        if not self.pending:
            driver.suppress()

    def status_update(self, driver, status):
        detail = f" ({status.message})" if status.message else ""
        self.say(f"task {status.task_id} {status.state}{detail}")
        if not status.is_terminal:
            return
        if status.state.value == "TASK_FINISHED":
            self.finished.add(status.task_id)
        else:
            self.failed.add(status.task_id)
        if self.done:
            self.say(f"all {self.count} tasks ended: {len(self.finished)} finished, {len(self.failed)} did not; "
                     f"{len(self.messages)} executor messages")
            driver.stop()

    def framework_message(self, driver, executor_id, agent_id, data):
        try:
            report = json.loads(data)
        except ValueError:
            self.say(f"message from executor {executor_id} on agent {agent_id}: {data!r}")
            return
        self.messages.append(report)
        self.say(f"message from executor {executor_id} (pid {report.get('executor_pid')}) on agent {agent_id}: "
                 f"task {report.get('task_id')} exited with code {report.get('exit_code')}, "
                 f"output {report.get('output')!r}")

    def executor_lost(self, driver, executor_id, agent_id, status):
        self.say(f"executor {executor_id} on agent {agent_id} exited (wait status {status})")
        self.executor_agents.discard(agent_id)

    def error(self, driver, message):
        self.say(f"the master rejected the framework: {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a batch of shell commands through a custom executor.")
    parser.add_argument("--master", default="http://127.0.0.1:8500",
                        help="the corral server's HTTP address (default: %(default)s)")
    parser.add_argument("--tasks", type=int, default=5, help="number of tasks (default: %(default)s)")
    parser.add_argument("--command", default="sleep 1; echo task {index} done",
                        help="shell command of each task; {index} is the task's number (default: %(default)r)")
    parser.add_argument("--cpus", type=float, default=0.1, help="CPUs per task (default: %(default)s)")
    parser.add_argument("--mem", type=float, default=32, help="memory per task in MB (default: %(default)s)")
    parser.add_argument("--name", default="executor-example", help="the framework's name (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds before giving up and tearing the framework down (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error(f"--tasks must be 1 or more, got {args.tasks}")
    if args.cpus <= 0 or args.mem <= 0:
        parser.error(f"--cpus and --mem must be more than 0, got {args.cpus} and {args.mem}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be more than 0, got {args.timeout}")
    return args


async def run(args: argparse.Namespace) -> int:
    scheduler = ExecutorFramework(args.tasks, args.command, args.cpus, args.mem)
    driver = SchedulerDriver(scheduler, FrameworkInfo(name=args.name), args.master)
    loop = asyncio.get_running_loop()
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        scheduler.say("interrupted; tearing the framework down")
        driver.stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt)
    timer = loop.call_later(args.timeout, lambda: (scheduler.say(f"timed out after {args.timeout:g}s"),
                                                   driver.stop()))
    try:
        status = await driver.run()
    finally:
        timer.cancel()
    if status is DriverStatus.ABORTED or interrupted or not scheduler.done:
        return 2
    return 0 if not scheduler.failed else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
