"""Acceptance: a real Prometheus scrapes corral, and finds the hello-web instances through its Consul API.

One scrape job reads corral's /v1/agent/metrics?format=prometheus, which
checks that Prometheus parses corral's exposition. Another uses
consul_sd_configs, which reads /v1/agent/self and then watches
/v1/health/service/hello-web with blocking queries: Prometheus's targets
API must list both instances while the job runs and none once it is
stopped. The tests run in file order on one cluster and one Prometheus.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from devcluster import EXAMPLES, DevProcess, free_port, task_processes, wait_until

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

if PROMETHEUS is None or PROMTOOL is None:
    if os.environ.get("CI"):
        pytest.fail("prometheus is not installed in CI; run scripts/ci-deps.sh first", pytrace=False)
    pytest.skip("prometheus is not installed; scripts/ci-deps.sh installs Debian's package", allow_module_level=True)

CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: corral
    metrics_path: /v1/agent/metrics
    params:
      format: [prometheus]
    static_configs:
      - targets: ["{corral}"]
"""

CONSUL_JOB = """\
  - job_name: hello-web
    consul_sd_configs:
      - server: "{corral}"
        services: [hello-web]
        refresh_interval: 1s
"""


def has_consul_sd() -> bool:
    """Tell whether this Prometheus build accepts consul_sd_configs.

    Debian's package (2.42.0+ds in bookworm) is built without Consul service
    discovery (its changelog: "Disable Consul SD until its Debian package is
    back in shape"), so promtool rejects the field.
    """
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "prometheus.yml"
        config.write_text("scrape_configs:\n" + CONSUL_JOB.format(corral="127.0.0.1:8500"))
        result = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True,
                                timeout=30)
    return result.returncode == 0


CONSUL_SD = has_consul_sd()

# NOTE: with Debian's prometheus package these tests are skipped, in CI too, because that
# build has no consul_sd_configs. So no real Prometheus checks corral's Consul API there.
needs_consul_sd = pytest.mark.skipif(
    not CONSUL_SD,
    reason=f"{PROMETHEUS} is built without consul_sd_configs (Debian disables Consul service discovery)",
)


class Prometheus:
    def __init__(self, folder, corral_addr: str):
        self.folder = folder
        self.port = free_port()
        self.config = folder / "prometheus.yml"
        config = CONFIG + (CONSUL_JOB if CONSUL_SD else "")
        self.config.write_text(config.format(corral=corral_addr))
        self.log_path = folder / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._ready, 30, "prometheus to be ready")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as answer:
                return answer.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **query: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.load(answer)["data"]

    def targets(self, job: str) -> list[dict]:
        active = self.api("/api/v1/targets", state="active")["activeTargets"]
        return [target for target in active if target["labels"].get("job") == job]

    def target_ports(self, job: str) -> list[int]:
        return sorted(int(target["labels"]["instance"].rpartition(":")[2]) for target in self.targets(job))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prometheus-corral")
    dev = DevProcess(folder / "data", folder / "corral-dev.log")
    dev.start()
    yield dev
    if dev.process is not None and dev.process.poll() is None:
        assert dev.stop() == 0
    leftover = task_processes(dev.data_dir)
    for process in leftover:
        process.kill()
    assert not leftover, f"task processes left after corral dev stopped: {[p.pid for p in leftover]}"


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory):
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), cluster.http_addr)
    server.start()
    yield server
    server.stop()


def test_job_runs(cluster):
    cluster.cli("kv", "put", "config/hello-web/greeting", "Hello, Prometheus")
    result = cluster.cli("job", "run", str(EXAMPLES / "hello-web.toml"))
    assert "2 of 2 instances running and passing" in result.stdout


@needs_consul_sd
def test_targets_list_both_instances(cluster, prometheus):
    ports = sorted(entry["Service"]["Port"] for entry in cluster.passing_instances())
    assert len(ports) == 2
    found = wait_until(lambda: prometheus.target_ports("hello-web") == ports and ports, 30,
                       f"prometheus to discover hello-web on ports {ports}")
    assert found == ports


@needs_consul_sd
def test_targets_carry_consul_labels(prometheus):
    for target in prometheus.targets("hello-web"):
        labels = target["discoveredLabels"]
        assert labels["__meta_consul_service"] == "hello-web"
        assert labels["__meta_consul_node"] == "test-node"
        assert ",v1," in labels["__meta_consul_tags"]


def test_corral_metrics_scraped(prometheus):
    def corral_up() -> bool:
        targets = prometheus.targets("corral")
        return bool(targets) and targets[0]["health"] == "up"

    wait_until(corral_up, 30, "prometheus to scrape corral's metrics")
    result = prometheus.api("/api/v1/query", query="corral_catalog_nodes")["result"]
    assert result[0]["value"][1] == "1"


def test_scraped_series_have_labels(prometheus):
    def instances() -> list:
        return prometheus.api("/api/v1/query", query='corral_catalog_service_instances{job="corral"}')["result"]

    result = wait_until(instances, 30, "the instance count to be scraped")
    assert float(result[0]["value"][1]) >= 2

    def scrapes_counted() -> list:
        query = 'corral_http_requests_total{route="/v1/agent/metrics",status="200"}'
        return prometheus.api("/api/v1/query", query=query)["result"]

    # A scrape is counted when its response is sent, so the count shows from the second scrape on.
    requests = wait_until(scrapes_counted, 30, "the scrapes to be counted")
    assert float(requests[0]["value"][1]) >= 1


@needs_consul_sd
def test_targets_gone_after_stop(cluster, prometheus):
    cluster.cli("job", "stop", "hello-web")
    assert cluster.passing_instances() == []
    wait_until(lambda: prometheus.targets("hello-web") == [], 30, "prometheus to drop the hello-web targets")
    assert prometheus.target_ports("hello-web") == []
