"""Tests for Consul's /v1/agent endpoints over real HTTP on 127.0.0.1, against a whole DevCluster.

Each test starts its own DevCluster in the test's event loop and calls it
the way users do: with py-consul (synchronous, so its calls run in worker
threads) or with raw HTTP where py-consul has no call. The servers that
HTTP, TCP and gRPC checks probe are started by the tests on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import aiohttp
import consul
import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from corral.agent.registry import RegistryConfig
from corral.dev import DevCluster, DevConfig
from devcluster import DevProcess, free_port, start_on_free_ports, wait_until

HOST = "127.0.0.1"
NODE = "agent-test"
WAIT_TIMEOUT = 10.0
# Fast checks, syncs and reaping, so that the tests take fractions of a second.
FAST_REGISTRY = RegistryConfig(min_check_interval=0.05, reap_interval=0.1, min_deregister_after=0.3)


class Agent:
    """A started DevCluster with a raw HTTP session and a py-consul client on it."""

    def __init__(self, cluster: DevCluster, session: aiohttp.ClientSession):
        self.cluster = cluster
        self.session = session
        self.base = f"http://{HOST}:{cluster.config.http_port}"
        self.consul = consul.Consul(host=HOST, port=cluster.config.http_port)
        self.consul.http.session.trust_env = False

    async def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a synchronous py-consul call in a worker thread."""
        return await asyncio.to_thread(function, *args, **kwargs)

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, str, Any]:
        """Send a raw request; return the status, the body text and the decoded JSON (or None)."""
        async with self.session.request(method, self.base + path, **kwargs) as response:
            text = await response.text()
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
            return response.status, text, body

    async def check(self, check_id: str) -> dict | None:
        checks = await self.call(self.consul.agent.checks)
        return checks.get(check_id)

    async def wait_for_status(self, check_id: str, status: str, timeout: float = WAIT_TIMEOUT) -> dict:
        """Poll /v1/agent/checks until the check has `status` and an output; return the check.

        A new check is critical with no output until its first result, so the
        output distinguishes a result from the initial status.
        """
        deadline = time.monotonic() + timeout
        while True:
            check = await self.check(check_id)
            if check is not None and check["Status"] == status and check["Output"]:
                return check
            if time.monotonic() > deadline:
                raise AssertionError(f"check {check_id} is {check and check['Status']}, not {status}")
            await asyncio.sleep(0.05)

    async def catalog_ids(self, name: str) -> list[str]:
        _, entries = await self.call(self.consul.catalog.service, name)
        return [entry["ServiceID"] for entry in entries]


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Agent]]]:
    started: list[Agent] = []

    async def start(registry: RegistryConfig = FAST_REGISTRY) -> Agent:
        def make_cluster(http_port: int, dns_port: int) -> DevCluster:
            return DevCluster(DevConfig(
                data_dir=tmp_path / f"cluster-{len(started)}",
                http_port=http_port,
                dns_port=dns_port,
                node=NODE,
                cpus=2.0,
                memory=512,
                registry=registry,
            ))

        cluster = await start_on_free_ports(make_cluster)
        session = aiohttp.ClientSession()
        started.append(Agent(cluster, session))
        return started[-1]

    yield start
    for agent in started:
        await agent.cluster.stop()
        await agent.session.close()
        agent.consul.http.session.close()


@pytest.fixture
async def agent(start_agent) -> Agent:
    return await start_agent()


