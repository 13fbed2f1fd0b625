"""Benchmark the allocator with simulated agents and frameworks, and write its section of docs/benchmarks.md.

Started by bench/allocator/run. Everything runs in this one process: the
allocator from src/corral/master/allocator.py, simulated agents (added
directly, with no agent processes), and simulated frameworks that accept
or decline every offer at once. Simulated time advances one second per allocation
cycle, Mesos's default allocation interval.

Each fill scenario places --tasks tasks of one fixed size. Every framework
wants an equal share of them, launches at most --per-offer tasks on each
offer (0 means as many as fit), and suppresses offers once it has all of
its tasks. The churn scenario then ends a fraction of the running tasks in
each cycle; their frameworks revive and launch replacements.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from corral.master.allocator import Allocation, Allocator, Offer, Resources  # noqa: E402
from corral.master.master import tune_garbage_collector  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pages import write_section  # noqa: E402

OUTPUT = ROOT / "docs" / "benchmarks.md"

AGENT = Resources(cpus=8, mem=16384, disk=102400, ports=[(31000, 32000)])
TASK_CPUS = 0.5
TASK_MEM = 1024
TASK_PORTS = 1
CYCLE_TARGET_MS = 100.0
PLACEMENT_TARGET = 10_000


@dataclass
class Run:
    """Measurements of one scenario."""

    name: str
    placed: int = 0
    cycles: int = 0
    offers: int = 0
    # Seconds spent inside allocator calls: allocate, accept, decline, suppress, revive, recover.
    allocator_seconds: float = 0.0
    # Seconds of the whole simulation loop, the simulated frameworks included.
    wall_seconds: float = 0.0
    cycle_ms: list[float] = field(default_factory=list)
    # Garbage collection time inside each allocate call, from gc.callbacks.
    gc_ms: list[float] = field(default_factory=list)
    # Collections during the whole run, inside allocator calls or not, by generation:
    # [count, longest pause in ms].
    collections: dict[int, list[float]] = field(default_factory=dict)

    @property
    def placements_per_second(self) -> float:
        return self.placed / self.allocator_seconds if self.allocator_seconds else 0.0

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.cycle_ms)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class GarbageCollectionClock:
    """Seconds spent in CPython's garbage collector, measured with gc.callbacks.

    `seconds` is the running total. `collections` counts the collections of
    each generation and keeps the longest pause, until the next reset.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections: dict[int, list[float]] = {}
        self._started = 0.0
        gc.callbacks.append(self._on_collection)

    def reset(self) -> None:
        self.collections = {}

    def snapshot(self) -> dict[int, list[float]]:
        return {generation: list(stats) for generation, stats in self.collections.items()}

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.seconds += pause
        stats = self.collections.setdefault(info["generation"], [0, 0.0])
        stats[0] += 1
        stats[1] = max(stats[1], pause * 1000)


GC_CLOCK = GarbageCollectionClock()


class Framework:
    __slots__ = ("id", "wanted", "running", "suppressed")

    def __init__(self, framework_id: str, wanted: int) -> None:
        self.id = framework_id
        self.wanted = wanted
        self.running: list[Allocation] = []
        self.suppressed = False


def build(args: argparse.Namespace) -> tuple[Allocator, dict[str, Framework]]:
    allocator = Allocator(rng=random.Random(args.seed))
    for number in range(args.agents):
        allocator.add_agent(f"agent-{number:05d}", AGENT, attributes={"rack": f"r{number % 40}"})
    frameworks = {}
    per_framework, extra = divmod(args.tasks, args.frameworks)
    for number in range(args.frameworks):
        role = f"role-{number % args.roles}"
        allocator.update_weight(role, 1.0 + number % args.roles % 3)
        framework_id = f"framework-{number:03d}"
        allocator.add_framework(framework_id, role)
        frameworks[framework_id] = Framework(framework_id, per_framework + (number < extra))
    return allocator, frameworks


def launches_for(offer: Offer, count: int) -> list[Resources]:
    """Return up to `count` task launches that fit in the offer, each with its own port."""
    total = offer.total
    fits = min(
        int(total.cpus / TASK_CPUS + 1e-9),
        int(total.mem / TASK_MEM + 1e-9),
        total.port_count // TASK_PORTS,
    )
    count = min(count, fits)
    if count <= 0:
        return []
    ports = total.first_ports(count * TASK_PORTS)
    singles = [port for begin, end in ports for port in range(begin, end + 1)]
    return [Resources(cpus=TASK_CPUS, mem=TASK_MEM, ports=[(p, p)]) for p in singles]


