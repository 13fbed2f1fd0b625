"""`GET /v1/tasks/{id}/logs`: a task's stdout or stderr, read from its sandbox, as plain text.

Query parameters:

- `stream`: `stdout` (the default) or `stderr`;
- `offset`: start at this byte of the file (default 0);
- `tail`: start at the beginning of the last N lines instead (not with `offset`);
- `follow`: keep the response open and send new output as the task writes
  it, until the task ends (a terminal state: a task restarted in place
  writes on to the same files) or the client disconnects.

The body is the file's bytes as the task wrote them. The header
`X-Corral-Log-Offset` gives the byte offset where the body starts, so a
client can resume with `offset`. The logs are served from the local agent's
sandboxes, so only for tasks placed on that agent's node.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from aiohttp import web

from corral.agent.agent import Agent
from corral.api.common import json_error, state_of
from corral.state.records import Task

log = logging.getLogger(__name__)

STREAMS = ("stdout", "stderr")
OFFSET_HEADER = "X-Corral-Log-Offset"
# How much of a file one read sends at most.
CHUNK_SIZE = 64 * 1024
# How often a followed file is checked for new output.
FOLLOW_INTERVAL = 0.2
_TAIL_BLOCK = 8 * 1024

# The local agent whose sandboxes hold the logs, or None when the server has none.
AGENT_KEY = web.AppKey("logs_agent", object)


# ---------------------------------------------------------------------------
# Reading the files (blocking; called through asyncio.to_thread)


def read_chunk(path: Path, offset: int, size: int = CHUNK_SIZE) -> bytes:
    """Return up to size bytes of path from offset; nothing when the file does not exist."""
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read(size)
    except FileNotFoundError:
        return b""


def tail_offset(path: Path, lines: int) -> int:
    """Return the byte offset where the last `lines` lines of path start (0 for a missing file).

    A newline at the very end ends the last line; it does not start another.
    """
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        return 0
    with file:
        end = file.seek(0, os.SEEK_END)
        if lines == 0 or end == 0:
            return end
        file.seek(end - 1)
        position = end - 1 if file.read(1) == b"\n" else end
        remaining = lines
        while position > 0:
            step = min(_TAIL_BLOCK, position)
            position -= step
            file.seek(position)
            block = file.read(step)
            index = len(block)
            while (index := block.rfind(b"\n", 0, index)) >= 0:
                remaining -= 1
                if remaining == 0:
                    return position + index + 1
        return 0


# ---------------------------------------------------------------------------
# Query parameters


def _parse_count(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None or text == "":
        return None
    if not (text.isascii() and text.isdigit()):
        raise json_error(400, {"error": f"invalid {name} {text!r}: expected a whole number of at least 0"})
    return int(text)


def _parse_follow(request: web.Request) -> bool:
    text = request.query.get("follow")
    if text is None:
        return False
    value = text.lower()
    if value in ("", "true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise json_error(400, {"error": f"invalid follow {text!r}: expected true or false"})


def _parse_stream(request: web.Request) -> str:
    stream = request.query.get("stream") or "stdout"
    if stream not in STREAMS:
        raise json_error(400, {"error": f"invalid stream {stream!r}: expected stdout or stderr"})
    return stream


# ---------------------------------------------------------------------------
# The handler


def _task_sandbox(request: web.Request, task: Task) -> Path:
    agent = request.app[AGENT_KEY]
    if not isinstance(agent, Agent) or agent.node != task.node:
        # NOTE: logs of tasks on other nodes need the server to reach that node's
        # agent, which separate agent processes do not offer yet.
        raise json_error(
            404, {"error": f"logs of task {task.id!r} are on node {task.node!r}, whose agent does not serve this API"}
        )
    try:
        return agent.sandbox_path(task.id)
    except ValueError as exc:
        raise json_error(400, {"error": str(exc)}) from None


async def task_logs(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    task_id = request.match_info["id"]
    task = state.task(task_id)
    if task is None:
        raise json_error(404, {"error": f"task {task_id!r} not found"})
    stream = _parse_stream(request)
    follow = _parse_follow(request)
    offset = _parse_count(request, "offset")
    tail = _parse_count(request, "tail")
    if offset is not None and tail is not None:
        raise json_error(400, {"error": "offset and tail cannot be used together; choose one"})
    sandbox = _task_sandbox(request, task)
    if task.state.is_terminal and not await asyncio.to_thread(sandbox.is_dir):
        raise json_error(
            404, {"error": f"logs of task {task_id!r} were removed with its sandbox after the task ended"}
        )
    path = sandbox / stream
    if tail is not None:
        position = await asyncio.to_thread(tail_offset, path, tail)
    else:
        position = offset or 0

    response = web.StreamResponse(headers={OFFSET_HEADER: str(position)})
    response.content_type = "text/plain"
    response.charset = "utf-8"
    await response.prepare(request)
    try:
        position = await _send_new_output(path, position, response)
        if follow:
            await _follow(request, task_id, path, position, response)
    except ConnectionResetError:
        log.debug("logs client disconnected task=%s stream=%s", task_id, stream)
        return response
    await response.write_eof()
    return response


async def _send_new_output(path: Path, position: int, response: web.StreamResponse) -> int:
    """Send the file's content from position on; return the position after it."""
    while chunk := await asyncio.to_thread(read_chunk, path, position):
        await response.write(chunk)
        position += len(chunk)
    return position


async def _follow(request: web.Request, task_id: str, path: Path, position: int, response: web.StreamResponse) -> None:
    state = state_of(request)
    while True:
        task = state.task(task_id)
        ended = task is None or task.state.is_terminal
        # Read once more after the task ended, for what it wrote last.
        position = await _send_new_output(path, position, response)
        if ended:
            return
        transport = request.transport
        if transport is None or transport.is_closing():
            log.debug("logs client disconnected task=%s", task_id)
            return
        await asyncio.sleep(FOLLOW_INTERVAL)


def add_routes(app: web.Application, agent: Agent | None) -> None:
    """Serve task logs from the sandboxes of `agent`, the agent in this server's process (if any)."""
    app[AGENT_KEY] = agent
    app.router.add_get("/v1/tasks/{id}/logs", task_logs)
