"""End to end: profiles through a real hub's REST API: what is refused, with which status and
message, and that a refusal leaves nothing behind (no claim, no container)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import simnvml
from helpers import container_of, gpus_cli, sim_config
from testbed import DockerBed
from testbed.hub import RunningHub

pytestmark = pytest.mark.docker


def profiles_config(image: str, spec: Path, extra: str = "") -> str:
    profiles = [
        {"slug": "cpu", "display_name": "CPU only", "image": image, "default": True},
        {"slug": "a100-1", "display_name": "1 × A100", "image": image, "gpus": {"count": 1, "model": "A100"},
         "cpu_limit": 1.5, "mem_limit": "1G", "environment": {"OMP_NUM_THREADS": "2"}, "allowed_groups": ["ml-lab"]},
        {"slug": "any-gpu", "display_name": "Any GPU", "image": image, "gpus": 1},
    ]
    return sim_config(spec, f"""
c.JupyterHub.allow_named_servers = True
c.JupyterHub.load_groups = {{"ml-lab": {{"users": ["ada"]}}}}
c.GPUSpawner.profiles = {profiles!r}
{extra}
""")


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return simnvml.write_spec(tmp_path / "gpus.json", [simnvml.gpu(0), simnvml.gpu(1)])


@pytest.fixture
def hub(start_hub: Callable[..., RunningHub], singleuser_image: str, spec: Path) -> RunningHub:
    return start_hub(extra=profiles_config(singleuser_image, spec))


@pytest.mark.parametrize(
    ("user", "options", "status", "message"),
    [
        ("bob", {"profile": "h100-8"}, 400, "Unknown profile 'h100-8'; the profiles you may use: 'cpu', 'any-gpu'."),
        ("bob", {"profile": "a100-1"}, 403, "Profile 'a100-1' is not open to bob; the profiles you may use: 'cpu', 'any-gpu'."),
        ("ada", {"profile": "a100-1", "image": "evil/miner:1"}, 400, "Unknown option 'image'"),
        ("ada", {"devices": ["GPU-00000000-0000-4000-8000-000000000000"]}, 400, "Unknown option 'devices'"),
        ("ada", {"profile": "cpu", "mem_limit": "1T"}, 400, "Unknown option 'mem_limit'"),
        ("ada", {"environment": {"LD_PRELOAD": "x"}}, 400, "Unknown option 'environment'"),
    ],
    ids=["unknown-slug", "not-allowed", "image", "devices", "limits", "environment"],
)
def test_refusals_through_the_rest_api(
    hub: RunningHub, docker_bed: DockerBed, user: str, options: dict, status: int, message: str
) -> None:
    r = hub.spawn(user, options=options)
    assert r.status_code == status, r.text
    assert r.json()["message"].startswith(message), r.json()["message"]
    assert hub.server_model(user) is None
    assert docker_bed.containers_labelled(f"gpuspawner.hub={hub.settings.hub_id}") == []


def test_refusals_leave_both_gpus_free(hub: RunningHub, docker_bed: DockerBed) -> None:
    for options, status in (({"profile": "nope"}, 400), ({"profile": "a100-1"}, 403),
                            ({"profile": "any-gpu", "image": "x:1"}, 400)):
        r = hub.spawn("bob", options=options)
        assert r.status_code == status, r.text
    for user in ("ada", "cyd"):
        r = hub.spawn(user, options={"profile": "any-gpu"})
        assert r.status_code in (201, 202), r.text
        hub.wait_ready(user)
    held = {container_of(docker_bed, hub, u)["Labels"]["gpuspawner.devices"] for u in ("ada", "cyd")}
    assert held == {simnvml.gpu(0)["uuid"], simnvml.gpu(1)["uuid"]}


def test_the_profile_sets_image_gpus_limits_environment(
    hub: RunningHub, docker_bed: DockerBed, singleuser_image: str, spec: Path
) -> None:
    r = hub.spawn("ada", options={"profile": "a100-1"})
    assert r.status_code in (201, 202), r.text
    model = hub.wait_ready("ada")
    container = container_of(docker_bed, hub, "ada")
    info = docker_bed.api.inspect_container(container["Id"])
    assert info["Config"]["Image"] == singleuser_image
    assert "OMP_NUM_THREADS=2" in info["Config"]["Env"]
    assert info["HostConfig"]["Memory"] == 2**30
    assert info["HostConfig"]["CpuQuota"] == 150_000
    assert info["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == [simnvml.gpu(0)["uuid"]]
    assert container["Labels"]["gpuspawner.profile"] == "a100-1"
    # admins see the profile and devices in the server's state
    assert model["state"]["profile"] == "a100-1"
    assert model["state"]["gpu_devices"] == [simnvml.gpu(0)["uuid"]]
    (row,) = [d for d in gpus_cli(hub)["devices"] if d["holder"]]
    assert (row["holder"], row["profile"], row["where"]) == ("ada", "a100-1", "held by ada (profile a100-1)")

    # the next spawn of another server starts from the configured defaults, not this profile
    r = hub.spawn_named("ada", "plain", options={"profile": "cpu"})
    assert r.status_code in (201, 202), r.text
    hub.wait_ready("ada", "plain")
    plain = [c for c in docker_bed.containers_labelled(f"gpuspawner.hub={hub.settings.hub_id}")
             if c["Labels"]["gpuspawner.server"] == "plain"][0]
    plain_info = docker_bed.api.inspect_container(plain["Id"])
    assert "OMP_NUM_THREADS=2" not in plain_info["Config"]["Env"]
    assert "NVIDIA_VISIBLE_DEVICES=void" in plain_info["Config"]["Env"]
    assert plain_info["HostConfig"]["Memory"] == 0


def test_an_admin_starts_a_server_for_another_user_within_that_users_profiles(hub: RunningHub) -> None:
    # the test driver is an admin service; access is judged for the server's owner
    assert hub.spawn("bob", options={"profile": "a100-1"}).status_code == 403
    r = hub.spawn("bob", options={"profile": "any-gpu"})
    assert r.status_code in (201, 202), r.text
    assert hub.wait_ready("bob")["state"]["profile"] == "any-gpu"


def test_gpu_quota_across_a_users_named_servers(
    start_hub: Callable[..., RunningHub], singleuser_image: str, tmp_path: Path
) -> None:
    spec = simnvml.write_spec(tmp_path / "four.json", [simnvml.gpu(i) for i in range(4)])
    hub = start_hub(extra=profiles_config(singleuser_image, spec, """