def handle_offer(
    allocator: Allocator, framework: Framework, offer: Offer, now: float, per_offer: int, run: Run
) -> None:
    missing = framework.wanted - len(framework.running)
    limit = missing if per_offer == 0 else min(per_offer, missing)
    launches = launches_for(offer, limit)
    started = time.perf_counter()
    if launches:
        framework.running.extend(allocator.accept(offer.id, launches, now))
    else:
        allocator.decline(offer.id, now)
    if len(framework.running) >= framework.wanted and not framework.suppressed:
        allocator.suppress(framework.id)
        framework.suppressed = True
    run.allocator_seconds += time.perf_counter() - started
    run.placed += len(launches)


def cycle(
    allocator: Allocator, frameworks: dict[str, Framework], now: float, per_offer: int, run: Run
) -> None:
    gc_before = GC_CLOCK.seconds
    started = time.perf_counter()
    result = allocator.allocate(now)
    run.allocator_seconds += time.perf_counter() - started
    run.gc_ms.append((GC_CLOCK.seconds - gc_before) * 1000)
    run.cycles += 1
    run.offers += len(result.offers)
    run.cycle_ms.append(result.seconds * 1000)
    for offer in result.offers:
        handle_offer(allocator, frameworks[offer.framework_id], offer, now, per_offer, run)


def fill(args: argparse.Namespace, per_offer: int) -> tuple[Run, Allocator, dict[str, Framework]]:
    label = "as many as fit" if per_offer == 0 else str(per_offer)
    allocator, frameworks = build(args)
    run = Run(f"fill, {label} per offer")
    gc.collect()
    GC_CLOCK.reset()
    started = time.perf_counter()
    now = 0.0
    while run.placed < args.tasks:
        now += 1.0
        cycle(allocator, frameworks, now, per_offer, run)
        if run.cycles > 10_000:
            raise RuntimeError(f"only {run.placed} of {args.tasks} tasks placed after 10,000 cycles")
    run.wall_seconds = time.perf_counter() - started
    run.collections = GC_CLOCK.snapshot()
    return run, allocator, frameworks


def churn(args: argparse.Namespace) -> Run:
    """Fill the cluster, then end --churn of the running tasks in each cycle and replace them."""
    _, allocator, frameworks = fill(args, args.churn_per_offer)
    rng = random.Random(args.seed + 1)
    run = Run(f"churn, {args.churn:.0%} of tasks end per cycle")
    ending = max(1, int(args.tasks * args.churn))
    gc.collect()
    GC_CLOCK.reset()
    started = time.perf_counter()
    now = 10_000.0
    for _ in range(args.churn_cycles):
        now += 1.0
        for framework in rng.choices(list(frameworks.values()), k=ending):
            if not framework.running:
                continue
            index = rng.randrange(len(framework.running))
            allocation = framework.running[index]
            framework.running[index] = framework.running[-1]
            framework.running.pop()
            call_started = time.perf_counter()
            allocator.recover_resources(allocation)
            if framework.suppressed:
                allocator.revive(framework.id)
                framework.suppressed = False
            run.allocator_seconds += time.perf_counter() - call_started
        cycle(allocator, frameworks, now, args.churn_per_offer, run)
    run.wall_seconds += time.perf_counter() - started
    run.collections = GC_CLOCK.snapshot()
    return run


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load": load,
    }


def rate(count: float, seconds: float) -> str:
    return f"{count / seconds:,.0f}" if seconds > 0 else "n/a"