@pytest.fixture
async def probe_server() -> AsyncIterator[dict]:
    """An HTTP server for checks to probe; `state["code"]` sets the status of /flip."""
    state: dict[str, Any] = {"code": 200, "requests": []}

    async def fixed(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="fixed")

    async def flip(request: web.Request) -> web.Response:
        return web.Response(status=state["code"], text="flip")

    async def echo(request: web.Request) -> web.Response:
        body = await request.text()
        probe = ",".join(request.headers.getall("X-Probe", []))
        agent_name = request.headers.get("User-Agent", "")
        return web.Response(text=f"{request.method} {probe} {body} {agent_name}")

    app = web.Application()
    app.router.add_get("/status/{code}", fixed)
    app.router.add_get("/flip", flip)
    app.router.add_route("*", "/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    state["url"] = f"http://{HOST}:{runner.addresses[0][1]}"
    yield state
    await runner.cleanup()


# Services


async def test_register_defaults(agent: Agent):
    assert await agent.call(agent.consul.agent.service.register, "web") is True

    services = await agent.call(agent.consul.agent.services)

    assert list(services) == ["web"]
    assert services["web"]["Service"] == "web"
    assert services["web"]["Tags"] == []
    assert services["web"]["Meta"] == {}
    assert services["web"]["Weights"] == {"Passing": 1, "Warning": 1}
    assert services["web"]["EnableTagOverride"] is False


async def test_register_fields(agent: Agent):
    await agent.call(
        agent.consul.agent.service.register,
        "web",
        service_id="web-1",
        address="127.0.0.2",
        port=8080,
        tags=["v1", "blue"],
        meta={"version": "1.2"},
        weights={"Passing": 10, "Warning": 2},
        enable_tag_override=True,
        tagged_addresses={"lan": {"Address": "10.0.0.7", "Port": 8081}},
    )

    service = await agent.call(agent.consul.agent.service_definition, "web-1")

    assert service["ID"] == "web-1"
    assert service["Address"] == "127.0.0.2"
    assert service["Port"] == 8080
    assert service["Tags"] == ["v1", "blue"]
    assert service["Meta"] == {"version": "1.2"}
    assert service["Weights"] == {"Passing": 10, "Warning": 2}
    assert service["EnableTagOverride"] is True
    assert service["TaggedAddresses"]["lan"] == {"Address": "10.0.0.7", "Port": 8081}
    assert service["TaggedAddresses"]["lan_ipv4"] == {"Address": "127.0.0.2", "Port": 8080}
    assert service["ContentHash"]


async def test_register_mixed_case_keys(agent: Agent):
    body = {
        "NAME": "api",
        "id": "api-1",
        "Tagged_Addresses": {"wan": {"address": "10.1.1.1", "port": 1}},
        "check": {"TTL": "30s", "status": "passing"},
    }
    status, text, _ = await agent.request("PUT", "/v1/agent/service/register", json=body)

    assert status == 200, text
    service = await agent.call(agent.consul.agent.service_definition, "api-1")
    assert service["TaggedAddresses"]["wan"] == {"Address": "10.1.1.1", "Port": 1}
    check = await agent.check("service:api-1")
    assert check["Status"] == "passing"


async def test_register_syncs_catalog(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web", service_id="web-1", port=80)

    assert await agent.catalog_ids("web") == ["web-1"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"Name": "web", "Port": "80"}, 'Invalid Port "80": expected an integer from 0 to 65535'),
        ({"Name": "web", "Port": 70000}, "Invalid Port 70000"),
        ({"Port": 80}, "Missing service name"),
        ({"Name": "web", "Tags": "v1"}, 'Invalid Tags "v1": expected a list of strings'),
        ({"Name": "web", "Weights": {"Passing": 0}}, "Invalid Weights: Passing must be from 1 to 65535"),
        ({"Name": "web", "Address": "0.0.0.0"}, 'Invalid service address "0.0.0.0"'),
        ({"Name": "web", "Meta": {"consul-x": "1"}}, "reserved prefix 'consul-'"),
        ({"Name": "web", "Check": {"HTTP": "http://127.0.0.1/"}}, "Interval must be > 0"),
        ({"Name": "web", "Check": {"Interval": "10s"}}, "TTL must be > 0 for TTL checks"),
        ({"Name": "web", "Check": {"TTL": "soon"}}, 'Invalid Check.TTL "soon"'),
        ({"Name": "web", "Check": {"TTL": "5s", "Status": "ok"}}, 'Invalid check Status "ok"'),
        ({"Name": "web", "Checks": [{"TTL": "5s"}, {"TCP": "nohost", "Interval": "1s"}]}, 'Invalid check TCP "nohost"'),
        ({"Name": "web", "Check": {"DockerContainerID": "x", "Interval": "1s"}}, "not supported by corral"),
    ],
)
async def test_register_rejects_invalid(agent: Agent, body: dict, expected: str):
    status, text, _ = await agent.request("PUT", "/v1/agent/service/register", json=body)

    assert status == 400
    assert expected in text
    assert await agent.call(agent.consul.agent.services) == {}


async def test_register_malformed_json(agent: Agent):
    status, text, _ = await agent.request("PUT", "/v1/agent/service/register", data=b"{not json")

    assert status == 400
    assert text.startswith("Request decode failed")


async def test_service_unknown_404(agent: Agent):
    status, text, _ = await agent.request("GET", "/v1/agent/service/nothing")

    assert status == 404
    assert "nothing" in text


