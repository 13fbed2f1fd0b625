import copy
import json

import pytest

from corral.jobspec import (
    CheckKind,
    CheckSpec,
    EnvVar,
    Job,
    JobSpecError,
    Problem,
    Resources,
    ServiceSpec,
    TaskSpec,
    load_job_file,
    parse_job,
)
from corral.types import JobType

FULL_JOB = {
    "name": "hello-web",
    "type": "service",
    "count": 2,
    "task": {
        "command": "python3",
        "args": ["-u", "hello_web.py"],
        "workdir": "/srv/hello",
        "kill_timeout": "5s",
        "ports": ["http"],
        "resources": {"cpus": 0.1, "memory": 64},
        "env": {
            "MODE": "production",
            "GREETING": {"key": "config/hello-web/greeting"},
        },
    },
    "service": {
        "name": "hello-web",
        "port": "http",
        "tags": ["v1"],
        "check": {"http": "/healthz", "interval": "2s", "timeout": "1s"},
    },
}

MINIMAL_JOB = {"name": "worker", "task": {"command": "sleep", "args": ["60"]}}

DELETE = object()


def modified(base, path, value):
    """Return a deep copy of base with the dotted path set to value, or removed for DELETE."""
    data = copy.deepcopy(base)
    *parents, last = path.split(".")
    table = data
    for key in parents:
        table = table.setdefault(key, {})
    if value is DELETE:
        del table[last]
    else:
        table[last] = value
    return data


def problems_of(data):
    with pytest.raises(JobSpecError) as caught:
        parse_job(data)
    return caught.value.problems


# --- good inputs


def test_parse_full_job():
    job = parse_job(FULL_JOB)
    assert job == Job(
        name="hello-web",
        type=JobType.SERVICE,
        count=2,
        task=TaskSpec(
            command="python3",
            args=("-u", "hello_web.py"),
            workdir="/srv/hello",
            kill_timeout=5.0,
            ports=("http",),
            resources=Resources(cpus=0.1, memory=64),
            env=(
                EnvVar("GREETING", key="config/hello-web/greeting"),
                EnvVar("MODE", value="production"),
            ),
        ),
        service=ServiceSpec(
            name="hello-web",
            port="http",
            tags=("v1",),
            check=CheckSpec(CheckKind.HTTP, "/healthz", interval=2.0, timeout=1.0),
        ),
    )


def test_parse_minimal_job_defaults():
    job = parse_job(MINIMAL_JOB)
    assert job.type is JobType.SERVICE
    assert job.count == 1
    assert job.service is None
    assert job.task.workdir is None
    assert job.task.kill_timeout == 5.0
    assert job.task.ports == ()
    assert job.task.resources == Resources(cpus=0.1, memory=64)
    assert job.task.env == ()


def test_parse_service_defaults():
    data = modified(MINIMAL_JOB, "task.ports", ["web"])
    data["service"] = {"check": {"tcp": True, "interval": "10s"}}
    service = parse_job(data).service
    assert service == ServiceSpec(
        name="worker",
        port="web",
        tags=(),
        check=CheckSpec(CheckKind.TCP, None, interval=10.0, timeout=10.0),
    )


def test_parse_service_port_chosen_among_several():
    data = modified(MINIMAL_JOB, "task.ports", ["http", "admin"])
    data["service"] = {"port": "admin"}
    assert parse_job(data).service.port == "admin"


GOOD_VARIANTS = [
    ("count", 0, lambda job: job.count == 0),
    ("task.kill_timeout", 2.5, lambda job: job.task.kill_timeout == 2.5),
    ("task.kill_timeout", 3, lambda job: job.task.kill_timeout == 3.0),
    ("task.kill_timeout", "1m30s", lambda job: job.task.kill_timeout == 90.0),
    ("task.resources.cpus", 2, lambda job: job.task.resources.cpus == 2.0),
    ("task.args", [""], lambda job: job.task.args == ("",)),
    ("task.env.EMPTY", "", lambda job: EnvVar("EMPTY", value="") in job.task.env),
    ("task.env._x1", "v", lambda job: EnvVar("_x1", value="v") in job.task.env),
    ("task.workdir", None, lambda job: job.task.workdir is None),
    ("service.check", None, lambda job: job.service.check is None),
    ("service.name", "0-web-1", lambda job: job.service.name == "0-web-1"),
    ("name", "a" * 63, lambda job: job.name == "a" * 63),
    ("name", "7", lambda job: job.name == "7"),
    ("task.ports", ["a" * 32], lambda job: job.task.ports == ("a" * 32,)),
    ("service.port", DELETE, lambda job: job.service.port == "http"),
    ("service.check.http", "/health?full=1", lambda job: job.service.check.path == "/health?full=1"),
]


