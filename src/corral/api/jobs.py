"""corral's own resources: `/v1/jobs` and `/v1/tasks`.

A job is submitted as the JSON form of its TOML file. Validation runs
before anything is stored, so a rejected job leaves the stored one as it
was.
"""

from __future__ import annotations

from aiohttp import web

from corral.api.common import block, json_error, json_response, read_json, state_of
from corral.jobspec import Job, JobSpecError, Problem, parse_job
from corral.state import State
from corral.state.records import CHECKS, JOB_STATUS, JOBS, TASKS, JobRecord, Task
from corral.types import CheckStatus, TaskState

JOB_PREFIXES = (JOBS, JOB_STATUS, TASKS, CHECKS)


def check_fits_some_agent(job: Job, state: State) -> None:
    """Reject a job whose one instance needs more than any registered agent has in total."""
    agents = state.agents()
    if not agents:
        return
    resources = job.task.resources
    problems = []
    largest_memory = max(agent.memory for agent in agents)
    if resources.memory > largest_memory:
        problems.append(
            Problem(
                "task.resources.memory",
                f"{resources.memory} MB is more than any agent has in total "
                f"(the largest has {largest_memory} MB); expected at most {largest_memory}",
            )
        )
    largest_cpus = max(agent.cpus for agent in agents)
    if resources.cpus > largest_cpus:
        problems.append(
            Problem(
                "task.resources.cpus",
                f"{resources.cpus:g} is more than any agent has in total "
                f"(the largest has {largest_cpus:g}); expected at most {largest_cpus:g}",
            )
        )
    if problems:
        raise JobSpecError(problems, subject=f"invalid job {job.name!r}")


def task_health(state: State, task: Task) -> str:
    """Return the worst status of the task's service checks and its node's checks, or "" when it has no check.

    As in Consul's health of a service instance, the node's checks count too,
    so the tasks of a failed agent turn critical with its serfHealth check.
    """
    checks = state.checks(task.node)
    statuses = [check.status for check in checks if check.service_id == task.id]
    if statuses:
        statuses += [check.status for check in checks if not check.service_id]
    for status in (CheckStatus.CRITICAL, CheckStatus.WARNING, CheckStatus.PASSING):
        if status in statuses:
            return status.value
    return ""


def task_to_api(state: State, task: Task) -> dict:
    data = task.to_api()
    data["Health"] = task_health(state, task)
    return data


def job_to_api(state: State, record: JobRecord) -> dict:
    tasks = sorted(state.tasks(job=record.name), key=lambda task: (task.instance, task.created_at))
    live = [task for task in tasks if task.spec_version == record.task_version and not task.state.is_terminal]
    running = [task for task in live if task.state is TaskState.RUNNING]
    count = 0 if record.stopped else record.spec.get("count", 0)
    return {
        "Name": record.name,
        "Type": record.spec.get("type"),
        "Count": count,
        "Version": record.version,
        "TaskVersion": record.task_version,
        "Stopped": record.stopped,
        "SubmittedAt": record.submitted_at,
        "Spec": record.spec,
        "Unplaced": state.job_status(record.name).unplaced,
        "Summary": {
            "Desired": count,
            "Running": len(running),
            "Passing": sum(1 for task in running if _is_passing(state, task, record)),
        },
        "Tasks": [task_to_api(state, task) for task in tasks],
    }


def _is_passing(state: State, task: Task, record: JobRecord) -> bool:
    """Tell whether a running task passes its check; one whose job has no check passes once running."""
    service = record.spec.get("service")
    if not service or "check" not in service:
        return True
    return task_health(state, task) == CheckStatus.PASSING.value


def _job_index(state: State) -> int:
    return max(state.view.index(prefix) for prefix in JOB_PREFIXES)


async def submit_job(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await read_json(request)
    try:
        job = parse_job(body)
        check_fits_some_agent(job, state)
    except JobSpecError as exc:
        raise json_error(400, exc.to_dict()) from None
    record = await state.submit_job(job)
    return json_response({"Name": record.name, "Version": record.version}, index=_job_index(state))


async def list_jobs(request: web.Request) -> web.Response:
    state = state_of(request)
    index = await block(request, lambda: _job_index(state), JOB_PREFIXES)
    return json_response([job_to_api(state, record) for record in state.jobs()], index=index)


async def get_job(request: web.Request) -> web.Response:
    state = state_of(request)
    name = request.match_info["name"]
    index = await block(request, lambda: _job_index(state), JOB_PREFIXES)
    record = state.job(name)
    if record is None:
        raise json_error(404, {"error": f"job {name!r} not found"})
    return json_response(job_to_api(state, record), index=index)


async def stop_job(request: web.Request) -> web.Response:
    state = state_of(request)
    name = request.match_info["name"]
    record = await state.stop_job(name)
    if record is None:
        raise json_error(404, {"error": f"job {name!r} not found"})
    return json_response({"Name": record.name, "Version": record.version, "Stopped": True})


async def list_tasks(request: web.Request) -> web.Response:
    state = state_of(request)
    job = request.query.get("job") or None
    index = await block(request, lambda: max(state.view.index(TASKS), state.view.index(CHECKS)), (TASKS, CHECKS))
    tasks = sorted(state.tasks(job=job), key=lambda task: (task.job, task.instance, task.created_at))
    return json_response([task_to_api(state, task) for task in tasks], index=index)


async def get_task(request: web.Request) -> web.Response:
    state = state_of(request)
    task = state.task(request.match_info["id"])
    if task is None:
        raise json_error(404, {"error": f"task {request.match_info['id']!r} not found"})
    return json_response(task_to_api(state, task), index=state.view.index(TASKS))


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_put("/v1/jobs", submit_job)
    router.add_post("/v1/jobs", submit_job)
    router.add_get("/v1/jobs", list_jobs)
    router.add_get("/v1/jobs/{name}", get_job)
    router.add_delete("/v1/jobs/{name}", stop_job)
    router.add_get("/v1/tasks", list_tasks)
    router.add_get("/v1/tasks/{id}", get_task)
