"""Tests for corral.scheduler.service: placement and reconciliation as pure functions."""

from __future__ import annotations

import pytest

from corral.scheduler.service import (
    AgentSnapshot,
    BinPackPlacer,
    TaskRequest,
    agent_snapshots,
    reconcile_service,
)
from corral.state.records import AgentInfo, Task
from corral.types import DesiredState, TaskState


def request(instance: int = 0, cpus: float = 0.5, memory: int = 128, ports: int = 1) -> TaskRequest:
    return TaskRequest("web", instance, cpus, memory, ports)


def task(
    instance: int,
    version: int = 1,
    *,
    task_id: str | None = None,
    node: str = "node1",
    desired: DesiredState = DesiredState.RUN,
    state: TaskState = TaskState.RUNNING,
    created_at: float = 1.0,
    cpus: float = 0.5,
    memory: int = 128,
    ports: tuple[str, ...] = ("http",),
) -> Task:
    return Task(
        id=task_id or f"web.{instance}.v{version}",
        job="web",
        instance=instance,
        node=node,
        spec_version=version,
        desired=desired,
        state=state,
        cpus=cpus,
        memory=memory,
        port_labels=list(ports),
        created_at=created_at,
    )


def agent(node: str, cpus: float = 4.0, memory: int = 4096, ports: list[list[int]] | None = None) -> AgentInfo:
    return AgentInfo(node, "10.0.0.1", cpus, memory, disk=10_000, port_ranges=ports or [[20000, 20009]])


def place(requests: list[TaskRequest], agents: list[AgentSnapshot]) -> list[str | None]:
    return [placement.node for placement in BinPackPlacer().place(requests, agents)]


# Placement


def test_place_fits_single_agent():
    placements = BinPackPlacer().place([request()], [AgentSnapshot("node1", 1.0, 256, 2)])

    assert len(placements) == 1
    assert placements[0].node == "node1"
    assert placements[0].reason == ""


def test_place_exact_fit():
    assert place([request(cpus=1.0, memory=256, ports=2)], [AgentSnapshot("node1", 1.0, 256, 2)]) == ["node1"]


def test_place_fractional_cpus_sum():
    # After 0.1 is placed, 0.3 - 0.1 leaves 0.19999999999999998 cpus, which must fit 0.2.
    agents = [AgentSnapshot("node1", 0.3, 1024, 10)]
    requests = [request(0, cpus=0.1), request(1, cpus=0.2)]

    assert place(requests, agents) == ["node1", "node1"]


def test_place_counts_used_resources():
    agents = [AgentSnapshot("node1", 2.0, 1024, 10, used_cpus=1.8)]

    assert place([request(cpus=0.5)], agents) == [None]


def test_place_consumes_capacity_in_batch():
    agents = [AgentSnapshot("node1", 1.0, 1024, 10)]
    requests = [request(index, cpus=0.4) for index in range(3)]

    assert place(requests, agents) == ["node1", "node1", None]


def test_place_spills_to_next_agent():
    agents = [AgentSnapshot("node1", 1.0, 256, 10), AgentSnapshot("node2", 1.0, 1024, 10)]
    requests = [request(index, memory=200) for index in range(3)]

    assert place(requests, agents) == ["node1", "node2", "node2"]


def test_place_respects_memory():
    agents = [AgentSnapshot("node1", 8.0, 100, 10)]

    assert place([request(memory=128)], agents) == [None]


def test_place_respects_ports():
    agents = [AgentSnapshot("node1", 8.0, 4096, 3, used_ports=2)]

    assert place([request(ports=2)], agents) == [None]


def test_place_zero_ports_fits_full_agent():
    agents = [AgentSnapshot("node1", 8.0, 4096, 3, used_ports=3)]

    assert place([request(ports=0)], agents) == ["node1"]


def test_binpack_prefers_least_memory_left():
    agents = [
        AgentSnapshot("roomy", 4.0, 8192, 10),
        AgentSnapshot("tight", 4.0, 512, 10),
        AgentSnapshot("middle", 4.0, 2048, 10),
    ]

    assert place([request(memory=256)], agents) == ["tight"]


def test_binpack_counts_used_memory():
    agents = [
        AgentSnapshot("big", 4.0, 8192, 10, used_memory=8000),
        AgentSnapshot("small", 4.0, 1024, 10),
    ]

    assert place([request(memory=128)], agents) == ["big"]


def test_binpack_skips_agent_without_room():
    agents = [AgentSnapshot("tight", 0.2, 512, 10), AgentSnapshot("roomy", 4.0, 8192, 10)]

    assert place([request(cpus=0.5)], agents) == ["roomy"]