@pytest.mark.parametrize(("path", "value", "holds"), GOOD_VARIANTS)
def test_parse_good_variant(path, value, holds):
    data = modified(FULL_JOB, path, value)
    if path == "task.ports":
        data["service"]["port"] = value[0]
    job = parse_job(data)
    assert holds(job)


def test_parse_sorts_env_by_name():
    data = modified(MINIMAL_JOB, "task.env", {"ZED": "1", "ALPHA": "2", "MID": {"key": "k"}})
    names = [variable.name for variable in parse_job(data).task.env]
    assert names == ["ALPHA", "MID", "ZED"]


# --- bad inputs: (dotted path, value or DELETE, expected problem field, fragment of message)

BAD_VARIANTS = [
    ("name", DELETE, "name", "missing required field"),
    ("name", "", "name", '""'),
    ("name", "Hello-Web", "name", '"Hello-Web"'),
    ("name", "hello_web", "name", '"hello_web"'),
    ("name", "-web", "name", '"-web"'),
    ("name", "web-", "name", '"web-"'),
    ("name", "a" * 64, "name", "a" * 40),
    ("name", 5, "name", "got 5"),
    ("type", "batch", "type", '"batch"'),
    ("type", 1, "type", "got 1"),
    ("count", -1, "count", "got -1"),
    ("count", True, "count", "got true"),
    ("count", 1.5, "count", "got 1.5"),
    ("count", "2", "count", 'got "2"'),
    ("count", 2**63, "count", str(2**63)),
    ("task", DELETE, "task", "missing required table"),
    ("task", "python3", "task", '"python3"'),
    ("task.comand", "x", "task.comand", "unknown field"),
    ("task.command", DELETE, "task.command", "missing required field"),
    ("task.command", "", "task.command", '""'),
    ("task.command", ["python3"], "task.command", '["python3"]'),
    ("task.command", "py\x00thon", "task.command", "NUL"),
    ("task.args", "-u hello.py", "task.args", '"-u hello.py"'),
    ("task.args", ["-u", 7], "task.args[1]", "got 7"),
    ("task.workdir", "srv/hello", "task.workdir", '"srv/hello"'),
    ("task.workdir", "", "task.workdir", '""'),
    ("task.workdir", 3, "task.workdir", "got 3"),
    ("task.kill_timeout", "5x", "task.kill_timeout", '"5x"'),
    ("task.kill_timeout", "5", "task.kill_timeout", '"5"'),
    ("task.kill_timeout", "0s", "task.kill_timeout", '"0s"'),
    ("task.kill_timeout", "-1s", "task.kill_timeout", '"-1s"'),
    ("task.kill_timeout", 0, "task.kill_timeout", "got 0"),
    ("task.kill_timeout", False, "task.kill_timeout", "got false"),
    ("task.kill_timeout", [5], "task.kill_timeout", "[5]"),
    ("task.ports", "http", "task.ports", '"http"'),
    ("task.ports", ["http", "http"], "task.ports[1]", 'duplicate port label "http"'),
    ("task.ports", ["http", "9p"], "task.ports[1]", '"9p"'),
    ("task.ports", ["http", "HTTP2"], "task.ports[1]", '"HTTP2"'),
    ("task.ports", ["http", "a" * 33], "task.ports[1]", "a" * 33),
    ("task.ports", ["http", 80], "task.ports[1]", "got 80"),
    ("task.resources", 1, "task.resources", "got 1"),
    ("task.resources.disk", 10, "task.resources.disk", "unknown field"),
    ("task.resources.cpus", 0, "task.resources.cpus", "got 0"),
    ("task.resources.cpus", -0.5, "task.resources.cpus", "got -0.5"),
    ("task.resources.cpus", "1", "task.resources.cpus", 'got "1"'),
    ("task.resources.cpus", float("inf"), "task.resources.cpus", "Infinity"),
    ("task.resources.cpus", True, "task.resources.cpus", "got true"),
    ("task.resources.memory", 0, "task.resources.memory", "got 0"),
    ("task.resources.memory", 64.0, "task.resources.memory", "got 64.0"),
    ("task.resources.memory", "64MB", "task.resources.memory", '"64MB"'),
    ("task.env", ["MODE=x"], "task.env", '["MODE=x"]'),
    ("task.env.1MODE", "x", "task.env.1MODE", '"1MODE"'),
    ("task.env.MY-VAR", "x", "task.env.MY-VAR", '"MY-VAR"'),
    ("task.env.PORT", 8080, "task.env.PORT", "got 8080"),
    ("task.env.MODE", "a\x00b", "task.env.MODE", "NUL"),
    ("task.env.GREETING", {}, "task.env.GREETING.key", "missing required field"),
    ("task.env.GREETING", {"key": ""}, "task.env.GREETING.key", '""'),
    ("task.env.GREETING", {"key": 5}, "task.env.GREETING.key", "got 5"),
    ("task.env.GREETING", {"key": "k", "default": "x"}, "task.env.GREETING.default", "unknown field"),
    ("service", "hello-web", "service", '"hello-web"'),
    ("service.id", "x", "service.id", "unknown field"),
    ("service.name", "Hello", "service.name", '"Hello"'),
    ("service.name", "hello.web", "service.name", '"hello.web"'),
    ("service.port", "admin", "service.port", '"admin"'),
    ("service.port", 80, "service.port", "got 80"),
    ("service.tags", "v1", "service.tags", '"v1"'),
    ("service.tags", ["v1", "v1"], "service.tags[1]", 'duplicate tag "v1"'),
    ("service.tags", [1], "service.tags[0]", "got 1"),
    ("service.check", "/healthz", "service.check", '"/healthz"'),
    ("service.check.http", "healthz", "service.check.http", '"healthz"'),
    ("service.check.http", "/a b", "service.check.http", '"/a b"'),
    ("service.check.http", True, "service.check.http", "got true"),
    ("service.check.interval", DELETE, "service.check.interval", "missing required field"),
    ("service.check.interval", "0s", "service.check.interval", '"0s"'),
    ("service.check.interval", "2 s", "service.check.interval", '"2 s"'),
    ("service.check.timeout", "-1s", "service.check.timeout", '"-1s"'),
    ("service.check.script", "true", "service.check.script", "unknown field"),
]


