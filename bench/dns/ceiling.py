"""A minimal asyncio UDP DNS responder: the ceiling for a DNS server written in Python.

It answers every datagram with one fixed response whose ID is replaced by the query's,
and does nothing else, so no Python DNS server on the same event loop can be faster.
It uses uvloop when installed, as `corral dev` does. It prints "ready" once bound and
runs until SIGINT or SIGTERM.

Usage: python ceiling.py --port PORT --response FILE
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path


class Responder(asyncio.DatagramProtocol):
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.transport.sendto(data[:2] + self.body, addr)


async def serve(port: int, response: bytes) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: Responder(response[2:]), local_addr=("127.0.0.1", port)
    )
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="UDP port on 127.0.0.1")
    parser.add_argument("--response", type=Path, required=True, help="file with the response message to send")
    args = parser.parse_args()
    response = args.response.read_bytes()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, response))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, response))


if __name__ == "__main__":
    main()
