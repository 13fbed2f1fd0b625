"""`corral agent`: run an agent joined to a server, and `corral agent leave` to remove it gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import click

from corral.agent.registry import RegistryConfig
from corral.agent.resources import DEFAULT_PORT_RANGE, ResourceSpec, parse_attributes, parse_resources
from corral.agent_process import AgentProcess, AgentProcessConfig
from corral.cli.dev import _address, _parsed, _port_range, _run
from corral.client import parse_address
from corral.dev import ListenError, default_data_dir

log = logging.getLogger("corral.agent")


@click.group(invoke_without_command=True)
@click.option("--join", default=None, metavar="HOST:PORT",
              help="HTTP address of the server to join. Required to run an agent.")
@click.option("--node", default=None, help="Name of this agent's node [default: the host name].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for task sandboxes and the agent's registry [default: the user's data folder, "
                   "corral/agent-NODE].")
@click.option("--http-addr", default="127.0.0.1:8500", show_default=True, callback=_address("--http-addr"),
              help="HOST:PORT where the agent serves /v1/agent/* and forwards every other path to the server.")
@click.option("--datacenter", default="dc1", show_default=True, help="Name of the datacenter.")
@click.option("--port-range", default=f"{DEFAULT_PORT_RANGE[0]}-{DEFAULT_PORT_RANGE[1]}", show_default=True,
              callback=_port_range,
              help="Dynamic port range for tasks, START-END inclusive; ports in --resources replace it.")
@click.option("--resources", default=None, callback=_parsed(lambda text: parse_resources(text) if text else None),
              metavar="SPEC",
              help="Resources to offer in Mesos's syntax, such as 'cpus:4;mem:8192;disk:10000;ports:[31000-32000]' "
                   "(mem and disk in MB); resources left out are detected. NAME(ROLE):VALUE reserves resources "
                   "statically for a role, offered only to that role's frameworks, such as "
                   "'cpus:4;cpus(analytics):2;mem:8192;mem(analytics):1024'.")
@click.option("--attributes", default=None, callback=_parsed(lambda text: parse_attributes(text) if text else None),
              metavar="SPEC", help="Attributes of this agent in Mesos's syntax, such as 'rack:r1;zone:a'; "
                                   "stored as the catalog node's metadata.")
@click.option("--enable-script-checks", is_flag=True, default=False,
              help="Allow script checks registered through this agent's HTTP API; off by default.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Lowest level of log lines to print.")
@click.pass_context
def agent(ctx, join, node, data_dir, http_addr, datacenter, port_range, resources, attributes,
          enable_script_checks, log_level) -> None:
    """Run an agent that joins the server at --join and runs the tasks placed on it.

    Stopping it (Ctrl-C or SIGTERM) leaves its tasks running. Unless it comes
    back within the server's --agent-timeout, the server declares the agent
    failed and replaces its tasks. To remove an agent with its tasks,
    run `corral agent leave`.
    """
    if ctx.invoked_subcommand is not None:
        return
    if join is None:
        raise click.UsageError("missing option --join HOST:PORT: the HTTP address of the server to join")
    try:
        parse_address(join, "--join")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--join") from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)-5s %(name)s: %(message)s")
    node = node or socket.gethostname()
    data_dir = (data_dir or default_data_dir().parent / f"agent-{node}").absolute()
    config = AgentProcessConfig(
        join=join.removeprefix("http://"),
        node=node,
        data_dir=data_dir,
        http_host=http_addr[0],
        http_port=http_addr[1],
        datacenter=datacenter,
        port_range=port_range,
        resources=resources or ResourceSpec(),
        attributes=attributes or {},
        registry=RegistryConfig(enable_script_checks=enable_script_checks),
    )
    click.echo(f"==> corral agent {node}: data folder {data_dir}, server {config.join}", err=True)
    try:
        _run(_serve(config))
    except ListenError as exc:
        raise click.ClickException(str(exc)) from None


async def _serve(config: AgentProcessConfig) -> None:
    process = AgentProcess(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _on_signal, signum, stop)
    try:
        await process.start()
    except BaseException:
        await process.stop()
        raise
    click.echo(f"==> corral agent {config.node} is running: HTTP http://{config.http_host}:{config.http_port}",
               err=True)
    stop_wait = asyncio.ensure_future(stop.wait())
    leave_wait = asyncio.ensure_future(process.leave_requested.wait())
    await asyncio.wait([stop_wait, leave_wait], return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    leave_wait.cancel()
    if process.leave_requested.is_set():
        await process.leave()
    else:
        await process.stop()


def _on_signal(signum: int, stop: asyncio.Event) -> None:
    if stop.is_set():
        log.warning("signal %s received again; still stopping", signal.Signals(signum).name)
        return
    log.info("signal %s received; stopping the agent and leaving its tasks running", signal.Signals(signum).name)
    stop.set()


@agent.command()
@click.option("--http-addr", "agent_addr", default="127.0.0.1:8500", show_default=True,
              callback=_address("--http-addr"), help="HOST:PORT of the agent's HTTP address.")
@click.option("--timeout", type=click.FloatRange(min=1), default=120, show_default=True,
              help="Seconds to wait for the agent to stop its tasks and deregister.")
def leave(agent_addr, timeout) -> None:
    """Make the agent at --http-addr leave: stop its tasks, deregister its node and exit."""
    host, port = agent_addr
    request = urllib.request.Request(f"http://{host}:{port}/v1/agent/leave", method="PUT", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"agent at {host}:{port} rejected the leave: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"cannot reach the agent at {host}:{port}: {reason}; "
                                   "check --http-addr") from None
    click.echo(f"agent at {host}:{port} left the cluster")
