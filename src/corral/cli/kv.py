"""`corral kv`: read and write the key/value store."""

from __future__ import annotations

import json
import sys

import click

from corral.client import Client, CorralError
from corral.cli.common import http_addr_option


@click.group()
def kv() -> None:
    """Read and write keys in the key/value store."""


def _read_value(value: str) -> bytes:
    """Take VALUE as given, or read stdin for "-" and a file for "@PATH", as `consul kv put` does."""
    if value == "-":
        return sys.stdin.buffer.read()
    if value.startswith("@"):
        path = value[1:]
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path!r}: {exc.strerror}", param_hint="VALUE") from None
    return value.encode()


@kv.command()
@click.argument("key")
@click.argument("value")
@http_addr_option
def put(client: Client, key: str, value: str) -> None:
    """Store VALUE at KEY. VALUE "-" reads standard input and "@PATH" reads a file."""
    response = client.request("PUT", f"/v1/kv/{key}", body=_read_value(value))
    if response.status != 200:
        raise CorralError(f"failed to write key {key!r}: {response.body.decode(errors='replace').strip()}")
    if json.loads(response.body) is not True:
        raise CorralError(f"failed to write key {key!r}: the server did not apply the write")
    click.echo(f"Success! Data written to: {key}")


@kv.command()
@click.argument("key")
@http_addr_option
def get(client: Client, key: str) -> None:
    """Print the value stored at KEY; a missing key is an error."""
    response = client.request("GET", f"/v1/kv/{key}", query={"raw": "true"})
    if response.status == 404:
        raise CorralError(f"key {key!r} not found")
    if response.status != 200:
        raise CorralError(f"failed to read key {key!r}: {response.body.decode(errors='replace').strip()}")
    sys.stdout.buffer.write(response.body)
    if not response.body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")


@kv.command()
@click.argument("key")
@click.option("--recurse", is_flag=True, help="Delete every key that starts with KEY.")
@http_addr_option
def delete(client: Client, key: str, recurse: bool) -> None:
    """Delete KEY (or, with --recurse, every key under it)."""
    query = {"recurse": "true"} if recurse else None
    response = client.request("DELETE", f"/v1/kv/{key}", query=query)
    if response.status != 200:
        raise CorralError(f"failed to delete key {key!r}: {response.body.decode(errors='replace').strip()}")
    click.echo(f"Success! Deleted key{'s under' if recurse else ''}: {key}")
