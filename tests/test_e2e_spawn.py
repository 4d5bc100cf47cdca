"""End to end: a real JupyterHub with GPUSpawner starts a real single-user server in a real container."""

from collections.abc import Callable

import docker.errors
import pytest

from testbed import DockerBed
from testbed.hub import RunningHub

pytestmark = pytest.mark.docker


def test_spawn_answer_through_proxy_stop_and_container_is_gone(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed
) -> None:
    hub = start_hub()
    r = hub.spawn("ada")
    assert r.status_code in (201, 202), r.text
    model = hub.wait_ready("ada")

    # The real jupyterhub-singleuser in the container answers, through the hub's proxy.
    status = hub.user_get("ada", "api/status")
    assert status.status_code == 200, status.text
    assert "started" in status.json()

    # The container is labelled as this hub's, for this user's default server.
    (container,) = docker_bed.containers_labelled(f"gpuspawner.hub={hub.settings.hub_id}")
    assert container["Labels"]["gpuspawner.user"] == "ada"
    assert container["Labels"]["gpuspawner.server"] == ""
    assert container["State"] == "running"
    assert model["state"]["object_id"] == container["Id"]
    # ... and it runs as the image's non-root user.
    assert docker_bed.api.inspect_container(container["Id"])["Config"]["User"] == "jovyan"

    hub.stop_server("ada")
    with pytest.raises(docker.errors.NotFound):
        docker_bed.api.inspect_container(container["Id"])
    assert hub.user_get("ada", "api/status").status_code != 200


def test_named_servers_carry_their_server_name(start_hub: Callable[..., RunningHub], docker_bed: DockerBed) -> None:
    hub = start_hub(extra="c.JupyterHub.allow_named_servers = True")
    r = hub.spawn_named("grace", "train")
    assert r.status_code in (201, 202), r.text
    hub.wait_ready("grace", "train")
    (container,) = docker_bed.containers_labelled(f"gpuspawner.hub={hub.settings.hub_id}")
    assert (container["Labels"]["gpuspawner.user"], container["Labels"]["gpuspawner.server"]) == ("grace", "train")
    assert hub.user_get("grace", "train/api/status").status_code == 200
