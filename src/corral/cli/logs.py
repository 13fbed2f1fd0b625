"""`corral logs`: print a task's stdout or stderr, and follow it as the task writes."""

from __future__ import annotations

import http.client
import urllib.parse

import click

from corral.cli.common import http_addr_option
from corral.client import Client, CorralError
from corral.client.core import Response, error_text

# Seconds to wait for the server when not following; a followed log may stay quiet for long.
REQUEST_TIMEOUT = 30.0


@click.command()
@click.argument("task_id", metavar="TASK")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the task ends.")
@click.option("--stderr", is_flag=True, help="Print the task's stderr instead of its stdout.")
@click.option("--tail", type=click.IntRange(min=0), default=None, metavar="N",
              help="Start with the last N lines instead of the beginning.")
@http_addr_option
def logs(client: Client, task_id: str, follow: bool, stderr: bool, tail: int | None) -> None:
    """Print the output of task TASK (an ID from `corral job status`).

    The output is read from the task's sandbox on its agent, across
    restarts of the task, until its sandbox is removed after the task ended.
    """
    query = {"stream": "stderr" if stderr else "stdout"}
    if follow:
        query["follow"] = "true"
    if tail is not None:
        query["tail"] = str(tail)
    path = f"/v1/tasks/{urllib.parse.quote(task_id, safe='')}/logs?{urllib.parse.urlencode(query)}"
    try:
        _copy_response(client, path, timeout=None if follow else REQUEST_TIMEOUT)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _copy_response(client: Client, path: str, timeout: float | None) -> None:
    """Send GET path and write the body to stdout as it arrives. Raises CorralError."""
    connection = http.client.HTTPConnection(client.host, client.port, timeout=timeout)
    try:
        try:
            connection.request("GET", path)
            answer = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            raise CorralError(f"cannot reach corral at {client.base_url} ({error})", unreachable=True) from None
        if answer.status >= 400:
            text = error_text(Response(answer.status, answer.read(), dict(answer.getheaders())))
            raise CorralError(f"GET {path} failed with HTTP {answer.status}: {text}", answer.status, text)
        _copy_body(client, answer)
    finally:
        connection.close()


def _copy_body(client: Client, answer: http.client.HTTPResponse) -> None:
    out = click.get_binary_stream("stdout")
    while True:
        try:
            # read1 returns what has arrived, so each line is printed as the task writes it.
            chunk = answer.read1(64 * 1024)
        except (OSError, http.client.HTTPException) as error:
            raise CorralError(f"lost the connection to corral at {client.base_url} ({error})",
                              unreachable=True) from None
        if not chunk:
            return
        try:
            out.write(chunk)
            out.flush()
        except BrokenPipeError:
            # The reader of our output (such as `head`) has closed the pipe.
            return
