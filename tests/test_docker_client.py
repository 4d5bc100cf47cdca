"""The hub's Docker client: one, however many servers make their first Docker call at once.

A hub that restarts checks all its servers together, so their first Docker calls arrive in several
threads at the same moment. DockerSpawner makes its client lazily, without a lock: each of those
threads made a client of its own and rebound the class's attribute, and on CPython 3.11 a replaced
client freed while another thread reads that attribute crashes the hub (SIGSEGV; how a restarted
swarm hub died in CI).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer

import pytest
from traitlets.config import Config

from testbed import QuietHandler, serving


class SlowEngine(QuietHandler):
    """A loopback stand-in for the engine's version endpoint, slow enough that first calls overlap."""

    version_requests = 0

    def do_GET(self) -> None:  # http.server calls it by this name
        type(self).version_requests += 1
        time.sleep(0.3)  # an engine answering its first request of a restart
        self.reply(json.dumps({"ApiVersion": "1.45", "Version": "28.2.2"}).encode(), "application/json")


@pytest.fixture
def engine() -> Iterator[ThreadingHTTPServer]:
    SlowEngine.version_requests = 0
    with serving("127.0.0.1", SlowEngine) as server:
        yield server


def test_servers_making_their_first_docker_call_together_share_one_client(engine: ThreadingHTTPServer) -> None:
    from gpuspawner import GPUSpawner

    class JustStarted(GPUSpawner):
        _client = None  # no client made yet, as in a hub that has just started

    config = Config({"DockerSpawner": {"client_kwargs": {"base_url": f"tcp://127.0.0.1:{engine.server_port}"}}})
    spawners = [JustStarted(config=config) for _ in range(6)]
    together = threading.Barrier(len(spawners))

    def first_call(spawner: GPUSpawner) -> object:
        together.wait()
        return spawner.client

    with ThreadPoolExecutor(len(spawners)) as pool:
        clients = list(pool.map(first_call, spawners))
    assert len({id(c) for c in clients}) == 1, "each server made a Docker client of its own"
    assert SlowEngine.version_requests == 1
    assert JustStarted._client is clients[0]  # later calls use it too
