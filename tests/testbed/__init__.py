"""The test bed: a real Docker engine, the stand-in NVIDIA hook's records, a local registry.

Test scaffolding only; nothing here is imported by gpuspawner itself.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import requests

TESTBED_DIR = Path(os.environ.get("GPUSPAWNER_TESTBED", "/var/tmp/gpuspawner-testbed"))


def require_docker() -> bool:
    """True where a missing engine must fail the run instead of skipping (CI)."""
    return os.environ.get("GPUSPAWNER_REQUIRE_DOCKER", "") not in ("", "0", "false", "no")


def docker_problem() -> str | None:
    """None if a Docker engine answers; else one line saying what is wrong."""
    try:
        client = docker.from_env(version="auto", timeout=10)
        client.ping()
    except Exception as e:  # any failure to reach the engine reads the same to the user
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return f"no Docker engine answers at {host} ({type(e).__name__}); start one with tests/testbed/testbed.sh start"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, *, timeout: float, interval: float = 0.2, what: str) -> Any:
    """Poll until predicate() returns something truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler of a test's own HTTP server: replies with :meth:`reply`, logs nothing."""

    def reply(self, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serving(host: str, handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[http.server.ThreadingHTTPServer]:
    """An HTTP server on `host` (a free port) answering with `handler` in threads, while the block runs."""
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class DockerBed:
    """The Docker engine as the tests see it, through docker-py."""

    def __init__(self) -> None:
        self.client = docker.from_env(version="auto", timeout=120)
        self.api = self.client.api

    @property
    def bridge_gateway(self) -> str:
        """The host's address on Docker's default bridge: containers reach the hub there."""
        for cfg in self.api.inspect_network("bridge")["IPAM"]["Config"]:
            net = ipaddress.ip_network(cfg["Subnet"])
            if net.version == 4:
                # The default bridge often omits its gateway: Docker gives it the first host address.
                return str(cfg.get("Gateway") or net[1])
        raise RuntimeError("Docker's default bridge has no IPv4 subnet")

    def hook_record(self, container_id: str, *, timeout: float = 10) -> dict[str, Any]:
        """What the stand-in nvidia-container-runtime-hook recorded for a started container."""
        path = TESTBED_DIR / "hook-records" / f"{container_id}.json"
        wait_for(path.exists, timeout=timeout, what=f"a hook record at {path}")
        record: dict[str, Any] = json.loads(path.read_text())
        return record

    def containers_labelled(self, label: str) -> list[dict[str, Any]]:
        return list(self.api.containers(all=True, filters={"label": [label]}))


@dataclass
class Registry:
    """Debian's docker-registry serving on 127.0.0.1 (an insecure registry dockerd allows)."""

    process: subprocess.Popen[bytes]
    address: str

    @classmethod
    def start(cls, binary: str, workdir: Path, *, host: str = "127.0.0.1", port: int | None = None,
              storage: Path | None = None, name: str = "registry", wait: bool = True) -> Registry:
        """Serve on host:port (a free port on loopback by default) from `storage` (default: workdir/data);
        several registries may serve one storage folder, each at its own address."""
        port = port or free_port()
        config = workdir / f"{name}.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {storage or workdir / 'data'}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: '{host}:{port}'}}\n"
        )
        log = open(workdir / f"{name}.log", "wb")
        process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        reg = cls(process=process, address=f"{host}:{port}")
        if wait:
            reg.wait()
        return reg

    def wait(self) -> None:
        wait_for(self._answers, timeout=30, what=f"docker-registry on {self.address}")

    def _answers(self) -> bool:
        try:
            return requests.get(f"http://{self.address}/v2/", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def manifest_digest(self, repo: str, tag: str) -> str:
        """The registry's own Docker-Content-Digest for repo:tag."""
        r = requests.head(
            f"http://{self.address}/v2/{repo}/manifests/{tag}",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
            timeout=10,
        )
        r.raise_for_status()
        return str(r.headers["Docker-Content-Digest"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
