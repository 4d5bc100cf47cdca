"""End to end: the GPU queue with a real hub, real containers and simulated GPUs.

Waiters are served in the order they came, each sees its place in line move in the progress
stream, and a waiter who cancels leaves the line at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

import simnvml
from gpuspawner.store import AuditStore
from helpers import container_of, login, read_progress, sim_config
from testbed import DockerBed, wait_for
from testbed.hub import RunningHub

pytestmark = pytest.mark.docker

QUEUE = """
c.GPUSpawner.gpu_request = 1
c.GPUSpawner.gpu_wait_timeout = 300
c.Spawner.start_timeout = 300
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 1}
"""


def ada_holds_the_one_gpu(start_hub: Callable[..., RunningHub], tmp_path: Path) -> RunningHub:
    """A hub with one GPU and a queue, ada's server holding the GPU."""
    spec = tmp_path / "gpus.json"
    simnvml.write_spec(spec, [simnvml.gpu(0)])
    hub = start_hub(extra=sim_config(spec, QUEUE))
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    return hub


def places(hub: RunningHub, user: str, *, until: str) -> list[str]:
    """The places in line `user`'s spawn announced, in order, each once: ["3rd", "2nd", "1st"]."""
    seen: list[str] = []
    for message in read_progress(hub, user, until=until, timeout=120):
        m = re.search(r"(\d+(?:st|nd|rd|th)) in line", message)
        if m and (not seen or seen[-1] != m.group(1)):
            seen.append(m.group(1))
    return seen


def test_waiters_get_the_gpu_in_the_order_they_came_and_see_their_place_move(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    hub = ada_holds_the_one_gpu(start_hub, tmp_path)
    for user, place in (("bob", "1st"), ("cyd", "2nd"), ("dan", "3rd")):
        assert hub.spawn(user).status_code == 202
        assert places(hub, user, until=f"{place} in line") == [place]

    hub.stop_server("ada")  # the GPU goes to bob, who came first; cyd and dan move up
    hub.wait_ready("bob", timeout=120)
    assert places(hub, "dan", until="2nd in line") == ["3rd", "2nd"]
    assert not hub.server_model("cyd")["ready"] and not hub.server_model("dan")["ready"]

    hub.stop_server("cyd")  # cyd gives up waiting: dan is next at once
    assert places(hub, "dan", until="1st in line") == ["3rd", "2nd", "1st"]

    hub.stop_server("bob")
    hub.wait_ready("dan", timeout=120)
    gpu = container_of(docker_bed, hub, "dan")["Labels"]["gpuspawner.devices"]
    assert docker_bed.hook_record(container_of(docker_bed, hub, "dan")["Id"])["devices"] == [gpu]
    store = AuditStore(f"sqlite:///{hub.settings.workdir / 'gpuspawner-audit.sqlite'}")
    cyd = wait_for(lambda: next((r for r in store.iter_records() if r.user == "cyd" and r.sealed), None),
                   timeout=60, interval=0.3, what="cyd's record to be closed")
    assert cyd.outcome == "failed" and "cancelled" in (cyd.error or "") and cyd.devices == ()


def test_the_spawn_form_shows_how_many_wait(
    start_hub: Callable[..., RunningHub], singleuser_image: str, tmp_path: Path
) -> None:
    spec = tmp_path / "gpus.json"
    simnvml.write_spec(spec, [simnvml.gpu(0)])
    profiles = [
        {"slug": "cpu", "display_name": "CPU", "image": singleuser_image, "default": True},
        {"slug": "gpu", "display_name": "1 GPU", "image": singleuser_image, "gpus": 1},
    ]
    hub = start_hub(extra=sim_config(spec, QUEUE + f"c.GPUSpawner.profiles = {profiles!r}\n"))
    for user in ("ada", "bob"):
        assert hub.spawn(user, options={"profile": "gpu"}).status_code in (201, 202)
    hub.wait_ready("ada")
    places(hub, "bob", until="1st in line")
    form = login(hub, "cyd").get(f"{hub.url}/hub/spawn", timeout=60).text
    assert 'data-queued="gpu">1 waiting ahead<' in form and 'data-queued="cpu"' not in form


def test_a_hub_kill_drops_the_waiters_and_closes_their_records(
    start_hub: Callable[..., RunningHub], tmp_path: Path
) -> None:
    hub = ada_holds_the_one_gpu(start_hub, tmp_path)
    assert hub.spawn("bob").status_code == 202
    places(hub, "bob", until="1st in line")
    hub.kill()
    hub.start()
    assert hub.server_model("bob") is None and hub.server_model("ada")["ready"]
    store = AuditStore(f"sqlite:///{hub.settings.workdir / 'gpuspawner-audit.sqlite'}")
    bob = wait_for(lambda: next((r for r in store.iter_records() if r.user == "bob" and r.sealed), None),
                   timeout=60, interval=0.3, what="bob's record to be closed")
    assert (bob.outcome, bob.error) == ("abandoned", "The hub stopped while this server was starting.")
    assert hub.spawn("bob").status_code == 202  # he may ask again, and waits in line again
    assert places(hub, "bob", until="1st in line") == ["1st"]
