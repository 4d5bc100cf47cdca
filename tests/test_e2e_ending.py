"""End to end: a record ends when its container ended, as the engine says, not when the hub noticed.

Real hub, real engine, real containers; GPUs from the simulated NVML. A container that dies behind
the hub's back is noticed at the hub's next poll, up to ``poll_interval`` later; its record must still
stop when the engine says the container finished (``State.FinishedAt``, its ``die`` event; on a swarm,
its task's ``Status.Timestamp``), so the records of one exclusive GPU never overlap and GPU-hours are
not counted past the container's end.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

import simnvml
from gpuspawner import seams
from gpuspawner.audit import AuditRecord
from gpuspawner.store import AuditStore, load_key
from gpuspawner.times import parse_time
from helpers import container_of, one_gpu_hub_with_ada, records_of, sealed_record, start_swarm_hub
from testbed import DockerBed, wait_for
from testbed.hub import RunningHub
from testbed.swarm import SwarmBed

pytestmark = pytest.mark.docker

SAME_MOMENT = 1.0  # seconds: a record's end and the engine's may differ by the time it takes to read one


def seconds(text: str | None) -> float:
    assert text, "no time"
    return parse_time(text).timestamp()


def die_event(bed: DockerBed, container_id: str, *, since: float) -> float:
    """When the engine's event log says the container died (seconds since the epoch)."""
    events = list(bed.api.events(since=int(since) - 1, until=int(time.time()) + 1, decode=True,
                                 filters={"type": "container", "event": "die", "container": container_id}))
    assert events, f"the engine logged no die event for {container_id[:12]}"
    return int(events[-1]["timeNano"]) / 1e9


def finished_at(engine: DockerBed | docker.DockerClient, container_id: str) -> float:
    """When the engine says the container finished (its State.FinishedAt, RFC 3339 with nanoseconds)."""
    state = engine.api.inspect_container(container_id)["State"]
    assert not state["Running"], state
    return seconds(state["FinishedAt"])


