"""Fixtures of the test bed: a real Docker engine, real images, a local registry, real hubs.

Tests marked ``docker`` need a Docker engine. Where none answers they are skipped, and the
run's header says why in one line; with ``GPUSPAWNER_REQUIRE_DOCKER=1`` (CI) a missing engine
or a missing piece of the test bed fails them instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import build_docker_dir, build_singleuser, unavailable
from testbed import DockerBed, Registry, docker_problem, require_docker
from testbed.hub import HubSetup, RunningHub, chp_path


def pytest_report_header(config: pytest.Config) -> str:
    problem = docker_problem()
    if problem is None:
        return "docker engine: answers; end-to-end tests run"
    verdict = "they FAIL (GPUSPAWNER_REQUIRE_DOCKER=1)" if require_docker() else "end-to-end tests are skipped"
    return f"docker engine: {problem}; {verdict}"


@pytest.fixture(scope="session")
def docker_bed() -> DockerBed:
    problem = docker_problem()
    if problem is not None:
        unavailable(problem)
    return DockerBed()


@pytest.fixture(scope="session")
def singleuser_image(docker_bed: DockerBed) -> str:
    """A light image running the real jupyterhub-singleuser as a non-root user (built once)."""
    return build_singleuser("gpuspawner-test/singleuser", "jupyter_server")


@pytest.fixture(scope="session")
def registry(docker_bed: DockerBed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A real registry (Debian's docker-registry) on 127.0.0.1, for real repository digests."""
    binary = shutil.which("docker-registry")
    if binary is None:
        unavailable("docker-registry is not installed (Debian package docker-registry)")
    reg = Registry.start(binary, tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture
def hub_token() -> str:
    return secrets.token_hex(32)


@pytest.fixture
def start_hub(
    docker_bed: DockerBed, singleuser_image: str, tmp_path: Path, hub_token: str
) -> Iterator[Callable[..., RunningHub]]:
    """Start real hubs (GPUSpawner, real proxy, real containers); all are stopped afterwards.

    Each test's hub has its own hub_id, so the containers it leaves behind, if any, are found
    by their labels and removed.
    """
    if chp_path() is None:
        unavailable("configurable-http-proxy is not installed (npm install -g configurable-http-proxy)")
    hubs: list[RunningHub] = []
    hub_id = "test-" + secrets.token_hex(4)

    def start(*, extra: str = "", timeout: float = 60, **settings_overrides: Any) -> RunningHub:
        settings = HubSetup(**{
            "workdir": tmp_path, "image": singleuser_image, "hub_ip": docker_bed.bridge_gateway, "token": hub_token,
            "hub_id": hub_id, "extra": extra, **settings_overrides,
        })
        hub = RunningHub(settings)
        hubs.append(hub)
        return hub.start(timeout=timeout)

    yield start
    for hub in hubs:
        hub.stop()
    kept_id = tmp_path / "gpuspawner-hub-id"  # a hub not given its id makes its own
    for label_id in {hub_id, kept_id.read_text().strip() if kept_id.exists() else hub_id}:
        for c in docker_bed.containers_labelled(f"gpuspawner.hub={label_id}"):
            docker_bed.api.remove_container(c["Id"], force=True)


@pytest.fixture(scope="session")
def lab_image(docker_bed: DockerBed) -> str:
    """The single-user image with JupyterLab (the one `make run` uses), built once."""
    return build_singleuser("gpuspawner/singleuser", "jupyterlab")


@pytest.fixture(scope="session")
def light_image(docker_bed: DockerBed) -> str:
    """A container that answers HTTP at once (docker/light): its start costs almost nothing."""
    return build_docker_dir(docker_bed, "light", "gpuspawner-test/light")


@pytest.fixture
def slow_image(docker_bed: DockerBed, registry: Registry, light_image: str) -> Iterator[Callable[[int, float], str]]:
    """make(megabytes, seconds): an image of that size, pushed to the local registry, absent from
    the engine, whose pull through a throttled proxy takes about that long. Returns its reference."""
    from testbed.throttle import ThrottledProxy, push_slow_image

    proxies: list[ThrottledProxy] = []
    made: list[str] = []

    def make(megabytes: int, seconds: float) -> str:
        ref, proxy = push_slow_image(
            docker_bed, registry.address, base=light_image, repo="gpuspawner-test/big", megabytes=megabytes, seconds=seconds
        )
        proxies.append(proxy)
        made.append(ref)
        return ref

    yield make
    for ref in made:
        try:
            docker_bed.api.remove_image(ref, force=True)
        except Exception:
            pass
    for proxy in proxies:
        proxy.stop()


from testbed.postgres import PostgresServer, find_bindir  # noqa: E402  (appended with its fixtures)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server (Debian's `postgresql`) on 127.0.0.1, for the whole session."""
    bindir = find_bindir()
    if bindir is None:
        unavailable("PostgreSQL is not installed (Debian package postgresql; docker/host/system-deps.sh test)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg is not installed (pip install -e '.[test]', or pip install 'psycopg[binary]')")
    server = PostgresServer.start(bindir)
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty PostgreSQL database for this test: its SQLAlchemy URL (postgresql+psycopg://…)."""
    return postgres_server.create_database()


from testbed.swarm import SwarmBed, SwarmBedError  # noqa: E402  (appended with its fixture)


@pytest.fixture(scope="session")
def swarm_bed(docker_bed: DockerBed, light_image: str) -> Iterator[SwarmBed]:
    """The multi-host test bed (tests/testbed/swarm.py), once per session: a Swarm manager and two GPU
    workers (2 GPUs each, worker1 also a MIG slice), each a Docker engine of its own on this machine."""
    if os.geteuid() != 0:
        unavailable("the Swarm test bed needs root (it adds a network interface and enters namespaces)")
    for tool, package in (("docker-registry", "docker-registry"), ("ip", "iproute2"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (Debian package {package})")
    bed = SwarmBed(base_image=light_image)
    try:
        bed.start()
    except SwarmBedError as e:
        pytest.fail(f"the Swarm test bed did not start: {e}", pytrace=False)
    yield bed
    bed.stop()
    assert bed.leftovers() == []
