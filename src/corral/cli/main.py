"""The `corral` command."""

from __future__ import annotations

import sys

import click

import corral
from corral.cli import catalog, cluster, jobs, kv, logs
from corral.cli.agent import agent
from corral.cli.dev import dev
from corral.cli.server import server


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """corral runs services on a pool of machines and makes them easy to find and configure.

    Commands that talk to a server find it through --http-addr or the
    CORRAL_HTTP_ADDR environment variable (default 127.0.0.1:8500).
    """


@cli.command()
def version() -> None:
    """Print the version of corral."""
    click.echo(f"corral {corral.__version__}")


cli.add_command(dev)
cli.add_command(server)
cli.add_command(agent)
cli.add_command(jobs.job)
cli.add_command(kv.kv)
cli.add_command(logs.logs)
cli.add_command(catalog.catalog)
cli.add_command(catalog.members)
cli.add_command(cluster.agents)
cli.add_command(cluster.tasks)
cli.add_command(cluster.frameworks)
cli.add_command(cluster.roles)


def main() -> None:
    sys.exit(cli.main(prog_name="corral", standalone_mode=True))
