"""End to end on a Docker Swarm: a real hub with GPUSwarmSpawner (gpu-swarm), a manager and two GPU
workers of the multi-host test bed (tests/testbed/swarm.py; 2 GPUs each, worker1 also a MIG slice),
real services. The servers' devices are Swarm's choice; the hub's records, `gpuspawner gpus --swarm`
and the workers' stand-in runtimes must agree on them, the GPU queue and quotas still hold, and a
worker going down ends its servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from docker.types import EndpointSpec, Resources
from prometheus_client.parser import text_string_to_metric_families

from gpuspawner.store import AuditStore
from helpers import gpus_cli, login, read_progress, start_swarm_hub
from testbed import wait_for
from testbed.hub import RunningHub
from testbed.swarm import SwarmBed

pytestmark = pytest.mark.docker

GPUS = {"worker1": ["GPU-w1-0", "GPU-w1-1"], "worker2": ["GPU-w2-0", "GPU-w2-1"]}


@pytest.fixture
def swarm_hub(start_hub: Callable[..., RunningHub], swarm_bed: SwarmBed) -> Iterator[Callable[..., RunningHub]]:
    """start(extra=""): a hub whose servers are services on the bed's swarm, with a 1-GPU, a 2-GPU and a
    MIG profile of the light image; every service it made is removed afterwards."""
    bed = swarm_bed
    profiles = [
        {"slug": "one", "display_name": "1 GPU", "image": bed.base_ref, "gpus": 1, "default": True},
        {"slug": "two", "display_name": "2 GPUs", "image": bed.base_ref, "gpus": 2},
        {"slug": "mig", "display_name": "A MIG slice", "image": bed.base_ref, "gpus": {"mig_profile": "1g.10gb"}},
    ]
    started: list[RunningHub] = []

    def start(extra: str = "") -> RunningHub:
        hub = start_swarm_hub(start_hub, bed, profiles, f"""
c.GPUSpawner.gpu_wait_timeout = 120
c.Spawner.poll_interval = 2
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 1}}
{extra}""")
        started.append(hub)
        return hub

    yield start
    for hub in started:
        hub.stop()
        for service in bed.manager.api.services(filters={"label": f"gpuspawner.hub={hub.settings.hub_id}"}):
            bed.manager.api.remove_service(service["ID"])
    bed.wait_settled()


def records(hub: RunningHub) -> dict[str, Any]:
    """The hub's audit records by user (the newest of each)."""
    store = AuditStore(f"sqlite:///{hub.settings.workdir / 'gpuspawner-audit.sqlite'}")
    return {r.user: r for r in store.iter_records()}


def swarm_gpus(hub: RunningHub, bed: SwarmBed) -> dict[str, Any]:
    """`gpuspawner gpus --swarm --json` as an admin runs it against the manager."""
    return gpus_cli(hub, "--swarm", env={"DOCKER_HOST": bed.manager_url})  # type: ignore[no-any-return]


def placed(hub: RunningHub, bed: SwarmBed, user: str) -> tuple[str, tuple[str, ...]]:
    """(node host name, UUIDs) of `user`'s server as its audit record says, checked against what the
    stand-in runtime on that node saw its container get."""
    record = wait_for(lambda: (r := records(hub).get(user)) and r.node and r.devices and r.container_id and r,
                      timeout=60, interval=0.5, what=f"{user}'s record to name its node and devices")
    uuids = tuple(d.uuid for d in record.devices)
    seen = bed.record(record.hostname, record.container_id)["environment"]
    assert sorted(u for k, v in seen.items() if k.startswith("DOCKER_RESOURCE_") for u in v.split(",")) == sorted(uuids)
    assert "NVIDIA_VISIBLE_DEVICES" not in seen  # Swarm's variables alone name the devices
    return record.hostname, uuids


