"""Options and error handling shared by the commands.

Client commands share --http-addr and the handling of API errors
(http_addr_option). `corral server` and `corral dev` share their listen
addresses, KV, DNS, master and log flags (server_options) and how they run
in the foreground until a signal (run_server).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from corral.agent.resources import role_name_problem
from corral.client import DEFAULT_HTTP_ADDR, HTTP_ADDR_ENV, Client, CorralError, parse_address
from corral.dns.config import DNSConfig, parse_recursor, parse_service_ttl, parse_ttl
from corral.duration import parse_duration
from corral.master.allocator import Quota
from corral.master.master import (
    DEFAULT_ALLOCATION_INTERVAL,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_OFFER_TIMEOUT,
    MasterConfig,
)
from corral.server import ListenError, Server

LOG_LEVELS = ["debug", "info", "warning", "error"]


def http_addr_option(command):
    """Add --http-addr (from CORRAL_HTTP_ADDR) and pass a Client as `client`."""

    @click.option(
        "--http-addr",
        envvar=HTTP_ADDR_ENV,
        default=DEFAULT_HTTP_ADDR,
        show_default=True,
        help=f"HOST:PORT of the corral HTTP API; also read from {HTTP_ADDR_ENV}.",
    )
    @functools.wraps(command)
    def wrapper(http_addr: str, **kwargs):
        try:
            client = Client(http_addr)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--http-addr") from None
        try:
            return command(client=client, **kwargs)
        except CorralError as exc:
            message = str(exc)
            if exc.unreachable:
                message += f"; is `corral dev` running? Set {HTTP_ADDR_ENV} or --http-addr to its HTTP address"
            raise click.ClickException(message) from None

    return wrapper


# Parsing of flag values


def address_option(flag: str):
    """Return a click callback that parses HOST:PORT into a (host, port) tuple, naming `flag` in errors."""

    def convert(ctx, param, value: str) -> tuple[str, int]:
        try:
            return parse_address(value, flag)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return convert


def parsed_option(parse):
    """Return a click callback that applies `parse` to a value, or to each value of a repeated flag."""

    def convert(ctx, param, value):
        try:
            if isinstance(value, tuple):
                return tuple(parse(item) for item in value)
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return convert


def positive_seconds(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: expected more than 0, such as 2s")
    return seconds


def offer_timeout(text: str) -> float | None:
    if text.strip().lower() == "off":
        return None
    return positive_seconds(text)


def role_weight(text: str) -> tuple[str, float]:
    role, separator, weight = text.partition("=")
    try:
        value = float(weight)
    except ValueError:
        value = 0.0
    if not separator or not role or not value > 0:
        raise ValueError(f"invalid role weight {text!r}: expected ROLE=WEIGHT with a weight above 0, such as web=2")
    return role, value


def role_quota(text: str) -> tuple[str, Quota]:
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


# The flags of `corral server` and `corral dev`


@dataclass
class ServerOptions:
    """The values of the flags that `corral server` and `corral dev` share."""

    data_dir: Path | None
    http_addr: tuple[str, int]
    dns_addr: tuple[str, int]
    node: str | None
    datacenter: str
    kv_max_value_size: int
    dns: DNSConfig
    master: MasterConfig

    def config_fields(self, default_data_dir: Path) -> dict[str, Any]:
        """Return the ServerConfig fields these flags set, with the data folder made absolute."""
        return {
            "data_dir": (self.data_dir or default_data_dir).absolute(),
            "http_host": self.http_addr[0],
            "http_port": self.http_addr[1],
            "dns_host": self.dns_addr[0],
            "dns_port": self.dns_addr[1],
            "node": self.node or socket.gethostname(),
            "datacenter": self.datacenter,
            "kv_max_value_size": self.kv_max_value_size,
            "dns": self.dns,
            "master": self.master,
        }


def _address_params(data_dir_help: str, node_help: str) -> list[click.Parameter]:
    return [
        click.Option(["--data-dir"], type=click.Path(file_okay=False, path_type=Path), default=None,
                     help=data_dir_help),
        click.Option(["--http-addr"], default="127.0.0.1:8500", show_default=True,
                     callback=address_option("--http-addr"), help="HOST:PORT the HTTP API listens on."),
        click.Option(["--dns-addr"], default="127.0.0.1:8600", show_default=True,
                     callback=address_option("--dns-addr"),
                     help="HOST:PORT the DNS server listens on, UDP and TCP."),
        click.Option(["--node"], default=None, help=node_help),
        click.Option(["--datacenter"], default="dc1", show_default=True, help="Name of the datacenter."),
    ]


def _tuning_params() -> list[click.Parameter]:
    return [
        click.Option(["--kv-max-value-size"], type=click.IntRange(min=1), default=512 * 1024, show_default=True,
                     help="Largest KV value a PUT may store, in bytes; larger ones are rejected with 413."),
        # DNS
        click.Option(["--dns-node-ttl"], default="0s", show_default=True, callback=parsed_option(parse_ttl),
                     help="TTL of DNS answers for node and .addr lookups, a duration such as 10s."),
        click.Option(["--dns-service-ttl", "dns_service_ttls"], multiple=True,
                     callback=parsed_option(parse_service_ttl), metavar="[NAME=]DURATION",
                     help="TTL of DNS answers for a service, such as web=30s; NAME may end in * to match a "
                          "prefix, and a duration alone applies to every service. Repeatable. [default: 0s]"),
        click.Option(["--dns-only-passing"], is_flag=True, default=False,
                     help="Leave instances with a warning check out of DNS answers too, not only critical ones."),
        click.Option(["--dns-enable-truncate"], is_flag=True, default=False,
                     help="Set the TC bit on UDP answers that had records dropped to fit, so that clients "
                          "retry over TCP."),
        click.Option(["--dns-recursor", "dns_recursors"], multiple=True, callback=parsed_option(parse_recursor),
                     metavar="IP[:PORT]",
                     help="Upstream DNS server that names outside the consul and corral domains are forwarded "
                          "to; repeatable, tried in order. Without one, such names are refused."),
        click.Option(["--dns-recursor-timeout"], default="2s", show_default=True,
                     callback=parsed_option(positive_seconds),
                     help="How long to wait for each recursor before trying the next one, a duration."),
        click.Option(["--dns-cache-mb"], type=click.IntRange(min=0), default=32, show_default=True,
                     help="Memory in MiB for encoded DNS answers, kept until the catalog changes; 0 turns "
                          "the cache off."),
        # The master's offer cycle
        click.Option(["--allocation-interval"], default=f"{DEFAULT_ALLOCATION_INTERVAL:g}s", show_default=True,
                     callback=parsed_option(positive_seconds),
                     help="Duration between allocation cycles of the offer cycle, such as 1s."),
        click.Option(["--offer-timeout"], default=f"{DEFAULT_OFFER_TIMEOUT:g}s", show_default=True,
                     callback=parsed_option(offer_timeout),
                     help="Duration after which an unanswered offer is rescinded, or 'off' to keep offers."),
        click.Option(["--role-weight", "role_weights"], multiple=True, callback=parsed_option(role_weight),
                     help="Weight of a role in the DRF order, as ROLE=WEIGHT; repeat for several roles."),
        click.Option(["--role-quota", "role_quotas"], multiple=True, callback=parsed_option(role_quota),
                     metavar="ROLE=LIMITS",
                     help="Quota of a role: the most cpus, mem and disk (MB) that its frameworks may be offered "
                          "and use together, static reservations for the role included, such as "
                          "'analytics=cpus:2;mem:1024'. Kinds left out are unlimited; repeat for several roles."),
        click.Option(["--heartbeat-interval"], default=f"{DEFAULT_HEARTBEAT_INTERVAL:g}s", hidden=True,
                     callback=parsed_option(positive_seconds),
                     help="Duration between HEARTBEAT events on a scheduler API stream, such as 15s."),
        click.Option(["--log-level"], type=click.Choice(LOG_LEVELS), default="info", show_default=True,
                     help="Lowest level of log lines to print."),
    ]


def server_options(*, data_dir_help: str, node_help: str):
    """Add the flags that `corral server` and `corral dev` share to a click command.

    Apply it above @click.command(). The listen addresses, --node and
    --datacenter come before the command's own flags in --help, the KV, DNS,
    master and log flags after them. The callback gets their values as one
    ServerOptions argument, `options`, with logging already configured from
    --log-level.
    """

    def decorate(command: click.Command) -> click.Command:
        command.params = [*_address_params(data_dir_help, node_help), *command.params, *_tuning_params()]
        callback = command.callback

        @functools.wraps(callback)
        def wrapper(**values):
            logging.basicConfig(
                level=values.pop("log_level").upper(),
                format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
            )
            options = ServerOptions(
                data_dir=values.pop("data_dir"),
                http_addr=values.pop("http_addr"),
                dns_addr=values.pop("dns_addr"),
                node=values.pop("node"),
                datacenter=values.pop("datacenter"),
                kv_max_value_size=values.pop("kv_max_value_size"),
                dns=DNSConfig(
                    node_ttl=values.pop("dns_node_ttl"),
                    service_ttl=dict(values.pop("dns_service_ttls")),
                    only_passing=values.pop("dns_only_passing"),
                    enable_truncate=values.pop("dns_enable_truncate"),
                    recursors=values.pop("dns_recursors"),
                    recursor_timeout=values.pop("dns_recursor_timeout"),
                    cache_max_bytes=values.pop("dns_cache_mb") * 1024 * 1024,
                ),
                master=MasterConfig(
                    allocation_interval=values.pop("allocation_interval"),
                    offer_timeout=values.pop("offer_timeout"),
                    role_weights=dict(values.pop("role_weights")),
                    role_quotas=dict(values.pop("role_quotas")),
                    heartbeat_interval=values.pop("heartbeat_interval"),
                ),
            )
            return callback(options=options, **values)

        command.callback = wrapper
        return command

    return decorate


# Running `corral server` and `corral dev`


def run_event_loop(coroutine) -> None:
    """Run `coroutine` to its end on a uvloop event loop, or on asyncio's own when uvloop is missing."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coroutine)


def run_server(build: Callable[[], Server]) -> None:
    """Build a Server (or DevCluster) in a new event loop and run it until SIGINT or SIGTERM.

    A listen address that cannot be bound ends the command with the ListenError's message.
    """
    try:
        run_event_loop(_serve(build))
    except ListenError as exc:
        raise click.ClickException(str(exc)) from None


async def _serve(build: Callable[[], Server]) -> None:
    instance = build()
    config = instance.config
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum, stop, instance.log)
    try:
        await instance.start()
        click.echo(
            f"==> {instance.name} is running: HTTP http://{config.http_host}:{config.http_port}, "
            f"DNS {config.dns_host}:{config.dns_port}. Press Ctrl-C to stop.",
            err=True,
        )
        await stop.wait()
    finally:
        await instance.stop()


def on_signal(signum: int, stop: asyncio.Event, log: logging.Logger) -> None:
    """Set `stop` on the first SIGINT or SIGTERM, and only log a repeated one."""
    if stop.is_set():
        log.warning("signal %s received again; still stopping tasks", signal.Signals(signum).name)
        return
    log.info("signal %s received; stopping", signal.Signals(signum).name)
    stop.set()