@pytest.mark.parametrize(("path", "value", "field", "fragment"), BAD_VARIANTS)
def test_parse_bad_variant(path, value, field, fragment):
    problems = problems_of(modified(FULL_JOB, path, value))
    fields = [problem.field for problem in problems]
    assert fields == [field]
    assert fragment in problems[0].message


def test_uppercase_name_suggests_lowercase():
    (problem,) = problems_of(modified(FULL_JOB, "name", "Hello-Web"))
    assert problem.message == 'expected a lowercase name, got "Hello-Web"; use "hello-web"'


def test_unknown_field_lists_accepted_fields():
    (problem,) = problems_of(modified(FULL_JOB, "task.comand", "x"))
    assert problem.message.startswith(
        "unknown field; expected one of args, command, env, kill_timeout, ports, "
        "resources, workdir"
    )
    assert '"command"' in problem.message


def test_unknown_top_level_field():
    (problem,) = problems_of(modified(FULL_JOB, "replicas", 3))
    assert problem.field == "replicas"
    assert "count, name, service, task, type" in problem.message


def test_workdir_message_mentions_cli():
    (problem,) = problems_of(modified(FULL_JOB, "task.workdir", "srv"))
    assert "absolute path" in problem.message
    assert "CLI" in problem.message


def test_long_value_truncated():
    (problem,) = problems_of(modified(FULL_JOB, "task.command", ["x" * 500]))
    assert "x" * 40 in problem.message
    assert "x" * 100 not in problem.message
    assert "..." in problem.message


