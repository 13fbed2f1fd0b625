"""Job definitions: validate a job submitted as TOML or JSON, and render it back.

parse_job checks every section in one pass and raises JobSpecError listing all the
problems it found, each with the dotted path of its field (such as
"task.resources.memory"). Job.to_dict returns the canonical form, with every default
filled in, that parse_job accepts back unchanged.

In the input, a field set to None (JSON null) counts as absent. The canonical form
omits absent optional fields because TOML has no null.
"""

from __future__ import annotations

import difflib
import enum
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path, PurePosixPath
from typing import Any

from corral.duration import format_duration, parse_duration
from corral.types import JobType

DEFAULT_COUNT = 1
DEFAULT_KILL_TIMEOUT = 5.0
DEFAULT_CPUS = 0.1
DEFAULT_MEMORY_MB = 64
DEFAULT_CHECK_TIMEOUT = 10.0

# The largest integer JSON encoders such as orjson write for a signed 64-bit field.
MAX_INTEGER = 2**63 - 1

_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT_LABEL = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_DNS_LABEL_RULE = (
    "a DNS label of 1-63 lowercase letters, digits and '-', "
    "not starting or ending with '-'"
)
_PORT_LABEL_RULE = (
    "a port label of 1-32 lowercase letters, digits, '_' and '-', starting with a letter"
)
_SHOW_LIMIT = 60

_JOB_FIELDS = frozenset({"name", "type", "count", "task", "service"})
_TASK_FIELDS = frozenset(
    {"command", "args", "workdir", "kill_timeout", "ports", "resources", "env"}
)
_RESOURCES_FIELDS = frozenset({"cpus", "memory"})
_ENV_VALUE_FIELDS = frozenset({"key"})
_SERVICE_FIELDS = frozenset({"name", "port", "tags", "check"})
_CHECK_FIELDS = frozenset({"http", "tcp", "interval", "timeout"})


# ---------------------------------------------------------------------------
# Errors


@dataclass(frozen=True, slots=True)
class Problem:
    """One invalid field: its dotted path (empty for the whole document) and what is wrong."""

    field: str
    message: str

    def __str__(self) -> str:
        if not self.field:
            return self.message
        return f"{self.field}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class JobSpecError(Exception):
    """A job definition that failed validation, with every problem found."""

    def __init__(self, problems: Iterable[Problem], *, subject: str = "invalid job") -> None:
        self.problems: list[Problem] = list(problems)
        self.subject = subject
        super().__init__(self._format())

    def _format(self) -> str:
        if len(self.problems) == 1:
            return f"{self.subject}: {self.problems[0]}"
        lines = [f"{self.subject}: {len(self.problems)} problems"]
        lines.extend(f"  {problem}" for problem in self.problems)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Return the HTTP API's error body."""
        return {"error": str(self), "problems": [p.to_dict() for p in self.problems]}


class _Problems:
    """Problems collected while validating, so that one pass reports them all."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, field: str, message: str) -> None:
        self.items.append(Problem(field, message))

    def count(self) -> int:
        return len(self.items)


# ---------------------------------------------------------------------------
# The parsed job


class CheckKind(enum.StrEnum):
    HTTP = "http"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class Resources:
    """What one task instance reserves on an agent: CPU shares and memory in MB."""

    cpus: float = DEFAULT_CPUS
    memory: int = DEFAULT_MEMORY_MB

    def to_dict(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "memory": self.memory}


@dataclass(frozen=True, slots=True)
class EnvVar:
    """An environment variable: a literal value, or a KV key read when the task starts."""

    name: str
    value: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.key is None):
            raise ValueError(
                f"environment variable {self.name}: set exactly one of value and key"
            )

    def to_value(self) -> str | dict[str, str]:
        """Return the value as task.env writes it: a string, or {"key": ...}."""
        if self.key is not None:
            return {"key": self.key}
        assert self.value is not None
        return self.value


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """The process that each instance of a job runs. kill_timeout is in seconds."""

    command: str
    args: tuple[str, ...] = ()
    workdir: str | None = None
    kill_timeout: float = DEFAULT_KILL_TIMEOUT
    ports: tuple[str, ...] = ()
    resources: Resources = Resources()
    env: tuple[EnvVar, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"command": self.command, "args": list(self.args)}
        if self.workdir is not None:
            result["workdir"] = self.workdir
        result["kill_timeout"] = format_duration(self.kill_timeout)
        result["ports"] = list(self.ports)
        result["resources"] = self.resources.to_dict()
        result["env"] = {var.name: var.to_value() for var in self.env}
        return result


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """A health check in Consul's terms. interval and timeout are in seconds."""

    kind: CheckKind
    path: str | None
    interval: float
    timeout: float = DEFAULT_CHECK_TIMEOUT

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any]
        if self.kind is CheckKind.HTTP:
            result = {"http": self.path}
        else:
            result = {"tcp": True}
        result["interval"] = format_duration(self.interval)
        result["timeout"] = format_duration(self.timeout)
        return result


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """The catalog service that each instance registers, on one of the task's ports."""

    name: str
    port: str
    tags: tuple[str, ...] = ()
    check: CheckSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"name": self.name, "port": self.port, "tags": list(self.tags)}
        if self.check is not None:
            result["check"] = self.check.to_dict()
        return result


