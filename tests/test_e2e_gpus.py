"""End to end: GPU allocation with a real hub, real containers, the Docker engine's GPU path and
simulated GPUs (the hub's pynvml talks to tests/simnvml.py instead of libnvidia-ml.so).

What a container received is read from the stand-in nvidia-container-runtime-hook's records,
that is, from what dockerd really passed to the OCI runtime.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import simnvml
from helpers import container_of, gpus_cli, read_progress, sim_config
from testbed import DockerBed
from testbed.hub import RunningHub

pytestmark = pytest.mark.docker

@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return tmp_path / "gpus.json"


def test_twenty_users_at_once_on_eight_gpus(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, spec: Path
) -> None:
    gpus = [simnvml.gpu(i) for i in range(6)]
    gpus.append(simnvml.gpu(6, processes=[{"pid": 777, "used_memory": 4 * 2**30}]))  # busy outside the hub
    gpus.append(simnvml.gpu(7, lost=True))
    simnvml.write_spec(spec, gpus)
    free = {g["uuid"] for g in gpus[:6]}
    hub = start_hub(extra=sim_config(spec, "c.GPUSpawner.gpu_request = 1"))
    users = [f"user{i:02d}" for i in range(20)]
    for user in users:
        hub.create_user(user)

    with ThreadPoolExecutor(len(users)) as pool:
        responses = dict(zip(users, pool.map(lambda u: hub.api("POST", f"/users/{u}/server", json={}, timeout=120), users), strict=True))

    started = sorted(u for u, r in responses.items() if r.status_code in (201, 202))
    refused = sorted(u for u, r in responses.items() if r.status_code == 503)
    assert len(started) == len(free), {u: (r.status_code, r.text[:200]) for u, r in responses.items()}
    assert len(refused) == len(users) - len(free)
    for user in refused:
        message = responses[user].json()["message"]
        assert message.startswith("No free GPU for this server: needs 1 × any GPU; 0 free, 6 held by other servers, "
                                  "1 busy outside the hub, 1 unhealthy."), message
        assert "user0" not in message  # other users' names are for admins only

    received = {}
    for user in started:
        hub.wait_ready(user)
        container = container_of(docker_bed, hub, user)
        record = docker_bed.hook_record(container["Id"])
        received[user] = tuple(record["devices"])
        assert len(received[user]) == 1
        # the container's label, its environment and the hub's state all name the same device
        assert container["Labels"]["gpuspawner.devices"] == received[user][0]
        env = docker_bed.api.inspect_container(container["Id"])["Config"]["Env"]
        assert f"NVIDIA_VISIBLE_DEVICES={received[user][0]}" in env
        assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in env
        assert hub.server_model(user)["state"]["gpu_devices"] == list(received[user])
    assert {uuids[0] for uuids in received.values()} == free  # distinct, and exactly the free ones


def test_a_cpu_only_server_sees_no_gpu(start_hub: Callable[..., RunningHub], docker_bed: DockerBed, spec: Path) -> None:
    simnvml.write_spec(spec, [simnvml.gpu(0)])
    hub = start_hub(extra=sim_config(spec))
    assert hub.spawn("cpu").status_code in (201, 202)
    hub.wait_ready("cpu")
    container = container_of(docker_bed, hub, "cpu")
    info = docker_bed.api.inspect_container(container["Id"])
    assert "NVIDIA_VISIBLE_DEVICES=void" in info["Config"]["Env"]
    assert not info["HostConfig"].get("DeviceRequests")
    assert container["Labels"]["gpuspawner.devices"] == ""
    with pytest.raises(TimeoutError):
        docker_bed.hook_record(container["Id"], timeout=1)


def test_a_kept_container_is_reused_only_while_its_gpu_is_still_the_one_granted(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, spec: Path
) -> None:
    gpu0, gpu1 = simnvml.gpu(0)["uuid"], simnvml.gpu(1)["uuid"]
    simnvml.write_spec(spec, [simnvml.gpu(0), simnvml.gpu(1)])
    hub = start_hub(extra=sim_config(spec, "c.GPUSpawner.gpu_request = 1\nc.DockerSpawner.remove = False\n"))
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    first = container_of(docker_bed, hub, "ada")
    assert first["Labels"]["gpuspawner.devices"] == gpu0
    hub.stop_server("ada")  # kept, stopped: it holds no GPU now
    assert hub.spawn("bob").status_code in (201, 202)
    hub.wait_ready("bob")
    assert container_of(docker_bed, hub, "bob")["Labels"]["gpuspawner.devices"] == gpu0

    # ada's kept container names bob's GPU: it is replaced, never started with it
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    second = container_of(docker_bed, hub, "ada")
    assert second["Id"] != first["Id"]
    assert docker_bed.hook_record(second["Id"])["devices"] == [gpu1]

    # granted the same GPU again, the kept container itself is started
    hub.stop_server("ada")
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    assert container_of(docker_bed, hub, "ada")["Id"] == second["Id"]


def test_a_failed_start_releases_its_gpu_at_once(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, spec: Path
) -> None:
    simnvml.write_spec(spec, [simnvml.gpu(0)])
    doomed = """
def run_as(spawner):
    # the container is created, then fails to start: no such user in the image
    return {"user": "nobody-here"} if spawner.user.name == "doomed" else {}