def test_five_users_ask_for_one_gpu_four_get_distinct_ones_and_the_fifth_waits_its_turn(
    swarm_hub: Callable[..., RunningHub], swarm_bed: SwarmBed
) -> None:
    hub = swarm_hub()
    users = ["ada", "bob", "cyd", "dan"]
    for user in users:
        assert hub.spawn(user, options={"profile": "one"}).status_code in (201, 202)
    for user in users:
        hub.wait_ready(user, timeout=180)
    where = {user: placed(hub, swarm_bed, user) for user in users}
    assert sorted((node, u) for node, (u,) in where.values()) == sorted((n, g) for n, gs in GPUS.items() for g in gs)
    for user in users:  # each server answers through the proxy, from whichever node it runs on
        assert hub.user_get(user, "/api/status").status_code == 200
    cluster = swarm_gpus(hub, swarm_bed)
    held = {d["uuid"]: d["holder"] for d in cluster["devices"] if d["status"] == "held"}
    assert held == {uuids[0]: user for user, (_, uuids) in where.items()}

    assert hub.spawn("eve", options={"profile": "one"}).status_code == 202
    assert any("1st in line" in m for m in read_progress(hub, "eve", until="1st in line", timeout=60))
    hub.stop_server("bob")
    hub.wait_ready("eve", timeout=180)
    assert placed(hub, swarm_bed, "eve")[1] == where["bob"][1]  # bob's GPU, the only one free
    bob = records(hub)["bob"]
    assert (bob.outcome, bob.node, bob.hostname) == ("stopped", swarm_bed.worker(where["bob"][0]).node_id,
                                                     where["bob"][0])
    assert bob.repo_digest == swarm_bed.base_ref and bob.docker_version  # the image by digest, the node's engine
    by_node = {r.hostname: r for r in records(hub).values()}
    assert (by_node["worker1"].driver_version, by_node["worker1"].cuda_driver_version) == ("550.54.15", "12.4")
    assert by_node["worker1"].devices[0].memory_total == 40 * 2**30
    assert by_node["worker2"].driver_version is None  # worker2's engine does not say its driver


def test_a_two_gpu_profile_lands_on_one_node_and_the_mig_profile_gets_its_slice(
    swarm_hub: Callable[..., RunningHub], swarm_bed: SwarmBed
) -> None:
    hub = swarm_hub()
    assert hub.spawn("ada", options={"profile": "one"}).status_code in (201, 202)
    hub.wait_ready("ada", timeout=180)
    # the spawn form counts the whole swarm: ada holds one of the two workers' four GPUs
    form = login(hub, "frank", then="/hub/home").get(f"{hub.url}/hub/spawn", timeout=60).text
    assert form.count("3 of 4 GPUs free") == 2 and "1 of 1 MIG 1g.10gb free" in form
    assert hub.spawn("bob", options={"profile": "two"}).status_code in (201, 202)
    assert hub.spawn("cyd", options={"profile": "mig"}).status_code in (201, 202)
    hub.wait_ready("bob", timeout=180)
    hub.wait_ready("cyd", timeout=180)
    ada_node, _ = placed(hub, swarm_bed, "ada")
    node, uuids = placed(hub, swarm_bed, "bob")
    assert sorted(uuids) == GPUS[node] and node != ada_node  # both GPUs of the node ada leaves whole
    assert placed(hub, swarm_bed, "cyd") == ("worker1", ("MIG-w1-1-0",))
    mig = records(hub)["cyd"].devices[0]
    assert mig.mig_profile == "1g.10gb"


def test_a_worker_going_down_ends_its_servers_and_its_gpus_are_free_when_it_returns(
    swarm_hub: Callable[..., RunningHub], swarm_bed: SwarmBed
) -> None:
    hub = swarm_hub()
    for user in ("ada", "bob"):
        assert hub.spawn(user, options={"profile": "two"}).status_code in (201, 202)
        hub.wait_ready(user, timeout=180)
    nodes = {user: placed(hub, swarm_bed, user)[0] for user in ("ada", "bob")}
    (down_user,) = [u for u, n in nodes.items() if n == "worker2"]
    swarm_bed.stop_worker("worker2")
    try:
        wait_for(lambda: hub.server_model(down_user) is None, timeout=90, interval=1, what=f"{down_user}'s server to end")
        record = wait_for(lambda: (r := records(hub)[down_user]).sealed and r, timeout=60, interval=0.5,
                          what=f"{down_user}'s record to be closed")
        assert record.outcome == "died" and "worker2" in (record.error or "")
        assert {d["node"] for d in swarm_gpus(hub, swarm_bed)["devices"]} == {"worker1"}  # a down node counts no GPU
    finally:
        swarm_bed.start_worker("worker2")
    wait_for(lambda: sum(d["status"] == "free" for d in swarm_gpus(hub, swarm_bed)["devices"]) == 3, timeout=90,
             interval=1, what="worker2's GPUs free again (and worker1's MIG slice)")
    assert hub.spawn(down_user, options={"profile": "two"}).status_code in (201, 202)
    hub.wait_ready(down_user, timeout=180)
    assert placed(hub, swarm_bed, down_user)[0] == "worker2"