@dataclass(frozen=True, slots=True)
class Job:
    """A validated job definition."""

    name: str
    type: JobType
    count: int
    task: TaskSpec
    service: ServiceSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the canonical JSON-compatible form, which parse_job maps back to this job."""
        result: dict[str, Any] = {
            "name": self.name,
            "type": self.type.value,
            "count": self.count,
            "task": self.task.to_dict(),
        }
        if self.service is not None:
            result["service"] = self.service.to_dict()
        return result


# ---------------------------------------------------------------------------
# Entry points


def parse_job(data: Mapping[str, Any]) -> Job:
    """Validate a job definition and build a Job from it.

    Raises JobSpecError listing every problem found.
    """
    problems = _Problems()
    job = _parse_job_table(data, problems)
    if problems.items or job is None:
        raise JobSpecError(problems.items, subject=_error_subject(data))
    return job


def load_job_file(path: str | PathLike[str]) -> dict[str, Any]:
    """Read a TOML job file into a dict, without validating it.

    Raises JobSpecError when the file cannot be read, is not UTF-8 or is not valid TOML.
    """
    subject = f"invalid job file {_quote(str(path))}"
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        message = f"cannot read the file: {err.strerror or err}"
        raise JobSpecError([Problem("", message)], subject=subject) from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        message = f"not valid UTF-8 at byte {err.start}; TOML files must be UTF-8"
        raise JobSpecError([Problem("", message)], subject=subject) from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib's message ends with "(at line L, column C)".
        raise JobSpecError([Problem("", f"malformed TOML: {err}")], subject=subject) from err


def _error_subject(data: object) -> str:
    name = data.get("name") if isinstance(data, Mapping) else None
    if isinstance(name, str):
        return f"invalid job {_show(name)}"
    return "invalid job"


# ---------------------------------------------------------------------------
# Section validators. Each reports its problems and returns None if it added any.


def _parse_job_table(data: object, problems: _Problems) -> Job | None:
    table = _as_table(data, "", problems)
    if table is None:
        return None
    start = problems.count()
    _check_fields(table, _JOB_FIELDS, "", problems)

    name = _read_dns_label(table, "name", "", problems, default=None)
    job_type = _read_job_type(table, problems)
    count = _read_integer(table, "count", "", problems, default=DEFAULT_COUNT, minimum=0)

    task = None
    task_table = _read_table(table, "task", "", problems, required=True)
    if task_table is not None:
        task = _parse_task(task_table, problems)

    service = None
    service_table = _read_table(table, "service", "", problems, required=False)
    if service_table is not None:
        ports = task.ports if task is not None else _declared_ports(task_table)
        service = _parse_service(service_table, name, ports, problems)

    if problems.count() > start or task is None:
        return None
    return Job(name=name, type=job_type, count=count, task=task, service=service)


def _read_job_type(table: Mapping[str, Any], problems: _Problems) -> JobType:
    value = table.get("type")
    if value is None:
        return JobType.SERVICE
    accepted = [job_type.value for job_type in JobType]
    if not isinstance(value, str) or value not in accepted:
        problems.add("type", f"expected one of {', '.join(accepted)}, got {_show(value)}")
        return JobType.SERVICE
    return JobType(value)


def _parse_task(table: Mapping[str, Any], problems: _Problems) -> TaskSpec | None:
    start = problems.count()
    _check_fields(table, _TASK_FIELDS, "task", problems)

    command = _read_string(table, "command", "task", problems, required=True)
    args = _read_string_list(table, "args", "task", problems)
    workdir = _read_workdir(table, problems)
    kill_timeout = _read_duration(
        table, "kill_timeout", "task", problems, default=DEFAULT_KILL_TIMEOUT
    )
    ports = _read_ports(table, "task", problems)

    resources = Resources()
    resources_table = _read_table(table, "resources", "task", problems, required=False)
    if resources_table is not None:
        resources = _parse_resources(resources_table, problems)

    env: tuple[EnvVar, ...] = ()
    env_table = _read_table(table, "env", "task", problems, required=False)
    if env_table is not None:
        env = _parse_env(env_table, problems)

    if problems.count() > start:
        return None
    return TaskSpec(
        command=command,
        args=args,
        workdir=workdir,
        kill_timeout=kill_timeout,
        ports=ports,
        resources=resources,
        env=env,
    )


def _read_workdir(table: Mapping[str, Any], problems: _Problems) -> str | None:
    value = table.get("workdir")
    if value is None:
        return None
    workdir = _read_string(table, "workdir", "task", problems, required=True)
    if workdir and not PurePosixPath(workdir).is_absolute():
        problems.add(
            "task.workdir",
            f"expected an absolute path, got {_show(value)}; only the corral CLI "
            "resolves relative paths, before it submits the job",
        )
    return workdir


def _read_ports(table: Mapping[str, Any], path: str, problems: _Problems) -> tuple[str, ...]:
    ports = _read_string_list(table, "ports", path, problems)
    seen: set[str] = set()
    for index, port in enumerate(ports):
        field = f"{path}.ports[{index}]"
        if not _PORT_LABEL.fullmatch(port):
            problems.add(field, f"expected {_PORT_LABEL_RULE}, got {_show(port)}")
        elif port in seen:
            problems.add(field, f"duplicate port label {_show(port)}")
        seen.add(port)
    return ports


def _declared_ports(task_table: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """Return task.ports if that field alone is valid, else None (the port is unknown)."""
    if task_table is None:
        return None
    scratch = _Problems()
    ports = _read_ports(task_table, "task", scratch)
    return None if scratch.items else ports


def _parse_resources(table: Mapping[str, Any], problems: _Problems) -> Resources:
    path = "task.resources"
    _check_fields(table, _RESOURCES_FIELDS, path, problems)
    cpus = _read_cpus(table, path, problems)
    memory = _read_integer(table, "memory", path, problems, default=DEFAULT_MEMORY_MB, minimum=1)
    return Resources(cpus=cpus, memory=memory)


def _read_cpus(table: Mapping[str, Any], path: str, problems: _Problems) -> float:
    value = table.get("cpus")
    if value is None:
        return DEFAULT_CPUS
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        problems.add(f"{path}.cpus", f"expected a number greater than 0, got {_show(value)}")
        return DEFAULT_CPUS
    return float(value)


def _parse_env(table: Mapping[str, Any], problems: _Problems) -> tuple[EnvVar, ...]:
    """Validate task.env, returning its variables sorted by name."""
    variables = []
    for name, value in table.items():
        variable = _parse_env_var(name, value, problems)
        if variable is not None:
            variables.append(variable)
    return tuple(sorted(variables, key=lambda variable: variable.name))


def _parse_env_var(name: object, value: object, problems: _Problems) -> EnvVar | None:
    field = f"task.env.{name}"
    start = problems.count()
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        problems.add(
            field,
            f"invalid environment variable name {_show(name)}; expected letters, digits "
            "and '_', not starting with a digit",
        )
    literal = key = None
    if isinstance(value, str):
        _check_no_nul(value, field, problems)
        literal = value
    elif isinstance(value, Mapping):
        _check_fields(value, _ENV_VALUE_FIELDS, field, problems)
        key = _read_string(value, "key", field, problems, required=True)
    else:
        problems.add(
            field,
            'expected a string, or a table with a KV "key" such as '
            f'{{ key = "config/app/setting" }}, got {_show(value)}',
        )
    if problems.count() > start:
        return None
    return EnvVar(name=str(name), value=literal, key=key)


def _parse_service(
    table: Mapping[str, Any],
    job_name: str,
    task_ports: tuple[str, ...] | None,
    problems: _Problems,
) -> ServiceSpec | None:
    """Validate the service table. task_ports is None when task.ports itself is invalid."""
    start = problems.count()
    _check_fields(table, _SERVICE_FIELDS, "service", problems)

    name = _read_dns_label(table, "name", "service", problems, default=job_name)
    port = _read_service_port(table, task_ports, problems)
    tags = _read_tags(table, problems)

    check = None
    check_table = _read_table(table, "check", "service", problems, required=False)
    if check_table is not None:
        check = _parse_check(check_table, problems)

    if problems.count() > start:
        return None
    return ServiceSpec(name=name, port=port, tags=tags, check=check)


def _read_service_port(
    table: Mapping[str, Any], task_ports: tuple[str, ...] | None, problems: _Problems
) -> str:
    field = "service.port"
    if table.get("port") is None:
        return _default_service_port(task_ports, problems)

    port = _read_string(table, "port", "service", problems, required=True)
    if not port or task_ports is None:
        return port
    if not task_ports:
        problems.add(
            field,
            f"unknown port label {_show(port)}: task.ports is empty; "
            "add the label to task.ports",
        )
    elif port not in task_ports:
        problems.add(
            field,
            f"unknown port label {_show(port)}; expected one of task.ports: "
            f"{', '.join(task_ports)}",
        )
    return port


def _default_service_port(task_ports: tuple[str, ...] | None, problems: _Problems) -> str:
    field = "service.port"
    if task_ports is None:
        return ""
    if len(task_ports) == 1:
        return task_ports[0]
    if not task_ports:
        problems.add(
            field,
            'a service needs a port, but task.ports is empty; add a label such as "http" '
            "to task.ports",
        )
    else:
        problems.add(
            field,
            "missing required field, because task.ports has several labels; "
            f"expected one of {', '.join(task_ports)}",
        )
    return ""


def _read_tags(table: Mapping[str, Any], problems: _Problems) -> tuple[str, ...]:
    tags = _read_string_list(table, "tags", "service", problems)
    seen: set[str] = set()
    for index, tag in enumerate(tags):
        if tag in seen:
            problems.add(f"service.tags[{index}]", f"duplicate tag {_show(tag)}")
        seen.add(tag)
    return tags


def _parse_check(table: Mapping[str, Any], problems: _Problems) -> CheckSpec | None:
    path = "service.check"
    start = problems.count()
    _check_fields(table, _CHECK_FIELDS, path, problems)

    kind, http_path = _read_check_kind(table, problems)
    interval = _read_duration(table, "interval", path, problems, default=None)
    timeout = _read_duration(table, "timeout", path, problems, default=DEFAULT_CHECK_TIMEOUT)

    if problems.count() > start or kind is None:
        return None
    return CheckSpec(kind=kind, path=http_path, interval=interval, timeout=timeout)


def _read_check_kind(
    table: Mapping[str, Any], problems: _Problems
) -> tuple[CheckKind | None, str | None]:
    """Read http or tcp, whichever is set, as (kind, HTTP path)."""
    path = "service.check"
    http = table.get("http")
    tcp = table.get("tcp")
    if http is not None:
        _check_http_path(http, problems)
    if tcp is not None and tcp is not True:
        problems.add(f"{path}.tcp", f"expected true, got {_show(tcp)}")

    if http is not None and tcp is not None:
        problems.add(path, "expected exactly one of http and tcp, got both")
        return None, None
    if http is not None:
        return CheckKind.HTTP, http
    if tcp is not None:
        return CheckKind.TCP, None
    problems.add(
        path,
        'missing check type; set http = "/path" for an HTTP check or tcp = true for a '
        "TCP check",
    )
    return None, None


def _check_http_path(value: object, problems: _Problems) -> None:
    field = "service.check.http"
    valid = (
        isinstance(value, str)
        and value.startswith("/")
        and not any(char.isspace() or not char.isprintable() for char in value)
    )
    if not valid:
        problems.add(
            field,
            f'expected a URL path starting with "/" and without spaces, such as '
            f'"/healthz", got {_show(value)}',
        )


# ---------------------------------------------------------------------------
# Field readers. Each reports a problem for an invalid value and returns a placeholder
# in its place, which the section validator then discards.


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _as_table(value: object, field: str, problems: _Problems) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping):
        return value
    problems.add(field, f"expected a table (a JSON object), got {_show(value)}")
    return None


def _read_table(
    table: Mapping[str, Any], key: str, path: str, problems: _Problems, *, required: bool
) -> Mapping[str, Any] | None:
    value = table.get(key)
    if value is None:
        if required:
            problems.add(_join(path, key), "missing required table")
        return None
    return _as_table(value, _join(path, key), problems)


def _check_fields(
    table: Mapping[Any, Any], allowed: frozenset[str], path: str, problems: _Problems
) -> None:
    expected = ", ".join(sorted(allowed))
    for key in table:
        if key in allowed:
            continue
        message = f"unknown field; expected one of {expected}"
        close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
        if close:
            message += f' (did you mean "{close[0]}"?)'
        problems.add(_join(path, str(key)), message)


def _read_string(
    table: Mapping[str, Any], key: str, path: str, problems: _Problems, *, required: bool
) -> str:
    """Read a non-empty string. An absent optional one is returned as ""."""
    field = _join(path, key)
    value = table.get(key)
    if value is None:
        if required:
            problems.add(field, "missing required field; expected a non-empty string")
        return ""
    if not isinstance(value, str) or not value:
        problems.add(field, f"expected a non-empty string, got {_show(value)}")
        return ""
    _check_no_nul(value, field, problems)
    return value


def _read_string_list(
    table: Mapping[str, Any], key: str, path: str, problems: _Problems
) -> tuple[str, ...]:
    field = _join(path, key)
    value = table.get(key)
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        problems.add(field, f"expected a list of strings, got {_show(value)}")
        return ()
    items = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            _check_no_nul(item, f"{field}[{index}]", problems)
            items.append(item)
        else:
            problems.add(f"{field}[{index}]", f"expected a string, got {_show(item)}")
    return tuple(items)


def _check_no_nul(value: str, field: str, problems: _Problems) -> None:
    # The operating system cannot pass a NUL character in argv, env or a path.
    if "\x00" in value:
        problems.add(field, f"contains a NUL character: {_show(value)}")


def _read_integer(
    table: Mapping[str, Any],
    key: str,
    path: str,
    problems: _Problems,
    *,
    default: int,
    minimum: int,
) -> int:
    value = table.get(key)
    if value is None:
        return default
    if not _is_integer(value) or value < minimum:
        problems.add(
            _join(path, key), f"expected an integer of {minimum} or more, got {_show(value)}"
        )
        return default
    if value > MAX_INTEGER:
        problems.add(
            _join(path, key), f"expected an integer of at most {MAX_INTEGER}, got {_show(value)}"
        )
        return default
    return int(value)


def _read_duration(
    table: Mapping[str, Any],
    key: str,
    path: str,
    problems: _Problems,
    *,
    default: float | None,
) -> float:
    """Read a duration greater than 0. default=None makes the field required."""
    field = _join(path, key)
    value = table.get(key)
    if value is None:
        if default is None:
            problems.add(field, 'missing required field; expected a duration such as "10s"')
            return 0.0
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        problems.add(
            field,
            f'expected a duration such as "10s" or a number of seconds, got {_show(value)}',
        )
        return 0.0
    try:
        seconds = parse_duration(value)
    except ValueError as err:
        problems.add(field, str(err))
        return 0.0
    if seconds <= 0:
        problems.add(field, f"expected a duration greater than 0, got {_show(value)}")
    return seconds


def _read_dns_label(
    table: Mapping[str, Any], key: str, path: str, problems: _Problems, *, default: str | None
) -> str:
    """Read a DNS label. default=None makes the field required."""
    field = _join(path, key)
    value = table.get(key)
    if value is None:
        if default is None:
            problems.add(field, f"missing required field; expected {_DNS_LABEL_RULE}")
            return ""
        return default
    if isinstance(value, str) and _DNS_LABEL.fullmatch(value):
        return value
    if isinstance(value, str) and _DNS_LABEL.fullmatch(value.lower()):
        message = (
            f"expected a lowercase name, got {_show(value)}; "
            f"use {_show(value.lower())}"
        )
    else:
        message = f"expected {_DNS_LABEL_RULE}, got {_show(value)}"
    problems.add(field, message)
    return ""


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: object) -> str:
    """Render a received value for a message: JSON where possible, truncated."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > _SHOW_LIMIT:
        text = text[: _SHOW_LIMIT - 3] + "..."
    return text


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
