"""`corral dev`: run a server and an agent in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path

import click

from corral.agent.registry import RegistryConfig
from corral.agent.resources import DEFAULT_PORT_RANGE, parse_port_range
from corral.client import parse_address
from corral.dns.config import DNSConfig, parse_recursor, parse_service_ttl, parse_ttl
from corral.duration import parse_duration
from corral.dev import DevCluster, DevConfig, ListenError, default_data_dir

log = logging.getLogger("corral.dev")


def _address(flag: str):
    def convert(ctx, param, value: str) -> tuple[str, int]:
        try:
            return parse_address(value, flag)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return convert


def _parsed(parse):
    """Return a click callback that applies `parse` to a value, or to each value of a repeated flag."""

    def convert(ctx, param, value):
        try:
            if isinstance(value, tuple):
                return tuple(parse(item) for item in value)
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return convert


def _positive_seconds(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: expected more than 0, such as 2s")
    return seconds


def _port_range(ctx, param, value: str) -> tuple[int, int]:
    try:
        return parse_port_range(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the SQLite store and task sandboxes [default: the user's data folder, corral/dev].",
)
@click.option("--http-addr", default="127.0.0.1:8500", show_default=True,
              callback=_address("--http-addr"), help="HOST:PORT the HTTP API listens on.")
@click.option("--dns-addr", default="127.0.0.1:8600", show_default=True,
              callback=_address("--dns-addr"), help="HOST:PORT the DNS server listens on, UDP and TCP.")
@click.option("--node", default=None, help="Name of this node [default: the host name].")
@click.option("--datacenter", default="dc1", show_default=True, help="Name of the datacenter.")
@click.option("--port-range", default=f"{DEFAULT_PORT_RANGE[0]}-{DEFAULT_PORT_RANGE[1]}", show_default=True,
              callback=_port_range, help="Dynamic port range for tasks, START-END inclusive.")
@click.option("--cpus", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPUs the agent offers [default: the number of logical CPUs].")
@click.option("--memory", type=click.IntRange(min=1), default=None,
              help="Memory in MB the agent offers [default: the machine's total memory].")
@click.option("--kv-max-value-size", type=click.IntRange(min=1), default=512 * 1024, show_default=True,
              help="Largest KV value a PUT may store, in bytes; larger ones are rejected with 413.")
@click.option("--dns-node-ttl", default="0s", show_default=True, callback=_parsed(parse_ttl),
              help="TTL of DNS answers for node and .addr lookups, a duration such as 10s.")
@click.option("--dns-service-ttl", "dns_service_ttls", multiple=True, callback=_parsed(parse_service_ttl),
              metavar="[NAME=]DURATION",
              help="TTL of DNS answers for a service, such as web=30s; NAME may end in * to match a "
                   "prefix, and a duration alone applies to every service. Repeatable. [default: 0s]")
@click.option("--dns-only-passing", is_flag=True, default=False,
              help="Leave instances with a warning check out of DNS answers too, not only critical ones.")
@click.option("--dns-enable-truncate", is_flag=True, default=False,
              help="Set the TC bit on UDP answers that had records dropped to fit, so that clients "
                   "retry over TCP.")
@click.option("--dns-recursor", "dns_recursors", multiple=True, callback=_parsed(parse_recursor),
              metavar="IP[:PORT]",
              help="Upstream DNS server that names outside the consul and corral domains are forwarded "
                   "to; repeatable, tried in order. Without one, such names are refused.")
@click.option("--dns-recursor-timeout", default="2s", show_default=True, callback=_parsed(_positive_seconds),
              help="How long to wait for each recursor before trying the next one, a duration.")
@click.option("--dns-cache-mb", type=click.IntRange(min=0), default=32, show_default=True,
              help="Memory in MiB for encoded DNS answers, kept until the catalog changes; 0 turns "
                   "the cache off.")
@click.option("--enable-script-checks", is_flag=True, default=False,
              help="Allow script checks (commands the agent runs) registered through the HTTP API. "
                   "Anyone who can reach the API can then run commands as this process; "
                   "off by default.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Lowest level of log lines to print.")
def dev(data_dir, http_addr, dns_addr, node, datacenter, port_range, cpus, memory, kv_max_value_size, dns_node_ttl,
        dns_service_ttls, dns_only_passing, dns_enable_truncate, dns_recursors, dns_recursor_timeout, dns_cache_mb,
        enable_script_checks, log_level) -> None:
    """Run a server and an agent in one process, with the embedded store.

    Tasks started by this process are stopped when it exits (Ctrl-C or SIGTERM).
    """
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
    )
    data_dir = (data_dir or default_data_dir()).absolute()
    config = DevConfig(
        data_dir=data_dir,
        http_host=http_addr[0],
        http_port=http_addr[1],
        dns_host=dns_addr[0],
        dns_port=dns_addr[1],
        node=node or socket.gethostname(),
        datacenter=datacenter,
        port_range=port_range,
        cpus=cpus,
        memory=memory,
        kv_max_value_size=kv_max_value_size,
        registry=RegistryConfig(enable_script_checks=enable_script_checks),
        dns=DNSConfig(
            node_ttl=dns_node_ttl,
            service_ttl=dict(dns_service_ttls),
            only_passing=dns_only_passing,
            enable_truncate=dns_enable_truncate,
            recursors=dns_recursors,
            recursor_timeout=dns_recursor_timeout,
            cache_max_bytes=dns_cache_mb * 1024 * 1024,
        ),
    )
    click.echo(f"==> corral dev: data folder {data_dir}", err=True)
    if enable_script_checks:
        log.warning("script checks are enabled for the HTTP API: any client of %s:%d can run commands",
                    *http_addr)
    try:
        _run(_serve(config))
    except ListenError as exc:
        raise click.ClickException(str(exc)) from None


def _run(coroutine) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coroutine)


async def _serve(config: DevConfig) -> None:
    cluster = DevCluster(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _on_signal, signum, stop)
    try:
        await cluster.start()
        click.echo(
            f"==> corral dev is running: HTTP http://{config.http_host}:{config.http_port}, "
            f"DNS {config.dns_host}:{config.dns_port}. Press Ctrl-C to stop.",
            err=True,
        )
        await stop.wait()
    finally:
        await cluster.stop()


def _on_signal(signum: int, stop: asyncio.Event) -> None:
    if stop.is_set():
        log.warning("signal %s received again; still stopping tasks", signal.Signals(signum).name)
        return
    log.info("signal %s received; stopping", signal.Signals(signum).name)
    stop.set()
