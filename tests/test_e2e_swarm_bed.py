"""End to end: the multi-host test bed (tests/testbed/swarm.py) does what the Swarm tests rely on.

A manager and two GPU workers, each a Docker engine of its own on this machine, form a Swarm.
Services asking for a Swarm generic resource get distinct GPUs, and the stand-in runtime on each
worker records which ``DOCKER_RESOURCE_*`` every container received; the hub's side of the overlay
network reaches a server on a worker, and the server reaches back; a worker's engine goes down and
comes back as the same node. No hub here: these tests check the bed, not gpuspawner.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from docker.types import EndpointSpec, Resources

from testbed import QuietHandler, serving, wait_for
from testbed.swarm import HUB_CONTAINER, SwarmBed

pytestmark = pytest.mark.docker

Task = dict[str, Any]


@pytest.fixture
def bed(swarm_bed: SwarmBed) -> SwarmBed:
    return swarm_bed


@pytest.fixture
def services(bed: SwarmBed) -> Iterator[Callable[..., str]]:
    """create(name, **kwargs): a service of the light image on the bed's overlay, reached at its
    tasks' addresses (dnsrr: this kernel has no IPVS). All are removed after the test, and their
    tasks gone, so that the next test finds every GPU free."""
    made: list[str] = []

    def create(name: str, **kwargs: Any) -> str:
        kwargs.setdefault("networks", [bed.network])
        kwargs.setdefault("endpoint_spec", EndpointSpec(mode="dnsrr"))
        made.append(bed.manager.services.create(bed.base_ref, name=name, **kwargs).id)
        return name

    yield create
    for service_id in made:
        bed.manager.api.remove_service(service_id)
    bed.wait_settled()


def current_tasks(bed: SwarmBed, service: str) -> list[Task]:
    """The service's tasks that Swarm still wants running (not the history of replaced ones)."""
    return list(bed.manager.api.tasks(filters={"service": service, "desired-state": "running"}))


def running_task(bed: SwarmBed, service: str, *, timeout: float = 90) -> Task:
    def found() -> Task | None:
        running = [t for t in current_tasks(bed, service) if t["Status"]["State"] == "running"]
        return running[0] if running else None

    return wait_for(found, timeout=timeout, interval=0.3, what=f"a running task of {service}")  # type: ignore[no-any-return]


def assigned(task: Task, kind: str) -> list[str]:
    """The named generic resources of `kind` that Swarm gave the task."""
    return [r["NamedResourceSpec"]["Value"] for r in task.get("GenericResources") or []
            if r.get("NamedResourceSpec", {}).get("Kind") == kind]


def container_id(task: Task) -> str:
    return str(task["Status"]["ContainerStatus"]["ContainerID"])


def test_the_manager_sees_two_workers_advertising_their_gpus_and_labelled(bed: SwarmBed) -> None:
    nodes = {n["Description"]["Hostname"]: n for n in bed.manager.api.nodes()}
    assert sorted(nodes) == ["manager", "worker1", "worker2"]
    for worker in bed.workers:
        node = nodes[worker.name]
        advertised = sorted((r["NamedResourceSpec"]["Kind"], r["NamedResourceSpec"]["Value"])
                            for r in node["Description"]["Resources"]["GenericResources"])
        assert (node["Spec"]["Role"], node["Status"]["State"]) == ("worker", "ready")
        assert advertised == sorted((kind, v) for kind, values in worker.resources.items() for v in values)
        assert node["Spec"]["Labels"] == dict(worker.labels)
        assert node["Description"]["Engine"]["Labels"] == dict(worker.engine_labels)
    assert bed.base_ref.startswith(f"{bed.registry}/") and "@sha256:" in bed.base_ref


def test_four_gpu_services_run_on_four_distinct_gpus_the_runtime_saw_and_a_fifth_waits(
    bed: SwarmBed, services: Callable[..., str]
) -> None:
    names = [services(f"gpu{i}", resources=Resources(generic_resources={"NVIDIA-GPU": 1})) for i in range(5)]

    def four_running_one_pending() -> tuple[list[Task], list[Task]] | None:
        tasks = [t for name in names for t in current_tasks(bed, name)]
        running = [t for t in tasks if t["Status"]["State"] == "running"]
        pending = [t for t in tasks if t["Status"]["State"] == "pending"]
        return (running, pending) if (len(running), len(pending)) == (4, 1) else None

    running, (pending,) = wait_for(four_running_one_pending, timeout=90, interval=0.5, what="4 GPU tasks running, 1 pending")
    assert "insufficient resources" in pending["Status"]["Err"]
    given = []
    for task in running:
        node = bed.node_of(task["NodeID"])
        (gpu,) = assigned(task, "NVIDIA-GPU")
        record = bed.record(node, container_id(task))
        assert record["environment"] == {"DOCKER_RESOURCE_NVIDIA-GPU": gpu}, (node.name, task["ID"])
        given.append((node.name, gpu))
    assert sorted(given) == sorted((w.name, gpu) for w in bed.workers for gpu in w.resources["NVIDIA-GPU"])
    time.sleep(3 * bed.heartbeat_s)  # and the fifth stays pending: no GPU is free
    assert four_running_one_pending() is not None


