"""The test bed's GPU path: dockerd hands DeviceRequests to the stand-in NVIDIA hook.

These tests check the bed itself, so that later tests can trust what the hook records
about which devices each container really received.
"""

from collections.abc import Iterator

import docker
import pytest

from helpers import unavailable
from testbed import DockerBed

pytestmark = pytest.mark.docker

UUIDS = ["GPU-11111111-2222-3333-4444-555555555555", "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"]


@pytest.fixture
def containers(docker_bed: DockerBed) -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    for cid in created:
        docker_bed.api.remove_container(cid, force=True)


def run_container(bed: DockerBed, image: str, created: list[str], *, device_requests: list[dict] | None) -> str:
    host_config = bed.api.create_host_config(device_requests=device_requests)
    try:
        cid = bed.api.create_container(image, command=["true"], host_config=host_config)["Id"]
    except docker.errors.APIError as e:
        if "could not select device driver" in str(e):
            unavailable("this Docker engine has no nvidia device driver: start it with tests/testbed/testbed.sh")
        raise
    created.append(cid)
    bed.api.start(cid)
    assert bed.api.wait(cid, timeout=60)["StatusCode"] == 0
    return cid


def test_exactly_the_requested_uuids_reach_the_container(
    docker_bed: DockerBed, singleuser_image: str, containers: list[str]
) -> None:
    cid = run_container(
        docker_bed,
        singleuser_image,
        containers,
        device_requests=[{"Driver": "nvidia", "DeviceIDs": UUIDS, "Capabilities": [["gpu"]]}],
    )
    record = docker_bed.hook_record(cid)
    assert record["devices"] == UUIDS
    assert record["argv"] == ["prestart"]


def test_a_container_without_device_requests_never_meets_the_hook(
    docker_bed: DockerBed, singleuser_image: str, containers: list[str]
) -> None:
    cid = run_container(docker_bed, singleuser_image, containers, device_requests=None)
    with pytest.raises(TimeoutError):
        docker_bed.hook_record(cid, timeout=1)
