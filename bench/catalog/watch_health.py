"""Hold many blocking health queries on one service, change one of its checks, and time the wake-up.

Run by bench/catalog/catalogbench.py in its own process. Each watcher is
`GET /v1/health/service/NAME?index=N&wait=60s` on its own connection, where
N is the service's current X-Consul-Index, sent and read by the small
asyncio protocol in bench/catalog/lean_client.py. The change is a
PUT /v1/catalog/register that sets one check on one instance of the service
to --status, sent with aiohttp like the other control requests. Prints one
JSON object on stdout, with times in seconds, in the shape of
bench/watchers.py, whose limits and readiness check this reuses, plus the
size of the responses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from urllib.parse import quote

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lean_client import LeanWatchers, build_request, measure  # noqa: E402
from watchers import WAIT, raise_fd_limit, wait_until_corral_connected  # noqa: E402


async def run(args: argparse.Namespace) -> dict:
    base = f"http://{args.addr}"
    path = f"/v1/health/service/{quote(args.service, safe='')}"
    url = f"{base}{path}"
    host, port = args.addr.rsplit(":", 1)
    state = LeanWatchers(args.count)
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

        async def wait_ready() -> None:
            await wait_until_corral_connected(state, args.server_pid, int(port))

        request = build_request(args.addr, path, index, WAIT)
        result = await measure(host, int(port), request, index, state, psutil.Process(args.server_pid),
                               wait_ready, write)
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