def test_binpack_tie_breaks_by_node():
    agents = [AgentSnapshot("node-b", 4.0, 1024, 10), AgentSnapshot("node-a", 4.0, 1024, 10)]

    assert place([request()], agents) == ["node-a"]


def test_unplaced_reason_names_cpus():
    placement = BinPackPlacer().place([request(cpus=2.0)], [AgentSnapshot("node1", 1.5, 4096, 10)])[0]

    assert placement.node is None
    assert "instance 0 of job web" in placement.reason
    assert "node node1: cpus 1.5 free of 2 requested" in placement.reason
    assert "memory" not in placement.reason
    assert "ports" not in placement.reason


def test_unplaced_reason_names_memory():
    agents = [AgentSnapshot("node1", 4.0, 1024, 10, used_memory=1000)]
    placement = BinPackPlacer().place([request(memory=128)], agents)[0]

    assert "memory 24 MB free of 128 MB requested" in placement.reason
    assert "cpus" not in placement.reason


def test_unplaced_reason_names_ports():
    placement = BinPackPlacer().place([request(ports=3)], [AgentSnapshot("node1", 4.0, 4096, 2)])[0]

    assert "ports 2 free of 3 requested" in placement.reason


def test_unplaced_reason_lists_every_agent():
    agents = [AgentSnapshot("node1", 0.1, 4096, 10), AgentSnapshot("node2", 4.0, 64, 10)]
    placement = BinPackPlacer().place([request(instance=3)], agents)[0]

    assert "instance 3 of job web" in placement.reason
    assert "node node1: cpus 0.1 free of 0.5 requested" in placement.reason
    assert "node node2: memory 64 MB free of 128 MB requested" in placement.reason


def test_unplaced_reason_all_shortfalls():
    placement = BinPackPlacer().place(
        [request(cpus=1.0, memory=512, ports=4)], [AgentSnapshot("node1", 0.5, 256, 1)]
    )[0]

    assert "cpus 0.5 free of 1 requested" in placement.reason
    assert "memory 256 MB free of 512 MB requested" in placement.reason
    assert "ports 1 free of 4 requested" in placement.reason


def test_unplaced_without_agents():
    placement = BinPackPlacer().place([request()], [])[0]

    assert placement.node is None
    assert placement.reason == "no agent is registered"


def test_unplaced_reason_uses_remaining_capacity():
    # The reason for the second request reports the cpus left after the first placement.
    agents = [AgentSnapshot("node1", 1.0, 1024, 10)]
    placements = BinPackPlacer().place([request(0, cpus=0.75), request(1, cpus=0.5)], agents)

    assert placements[1].node is None
    assert "cpus 0.25 free of 0.5 requested" in placements[1].reason


def test_place_keeps_request_order():
    requests = [request(index) for index in (2, 0, 1)]
    placements = BinPackPlacer().place(requests, [AgentSnapshot("node1", 4.0, 4096, 10)])

    assert [placement.request.instance for placement in placements] == [2, 0, 1]


def test_place_leaves_snapshots_unchanged():
    snapshot = AgentSnapshot("node1", 1.0, 1024, 10)
    BinPackPlacer().place([request()], [snapshot])

    assert snapshot.used_cpus == 0.0
    assert snapshot.used_memory == 0
    assert snapshot.used_ports == 0


# Reconciliation


def test_reconcile_new_job_starts_all():
    plan = reconcile_service(3, 1, False, [])

    assert plan.start == [0, 1, 2]
    assert plan.stop == []


def test_reconcile_steady_state_noop():
    tasks = [task(0), task(1)]
    plan = reconcile_service(2, 1, False, tasks)

    assert plan.start == []
    assert plan.stop == []


def test_reconcile_scale_up():
    plan = reconcile_service(4, 1, False, [task(0), task(1)])

    assert plan.start == [2, 3]
    assert plan.stop == []


def test_reconcile_scale_down():
    tasks = [task(index) for index in range(4)]
    plan = reconcile_service(2, 1, False, tasks)

    assert plan.start == []
    assert sorted(plan.stop) == ["web.2.v1", "web.3.v1"]


def test_reconcile_scale_to_zero():
    plan = reconcile_service(0, 1, False, [task(0), task(1)])

    assert plan.start == []
    assert sorted(plan.stop) == ["web.0.v1", "web.1.v1"]


def test_reconcile_version_change_replaces():
    plan = reconcile_service(2, 2, False, [task(0, 1), task(1, 1)])

    assert plan.start == [0, 1]
    assert sorted(plan.stop) == ["web.0.v1", "web.1.v1"]