def test_job_not_a_table():
    problems = problems_of(["hello-web"])
    assert [problem.field for problem in problems] == [""]
    assert '["hello-web"]' in problems[0].message


def test_service_without_ports():
    data = modified(FULL_JOB, "task.ports", DELETE)
    del data["service"]["port"]
    (problem,) = problems_of(data)
    assert problem.field == "service.port"
    assert "task.ports is empty" in problem.message


def test_service_port_given_without_ports():
    data = modified(FULL_JOB, "task.ports", [])
    (problem,) = problems_of(data)
    assert problem.field == "service.port"
    assert '"http"' in problem.message
    assert "task.ports is empty" in problem.message


def test_service_port_required_with_several_ports():
    data = modified(FULL_JOB, "task.ports", ["http", "admin"])
    del data["service"]["port"]
    (problem,) = problems_of(data)
    assert problem.field == "service.port"
    assert "http, admin" in problem.message


def test_service_port_checked_when_task_invalid():
    data = modified(FULL_JOB, "task.command", DELETE)
    data["service"]["port"] = "admin"
    fields = [problem.field for problem in problems_of(data)]
    assert fields == ["task.command", "service.port"]


def test_check_without_kind():
    data = modified(FULL_JOB, "service.check.http", DELETE)
    (problem,) = problems_of(data)
    assert problem.field == "service.check"
    assert "http" in problem.message
    assert "tcp" in problem.message


def test_check_with_both_kinds():
    data = modified(FULL_JOB, "service.check.tcp", True)
    (problem,) = problems_of(data)
    assert problem.field == "service.check"
    assert "exactly one of http and tcp" in problem.message


def test_check_tcp_false():
    data = modified(FULL_JOB, "service.check.http", DELETE)
    data["service"]["check"]["tcp"] = False
    (problem,) = problems_of(data)
    assert problem.field == "service.check.tcp"
    assert "got false" in problem.message


def test_all_problems_in_one_pass():
    data = {
        "name": "Bad_Name",
        "count": -1,
        "task": {"comand": "x", "resources": {"memory": 0}},
        "service": {"tags": ["a", "a"]},
    }
    fields = [problem.field for problem in problems_of(data)]
    assert fields == [
        "name",
        "count",
        "task.comand",
        "task.command",
        "task.resources.memory",
        "service.port",
        "service.tags[1]",
    ]


# --- JobSpecError


def test_error_single_problem_text():
    with pytest.raises(JobSpecError) as caught:
        parse_job(modified(FULL_JOB, "count", -1))
    assert str(caught.value) == (
        'invalid job "hello-web": count: expected an integer of 0 or more, got -1'
    )


def test_error_several_problems_text():
    data = modified(FULL_JOB, "count", -1)
    data["task"]["command"] = ""
    with pytest.raises(JobSpecError) as caught:
        parse_job(data)
    lines = str(caught.value).splitlines()
    assert lines[0] == 'invalid job "hello-web": 2 problems'
    assert lines[1] == "  count: expected an integer of 0 or more, got -1"
    assert lines[2] == '  task.command: expected a non-empty string, got ""'


def test_error_without_name():
    with pytest.raises(JobSpecError) as caught:
        parse_job(modified(FULL_JOB, "name", DELETE))
    assert str(caught.value).startswith("invalid job: name: missing required field")


def test_error_to_dict():
    with pytest.raises(JobSpecError) as caught:
        parse_job(modified(FULL_JOB, "count", -1))
    body = caught.value.to_dict()
    assert body == {
        "error": 'invalid job "hello-web": count: expected an integer of 0 or more, got -1',
        "problems": [{"field": "count", "message": "expected an integer of 0 or more, got -1"}],
    }
    assert json.loads(json.dumps(body)) == body


