#!/usr/bin/env python3
"""A batch framework: run N shell tasks on a corral cluster through the scheduler API.

It subscribes to the master given by --master, places tasks on the offers it
receives (as many per offer as fit), declines the rest, prints every status
update, and ends once each task has finished. A task that is lost with its
agent is launched again, up to --max-retries times.

Exit status: 0 when every task ended TASK_FINISHED, 1 when any ended
otherwise (failed, killed, error, or lost too often), 2 when the master
rejected the framework or --timeout passed first.

    python examples/batch_framework.py --master http://127.0.0.1:8500 --tasks 10
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections import deque

from corral.sdk import CallError, DriverStatus, FrameworkInfo, Scheduler, SchedulerDriver, TaskState

# States after which a task is launched again: its agent was lost, or the
# master dropped the launch (for example, the offer had been rescinded).
RETRY_STATES = {TaskState.TASK_LOST, TaskState.TASK_UNREACHABLE, TaskState.TASK_GONE,
                TaskState.TASK_DROPPED, TaskState.TASK_UNKNOWN}

# While tasks wait to be placed, unused offers come back after this many seconds.
SHORT_REFUSE_SECONDS = 1.0
# Once every task is placed, unused offers stay away this long (and offers are suppressed).
LONG_REFUSE_SECONDS = 60.0
# Seconds the master keeps the framework's tasks while the scheduler is disconnected.
FAILOVER_TIMEOUT = 120.0


class BatchScheduler(Scheduler):
    """Places `count` copies of a shell command and tracks each to its end."""

    def __init__(self, count: int, command: str, cpus: float, mem: float, max_retries: int):
        self.command = command
        self.cpus = cpus
        self.mem = mem
        self.max_retries = max_retries
        self.started = time.monotonic()
        self.pending: deque[int] = deque(range(count))
        self.attempts = [0] * count
        # Task id of each launched, not yet ended task, to its index in the batch.
        self.running: dict[str, int] = {}
        self.finished: set[int] = set()
        self.failed: set[int] = set()
        self.count = count
        self.suppressed = False

    @property
    def done(self) -> bool:
        return len(self.finished) + len(self.failed) == self.count

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def registered(self, driver, framework_id, master_info):
        self.say(f"registered as framework {framework_id}; {self.count} tasks to run")

    def reregistered(self, driver, master_info):
        # Updates may have been missed while disconnected: ask for the state of every launched task.
        self.say(f"subscribed again; reconciling {len(self.running)} tasks")
        if self.running:
            driver.reconcile(list(self.running))

    def disconnected(self, driver):
        self.say("lost the connection to the master; reconnecting")

    async def resource_offers(self, driver, offers):
        for offer in offers:
            tasks = []
            while self.pending and offer.fits(cpus=self.cpus, mem=self.mem):
                index = self.pending.popleft()
                task_id = f"batch-{index:03d}-{self.attempts[index]}"
                tasks.append(offer.task(f"batch-{index:03d}", self.command, cpus=self.cpus, mem=self.mem,
                                        task_id=task_id))
                self.running[task_id] = index
            if not tasks:
                refuse = LONG_REFUSE_SECONDS if not self.pending else SHORT_REFUSE_SECONDS
                driver.decline(offer, refuse_seconds=refuse)
                continue
            self.say(f"launching {len(tasks)} tasks on agent {offer.agent_id} ({offer.hostname})")
            try:
                await driver.launch(offer, tasks, filters=SHORT_REFUSE_SECONDS)
            except CallError as error:
                # The tasks never reached the master, so they wait for another offer.
                self.say(f"launch on offer {offer.id} failed: {error}")
                for task in tasks:
                    self.pending.appendleft(self.running.pop(task["task_id"]["value"]))
        if not self.pending and not self.suppressed:
            self.suppressed = True
            driver.suppress()

    def status_update(self, driver, status):
        index = self.running.get(status.task_id)
        detail = ", ".join(part for part in (status.reason, status.message) if part)
        detail = f" ({detail})" if detail else ""
        self.say(f"task {status.task_id} {status.state} on agent {status.agent_id or '-'}{detail}")
        if index is None or not (status.is_terminal or status.state in RETRY_STATES):
            return
        del self.running[status.task_id]
        if status.state is TaskState.TASK_FINISHED:
            self.finished.add(index)
        elif status.state in RETRY_STATES and self.attempts[index] < self.max_retries:
            self.attempts[index] += 1
            self.pending.append(index)
            if self.suppressed:
                self.suppressed = False
                driver.revive()
        else:
            self.failed.add(index)
        if self.done:
            self.say(f"all {self.count} tasks ended: {len(self.finished)} finished, {len(self.failed)} did not")
            driver.stop()

    def error(self, driver, message):
        self.say(f"the master rejected the framework: {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a batch of shell tasks on a corral cluster.")
    parser.add_argument("--master", default="http://127.0.0.1:8500",
                        help="the corral server's HTTP address (default: %(default)s)")
    parser.add_argument("--tasks", type=int, default=10, help="number of tasks (default: %(default)s)")
    parser.add_argument("--command", default="sleep 1; echo done",
                        help="shell command of each task (default: %(default)r)")
    parser.add_argument("--cpus", type=float, default=0.1, help="CPUs per task (default: %(default)s)")
    parser.add_argument("--mem", type=float, default=32, help="memory per task in MB (default: %(default)s)")
    parser.add_argument("--role", default="*", help="the framework's role (default: %(default)s)")
    parser.add_argument("--name", default="batch-example", help="the framework's name (default: %(default)s)")
    parser.add_argument("--max-retries", type=int, default=2,
                        help="launches again of a task lost with its agent (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds before giving up and tearing the framework down (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="log the driver's events at DEBUG")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error(f"--tasks must be 1 or more, got {args.tasks}")
    if args.cpus <= 0 or args.mem <= 0:
        parser.error(f"--cpus and --mem must be more than 0, got {args.cpus} and {args.mem}")
    if args.max_retries < 0 or args.timeout <= 0:
        parser.error("--max-retries must be 0 or more and --timeout more than 0")
    return args


async def run(args: argparse.Namespace) -> int:
    scheduler = BatchScheduler(args.tasks, args.command, args.cpus, args.mem, args.max_retries)
    # The failover timeout lets the framework and its tasks outlive a dropped
    # connection to the master while the driver reconnects.
    framework = FrameworkInfo(name=args.name, roles=[args.role], capabilities=["PARTITION_AWARE"],
                              failover_timeout=FAILOVER_TIMEOUT)
    driver = SchedulerDriver(scheduler, framework, args.master)
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
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