def median_run(runs: list[Run]) -> Run:
    """Return the run with the median time inside the allocator."""
    return sorted(runs, key=lambda run: run.allocator_seconds)[len(runs) // 2]


def report(
    args: argparse.Namespace, scenarios: list[list[Run]], host: dict[str, str], command: str
) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Allocator benchmark",
        "",
        "The allocator (src/corral/master/allocator.py) placing fixed-size tasks on simulated",
        "agents for simulated frameworks, all in one process with no sockets. `bench/allocator/run`",
        "writes this section, so run it again to refresh the figures rather than editing them.",
        "",
        f"Produced on {now} by:",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {host['nproc']} CPUs ({host['cpu']}), Linux {host['kernel']}, "
        f"Python {host['python']}. Load average when the run started: {host['load']}.",
        "",
        f"Garbage collector thresholds: {host['gc']}.",
        "",
        "## Setup",
        "",
        f"- {args.agents:,} agents of {AGENT.cpus:g} cpus, {AGENT.mem:g} MB mem, {AGENT.disk:g} MB disk and ports "
        f"{AGENT.ports[0][0]}-{AGENT.ports[0][1]}.",
        f"- {args.frameworks} frameworks in {args.roles} roles with weights 1, 2 and 3 in turn.",
        f"- {args.tasks:,} tasks of {TASK_CPUS:g} cpus, {TASK_MEM} MB and {TASK_PORTS} port, shared equally among "
        "the frameworks. An agent holds 16 of them, so the tasks fill "
        f"{args.tasks / (args.agents * 16):.0%} of the cluster.",
        "- A framework accepts or declines each offer at once. It accepts with as many tasks as the offer holds, up",
        "  to its per-offer limit and to the tasks it still needs (the rest of the offer returns behind",
        "  the default 5-second filter). When no task fits, it declines. Once it has all its tasks, it suppresses",
        "  offers.",
        "- One allocation cycle per simulated second. The offer timeout is off.",
        "",
        "## Results",
        "",
        f"Each scenario ran {args.repeat} times from scratch. A row shows the run with the median time inside",
        "the allocator, and the brackets give the lowest and highest placements/s and maximum cycle",
        "time of all its runs.",
        "",
        "Placements/s counts the tasks placed, divided by the time spent inside allocator calls",
        "(allocate, accept, decline, suppress, revive, recover). The end-to-end rate also counts",
        "the simulated frameworks' own work of building launches. Cycle times come from `allocate` only.",
        "GC is the part of all cycles' time that CPython's garbage collector took (measured with",
        "`gc.callbacks`), and the cycle time without GC subtracts each cycle's collections.",
        "",
        "| scenario | tasks placed | cycles | offers | placements/s | end-to-end placements/s | "
        "cycle p50 / p99 / max ms | GC | cycle without GC p50 / p99 / max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for runs in scenarios:
        run = median_run(runs)
        rates = [r.placements_per_second for r in runs]
        worst = [max(r.cycle_ms) for r in runs]
        net = Run(run.name, cycle_ms=[c - g for c, g in zip(run.cycle_ms, run.gc_ms)])
        gc_share = sum(run.gc_ms) / sum(run.cycle_ms) if sum(run.cycle_ms) else 0.0
        lines.append(
            f"| {run.name} | {run.placed:,} | {run.cycles} | {run.offers:,} | "
            f"{run.placements_per_second:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | "
            f"{rate(run.placed, run.wall_seconds)} | "
            f"{run.percentile(0.5):.1f} / {run.percentile(0.99):.1f} / {max(run.cycle_ms):.1f} "
            f"({min(worst):.1f}-{max(worst):.1f}) | "
            f"{gc_share:.0%} | "
            f"{net.percentile(0.5):.1f} / {net.percentile(0.99):.1f} / {max(net.cycle_ms):.1f} |"
        )
    lines += collection_table(scenarios)
    lines += ["", "## Against the targets", ""]
    lines += targets(args, scenarios)
    lines += [
        "",
        "## Notes",
        "",
        "- A cycle makes at most one offer per agent with free resources, plus one per role",
        "  reservation, and its time grows with the offers it makes. The first cycle of each fill",
        f"  run offers all {args.agents:,} agents. With one task per offer, every agent keeps free resources",
        "  and gets one offer in every cycle until the tasks are placed. Otherwise a cycle visits only",
        "  the agents whose resources changed or whose filters expired.",
        "- In the churn run, frameworks that were suppressed revive when their tasks end. A revive",
        "  makes the next cycle visit every agent with free resources, because a revived framework",
        "  may want agents that no other framework wanted. A revived framework needs one or two",
        "  replacements but is offered many agents and declines the rest, so most churn offers are",
        "  declined and its placements/s is low.",
        "- The master raises CPython's garbage-collector thresholds when it starts",
        "  (GC_THRESHOLDS in src/corral/master/master.py), and this benchmark does the same unless",
        "  `--gc default` is given. With CPython's defaults (700, 10, 10) a cycle that makes 10,000",
        "  offers starts at least 14 young collections. Full collections of the whole heap take 100 ms",
        "  or more once the tasks are placed, and they often start inside a cycle. With the master's",
        "  thresholds collections are rare, and offers accepted or declined before the next one are",
        "  never scanned.",
        "  Whether a rare collection starts inside a cycle depends on how many objects the frameworks",
        "  create between cycles, so the GC column can be 0% here and not in another process.",
        "- The machine is shared with other work, so figures vary between runs. The load average",
        "  above shows how busy it was when this run started.",
        "",
    ]
    return "\n".join(lines)


def collection_table(scenarios: list[list[Run]]) -> list[str]:
    """List the garbage collections of each scenario's median run, inside allocator calls or not."""
    lines = [
        "",
        "## Garbage collections",
        "",
        "All collections while each row's run placed its tasks, whether they started inside an",
        "allocator call or in the simulated frameworks, with the longest pause of each generation.",
        "A collection that starts inside `allocate` adds its pause to that cycle.",
        "",
        "| scenario | generation 0: collections, longest ms | generation 1 | generation 2 |",
        "|---|---:|---:|---:|",
    ]
    for runs in scenarios:
        run = median_run(runs)
        cells = []
        for generation in range(3):
            count, longest = run.collections.get(generation, (0, 0.0))
            cells.append(f"{count:.0f}, {longest:.1f}" if count else "0")
        lines.append(f"| {run.name} | {' | '.join(cells)} |")
    return lines


def targets(args: argparse.Namespace, scenarios: list[list[Run]]) -> list[str]:
    """Judge the fill scenarios against the targets, with the median run and the worst run."""
    lines = [
        f"The targets are at least {PLACEMENT_TARGET:,} placements/s while placing the tasks, and every",
        f"allocation cycle under {CYCLE_TARGET_MS:.0f} ms. They apply to the fill scenarios. The churn",
        "scenario is there to show the steady state, and its placements/s counts only replacements.",
        "",
    ]
    fills = scenarios[: len(args.per_offer)]
    for runs in fills:
        run = median_run(runs)
        slowest_rate = min(r.placements_per_second for r in runs)
        if slowest_rate >= PLACEMENT_TARGET:
            placements = f"Placements/s: met in all {len(runs)} runs (lowest {slowest_rate:,.0f})"
        else:
            placements = f"Placements/s: NOT met (lowest run {slowest_rate:,.0f})"
        over = [r for r in runs if max(r.cycle_ms) >= CYCLE_TARGET_MS]
        worst_cycle = max(max(r.cycle_ms) for r in runs)
        if not over:
            cycles = f"Cycles under {CYCLE_TARGET_MS:.0f} ms: met in all {len(runs)} runs (slowest {worst_cycle:.1f} ms)"
        else:
            slow_cycles = sum(c >= CYCLE_TARGET_MS for r in runs for c in r.cycle_ms)
            total_cycles = sum(len(r.cycle_ms) for r in runs)
            cycles = (
                f"Cycles under {CYCLE_TARGET_MS:.0f} ms: NOT met. {slow_cycles} of {total_cycles} cycles in {len(over)} of "
                f"{len(runs)} runs took {CYCLE_TARGET_MS:.0f} ms or more (slowest {worst_cycle:.1f} ms, "
                f"median run's p50 {run.percentile(0.5):.1f} ms)"
            )
        lines.append(f"- {run.name}. {placements}. {cycles}.")
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10_000, help="simulated agents (default 10000)")
    parser.add_argument("--frameworks", type=int, default=100, help="simulated frameworks (default 100)")
    parser.add_argument("--roles", type=int, default=10, help="roles the frameworks are spread over (default 10)")
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks to place (default 100000)")
    parser.add_argument(
        "--per-offer",
        type=int,
        nargs="+",
        default=[0, 5, 1],
        help="per-offer launch limits, one fill scenario each; 0 means as many as fit (default 0 5 1)",
    )
    parser.add_argument("--churn", type=float, default=0.01, help="fraction of tasks ending per churn cycle (default 0.01)")
    parser.add_argument("--churn-cycles", type=int, default=30, help="cycles of the churn scenario; 0 skips it (default 30)")
    parser.add_argument("--churn-per-offer", type=int, default=5, help="per-offer launch limit in the churn scenario (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--gc",
        choices=["master", "default"],
        default="master",
        help="garbage-collector thresholds: the master's (corral.master.master.GC_THRESHOLDS) or "
        "CPython's defaults (default master)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each scenario; the median is shown (default 3)")
    parser.add_argument("--write", action="store_true", help=f"write the allocator section of {OUTPUT.relative_to(ROOT)} as well as printing it")
    args = parser.parse_args(argv)
    if min(args.agents, args.frameworks, args.roles, args.tasks, args.repeat) < 1:
        parser.error("--agents, --frameworks, --roles, --tasks and --repeat must be at least 1")
    if args.tasks > args.agents * 16:
        parser.error(f"--tasks {args.tasks} is more than {args.agents} agents hold (16 each)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.gc == "master":
        tune_garbage_collector()
        gc_setting = f"{gc.get_threshold()}, as the master sets them (`--gc master`)"
    else:
        gc_setting = f"{gc.get_threshold()}, CPython's defaults (`--gc default`)"
    host = machine()
    host["gc"] = gc_setting
    command = os.environ.get("BENCH_ENTRY", "bench/allocator/run")
    command = " ".join([command, *map(shlex.quote, argv)])
    scenarios: list[list[Run]] = []
    for per_offer in args.per_offer:
        scenarios.append([fill(args, per_offer)[0] for _ in range(args.repeat)])
        print(f"{scenarios[-1][0].name}: {args.repeat} runs done", file=sys.stderr)
    if args.churn_cycles:
        scenarios.append([churn(args) for _ in range(args.repeat)])
        print(f"{scenarios[-1][0].name}: {args.repeat} runs done", file=sys.stderr)
    page = report(args, scenarios, host, command)
    print(page)
    if args.write:
        write_section("allocator", page, OUTPUT)
        print(f"wrote the allocator section of {OUTPUT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