def test_problem_str():
    assert str(Problem("task.command", "missing")) == "task.command: missing"
    assert str(Problem("", "malformed")) == "malformed"


# --- canonical form


def test_to_dict_fills_defaults():
    assert parse_job(MINIMAL_JOB).to_dict() == {
        "name": "worker",
        "type": "service",
        "count": 1,
        "task": {
            "command": "sleep",
            "args": ["60"],
            "kill_timeout": "5s",
            "ports": [],
            "resources": {"cpus": 0.1, "memory": 64},
            "env": {},
        },
    }


def test_to_dict_full_job():
    canonical = parse_job(FULL_JOB).to_dict()
    assert canonical["task"]["env"] == {
        "GREETING": {"key": "config/hello-web/greeting"},
        "MODE": "production",
    }
    assert canonical["service"]["check"] == {
        "http": "/healthz",
        "interval": "2s",
        "timeout": "1s",
    }
    assert json.loads(json.dumps(canonical)) == canonical


def test_to_dict_tcp_check():
    data = modified(FULL_JOB, "service.check", {"tcp": True, "interval": 90})
    check = parse_job(data).to_dict()["service"]["check"]
    assert check == {"tcp": True, "interval": "1m30s", "timeout": "10s"}


ROUND_TRIP_JOBS = [
    FULL_JOB,
    MINIMAL_JOB,
    modified(FULL_JOB, "task.kill_timeout", 0.1),
    modified(FULL_JOB, "task.kill_timeout", "2562047h47m16.854775807s"),
    modified(FULL_JOB, "task.kill_timeout", "1.5\u00b5s"),
    modified(FULL_JOB, "service.check", {"tcp": True, "interval": "1h0.5s"}),
    modified(FULL_JOB, "task.resources.cpus", 3),
]


@pytest.mark.parametrize("data", ROUND_TRIP_JOBS)
def test_round_trip(data):
    job = parse_job(data)
    assert parse_job(job.to_dict()) == job
    assert parse_job(json.loads(json.dumps(job.to_dict()))) == job


def test_null_counts_as_absent():
    data = modified(MINIMAL_JOB, "count", None)
    data["service"] = None
    data["task"]["workdir"] = None
    job = parse_job(data)
    assert job.count == 1
    assert job.service is None
    assert job.task.workdir is None


def test_dataclasses_frozen():
    job = parse_job(FULL_JOB)
    with pytest.raises(AttributeError):
        job.count = 3


def test_env_var_needs_one_source():
    with pytest.raises(ValueError):
        EnvVar("X")
    with pytest.raises(ValueError):
        EnvVar("X", value="a", key="b")


# --- load_job_file

JOB_TOML = """\
name = "hello-web"
count = 2

[task]
command = "python3"
args = ["-u", "hello_web.py"]
ports = ["http"]
resources = { cpus = 0.1, memory = 64 }

[task.env]
GREETING = { key = "config/hello-web/greeting" }
MODE = "production"

[service]
tags = ["v1"]
check = { http = "/healthz", interval = "2s", timeout = "1s" }
"""


def test_load_job_file(tmp_path):
    path = tmp_path / "hello-web.toml"
    path.write_text(JOB_TOML, encoding="utf-8")
    job = parse_job(load_job_file(path))
    assert job.name == "hello-web"
    assert job.service.port == "http"
    assert job.task.env[0] == EnvVar("GREETING", key="config/hello-web/greeting")


def test_load_job_file_broken_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "hello-web"\n[task\ncommand = "python3"\n', encoding="utf-8")
    with pytest.raises(JobSpecError) as caught:
        load_job_file(path)
    message = str(caught.value)
    assert str(path) in message
    assert "malformed TOML" in message
    assert "line 2" in message
    assert "column" in message


def test_load_job_file_missing(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(JobSpecError) as caught:
        load_job_file(path)
    assert str(path) in str(caught.value)
    assert "cannot read" in str(caught.value)


def test_load_job_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(JobSpecError) as caught:
        load_job_file(path)
    assert "UTF-8" in str(caught.value)
