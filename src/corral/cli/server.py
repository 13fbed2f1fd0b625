"""`corral server`: run the control plane in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path

import click

from corral.cli.dev import _address, _on_signal, _parsed, _positive_seconds, _run
from corral.dev import ListenError, default_data_dir
from corral.dns.config import DNSConfig
from corral.agent.resources import role_name_problem
from corral.master.agents import DEFAULT_AGENT_TIMEOUT
from corral.master.allocator import Quota
from corral.master.master import (
    DEFAULT_ALLOCATION_INTERVAL,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_OFFER_TIMEOUT,
    MasterConfig,
)
from corral.server import Server, ServerConfig

log = logging.getLogger("corral.server")


def _offer_timeout(text: str) -> float | None:
    if text.strip().lower() == "off":
        return None
    return _positive_seconds(text)


def _role_weight(text: str) -> tuple[str, float]:
    role, separator, weight = text.partition("=")
    try:
        value = float(weight)
    except ValueError:
        value = 0.0
    if not separator or not role or not value > 0:
        raise ValueError(f"invalid role weight {text!r}: expected ROLE=WEIGHT with a weight above 0, such as web=2")
    return role, value


def _role_quota(text: str) -> tuple[str, Quota]:
    """Parse ROLE=cpus:2;mem:1024;disk:5000 into a role and its quota limits (mem and disk in MB)."""
    role, separator, limits = text.partition("=")
    role = role.strip()
    if not separator or not role or not limits.strip():
        raise ValueError(f"invalid role quota {text!r}: expected ROLE=LIMITS, such as analytics=cpus:2;mem:1024")
    problem = role_name_problem(role)
    if problem is not None:
        raise ValueError(f"invalid role quota {text!r}: role {role!r} {problem}")
    values: dict[str, float] = {}
    for part in filter(None, (item.strip() for item in limits.split(";"))):
        kind, colon, amount = (piece.strip() for piece in part.partition(":"))
        if kind not in ("cpus", "mem", "disk") or not colon:
            raise ValueError(f"invalid role quota {text!r}: part {part!r} is not cpus:N, mem:MB or disk:MB")
        if kind in values:
            raise ValueError(f"invalid role quota {text!r}: {kind} is given twice")
        try:
            number = float(amount)
        except ValueError:
            number = -1.0
        if not 0 <= number < float("inf"):
            raise ValueError(f"invalid role quota {text!r}: {kind} must be a number of 0 or more, got {amount!r}")
        values[kind] = number
    return role, Quota(cpus=values.get("cpus"), mem=values.get("mem"), disk=values.get("disk"))


def default_server_data_dir() -> Path:
    """Return $XDG_DATA_HOME/corral/server, or ~/.local/share/corral/server."""
    return default_data_dir().parent / "server"


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the SQLite store [default: the user's data folder, corral/server].")
@click.option("--http-addr", default="127.0.0.1:8500", show_default=True,
              callback=_address("--http-addr"), help="HOST:PORT the HTTP API listens on.")
@click.option("--dns-addr", default="127.0.0.1:8600", show_default=True,
              callback=_address("--dns-addr"), help="HOST:PORT the DNS server listens on, UDP and TCP.")
@click.option("--node", default=None, help="Name of this server [default: the host name].")
@click.option("--datacenter", default="dc1", show_default=True, help="Name of the datacenter.")
@click.option("--agent-timeout", default=f"{DEFAULT_AGENT_TIMEOUT:g}s", show_default=True,
              callback=_parsed(_positive_seconds),
              help="Duration without a heartbeat after which an agent is declared failed and its tasks "
                   "are replaced elsewhere, such as 10s.")
@click.option("--allocation-interval", default=f"{DEFAULT_ALLOCATION_INTERVAL:g}s", show_default=True,
              callback=_parsed(_positive_seconds),
              help="Duration between allocation cycles of the offer cycle, such as 1s.")
@click.option("--offer-timeout", default=f"{DEFAULT_OFFER_TIMEOUT:g}s", show_default=True,
              callback=_parsed(_offer_timeout),
              help="Duration after which an unanswered offer is rescinded, or 'off' to keep offers.")
@click.option("--role-weight", "role_weights", multiple=True, callback=_parsed(_role_weight),
              help="Weight of a role in the DRF order, as ROLE=WEIGHT; repeat for several roles.")
@click.option("--role-quota", "role_quotas", multiple=True, callback=_parsed(_role_quota),
              metavar="ROLE=LIMITS",
              help="Quota of a role: the most cpus, mem and disk (MB) that its frameworks may be offered "
                   "and use together, static reservations for the role included, such as "
                   "'analytics=cpus:2;mem:1024'. Kinds left out are unlimited; repeat for several roles.")
@click.option("--heartbeat-interval", default=f"{DEFAULT_HEARTBEAT_INTERVAL:g}s", hidden=True,
              callback=_parsed(_positive_seconds),
              help="Duration between HEARTBEAT events on a scheduler API stream, such as 15s.")
@click.option("--kv-max-value-size", type=click.IntRange(min=1), default=512 * 1024, show_default=True,
              help="Largest KV value a PUT may store, in bytes; larger ones are rejected with 413.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Lowest level of log lines to print.")
def server(
    data_dir, http_addr, dns_addr, node, datacenter, agent_timeout, allocation_interval, offer_timeout,
    role_weights, role_quotas, heartbeat_interval, kv_max_value_size, log_level,
) -> None:
    """Run a server: store, HTTP API, DNS, job scheduler and agent failure detection.

    Agents join it with `corral agent --join HOST:PORT`. Stopping the server
    leaves agents and their tasks running.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)-5s %(name)s: %(message)s")
    data_dir = (data_dir or default_server_data_dir()).absolute()
    config = ServerConfig(
        data_dir=data_dir,
        http_host=http_addr[0],
        http_port=http_addr[1],
        dns_host=dns_addr[0],
        dns_port=dns_addr[1],
        node=node or socket.gethostname(),
        datacenter=datacenter,
        kv_max_value_size=kv_max_value_size,
        agent_timeout=agent_timeout,
        dns=DNSConfig(),
        master=MasterConfig(
            allocation_interval=allocation_interval, offer_timeout=offer_timeout, role_weights=dict(role_weights),
            role_quotas=dict(role_quotas), heartbeat_interval=heartbeat_interval,
        ),
    )
    click.echo(f"==> corral server: data folder {data_dir}", err=True)
    try:
        _run(_serve(config))
    except ListenError as exc:
        raise click.ClickException(str(exc)) from None


async def _serve(config: ServerConfig) -> None:
    instance = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _on_signal, signum, stop)
    try:
        await instance.start()
        click.echo(
            f"==> corral server is running: HTTP http://{config.http_host}:{config.http_port}, "
            f"DNS {config.dns_host}:{config.dns_port}. Press Ctrl-C to stop.",
            err=True,
        )
        await stop.wait()
    finally:
        await instance.stop()
