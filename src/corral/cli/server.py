"""`corral server`: run the control plane in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

from pathlib import Path

import click

from corral.cli.common import ServerOptions, parsed_option, positive_seconds, run_server, server_options
from corral.dev import default_data_dir
from corral.master.agents import DEFAULT_AGENT_TIMEOUT
from corral.server import Server, ServerConfig


def default_server_data_dir() -> Path:
    """Return $XDG_DATA_HOME/corral/server, or ~/.local/share/corral/server."""
    return default_data_dir().parent / "server"


@server_options(
    data_dir_help="Folder for the SQLite store [default: the user's data folder, corral/server].",
    node_help="Name of this server [default: the host name].",
)
@click.command()
@click.option("--agent-timeout", default=f"{DEFAULT_AGENT_TIMEOUT:g}s", show_default=True,
              callback=parsed_option(positive_seconds),
              help="Duration without a heartbeat after which an agent is declared failed and its tasks "
                   "are replaced elsewhere, such as 10s.")
def server(options: ServerOptions, agent_timeout) -> None:
    """Run a server: store, HTTP API, DNS, job scheduler and agent failure detection.

    Agents join it with `corral agent --join HOST:PORT`. Stopping the server
    leaves agents and their tasks running.
    """
    config = ServerConfig(**options.config_fields(default_server_data_dir()), agent_timeout=agent_timeout)
    click.echo(f"==> corral server: data folder {config.data_dir}", err=True)
    run_server(lambda: Server(config))