def test_a_mig_slice_goes_to_the_worker_that_has_it_under_an_upper_cased_variable(
    bed: SwarmBed, services: Callable[..., str]
) -> None:
    task = running_task(bed, services("mig", resources=Resources(generic_resources={"NVIDIA-MIG-1g.10gb": 1})))
    node = bed.node_of(task["NodeID"])
    assert (node.name, assigned(task, "NVIDIA-MIG-1g.10gb")) == ("worker1", ["MIG-w1-1-0"])
    # Swarm upper-cases the kind in the variable's name; a runtime reading it must look for that name.
    assert bed.record(node, container_id(task))["environment"] == {"DOCKER_RESOURCE_NVIDIA-MIG-1G.10GB": "MIG-w1-1-0"}


class _Recorder(QuietHandler):
    clients: list[str] = []

    def do_GET(self) -> None:
        self.clients.append(self.client_address[0])
        self.reply(b"hub")


@pytest.fixture
def hub_stand_in(bed: SwarmBed) -> Iterator[http.server.ThreadingHTTPServer]:
    """An HTTP server where a hub on this host listens for its servers (bed.hub_ip), noting who called."""
    _Recorder.clients = []
    with serving(bed.hub_ip, _Recorder) as server:
        yield server


def test_the_hub_side_reaches_a_server_on_a_worker_over_the_overlay_and_the_server_reaches_back(
    bed: SwarmBed, services: Callable[..., str], hub_stand_in: http.server.ThreadingHTTPServer
) -> None:
    task = running_task(bed, services("web", constraints=["node.role == worker"]))
    address = bed.task_address(task)
    r = requests.get(f"http://{address}:8888/", timeout=10)
    assert (r.status_code, r.json()) == (200, {"started": "now"})

    port = hub_stand_in.server_address[1]
    probe = (
        "import json, socket, urllib.request\n"
        f"body = urllib.request.urlopen('http://{bed.hub_connect_ip}:{port}/', timeout=10).read().decode()\n"
        f"print(json.dumps([body, socket.gethostbyname('{HUB_CONTAINER}')]))\n"
    )
    with contextlib.closing(bed.node_of(task["NodeID"]).client()) as worker:
        code, output = worker.containers.get(container_id(task)).exec_run(["python3", "-c", probe])
    assert code == 0, output.decode()
    assert json.loads(output) == ["hub", bed.hub_connect_ip]
    # The call came over the overlay, from the server's own address (no NAT on the way).
    assert _Recorder.clients == [address]


def test_a_worker_whose_engine_stops_is_seen_down_its_tasks_end_and_it_comes_back_as_itself(
    bed: SwarmBed, services: Callable[..., str]
) -> None:
    worker = bed.workers[1]
    before = running_task(bed, services("pinned", constraints=[f"node.hostname == {worker.name}"]))
    node_id = worker.node_id

    bed.stop_worker(worker)  # returns once the manager sees the node down
    assert bed.node_state(worker) == "down"
    wait_for(lambda: bed.manager.api.inspect_task(before["ID"])["DesiredState"] == "shutdown",
             timeout=30, what="Swarm to give up the task of the stopped worker")
    waiting = wait_for(lambda: [t for t in current_tasks(bed, "pinned") if t["ID"] != before["ID"]],
                       timeout=30, what="Swarm to replace the task of the stopped worker")
    assert [t["Status"]["State"] for t in waiting] == ["pending"]  # its only node is down

    bed.start_worker(worker)  # returns once the manager sees the node ready
    listed = bed.manager.api.inspect_node(node_id)  # the manager's node of that ID is this worker, ready again
    assert (listed["Description"]["Hostname"], listed["Status"]["State"]) == (worker.name, "ready")
    after = running_task(bed, "pinned")
    assert (after["NodeID"], after["ID"] == before["ID"]) == (node_id, False)
    with contextlib.closing(worker.client()) as engine:
        old = [c for c in engine.api.containers(all=True) if c["Id"] == container_id(before)]
    assert all(c["State"] != "running" for c in old)  # the engine stopped it on the way down (or has removed it)
    bed.wait_settled()