c.DockerSpawner.extra_create_kwargs = run_as
c.GPUSpawner.gpu_request = 1
"""
    hub = start_hub(extra=sim_config(spec, doomed))
    r = hub.spawn("doomed")
    assert r.status_code >= 500, r.text
    assert hub.server_model("doomed") is None

    r = hub.spawn("lucky")
    assert r.status_code in (201, 202), r.text
    hub.wait_ready("lucky")
    record = docker_bed.hook_record(container_of(docker_bed, hub, "lucky")["Id"])
    assert record["devices"] == [simnvml.gpu(0)["uuid"]]


def test_a_spawn_waits_for_a_gpu_and_starts_when_a_server_stops(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, spec: Path
) -> None:
    simnvml.write_spec(spec, [simnvml.gpu(0), simnvml.gpu(1)])
    hub = start_hub(extra=sim_config(spec, """
c.GPUSpawner.gpu_request = 1
c.GPUSpawner.gpu_wait_timeout = 90
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 1}
"""))
    for user in ("ada", "bob"):
        assert hub.spawn(user).status_code in (201, 202)
        hub.wait_ready(user)
    ada_gpu = container_of(docker_bed, hub, "ada")["Labels"]["gpuspawner.devices"]

    assert hub.spawn("cyd").status_code == 202
    messages = read_progress(hub, "cyd", until="in line")
    assert messages[0] == "Server requested"
    assert "Looking for 1 × any GPU" in messages[1]
    assert "0 free, 2 held by other servers" in messages[-1]
    assert not hub.server_model("cyd")["ready"]

    hub.stop_server("ada")
    hub.wait_ready("cyd", timeout=60)
    assert docker_bed.hook_record(container_of(docker_bed, hub, "cyd")["Id"])["devices"] == [ada_gpu]


def test_after_a_hub_crash_claims_are_rebuilt_from_the_running_containers(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, spec: Path
) -> None:
    simnvml.write_spec(spec, [simnvml.gpu(i) for i in range(4)])
    hub = start_hub(extra=sim_config(spec, "c.GPUSpawner.gpu_request = 1"))
    for user in ("ada", "bob", "cyd"):
        assert hub.spawn(user).status_code in (201, 202)
        hub.wait_ready(user)
    held = {u: container_of(docker_bed, hub, u)["Labels"]["gpuspawner.devices"] for u in ("ada", "bob", "cyd")}

    hub.kill()  # SIGKILL: no shutdown, containers and proxy keep running
    assert hub.process is not None and hub.process.returncode == -signal.SIGKILL
    # a dead container frees its device
    docker_bed.api.kill(container_of(docker_bed, hub, "cyd")["Id"])
    hub.start()

    for user in ("ada", "bob"):
        assert hub.server_model(user)["state"]["gpu_devices"] == [held[user]]
        assert hub.user_get(user, "api/status").status_code == 200
    expected: dict[str, str | None] = {simnvml.gpu(i)["uuid"]: None for i in range(4)}
    expected.update({held["ada"]: "ada", held["bob"]: "bob"})
    assert {d["uuid"]: d["holder"] for d in gpus_cli(hub)["devices"]} == expected

    # new spawns get really free devices, never ada's or bob's
    for user in ("dan", "eve"):
        assert hub.spawn(user).status_code in (201, 202), user
        hub.wait_ready(user)
    new = {docker_bed.hook_record(container_of(docker_bed, hub, u)["Id"])["devices"][0] for u in ("dan", "eve")}
    assert new.isdisjoint({held["ada"], held["bob"]})
    assert len(new) == 2
    r = hub.spawn("fay")
    assert r.status_code == 503 and "0 free, 4 held by other servers" in r.json()["message"]


def test_gpus_command_shows_each_device_and_who_holds_it(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, spec: Path
) -> None:
    simnvml.write_spec(spec, [
        simnvml.gpu(0),
        simnvml.gpu(1, processes=[{"pid": 5, "used_memory": 2**30}]),
        simnvml.gpu(2, lost=True),
        simnvml.gpu(3, mig=[simnvml.mig_device(3, 0)]),
    ])
    hub = start_hub(extra=sim_config(spec, 'c.GPUSpawner.gpu_request = {"mig_profile": "1g.10gb"}\nc.JupyterHub.allow_named_servers = True'))
    hub.create_user("ada")
    r = hub.spawn_named("ada", "course")
    assert r.status_code in (201, 202), r.text
    hub.wait_ready("ada", "course")

    out = gpus_cli(hub)
    where = [(d["index"], d["where"]) for d in out["devices"]]
    assert where == [
        ("0", "free"),
        ("1", "busy outside the hub (1 process)"),
        ("2", "unhealthy"),
        ("3", "MIG mode: see its MIG devices"),
        ("3:mig", "held by ada/course"),
    ]
    assert out["devices"][2]["health"] == "NVML: GPU is lost"
    table = gpus_cli(hub, json_out=False)
    assert "held by ada/course" in table and "1g.10gb" in table
    assert table.rstrip().endswith(f"hub {hub.settings.hub_id}: 1 free, 1 held by its servers.")


def test_unknown_hub_config_values_stop_the_hub(start_hub: Callable[..., RunningHub]) -> None:
    with pytest.raises(RuntimeError) as e:
        start_hub(extra='c.GPUSpawner.gpu_request = {"cuont": 1}', timeout=30)
    assert "GPUSpawner.gpu_request has unknown key 'cuont'" in str(e.value)
