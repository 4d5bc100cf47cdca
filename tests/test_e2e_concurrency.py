"""Docker calls of different users do not queue behind each other: a slow pull holds up nobody else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import simnvml
from helpers import container_of, read_progress, sim_config
from testbed import DockerBed
from testbed.hub import RunningHub

pytestmark = pytest.mark.docker


def test_while_a_slow_pull_runs_another_user_gets_a_gpu_starts_and_stops(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, light_image: str,
    slow_image: Callable[[int, float], str], tmp_path: Path,
) -> None:
    big = slow_image(48, 24)  # about 24 s through the throttled proxy
    spec = simnvml.write_spec(tmp_path / "gpus.json", [simnvml.gpu(0), simnvml.gpu(1)])
    profiles = [
        {"slug": "gpu-light", "display_name": "1 GPU, light", "image": light_image, "gpus": 1, "default": True},
        {"slug": "big", "display_name": "Big", "image": big},
    ]
    hub = start_hub(extra=sim_config(spec, f"""
c.GPUSpawner.profiles = {profiles!r}
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
"""))
    assert hub.spawn("puller", options={"profile": "big"}).status_code == 202
    assert "Pulling image" in read_progress(hub, "puller", until="Pulling image")[-1]

    # The other user's allocation, container creation and start do not wait for the pull...
    assert hub.spawn("other", options={"profile": "gpu-light"}).status_code == 202
    hub.wait_ready("other", timeout=60)
    assert hub.user_get("other", "api/status").status_code == 200
    container = container_of(docker_bed, hub, "other")
    gpu = container["Labels"]["gpuspawner.devices"]
    assert gpu in {simnvml.gpu(0)["uuid"], simnvml.gpu(1)["uuid"]}
    assert docker_bed.hook_record(container["Id"])["devices"] == [gpu]
    # ...nor does stopping it...
    hub.stop_server("other", timeout=20)
    # ...all while the first user's image is still on its way.
    assert hub.server_model("puller")["pending"] == "spawn"

    hub.wait_ready("puller", timeout=120)  # and the slow pull does finish
