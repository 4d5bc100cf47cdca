"""The test bed's local registry gives real repository digests."""

import pytest

from testbed import DockerBed, Registry

pytestmark = pytest.mark.docker


def test_pushed_image_digest_is_the_registrys_content_digest(
    docker_bed: DockerBed, registry: Registry, singleuser_image: str
) -> None:
    repo = f"{registry.address}/gpuspawner-test/singleuser"
    docker_bed.api.tag(singleuser_image, repo, "bed")
    try:
        for line in docker_bed.api.push(repo, "bed", stream=True, decode=True):
            assert "error" not in line, line
        repo_digests = docker_bed.api.inspect_image(f"{repo}:bed")["RepoDigests"]
        assert f"{repo}@{registry.manifest_digest('gpuspawner-test/singleuser', 'bed')}" in repo_digests
    finally:
        docker_bed.api.remove_image(f"{repo}:bed")