async def test_deregister_removes_service(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web", check=consul.Check.ttl("30s"))

    assert await agent.call(agent.consul.agent.service.deregister, "web") is True

    assert await agent.call(agent.consul.agent.services) == {}
    assert await agent.call(agent.consul.agent.checks) == {}
    assert await agent.catalog_ids("web") == []


async def test_deregister_unknown_asks_for_id(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web", service_id="web-1")

    status, text, _ = await agent.request("PUT", "/v1/agent/service/deregister/web")

    assert status == 404
    assert text == 'Unknown service ID "web". Ensure that the service ID is passed, not the service name.'


async def test_members_local_node(agent: Agent):
    members = await agent.call(agent.consul.agent.members)

    assert len(members) == 1
    assert members[0]["Name"] == NODE
    assert members[0]["Addr"] == HOST
    assert members[0]["Status"] == 1
    assert members[0]["Tags"]["dc"] == "dc1"


# TTL checks


async def test_ttl_pass_warn_fail(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web", check=consul.Check.ttl("30s"))
    check_api = agent.consul.agent.check

    assert (await agent.check("service:web"))["Status"] == "critical"
    await agent.call(check_api.ttl_pass, "service:web", "fine")
    passing = await agent.check("service:web")
    await agent.call(check_api.ttl_warn, "service:web", "slow")
    warning = await agent.check("service:web")
    await agent.call(check_api.ttl_fail, "service:web", "down")
    critical = await agent.check("service:web")

    assert (passing["Status"], passing["Output"]) == ("passing", "fine")
    assert (warning["Status"], warning["Output"]) == ("warning", "slow")
    assert (critical["Status"], critical["Output"]) == ("critical", "down")


async def test_ttl_pass_reaches_health(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web", check=consul.Check.ttl("30s"))

    await agent.call(agent.consul.agent.check.ttl_pass, "service:web")

    _, entries = await agent.call(agent.consul.health.service, "web", passing=True)
    assert [entry["Service"]["ID"] for entry in entries] == ["web"]


async def test_ttl_expires_critical(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web", check=consul.Check.ttl("300ms"))
    await agent.call(agent.consul.agent.check.ttl_pass, "service:web", "alive")

    check = await agent.wait_for_status("service:web", "critical", timeout=5)

    assert check["Output"] == "TTL expired (last output before timeout follows): alive"


async def test_check_update_body(agent: Agent):
    await agent.call(agent.consul.agent.check.register, "cron", check=consul.Check.ttl("30s"))

    status, text, _ = await agent.request(
        "PUT", "/v1/agent/check/update/cron", json={"status": "warning", "output": "lagging"}
    )

    assert status == 200, text
    check = await agent.check("cron")
    assert check["Status"] == "warning"
    assert check["Output"] == "lagging"


async def test_check_update_invalid_status(agent: Agent):
    await agent.call(agent.consul.agent.check.register, "cron", check=consul.Check.ttl("30s"))

    status, text, _ = await agent.request("PUT", "/v1/agent/check/update/cron", json={"Status": "fine"})

    assert status == 400
    assert 'Invalid check status: "fine"' in text


async def test_check_update_output_capped(agent: Agent):
    await agent.call(agent.consul.agent.check.register, "cron", check=consul.Check.ttl("30s"))

    await agent.request("PUT", "/v1/agent/check/update/cron", json={"Status": "passing", "Output": "x" * 5000})

    output = (await agent.check("cron"))["Output"]
    assert output.startswith("x" * 4096 + "...")
    assert "4096 of 5000 bytes captured" in output


async def test_ttl_update_unknown_check(agent: Agent):
    status, text, _ = await agent.request("PUT", "/v1/agent/check/pass/ghost")

    assert status == 404
    assert "Unknown check ID" in text


async def test_ttl_update_non_ttl_check(agent: Agent, probe_server: dict):
    check = consul.Check.http(probe_server["url"] + "/status/200", "10s")
    await agent.call(agent.consul.agent.check.register, "web", check=check)

    status, text, _ = await agent.request("PUT", "/v1/agent/check/pass/web")

    assert status == 500
    assert "does not have associated TTL" in text


# Check registration


async def test_check_register_on_service(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "db", service_id="db-1")

    await agent.call(
        agent.consul.agent.check.register, "disk", check=consul.Check.ttl("30s"), check_id="db-disk",
        service_id="db-1", notes="free space",
    )

    check = await agent.check("db-disk")
    assert check["Name"] == "disk"
    assert check["ServiceID"] == "db-1"
    assert check["ServiceName"] == "db"
    assert check["Notes"] == "free space"
    assert check["Status"] == "critical"


async def test_check_register_unknown_service(agent: Agent):
    body = {"Name": "disk", "TTL": "30s", "ServiceID": "nope"}

    status, text, _ = await agent.request("PUT", "/v1/agent/check/register", json=body)

    assert status == 404
    assert text == 'ServiceID "nope" does not exist'


async def test_check_register_missing_name(agent: Agent):
    status, text, _ = await agent.request("PUT", "/v1/agent/check/register", json={"TTL": "30s"})

    assert status == 400
    assert text == "Missing check name"


async def test_check_initial_status_given(agent: Agent):
    await agent.request("PUT", "/v1/agent/check/register", json={"Name": "up", "TTL": "30s", "Status": "passing"})

    assert (await agent.check("up"))["Status"] == "passing"


async def test_check_deregister(agent: Agent):
    await agent.call(agent.consul.agent.check.register, "cron", check=consul.Check.ttl("30s"))

    assert await agent.call(agent.consul.agent.check.deregister, "cron") is True

    assert await agent.check("cron") is None
    status, _, _ = await agent.request("PUT", "/v1/agent/check/deregister/cron")
    assert status == 404


async def test_reregister_keeps_check_status(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web", check=consul.Check.ttl("30s"))
    await agent.call(agent.consul.agent.check.ttl_pass, "service:web", "fine")

    await agent.call(agent.consul.agent.service.register, "web", check=consul.Check.ttl("30s"))

    check = await agent.check("service:web")
    assert check["Status"] == "passing"
    assert check["Output"] == "fine"


async def test_replace_existing_checks(agent: Agent):
    register = agent.consul.agent.service.register
    await agent.call(register, "web", check=consul.Check.ttl("30s"), extra_checks=[consul.Check.ttl("30s")])
    before = set(await agent.call(agent.consul.agent.checks))

    await agent.call(register, "web", check={"CheckID": "service:web:1", "TTL": "30s"})
    kept = set(await agent.call(agent.consul.agent.checks))
    await agent.call(register, "web", check={"CheckID": "service:web:1", "TTL": "30s"}, replace_existing_checks=True)
    replaced = set(await agent.call(agent.consul.agent.checks))

    assert before == {"service:web:1", "service:web:2"}
    assert kept == before
    assert replaced == {"service:web:1"}


# Checks that the agent runs


async def test_http_check_statuses(agent: Agent, probe_server: dict):
    url = probe_server["url"]
    for name, code in (("ok", 200), ("busy", 429), ("down", 503)):
        check = consul.Check.http(f"{url}/status/{code}", "100ms")
        await agent.call(agent.consul.agent.check.register, name, check=check)

    ok = await agent.wait_for_status("ok", "passing")
    busy = await agent.wait_for_status("busy", "warning")
    down = await agent.wait_for_status("down", "critical")

    assert ok["Output"] == f"HTTP GET {url}/status/200: 200 OK Output: fixed"
    assert busy["Output"].startswith(f"HTTP GET {url}/status/429: 429 Too Many Requests")
    assert down["Output"].startswith(f"HTTP GET {url}/status/503: 503 Service Unavailable")


async def test_http_check_method_header_body(agent: Agent, probe_server: dict):
    body = {
        "Name": "echo",
        "HTTP": probe_server["url"] + "/echo",
        "Method": "POST",
        "Header": {"X-Probe": ["one", "two"]},
        "Body": "ping",
        "Interval": "100ms",
    }
    await agent.request("PUT", "/v1/agent/check/register", json=body)

    check = await agent.wait_for_status("echo", "passing")

    assert check["Output"].endswith("Output: POST one,two ping Consul Health Check")


async def test_http_check_recovers(agent: Agent, probe_server: dict):
    probe_server["code"] = 500
    check = consul.Check.http(probe_server["url"] + "/flip", "100ms")
    await agent.call(agent.consul.agent.service.register, "web", check=check)
    await agent.wait_for_status("service:web", "critical")

    probe_server["code"] = 200

    await agent.wait_for_status("service:web", "passing")


async def test_failures_before_critical(agent: Agent, probe_server: dict):
    check = {
        "Name": "flaky",
        "HTTP": probe_server["url"] + "/flip",
        "Interval": "100ms",
        "FailuresBeforeCritical": 3,
    }
    await agent.request("PUT", "/v1/agent/check/register", json=check)
    await agent.wait_for_status("flaky", "passing")
    probe_server["code"] = 500

    # At most two failing probes fit in 150 ms, and two leave the check passing.
    await asyncio.sleep(0.15)
    meanwhile = await agent.check("flaky")
    critical = await agent.wait_for_status("flaky", "critical")

    assert meanwhile["Status"] == "passing"
    assert "500 Internal Server Error" in critical["Output"]


async def test_tcp_check(agent: Agent):
    server = await asyncio.start_server(lambda reader, writer: writer.close(), HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await agent.call(
            agent.consul.agent.service.register, "db", port=port, check=consul.Check.tcp(HOST, port, "100ms")
        )
        check = await agent.wait_for_status("service:db", "passing")
    finally:
        server.close()
        await server.wait_closed()

    assert check["Output"] == f"TCP connect {HOST}:{port}: Success"
    await agent.wait_for_status("service:db", "critical")


@pytest.fixture
async def grpc_server() -> AsyncIterator[tuple[int, health.aio.HealthServicer]]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    yield port, servicer
    await server.stop(None)


async def test_grpc_check_serving(agent: Agent, grpc_server):
    port, servicer = grpc_server
    await servicer.set("shop.Cart", health_pb2.HealthCheckResponse.SERVING)
    target = f"{HOST}:{port}/shop.Cart"

    await agent.call(agent.consul.agent.check.register, "cart", check=consul.Check.grpc(target, "100ms"))

    check = await agent.wait_for_status("cart", "passing")
    assert check["Output"] == f"gRPC check {target}: success"
    assert check["Type"] == "grpc"


async def test_grpc_check_not_serving(agent: Agent, grpc_server):
    port, servicer = grpc_server
    await servicer.set("shop.Cart", health_pb2.HealthCheckResponse.SERVING)
    await agent.call(
        agent.consul.agent.check.register, "cart", check=consul.Check.grpc(f"{HOST}:{port}/shop.Cart", "100ms")
    )
    await agent.wait_for_status("cart", "passing")

    await servicer.set("shop.Cart", health_pb2.HealthCheckResponse.NOT_SERVING)

    check = await agent.wait_for_status("cart", "critical")
    assert "NOT_SERVING" in check["Output"]


async def test_script_check_rejected_by_default(agent: Agent):
    check = consul.Check.script([sys.executable, "-c", "pass"], "1s")

    status, text, _ = await agent.request(
        "PUT", "/v1/agent/service/register", json={"Name": "web", "Check": check}
    )

    assert status == 403
    assert text.startswith("Scripts are disabled on this agent from remote calls")
    assert "--enable-script-checks" in text
    assert await agent.call(agent.consul.agent.services) == {}


async def test_script_check_when_enabled(start_agent):
    agent = await start_agent(RegistryConfig(enable_script_checks=True, min_check_interval=0.05))
    for name, code in (("zero", 0), ("one", 1), ("two", 2)):
        args = [sys.executable, "-c", f"print('exit {code}'); raise SystemExit({code})"]
        await agent.call(agent.consul.agent.check.register, name, check=consul.Check.script(args, "100ms"))

    zero = await agent.wait_for_status("zero", "passing")
    one = await agent.wait_for_status("one", "warning")
    two = await agent.wait_for_status("two", "critical")

    assert zero["Output"] == "exit 0\n"
    assert one["Output"] == "exit 1\n"
    assert two["Output"] == "exit 2\n"


async def test_deregister_critical_service(agent: Agent):
    check = {"TTL": "30s", "DeregisterCriticalServiceAfter": "100ms"}
    await agent.call(agent.consul.agent.service.register, "web", check=check)
    await agent.call(agent.consul.agent.service.register, "db", check=consul.Check.ttl("30s"))

    deadline = time.monotonic() + WAIT_TIMEOUT
    while "web" in await agent.call(agent.consul.agent.services):
        assert time.monotonic() < deadline, "the critical service was not deregistered"
        await asyncio.sleep(0.05)

    assert list(await agent.call(agent.consul.agent.services)) == ["db"]
    assert await agent.catalog_ids("web") == []


# Maintenance


async def test_service_maintenance(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web", check={"TTL": "30s", "Status": "passing"})

    await agent.call(agent.consul.agent.service.maintenance, "web", "true", "upgrading")

    check = await agent.check("_service_maintenance:web")
    assert check["Status"] == "critical"
    assert check["Notes"] == "upgrading"
    assert check["ServiceID"] == "web"
    _, passing = await agent.call(agent.consul.health.service, "web", passing=True)
    assert passing == []

    await agent.call(agent.consul.agent.service.maintenance, "web", "false")

    assert await agent.check("_service_maintenance:web") is None
    _, passing = await agent.call(agent.consul.health.service, "web", passing=True)
    assert len(passing) == 1


async def test_service_maintenance_default_reason(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web")

    await agent.call(agent.consul.agent.service.maintenance, "web", "true")

    notes = (await agent.check("_service_maintenance:web"))["Notes"]
    assert notes.startswith("Maintenance mode is enabled for this service, but no reason was provided")


async def test_service_maintenance_unknown(agent: Agent):
    status, text, _ = await agent.request("PUT", "/v1/agent/service/maintenance/ghost?enable=true")

    assert status == 404
    assert "ghost" in text


@pytest.mark.parametrize(("query", "expected"), [("", "Missing value for enable"), ("?enable=maybe", "Invalid value")])
async def test_maintenance_enable_required(agent: Agent, query: str, expected: str):
    status, text, _ = await agent.request("PUT", "/v1/agent/maintenance" + query)

    assert status == 400
    assert expected in text


async def test_node_maintenance(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web", check={"TTL": "30s", "Status": "passing"})

    await agent.call(agent.consul.agent.maintenance, "true", "rack move")

    check = await agent.check("_node_maintenance")
    assert check["Status"] == "critical"
    assert check["Notes"] == "rack move"
    assert check["ServiceID"] == ""
    _, passing = await agent.call(agent.consul.health.service, "web", passing=True)
    assert passing == []

    await agent.call(agent.consul.agent.maintenance, "false")

    assert await agent.check("_node_maintenance") is None


# Local service health


async def test_health_by_name_codes(agent: Agent):
    register = agent.consul.agent.service.register
    await agent.call(register, "web", service_id="web-1", check={"TTL": "30s", "Status": "passing"})
    await agent.call(register, "web", service_id="web-2", check={"TTL": "30s", "Status": "passing"})

    passing = await agent.request("GET", "/v1/agent/health/service/name/web")
    await agent.call(agent.consul.agent.check.ttl_warn, "service:web-2")
    warning = await agent.request("GET", "/v1/agent/health/service/name/web")
    await agent.call(agent.consul.agent.check.ttl_fail, "service:web-1")
    critical = await agent.request("GET", "/v1/agent/health/service/name/web?format=text")

    assert passing[0] == 200
    assert [entry["AggregatedStatus"] for entry in passing[2]] == ["passing", "passing"]
    assert warning[0] == 429
    assert critical[0] == 503
    assert critical[1] == "critical"


async def test_health_by_name_unknown(agent: Agent):
    status, text, body = await agent.request("GET", "/v1/agent/health/service/name/ghost")

    assert status == 404
    assert body == []


async def test_health_by_id(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web", service_id="web-1", check={"TTL": "30s"})

    status, _, body = await agent.request("GET", "/v1/agent/health/service/id/web-1")

    assert status == 503
    assert body["AggregatedStatus"] == "critical"
    assert body["Service"]["ID"] == "web-1"
    assert [check["CheckID"] for check in body["Checks"]] == ["service:web-1"]


async def test_health_by_id_maintenance(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web", check={"TTL": "30s", "Status": "passing"})
    await agent.call(agent.consul.agent.service.maintenance, "web", "true")

    status, text, _ = await agent.request("GET", "/v1/agent/health/service/id/web", headers={"Accept": "text/plain"})

    assert status == 503
    assert text == "maintenance"


async def test_health_by_id_unknown(agent: Agent):
    status, text, _ = await agent.request("GET", "/v1/agent/health/service/id/ghost?format=text")

    assert status == 404
    assert text == "ServiceId ghost not found"


# Hash-based blocking


async def test_content_hash_header(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web")

    async with agent.session.get(agent.base + "/v1/agent/service/web") as response:
        header = response.headers["X-Consul-ContentHash"]
        body = await response.json()

    assert header == body["ContentHash"]


async def test_hash_blocks_until_change(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web", tags=["v1"])
    async with agent.session.get(agent.base + "/v1/agent/service/web") as response:
        first = response.headers["X-Consul-ContentHash"]

    async def change_later() -> None:
        await asyncio.sleep(0.3)
        await agent.call(agent.consul.agent.service.register, "web", tags=["v2"])

    changer = asyncio.create_task(change_later())
    started = time.monotonic()
    status, _, body = await agent.request("GET", f"/v1/agent/service/web?hash={first}&wait=10s")
    elapsed = time.monotonic() - started
    await changer

    assert status == 200
    assert body["Tags"] == ["v2"]
    assert body["ContentHash"] != first
    assert 0.25 <= elapsed < 5


async def test_hash_wait_times_out(agent: Agent):
    await agent.call(agent.consul.agent.service.register, "web")
    async with agent.session.get(agent.base + "/v1/agent/services") as response:
        first = response.headers["X-Consul-ContentHash"]

    started = time.monotonic()
    async with agent.session.get(agent.base + f"/v1/agent/services?hash={first}&wait=300ms") as response:
        second = response.headers["X-Consul-ContentHash"]
    elapsed = time.monotonic() - started

    assert second == first
    assert 0.3 <= elapsed < 2


# The agent's registry and the catalog


async def test_task_service_in_agent(agent: Agent, tmp_path: Path):
    job = {
        "name": "pinger",
        "task": {
            "command": "sh",
            "args": ["-c", f'exec "{sys.executable}" -m http.server "$PORT" --bind {HOST}'],
            "workdir": str(tmp_path),
            "ports": ["http"],
        },
        "service": {"name": "pinger", "port": "http", "check": {"http": "/", "interval": "200ms"}},
    }
    status, text, _ = await agent.request("PUT", "/v1/jobs", json=job)
    assert status == 200, text
    try:
        deadline = time.monotonic() + 20
        while not (services := await agent.call(agent.consul.agent.services)):
            assert time.monotonic() < deadline, "the task's service did not reach the agent"
            await asyncio.sleep(0.1)
        (task_id,) = services
        check = await agent.wait_for_status(f"service:{task_id}", "passing", timeout=20)
    finally:
        await agent.request("DELETE", "/v1/jobs/pinger")

    assert services[task_id]["Service"] == "pinger"
    assert services[task_id]["Meta"]["corral-job"] == "pinger"
    assert check["Type"] == "http"


async def test_registration_survives_restart(start_agent, tmp_path: Path):
    first = await start_agent()
    await first.call(first.consul.agent.service.register, "web", port=80, check={"TTL": "30s", "Status": "passing"})
    await first.cluster.stop()
    config = first.cluster.config
    config.http_port = free_port()
    config.dns_port = free_port()
    cluster = DevCluster(config)
    await cluster.start()
    second = Agent(cluster, first.session)
    try:
        services = await second.call(second.consul.agent.services)
        catalog = await second.catalog_ids("web")
        check = await second.check("service:web")
    finally:
        second.consul.http.session.close()
        await cluster.stop()

    assert list(services) == ["web"]
    assert catalog == ["web"]
    assert check["Status"] == "passing"


# A `corral dev` process, as users start it


def test_dev_process_runs_script_and_grpc_checks(tmp_path: Path):
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("shop.Cart", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    grpc_port = grpc_server.add_insecure_port(f"{HOST}:0")
    grpc_server.start()
    dev = DevProcess(tmp_path / "data", tmp_path / "dev.log", ["--enable-script-checks"])
    dev.start()
    client = consul.Consul(host=HOST, port=int(dev.http_addr.split(":")[1]))
    client.http.session.trust_env = False
    try:
        script = consul.Check.script([sys.executable, "-c", "print('fine')"], "1s")
        client.agent.check.register("script", check=script)
        client.agent.check.register("cart", check=consul.Check.grpc(f"{HOST}:{grpc_port}/shop.Cart", "1s"))

        def statuses() -> dict[str, str] | None:
            checks = client.agent.checks()
            found = {name: checks[name]["Status"] for name in ("script", "cart") if name in checks}
            return found if set(found.values()) == {"passing"} else None

        found = wait_until(statuses, 15, "the script and gRPC checks to pass")
    finally:
        client.http.session.close()
        exit_code = dev.stop()
        grpc_server.stop(None)

    assert found == {"script": "passing", "cart": "passing"}
    assert exit_code == 0