def test_reconcile_partial_rollout():
    tasks = [task(0, 2), task(1, 1)]
    plan = reconcile_service(2, 2, False, tasks)

    assert plan.start == [1]
    assert plan.stop == ["web.1.v1"]


def test_reconcile_stopped_job_stops_all():
    tasks = [task(0), task(1), task(2, 2)]
    plan = reconcile_service(3, 1, True, tasks)

    assert plan.start == []
    assert plan.stop == ["web.0.v1", "web.1.v1", "web.2.v2"]


def test_reconcile_stopped_job_skips_ended():
    tasks = [task(0), task(1, state=TaskState.KILLED), task(2, desired=DesiredState.STOP)]
    plan = reconcile_service(3, 1, True, tasks)

    assert plan.stop == ["web.0.v1"]


def test_reconcile_replaces_ended_task():
    tasks = [task(0, state=TaskState.FINISHED), task(1, state=TaskState.LOST)]
    plan = reconcile_service(2, 1, False, tasks)

    assert plan.start == [0, 1]
    assert plan.stop == []


def test_reconcile_keeps_restarting_task():
    # FAILED is not terminal, because the agent restarts the process after a backoff.
    plan = reconcile_service(1, 1, False, [task(0, state=TaskState.FAILED)])

    assert plan.start == []
    assert plan.stop == []


def test_reconcile_replaces_task_being_stopped():
    tasks = [task(0, desired=DesiredState.STOP, state=TaskState.KILLING)]
    plan = reconcile_service(1, 1, False, tasks)

    assert plan.start == [0]
    assert plan.stop == []


def test_reconcile_duplicate_keeps_newest():
    tasks = [
        task(0, task_id="web.0.old", created_at=1.0),
        task(0, task_id="web.0.new", created_at=2.0),
    ]
    plan = reconcile_service(1, 1, False, tasks)

    assert plan.start == []
    assert plan.stop == ["web.0.old"]


def test_reconcile_staging_task_counts():
    plan = reconcile_service(1, 1, False, [task(0, state=TaskState.STAGING)])

    assert plan.start == []
    assert plan.stop == []


# Agent snapshots


def test_snapshots_sum_live_tasks():
    tasks = [
        task(0, cpus=0.5, memory=128, ports=("http",)),
        task(1, cpus=0.25, memory=64, ports=("http", "admin")),
    ]
    snapshot = agent_snapshots([agent("node1")], tasks)[0]

    assert snapshot.node == "node1"
    assert snapshot.used_cpus == pytest.approx(0.75)
    assert snapshot.used_memory == 192
    assert snapshot.used_ports == 3


def test_snapshots_skip_ended_tasks():
    tasks = [task(0, state=TaskState.KILLED), task(1, state=TaskState.FINISHED)]
    snapshot = agent_snapshots([agent("node1")], tasks)[0]

    assert snapshot.used_cpus == 0.0
    assert snapshot.used_memory == 0
    assert snapshot.used_ports == 0


def test_snapshots_count_stopping_tasks():
    # A task whose desired state is STOP uses its resources until its process has ended.
    tasks = [task(0, desired=DesiredState.STOP, state=TaskState.KILLING)]
    snapshot = agent_snapshots([agent("node1")], tasks)[0]

    assert snapshot.used_memory == 128


def test_snapshots_per_node():
    tasks = [task(0, node="node1", memory=100), task(1, node="node2", memory=300)]
    snapshots = agent_snapshots([agent("node1"), agent("node2"), agent("node3")], tasks)

    assert [snapshot.used_memory for snapshot in snapshots] == [100, 300, 0]


def test_snapshots_capacity_from_agent():
    info = agent("node1", cpus=2.5, memory=2048, ports=[[20000, 20009], [30000, 30004]])
    snapshot = agent_snapshots([info], [])[0]

    assert snapshot.cpus == 2.5
    assert snapshot.memory == 2048
    assert snapshot.ports == 15


def test_snapshots_ignore_unknown_node():
    snapshots = agent_snapshots([agent("node1")], [task(0, node="gone")])

    assert len(snapshots) == 1
    assert snapshots[0].used_memory == 0


def test_snapshots_feed_placement():
    tasks = [task(index, memory=1000) for index in range(4)]
    snapshots = agent_snapshots([agent("node1", memory=4096), agent("node2", memory=4096)], tasks)

    assert place([request(memory=64)], snapshots) == ["node1"]
    assert place([request(memory=128)], snapshots) == ["node2"]
