"""Hold many blocking health queries on one service, change one of its checks, and time the wake-up.

Run by bench/catalog/catalogbench.py in its own process. Each watcher is
`GET /v1/health/service/NAME?index=N&wait=60s` on its own connection, where
N is the service's current X-Consul-Index. The change is a
PUT /v1/catalog/register that sets one check on one instance of the service
to --status. Prints one JSON object on stdout, with times in seconds, in the
shape of bench/watchers.py, whose watcher and timing code this reuses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from watchers import Watchers, corral_watcher, measure, raise_fd_limit, wait_until_corral_connected  # noqa: E402


async def run(args: argparse.Namespace) -> dict:
    base = f"http://{args.addr}"
    url = f"{base}/v1/health/service/{args.service}"
    state = Watchers(args.count)
    change = {
        "Node": args.node,
        "Address": args.address,
        "SkipNodeUpdate": True,
        "Check": {
            "Node": args.node,
            "CheckID": f"bench-check-{args.service_id}",
            "Name": "bench check",
            "ServiceID": args.service_id,
            "Status": args.status,
        },
    }
    async with aiohttp.ClientSession() as control:
        async with control.get(url) as response:
            response.raise_for_status()
            index = int(response.headers["X-Consul-Index"])
            instances = len(await response.json())

        async def write() -> None:
            async with control.put(f"{base}/v1/catalog/register", json=change) as response:
                response.raise_for_status()

        def start(session: aiohttp.ClientSession):
            return corral_watcher(session, url, index, state)

        async def wait_ready() -> None:
            await wait_until_corral_connected(state, args.server_pid, int(args.addr.rsplit(":", 1)[1]))

        result = await measure(psutil.Process(args.server_pid), state, start, wait_ready, write)
    result["instances"] = instances
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True, help="HOST:PORT of corral's HTTP API")
    parser.add_argument("--count", type=int, default=10_000, help="number of watchers [10000]")
    parser.add_argument("--service", required=True, help="the service name to watch")
    parser.add_argument("--service-id", required=True, help="ID of the instance whose check is changed")
    parser.add_argument("--node", required=True, help="node of that instance")
    parser.add_argument("--address", required=True, help="address of that node")
    parser.add_argument("--status", default="critical", help="status the changed check is set to [critical]")
    parser.add_argument("--server-pid", type=int, required=True,
                        help="process id of corral, for its CPU time and to see when it is idle")
    args = parser.parse_args()
    # One descriptor per watcher, plus room for the control session and the interpreter.
    raise_fd_limit(args.count + 256)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    json.dump(runner(run(args)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
