"""`corral catalog` and `corral members` against a real `corral dev` subprocess."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from devcluster import DevProcess, wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-catalog")
    dev = DevProcess(folder / "data", folder / "corral-dev.log")
    dev.start()
    yield dev
    assert dev.stop() == 0


@pytest.fixture
def web_port():
    """The port of an HTTP server on 127.0.0.1 that returns 200, for the check of a registered service."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_register_runs_http_check(cluster, web_port):
    result = cluster.cli(
        "catalog", "register", "cli-web", f"127.0.0.1:{web_port}", "--tag", "blue", "--tag", "v2",
        "--check-http", f"http://127.0.0.1:{web_port}/healthz", "--check-interval", "1s",
    )
    assert "Registered service 'cli-web' with ID 'cli-web'" in result.stdout
    instances = wait_until(lambda: cluster.get("/v1/health/service/cli-web?passing"), 15,
                           "the agent's HTTP check to pass")
    assert instances[0]["Service"]["Port"] == web_port
    assert sorted(instances[0]["Service"]["Tags"]) == ["blue", "v2"]
    cluster.cli("catalog", "deregister", "cli-web")


def test_register_json_prints_id(cluster):
    result = cluster.cli("catalog", "register", "cli-json", "127.0.0.1:9100", "--id", "cli-json-1", "--json")
    assert json.loads(result.stdout)["ID"] == "cli-json-1"
    cluster.cli("catalog", "deregister", "cli-json-1")


def test_services_table_and_json(cluster):
    cluster.cli("catalog", "register", "cli-listed", "127.0.0.1:9101", "--tag", "green")
    table = cluster.cli("catalog", "services").stdout
    assert "SERVICE" in table
    listed = [line for line in table.splitlines() if line.startswith("cli-listed")]
    assert len(listed) == 1
    assert "green" in listed[0]
    data = json.loads(cluster.cli("catalog", "services", "--json").stdout)
    assert data["cli-listed"] == ["green"]
    cluster.cli("catalog", "deregister", "cli-listed")


def test_deregister_removes_service(cluster):
    cluster.cli("catalog", "register", "cli-gone", "127.0.0.1:9102")
    result = cluster.cli("catalog", "deregister", "cli-gone")
    assert "Deregistered service 'cli-gone'" in result.stdout
    data = json.loads(cluster.cli("catalog", "services", "--json").stdout)
    assert "cli-gone" not in data


def test_nodes_table_and_json(cluster):
    table = cluster.cli("catalog", "nodes").stdout
    assert "NODE" in table
    assert "test-node" in table
    data = json.loads(cluster.cli("catalog", "nodes", "--json").stdout)
    assert [node["Node"] for node in data] == ["test-node"]


def test_members_table_and_json(cluster):
    table = cluster.cli("members").stdout
    row = [line for line in table.splitlines() if line.startswith("test-node")]
    assert len(row) == 1
    assert "alive" in row[0]
    assert "server" in row[0]
    data = json.loads(cluster.cli("members", "--json").stdout)
    assert data[0]["Name"] == "test-node"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("catalog", "register", "bad", "no-port"), "invalid address 'no-port'"),
        (("catalog", "register", "bad", "127.0.0.1:70000"), "'127.0.0.1:70000'"),
        (("catalog", "register", "bad", "127.0.0.1:0"), "invalid port 0"),
        (("catalog", "register", "bad", "127.0.0.1:80", "--check-http", "ftp://x/"), "invalid URL 'ftp://x/'"),
        (("catalog", "register", "bad", "127.0.0.1:80", "--check-http", "http://x/", "--check-interval", "soon"),
         "invalid duration 'soon'"),
        (("catalog", "register", "bad", "127.0.0.1:80", "--check-interval", "5s"), "add --check-http URL"),
    ],
)
def test_invalid_values_are_named(cluster, args, expected):
    result = cluster.cli(*args, check=False)
    assert result.returncode == 2
    assert expected in result.stderr


def test_deregister_unknown_id_fails(cluster):
    result = cluster.cli("catalog", "deregister", "no-such-id", check=False)
    assert result.returncode == 1
    assert "no-such-id" in result.stderr


def test_unreachable_server_is_named(cluster):
    result = cluster.cli("catalog", "services", "--http-addr", "127.0.0.1:1", check=False)
    assert result.returncode == 1
    assert "127.0.0.1:1" in result.stderr
    assert "CORRAL_HTTP_ADDR" in result.stderr