def test_a_hub_restart_rebuilds_its_view_from_the_swarm(
    swarm_hub: Callable[..., RunningHub], swarm_bed: SwarmBed, tmp_path: Path
) -> None:
    hub = swarm_hub("c.JupyterHub.cleanup_servers = False")
    for user in ("ada", "bob", "cyd"):
        assert hub.spawn(user, options={"profile": "one"}).status_code in (201, 202)
        hub.wait_ready(user, timeout=180)
    taken = {placed(hub, swarm_bed, u)[1][0] for u in ("ada", "bob", "cyd")}
    hub.kill()
    hub.start()
    for user in ("ada", "bob", "cyd"):  # resumed, on the same devices
        assert hub.server_model(user) is not None and hub.user_get(user, "/api/status").status_code == 200
    assert hub.spawn("dan", options={"profile": "one"}).status_code in (201, 202)
    hub.wait_ready("dan", timeout=180)
    (free,) = {g for gs in GPUS.values() for g in gs} - taken
    assert placed(hub, swarm_bed, "dan")[1] == (free,)
    assert hub.spawn("eve", options={"profile": "one"}).status_code == 202  # no GPU left: eve waits in line
    assert any("1st in line" in m for m in read_progress(hub, "eve", until="1st in line", timeout=60))


def hub_metrics(hub: RunningHub) -> dict[str, list[dict[str, str]]]:
    """The hub's gpuspawner series whose value is 1 (info, holder and state series), by name: their labels."""
    text = requests.get(f"{hub.url}/hub/metrics", timeout=30).text
    return {f.name: [s.labels for s in f.samples if s.value == 1] for f in text_string_to_metric_families(text)
            if f.name.startswith("gpuspawner_device_")}


def test_the_hubs_metrics_name_each_gpus_node_and_a_gpu_another_service_holds_is_busy(
    swarm_hub: Callable[..., RunningHub], swarm_bed: SwarmBed
) -> None:
    bed = swarm_bed
    outside = bed.manager.services.create(  # a service that is not the hub's, holding one of worker2's GPUs
        bed.base_ref, name="someone-elses-job", networks=[bed.network], endpoint_spec=EndpointSpec(mode="dnsrr"),
        resources=Resources(generic_resources={"NVIDIA-GPU": 1}), constraints=["node.hostname == worker2"])
    try:
        task = wait_for(lambda: [t for t in bed.manager.api.tasks(filters={"service": outside.id})
                                 if t["Status"]["State"] == "running"], timeout=90, interval=0.3, what="the other service's task")[0]
        (taken,) = [r["NamedResourceSpec"]["Value"] for r in task["GenericResources"]]
        hub = swarm_hub("c.JupyterHub.authenticate_prometheus = False\nc.GPUSpawner.gpu_sample_seconds = 1")
        assert hub.spawn("ada", options={"profile": "one"}).status_code in (201, 202)
        hub.wait_ready("ada", timeout=180)
        ada = placed(hub, bed, "ada")[1][0]

        def sampled() -> dict[str, list[dict[str, str]]] | None:
            found = hub_metrics(hub)
            states = {lb["uuid"]: lb["state"] for lb in found.get("gpuspawner_device_state", [])}
            return found if (states.get(ada), states.get(taken)) == ("held", "busy") else None

        found = wait_for(sampled, timeout=30, interval=0.5, what="a sample with ada's GPU held and the other service's busy")
        nodes = {lb["uuid"]: lb["node"] for lb in found["gpuspawner_device_info"]}
        assert nodes == {g: node for node, gs in GPUS.items() for g in gs} | {"MIG-w1-1-0": "worker1"}
        assert [(lb["uuid"], lb["user"], lb["profile"]) for lb in found["gpuspawner_device_holder"]] == [(ada, "ada", "one")]
    finally:
        outside.remove()
