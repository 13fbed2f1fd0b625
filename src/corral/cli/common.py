"""Options and error handling that every client command shares."""

from __future__ import annotations

import functools

import click

from corral.client import DEFAULT_HTTP_ADDR, HTTP_ADDR_ENV, Client, CorralError


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
            if exc.status is None:
                message += f"; is `corral dev` running? Set {HTTP_ADDR_ENV} or --http-addr to its HTTP address"
            raise click.ClickException(message) from None

    return wrapper
