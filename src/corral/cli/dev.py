"""`corral dev`: run a server and an agent in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging

import click

from corral.agent.registry import RegistryConfig
from corral.agent.resources import DEFAULT_PORT_RANGE, parse_port_range
from corral.cli.common import ServerOptions, run_server, server_options

# corral.cli.agent imports these flag parsers and the event loop runner from this module.
from corral.cli.common import address_option as _address  # noqa: F401
from corral.cli.common import parsed_option as _parsed  # noqa: F401
from corral.cli.common import run_event_loop as _run  # noqa: F401
from corral.dev import DevCluster, DevConfig, default_data_dir

log = logging.getLogger("corral.dev")


def _port_range(ctx, param, value: str) -> tuple[int, int]:
    try:
        return parse_port_range(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@server_options(
    data_dir_help="Folder for the SQLite store and task sandboxes [default: the user's data folder, corral/dev].",
    node_help="Name of this node [default: the host name].",
)
@click.command()
@click.option("--port-range", default=f"{DEFAULT_PORT_RANGE[0]}-{DEFAULT_PORT_RANGE[1]}", show_default=True,
              callback=_port_range, help="Dynamic port range for tasks, START-END inclusive.")
@click.option("--cpus", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPUs the agent offers [default: the number of logical CPUs].")
@click.option("--memory", type=click.IntRange(min=1), default=None,
              help="Memory in MB the agent offers [default: the machine's total memory].")
@click.option("--enable-script-checks", is_flag=True, default=False,
              help="Allow script checks (commands the agent runs) registered through the HTTP API. "
                   "Anyone who can reach the API can then run commands as this process; "
                   "off by default.")
def dev(options: ServerOptions, port_range, cpus, memory, enable_script_checks) -> None:
    """Run a server and an agent in one process, with the embedded store.

    Tasks started by this process are stopped when it exits (Ctrl-C or SIGTERM).
    """
    config = DevConfig(
        **options.config_fields(default_data_dir()),
        port_range=port_range,
        cpus=cpus,
        memory=memory,
        registry=RegistryConfig(enable_script_checks=enable_script_checks),
    )
    click.echo(f"==> corral dev: data folder {config.data_dir}", err=True)
    if enable_script_checks:
        log.warning("script checks are enabled for the HTTP API: any client of %s:%d can run commands",
                    *options.http_addr)
    run_server(lambda: DevCluster(config))