c.GPUSpawner.max_gpus_per_user = 1
c.GPUSpawner.max_gpus_per_group = {"ml-lab": 2}
"""))
    assert hub.spawn_named("bob", "one", options={"profile": "any-gpu"}).status_code in (201, 202)
    hub.wait_ready("bob", "one")
    r = hub.spawn_named("bob", "two", options={"profile": "any-gpu"})
    assert r.status_code == 403
    assert r.json()["message"] == (
        "GPU quota reached: you may hold 1 GPU across your servers; 1 held by your other servers (one), "
        "and this server needs 1. Stop another server or choose a profile with fewer GPUs."
    )
    assert hub.spawn_named("bob", "three", options={"profile": "cpu"}).status_code in (201, 202)  # CPU is never counted

    for name in ("one", "two"):  # ada's group allows 2
        assert hub.spawn_named("ada", name, options={"profile": "a100-1"}).status_code in (201, 202)
        hub.wait_ready("ada", name)
    assert hub.spawn_named("ada", "three", options={"profile": "a100-1"}).status_code == 403


def test_progress_tells_profile_devices_image_and_start(
    start_hub: Callable[..., RunningHub], singleuser_image: str, spec: Path
) -> None:
    # the spawn request answers at once, so the progress stream is read while the server starts
    hub = start_hub(extra=profiles_config(
        singleuser_image, spec, 'c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}'
    ))
    events: list[str] = []
    r = hub.spawn("ada", options={"profile": "a100-1"})
    assert r.status_code == 202
    with hub.session.get(f"{hub.api_url}/users/ada/server/progress", stream=True, timeout=30) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                event = json.loads(line[5:])
                events.append(event["message"])
                if event.get("ready") or event.get("failed"):
                    break
    assert "Server ready at /user/ada/" in events[-1]
    text = "\n".join(events)
    assert "Profile: 1 × A100 (1 × A100 · 1.5 CPUs · 1 GiB memory)" in text
    assert f"Allocated NVIDIA A100-SXM4-80GB ({simnvml.gpu(0)['uuid']})" in text
    assert "Checking image" in text
    assert "Starting container" in text


def test_callable_profiles_per_user_and_a_bad_result_is_the_hubs_fault(
    start_hub: Callable[..., RunningHub], singleuser_image: str, spec: Path
) -> None:
    hub = start_hub(extra=sim_config(spec, f"""
async def lab_profiles(spawner):
    if spawner.user.name == "broken":
        return [{{"slug": "x", "display_name": "X", "image": "unpinned"}}]
    return [{{"slug": "mine-" + spawner.user.name, "display_name": "Yours", "image": {singleuser_image!r}}}]
c.GPUSpawner.profiles = lab_profiles
"""))
    assert hub.spawn("ada", options={"profile": "mine-bob"}).status_code == 400
    assert hub.spawn("ada", options={"profile": "mine-ada"}).status_code in (201, 202)
    r = hub.spawn("broken")
    assert r.status_code == 500
    assert "GPUSpawner.profiles[0] (slug 'x'): 'image' is 'unpinned', which is not pinned" in r.json()["message"]


def test_an_unpinned_profile_image_stops_the_hub(start_hub: Callable[..., RunningHub]) -> None:
    bad = '[{"slug": "cpu", "display_name": "CPU", "image": "quay.io/jupyter/base-notebook:latest"}]'
    with pytest.raises(RuntimeError) as e:
        start_hub(extra=f"c.GPUSpawner.profiles = {bad}")
    assert (
        "Bad configuration: GPUSpawner.profiles[0] (slug 'cpu'): 'image' is "
        "'quay.io/jupyter/base-notebook:latest', which is not pinned"
    ) in str(e.value)
