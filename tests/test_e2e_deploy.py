"""The deploy kit for real: the hub image builds from a locally made base and its hub answers;
the compose file validates."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from conftest import ROOT, unavailable
from testbed import DockerBed, free_port, wait_for

pytestmark = pytest.mark.docker
COMPOSE = ROOT / "docker/docker-compose.yml"


@pytest.fixture(scope="module")
def hub_image(docker_bed: DockerBed) -> str:
    out = subprocess.run(
        [str(ROOT / "docker/hub/build.sh"), "gpuspawner-test/hub:ci"],
        env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def network(docker_bed: DockerBed) -> Iterator[str]:
    name = "gpst-" + secrets.token_hex(4)
    docker_bed.api.create_network(name)
    yield name
    docker_bed.api.remove_network(name)


def test_the_hub_image_starts_a_hub_that_answers(docker_bed: DockerBed, hub_image: str, network: str) -> None:
    port = free_port()
    container = docker_bed.client.containers.run(
        hub_image, detach=True, name=network + "-hub", network=network,
        ports={"8000/tcp": ("127.0.0.1", port)},
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"}},
        environment={"GPUSPAWNER_NETWORK": network, "GPUSPAWNER_HUB_CONNECT_IP": network + "-hub"},
    )
    try:
        def answers() -> dict | None:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/hub/api/", timeout=2)
            except requests.ConnectionError:
                return None
            return r.json() if r.status_code == 200 else None

        try:
            info = wait_for(answers, timeout=90, what="the hub in the image to answer")
        except TimeoutError:
            raise AssertionError(container.logs()[-3000:].decode(errors="replace")) from None
        assert "version" in info
        image = docker_bed.api.inspect_image(hub_image)
        assert image["Config"]["Labels"]["org.opencontainers.image.title"] == "gpuspawner hub"
        # the shipped config ran: shared-password login, its secrets in the data volume
        listing = container.exec_run(["ls", "/srv/jupyterhub/data"]).output.decode()
        assert "user-password" in listing and "jupyterhub.sqlite" in listing
    finally:
        container.remove(force=True)


def test_the_compose_file_validates_and_is_safe_by_default() -> None:
    if shutil.which("docker-compose") is None:
        unavailable("docker-compose is not installed (Debian package docker-compose)")
    out = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    hub = yaml.safe_load(out.stdout)["services"]["hub"]
    assert hub["ports"] == ["127.0.0.1:8000:8000/tcp"]  # not reachable from other machines
    assert "/var/run/docker.sock:/var/run/docker.sock:rw" in hub["volumes"]
    assert any(v.startswith("hub-data:/srv/jupyterhub/data") for v in hub["volumes"])
    assert hub["environment"]["GPUSPAWNER_NETWORK"] in hub["networks"]
    assert hub["build"]["dockerfile"] == "docker/hub/Dockerfile"
    assert (ROOT / "docker/.env").read_text().strip() == "COMPOSE_PROJECT_NAME=gpuspawner"
