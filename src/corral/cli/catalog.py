"""`corral catalog` and `corral members`: register services with the agent and list the catalog."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from corral.cli.common import http_addr_option
from corral.client import Check, Client, parse_address
from corral.duration import format_duration, parse_duration

# Serf's member statuses, as `consul members` prints them.
MEMBER_STATUSES = {0: "none", 1: "alive", 2: "leaving", 3: "left", 4: "failed"}

json_option = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead of a table.")


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _print_table(columns: tuple[str, ...], rows: list[list[str]]) -> None:
    table = Table(box=None, pad_edge=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(width=200, soft_wrap=True).print(table)


def _service_address(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    try:
        host, port = parse_address(value, "ADDR:PORT")
    except ValueError:
        raise click.BadParameter(f"invalid address {value!r}: expected HOST:PORT, such as 127.0.0.1:8080") from None
    if not 1 <= port <= 65535:
        raise click.BadParameter(f"invalid port {port} in {value!r}: expected 1 to 65535")
    return host, port


def _check_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    scheme, separator, rest = value.partition("://")
    if scheme not in ("http", "https") or not separator or not rest.split("/")[0]:
        raise click.BadParameter(f"invalid URL {value!r}: expected an http:// or https:// URL with a host")
    return value


def _interval(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise click.BadParameter(f"invalid duration {value!r}: expected more than 0, such as 10s")
    return seconds


@click.group()
def catalog() -> None:
    """Register services with the agent and list the catalog's services and nodes."""


@catalog.command()
@click.argument("name")
@click.argument("address", metavar="ADDR:PORT", callback=_service_address)
@click.option("--id", "service_id", default=None,
              help="Service ID [default: NAME, as in Consul]. Registering an ID again replaces that instance.")
@click.option("--tag", "tags", multiple=True, help="A tag of the service; repeatable.")
@click.option("--check-http", metavar="URL", callback=_check_url,
              help="URL that the agent GETs to check the service: 2xx is passing, 429 warning, "
                   "anything else critical.")
@click.option("--check-interval", default="10s", show_default=True, callback=_interval,
              help="Time between two runs of the check, a duration such as 10s.")
@json_option
@http_addr_option
def register(client: Client, name: str, address: tuple[str, int], service_id: str | None, tags: tuple[str, ...],
             check_http: str | None, check_interval: float, as_json: bool) -> None:
    """Register service NAME at ADDR:PORT with the agent, which runs its check.

    The agent keeps the service in the catalog until `corral catalog
    deregister ID`.
    """
    ctx = click.get_current_context()
    if check_http is None and ctx.get_parameter_source("check_interval") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--check-interval needs a check: add --check-http URL")
    host, port = address
    check = Check.http(check_http, interval=check_interval) if check_http else None
    registered = client.register_service(name, service_id=service_id, address=host, port=port, tags=tags,
                                         check=check)
    if as_json:
        _print_json({"ID": registered, "Name": name, "Address": host, "Port": port, "Tags": list(tags)})
        return
    line = f"Registered service {name!r} with ID {registered!r} at {host}:{port}"
    if check_http:
        line += f", checked with GET {check_http} every {format_duration(check_interval)}"
    click.echo(line)


@catalog.command()
@click.argument("service_id", metavar="ID")
@http_addr_option
def deregister(client: Client, service_id: str) -> None:
    """Deregister the service with ID from the agent, and so from the catalog."""
    client.deregister_service(service_id)
    click.echo(f"Deregistered service {service_id!r}")


@catalog.command()
@json_option
@http_addr_option
def services(client: Client, as_json: bool) -> None:
    """List the services in the catalog with their tags."""
    data = client.catalog_services()
    if as_json:
        _print_json(data)
        return
    rows = [[name, ",".join(sorted(tags)) or "-"] for name, tags in sorted(data.items())]
    _print_table(("SERVICE", "TAGS"), rows)


@catalog.command()
@json_option
@http_addr_option
def nodes(client: Client, as_json: bool) -> None:
    """List the nodes in the catalog."""
    data = client.catalog_nodes()
    if as_json:
        _print_json(data)
        return
    rows = [[node["Node"], node["ID"][:8], node["Address"], node["Datacenter"]] for node in data]
    _print_table(("NODE", "ID", "ADDRESS", "DC"), rows)


@click.command()
@json_option
@http_addr_option
def members(client: Client, as_json: bool) -> None:
    """List the members known to the agent, as `consul members` does."""
    data = client.members()
    if as_json:
        _print_json(data)
        return
    rows = []
    for member in data:
        tags = member.get("Tags") or {}
        rows.append([
            member["Name"],
            f"{member['Addr']}:{member['Port']}",
            MEMBER_STATUSES.get(member.get("Status"), str(member.get("Status"))),
            "server" if tags.get("role") == "consul" else "client",
            tags.get("build", "-"),
            tags.get("dc", "-"),
        ])
    _print_table(("NODE", "ADDRESS", "STATUS", "TYPE", "BUILD", "DC"), rows)
