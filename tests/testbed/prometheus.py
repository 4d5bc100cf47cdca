"""A throwaway Prometheus for one test: Debian's `prometheus`, on 127.0.0.1 only, scraping one hub.

Test scaffolding only. It scrapes the hub's ``/hub/metrics`` every second with a token holding
``read:metrics`` (as a lab's Prometheus would), keeps its data in a temporary folder, and is
stopped and removed at the end. Queries go through its HTTP API, as Grafana's would.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from testbed import free_port, wait_for


def find_prometheus() -> str | None:
    return shutil.which("prometheus")


@dataclass
class PrometheusServer:
    folder: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, binary: str, *, target: str, metrics_path: str, token: str) -> PrometheusServer:
        """Scrape ``http://<target><metrics_path>`` (host:port on loopback) with `token`, every second."""
        folder = Path(tempfile.mkdtemp(prefix="gpuspawner-prometheus-"))
        (folder / "token").write_text(token)
        (folder / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: jupyterhub
    metrics_path: {metrics_path}
    authorization:
      credentials_file: {folder / 'token'}
    static_configs:
      - targets: ["{target}"]
""")
        port = free_port()
        log = open(folder / "prometheus.log", "ab")
        process = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        server = cls(folder, port, process)
        try:
            wait_for(server._ready, timeout=60, what=f"Prometheus at {server.url}")
        except BaseException:
            server.stop()
            raise
        return server

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}: {self.log_tail()}")
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def log_tail(self) -> str:
        log = self.folder / "prometheus.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector (each item has ``metric``, the labels, and ``value``)."""
        r = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus refused {promql!r}: {body.get('errorType')}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = requests.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return targets

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