def test_a_killed_gpu_servers_record_ends_when_its_container_died_before_the_next_holder_of_its_gpu_started(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    gpu0 = simnvml.gpu(0)["uuid"]
    # The hub polls its servers only when asked (a DELETE polls first): it notices ada's death late.
    hub = one_gpu_hub_with_ada(start_hub, tmp_path, "c.Spawner.poll_interval = 3600")
    wait_for(lambda: records_of(hub, "ada")[0].outcome == "running", timeout=30, what="ada's record to say running")
    ada_container = container_of(docker_bed, hub, "ada")["Id"]
    killed = time.time()
    docker_bed.api.kill(ada_container)
    ada_finished = finished_at(docker_bed, ada_container)

    # The one GPU is free once ada's container is dead, though the hub has not noticed her server end.
    assert hub.spawn("bob").status_code in (201, 202)
    hub.wait_ready("bob")
    bob_container = container_of(docker_bed, hub, "bob")["Id"]
    assert docker_bed.hook_record(bob_container)["devices"] == [gpu0]
    time.sleep(max(0.0, killed + 4 - time.time()))
    noticed = time.time()
    assert hub.api("DELETE", "/users/ada/server").status_code in (202, 204)

    ada = sealed_record(hub, "ada", first=True)
    assert (ada.outcome, ada.exit_code, ada.container_id) == ("died", 137, ada_container), ada
    ada_died = die_event(docker_bed, ada_container, since=killed)
    assert abs(seconds(ada.stopped_at) - ada_finished) <= SAME_MOMENT, (ada.stopped_at, ada_finished, noticed)
    assert abs(seconds(ada.stopped_at) - ada_died) <= SAME_MOMENT, (ada.stopped_at, ada_died, noticed)
    # the two records of the one GPU do not overlap: ada's ends before bob's begins
    (bob,) = records_of(hub, "bob")
    assert [d.uuid for d in ada.devices] == [d.uuid for d in bob.devices] == [gpu0]
    assert seconds(ada.started_at) <= seconds(ada.stopped_at) <= seconds(bob.started_at), (ada, bob)


def test_a_dead_container_no_server_owns_ends_its_record_when_it_died_not_when_the_hub_looked(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, light_image: str
) -> None:
    # Dead containers are kept (remove = False), so the hub's reconciliation finds this one and reads its end.
    hub = start_hub(extra="c.DockerSpawner.remove = False\nc.GPUSpawner.reconcile_interval = 2\n")
    key_file = hub.settings.workdir / "gpuspawner-audit.key"
    wait_for(key_file.exists, timeout=30, what="the hub to make its sealing key")
    store = AuditStore(f"sqlite:///{hub.settings.workdir / 'gpuspawner-audit.sqlite'}", key=load_key(key_file),
                       head_file=hub.settings.workdir / "gpuspawner-audit.head")
    # what a hub killed while a server ran leaves: its labelled container, and the server's open record
    requested = seams.now_iso()
    container = docker_bed.api.create_container(
        light_image, labels={"gpuspawner.hub": hub.settings.hub_id, "gpuspawner.user": "ada", "gpuspawner.server": "",
                             "gpuspawner.devices": "", "gpuspawner.record": "killed-while-away"},
    )
    try:
        docker_bed.api.start(container["Id"])
        started = seams.now_iso()
        killed = time.time()
        docker_bed.api.kill(container["Id"])
        ended = finished_at(docker_bed, container["Id"])
        time.sleep(4)  # the hub learns of it only once the record is there: seconds after the container died
        store.insert(AuditRecord(id="killed-while-away", hub_id=hub.settings.hub_id, user="ada", server="",
                                 requested_at=requested, started_at=started, outcome="running",
                                 container_id=container["Id"]))
        closed = wait_for(lambda: (r := store.get("killed-while-away")) and r.sealed and r, timeout=30,
                          what="the hub's reconciliation to close the record")
        assert (closed.outcome, closed.exit_code) == ("died", 137), closed
        assert abs(seconds(closed.stopped_at) - ended) <= SAME_MOMENT, (closed.stopped_at, ended)
        assert abs(seconds(closed.stopped_at) - die_event(docker_bed, container["Id"], since=killed)) <= SAME_MOMENT
    finally:
        store.dispose()
        docker_bed.api.remove_container(container["Id"], force=True)


def test_a_server_the_hub_stops_ends_its_record_when_its_container_stopped(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    hub = one_gpu_hub_with_ada(start_hub, tmp_path)
    wait_for(lambda: records_of(hub, "ada")[0].outcome == "running", timeout=30, what="ada's record to say running")
    container = container_of(docker_bed, hub, "ada")["Id"]
    asked = time.time()
    hub.stop_server("ada")
    record = sealed_record(hub, "ada", first=True)
    assert record.outcome == "stopped", record
    died = die_event(docker_bed, container, since=asked)
    assert abs(seconds(record.stopped_at) - died) <= SAME_MOMENT, (record.stopped_at, died)
    assert seconds(record.ready_at) <= seconds(record.stopped_at) <= time.time()


# --- On a swarm: the task's end ---------------------------------------------------------------------------


@pytest.fixture
def swarm_hub(start_hub: Callable[..., RunningHub], swarm_bed: SwarmBed) -> Iterator[RunningHub]:
    """A hub whose servers are services on the swarm test bed (one GPU each), polling them only when asked;
    every service it made is removed afterwards."""
    bed = swarm_bed
    profiles = [{"slug": "one", "display_name": "1 GPU", "image": bed.base_ref, "gpus": 1, "default": True}]
    hub = start_swarm_hub(start_hub, bed, profiles, "c.Spawner.poll_interval = 3600")
    yield hub
    hub.stop()
    for service in bed.manager.api.services(filters={"label": f"gpuspawner.hub={hub.settings.hub_id}"}):
        bed.manager.api.remove_service(service["ID"])
    bed.wait_settled()


def test_a_swarm_servers_record_ends_when_its_task_ended_not_when_the_hub_noticed(
    swarm_hub: RunningHub, swarm_bed: SwarmBed
) -> None:
    hub = swarm_hub
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada", timeout=180)
    placed = wait_for(lambda: (r := records_of(hub, "ada")[0]).container_id and r.hostname and r.outcome == "running" and r,
                      timeout=60, interval=0.5, what="ada's record to name her task's container and node")
    with contextlib.closing(swarm_bed.worker(placed.hostname).client()) as worker:
        killed = time.time()
        worker.api.kill(placed.container_id)
        container_finished = finished_at(worker, placed.container_id)

    def ended_task() -> dict | None:
        tasks = swarm_bed.manager.api.tasks(filters={"service": placed.container_name})
        mine = [t for t in tasks if (t["Status"].get("ContainerStatus") or {}).get("ContainerID") == placed.container_id]
        return mine[0] if mine and mine[0]["Status"]["State"] == "failed" else None

    task = wait_for(ended_task, timeout=60, interval=0.5, what="the swarm to see ada's task fail")
    time.sleep(max(0.0, killed + 4 - time.time()))
    assert hub.api("DELETE", "/users/ada/server").status_code in (202, 204)  # the hub polls first: it notices now

    ada = sealed_record(hub, "ada", first=True)
    assert ada.outcome == "died" and "failed" in (ada.error or ""), ada
    task_ended = seconds(task["Status"]["Timestamp"])
    assert abs(seconds(ada.stopped_at) - task_ended) <= SAME_MOMENT, (ada.stopped_at, task["Status"], killed)
    assert abs(seconds(ada.stopped_at) - container_finished) <= SAME_MOMENT, (ada.stopped_at, container_finished)
    assert seconds(ada.started_at) <= seconds(ada.stopped_at)
