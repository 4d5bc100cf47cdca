"""A Docker Swarm's GPUs as gpuspawner sees them: what its nodes advertise, what its tasks hold, what a
service asks, and what a GPU node's engine must be told to advertise.

The nodes, tasks and services below are shaped as Docker Engine API v1.41 returns them (moby's
api/types/swarm: Node, Task, Service, NetworkAttachment, GenericResource). One difference from the
API reference: the engine sends a task's assigned resources as ``GenericResources`` (the Go type's
field, filled from the task's AssignedGenericResources in daemon/cluster/convert/task.go), while the
swagger file calls them ``AssignedGenericResources``; both are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from gpuspawner import labels, swarm
from gpuspawner.allocation import GPURequest, Grant, Holder, Refusal, allocate
from gpuspawner.devices import Device, GiB, Inventory

HUB = "hub-3f9a1c2b7d4e"
A100 = "NVIDIA A100-SXM4-80GB"
HUB_NETWORK = "k8q2m0v5x1c3b6n9z4a7s2d0f"  # the hub's overlay network, by ID
INGRESS = "4qvuz4ko70xaltuqbt8956gd1"
Json = dict[str, Any]


def gpu_labels(model: str = A100, memory: int = 80 * GiB, **mig_memory: int) -> dict[str, str]:
    """A GPU node's labels as an admin sets them on the manager (``docker node update --label-add``):
    its GPU model and memory per GPU and per MIG profile (``1g_10gb`` for 1g.10gb)."""
    found = {swarm.MODEL_LABEL: model, swarm.MEMORY_LABEL: str(memory)}
    found.update({swarm.MIG_MEMORY_LABEL_PREFIX + p.replace("_", "."): str(m) for p, m in mig_memory.items()})
    return found


DRIVER = {swarm.DRIVER_LABEL: "550.54.15", swarm.CUDA_LABEL: "12.4"}  # engine labels, from daemon.json


def node_json(node_id: str, hostname: str, resources: Iterable[tuple[str, str]] = (), *, labels: Mapping[str, str] | None = None,
              engine_labels: Mapping[str, str] = DRIVER, state: str = "ready", availability: str = "active",
              role: str = "worker") -> Json:
    """A ``GET /nodes`` entry: named generic resources and engine labels from daemon.json, node labels
    from the manager, status."""
    generic: list[Json] = [{"NamedResourceSpec": {"Kind": kind, "Value": value}} for kind, value in resources]
    generic.append({"DiscreteResourceSpec": {"Kind": "SSD", "Value": 2}})  # an admin's other resource
    return {
        "ID": node_id, "Version": {"Index": 42},
        "CreatedAt": "2026-11-20T08:00:00.000000000Z", "UpdatedAt": "2026-11-21T09:00:00.000000000Z",
        "Spec": {"Labels": {"rack": "b2", **(labels or {})}, "Role": role, "Availability": availability},
        "Description": {
            "Hostname": hostname,
            "Platform": {"Architecture": "x86_64", "OS": "linux"},
            "Resources": {"NanoCPUs": 64_000_000_000, "MemoryBytes": 540_000_000_000, "GenericResources": generic},
            "Engine": {"EngineVersion": "20.10.24+dfsg1", "Labels": dict(engine_labels),
                       "Plugins": [{"Type": "Log", "Name": "json-file"}, {"Type": "Network", "Name": "overlay"}]},
            "TLSInfo": {"TrustRoot": "-----BEGIN CERTIFICATE-----\n…\n-----END CERTIFICATE-----\n",
                        "CertIssuerSubject": "MBMxETAPBgNVBAMTCHN3YXJtLWNh", "CertIssuerPublicKey": "MFkwEwYHKoZIzj0C…"},
        },
        "Status": {"State": state, "Addr": "10.20.0.11"} | ({"Message": "heartbeat failure"} if state == "down" else {}),
    }


def network_attachment(network_id: str, name: str, address: str) -> Json:
    return {
        "Network": {
            "ID": network_id, "Version": {"Index": 18},
            "CreatedAt": "2026-11-20T08:00:01.000000000Z", "UpdatedAt": "2026-11-20T08:00:01.000000000Z",
            "Spec": {"Name": name, "Labels": {}, "DriverConfiguration": {}, "Attachable": name != "ingress",
                     "Ingress": name == "ingress", "Scope": "swarm"},
            "DriverState": {"Name": "overlay", "Options": {"com.docker.network.driver.overlay.vxlanid_list": "4097"}},
            "IPAMOptions": {"Driver": {"Name": "default"}, "Configs": [{"Subnet": "10.214.7.0/24", "Gateway": "10.214.7.1"}]},
        },
        "Addresses": [address],
    }


def task_json(task_id: str, *, service_id: str, node_id: str = "", state: str = "running", desired: str = "running",
              resources: Iterable[tuple[str, str]] = (), networks: Iterable[Json] = (),
              key: str = "GenericResources") -> Json:
    """A ``GET /tasks`` entry. The engine sends assigned resources as `key` ``GenericResources``."""
    task: Json = {
        "ID": task_id, "Version": {"Index": 77},
        "CreatedAt": "2026-11-21T09:59:58.000000000Z", "UpdatedAt": "2026-11-21T10:00:02.000000000Z",
        "Labels": {},
        "Spec": {
            "ContainerSpec": {"Image": "registry.lab/gpu-notebook@sha256:" + "ab" * 32, "Isolation": "default"},
            "Resources": {"Limits": {}, "Reservations": {"GenericResources": [
                {"DiscreteResourceSpec": {"Kind": swarm.GPU_KIND, "Value": 1}}]}},
            "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
            "Placement": {"Constraints": [f"engine.labels.{swarm.MODEL_LABEL}=={A100}"]},
            "Networks": [{"Target": HUB_NETWORK}], "ForceUpdate": 0,
        },
        "ServiceID": service_id, "Slot": 1,
        "Status": {"Timestamp": "2026-11-21T10:00:02.000000000Z", "State": state, "Message": state,
                   "ContainerStatus": {"ContainerID": "e5d62702a1b48d01c3e02ca1e0212a25", "PID": 677, "ExitCode": 0},
                   "PortStatus": {}},
        "DesiredState": desired,
        "NetworksAttachments": list(networks),
    }
    if node_id:  # a task not yet scheduled has no node
        task["NodeID"] = node_id
    named = [{"NamedResourceSpec": {"Kind": kind, "Value": value}} for kind, value in resources]
    if named:
        task[key] = named
    return task


def service_json(service_id: str, name: str, service_labels: Mapping[str, str]) -> Json:
    """A ``GET /services`` entry: its name and labels are what the claims need."""
    return {
        "ID": service_id, "Version": {"Index": 60},
        "CreatedAt": "2026-11-21T09:59:57.000000000Z", "UpdatedAt": "2026-11-21T09:59:57.000000000Z",
        "Spec": {"Name": name, "Labels": dict(service_labels),
                 "TaskTemplate": {"ContainerSpec": {"Image": "registry.lab/gpu-notebook"}, "ForceUpdate": 0},
                 "Mode": {"Replicated": {"Replicas": 1}}, "EndpointSpec": {"Mode": "dnsrr"}},
        "Endpoint": {"Spec": {"Mode": "dnsrr"}},
    }


def server_service(service_id: str, user: str, server: str = "", *, hub: str = HUB, profile: str = "a100") -> Json:
    identity = labels.ServerIdentity(hub_id=hub, user=user, server=server)
    return service_json(service_id, f"jupyter-{user}{'-' + server if server else ''}",
                        labels.server_labels(identity, version="2.1.0", profile=profile, record="rec-" + user))


def tasks_of(api_tasks: Iterable[Json], api_services: Iterable[Json], *, network_id: str = "") -> list[swarm.SwarmTask]:
    """The tasks with their services' names and labels, as the hub and `gpuspawner gpus --swarm` build them."""
    by_id = {s["ID"]: s["Spec"] for s in api_services}
    return [swarm.task_from_api(t, service_name=by_id.get(t["ServiceID"], {}).get("Name", ""),
                                service_labels=by_id.get(t["ServiceID"], {}).get("Labels"), network_id=network_id)
            for t in api_tasks]


W1_GPUS = [(swarm.GPU_KIND, "GPU-w1-0"), (swarm.GPU_KIND, "GPU-w1-1")]
W2_RESOURCES = [(swarm.GPU_KIND, "GPU-w2-0"), (swarm.mig_kind("1g.10gb"), "MIG-w2-1-0"), (swarm.mig_kind("1g.10gb"), "MIG-w2-1-1"),
                (swarm.mig_kind("3g.40gb"), "MIG-w2-1-2")]


def cluster() -> list[Json]:
    """Two schedulable GPU workers, one drained, one paused, one down, and a manager without GPUs."""
    return [
        node_json("n1", "gpu01", W1_GPUS, labels=gpu_labels()),
        node_json("n2", "gpu02", W2_RESOURCES, labels=gpu_labels(memory=80 * GiB, **{"1g_10gb": 10 * GiB, "3g_40gb": 40 * GiB})),
        node_json("n3", "gpu03", [(swarm.GPU_KIND, "GPU-w3-0")], labels=gpu_labels(), availability="drain"),
        node_json("n4", "gpu04", [(swarm.GPU_KIND, "GPU-w4-0")], labels=gpu_labels(), availability="pause"),
        node_json("n5", "gpu05", [(swarm.GPU_KIND, "GPU-w5-0")], labels=gpu_labels(), state="down"),
        node_json("m1", "manager", engine_labels={}, role="manager"),
    ]


def inventory_of(api_nodes: Iterable[Json]) -> Inventory:
    return swarm.cluster_inventory(swarm.node_from_api(n) for n in api_nodes)


# --- Nodes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "availability", "schedulable"),
    [("ready", "active", True), ("ready", "drain", False), ("ready", "pause", False), ("down", "active", False),
     ("disconnected", "active", False), ("unknown", "active", False)],
    ids=["ready-active", "drained", "paused", "down", "disconnected", "unknown"],
)
def test_a_node_is_schedulable_only_when_up_and_active(state: str, availability: str, schedulable: bool) -> None:
    node = swarm.node_from_api(node_json("n1", "gpu01", W1_GPUS, state=state, availability=availability))
    assert node.schedulable is schedulable


def test_a_node_reads_its_host_name_its_and_its_engines_labels_and_named_resources_only() -> None:
    node = swarm.node_from_api(node_json("n2", "gpu02", W2_RESOURCES, labels=gpu_labels()))
    assert (node.id, node.hostname, node.engine_version) == ("n2", "gpu02", "20.10.24+dfsg1")
    assert (node.labels[swarm.MODEL_LABEL], node.labels["rack"]) == (A100, "b2")
    assert node.engine_labels == DRIVER
    assert node.resources == tuple(W2_RESOURCES)  # the discrete "SSD" resource names no device


# --- Tasks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["GenericResources", "AssignedGenericResources"], ids=["as-the-engine-sends", "as-the-swagger-names"])
def test_a_task_names_the_devices_swarm_assigned_it(key: str) -> None:
    task = swarm.task_from_api(task_json("t1", service_id="s1", node_id="n1", resources=W1_GPUS[:1], key=key))
    assert task.resources == ((swarm.GPU_KIND, "GPU-w1-0"),)


def test_a_task_is_reached_at_its_address_on_the_hubs_network_not_the_ingress() -> None:
    attached = [network_attachment(INGRESS, "ingress", "10.255.0.9/16"), network_attachment(HUB_NETWORK, "gpuspawner", "10.214.7.23/24")]
    task = swarm.task_from_api(task_json("t1", service_id="s1", node_id="n1", networks=attached), network_id=HUB_NETWORK)
    assert task.address == "10.214.7.23"
    assert swarm.task_from_api(task_json("t1", service_id="s1", networks=attached), network_id="another").address == ""
    assert swarm.task_from_api(task_json("t1", service_id="s1"), network_id=HUB_NETWORK).address == ""


def test_a_task_carries_its_services_name_and_labels() -> None:
    (task,) = tasks_of([task_json("t1", service_id="s1", node_id="n1")], [server_service("s1", "ada", "train")])
    assert (task.service_name, task.node_id, task.state, task.desired_state) == ("jupyter-ada-train", "n1", "running", "running")
    assert labels.identity_from_labels(task.labels) == labels.ServerIdentity(HUB, "ada", "train")


@pytest.mark.parametrize(
    ("state", "desired", "holds"),
    [
        ("new", "running", False), ("pending", "running", False), ("assigned", "running", True),
        ("accepted", "running", True), ("preparing", "running", True), ("starting", "running", True),
        ("running", "running", True),
        # being stopped: its container still runs on the device, and Swarm counts the device as used
        # until the task has ended (swarmkit's scheduler frees a task's resources past "running" only)
        ("running", "shutdown", True), ("running", "remove", True),
        ("complete", "shutdown", False), ("shutdown", "shutdown", False), ("failed", "running", False),
        ("rejected", "running", False), ("orphaned", "running", False),
    ],
)
def test_a_task_holds_its_devices_from_assignment_until_it_has_ended(state: str, desired: str, holds: bool) -> None:
    task = swarm.task_from_api(task_json("t1", service_id="s1", node_id="n1", state=state, desired=desired, resources=W1_GPUS[:1]))
    assert task.holds is holds


ENDED = "2026-11-21T10:00:02.000000+00:00"  # task_json's Status.Timestamp, as gpuspawner stores times


@pytest.mark.parametrize(
    ("state", "ended_at"),
    [
        ("complete", ENDED), ("failed", ENDED), ("shutdown", ENDED), ("rejected", ENDED), ("orphaned", ENDED),
        ("running", None), ("starting", None), ("pending", None), ("remove", None),  # not ended (yet)
    ],
)
def test_a_task_that_ended_says_when_by_its_status_timestamp(state: str, ended_at: str | None) -> None:
    assert swarm.task_from_api(task_json("t1", service_id="s1", node_id="n1", state=state)).ended_at == ended_at


@pytest.mark.parametrize(
    ("tasks", "ended_at"),
    [
        ([], None),
        ([("failed", "2026-11-21T10:00:02.5Z")], "2026-11-21T10:00:02.500000+00:00"),
        ([("failed", "2026-11-21T10:00:02Z"), ("shutdown", "2026-11-21T10:05:00.123456789Z")],
         "2026-11-21T10:05:00.123456+00:00"),
        ([("failed", "2026-11-21T10:00:02Z"), ("running", "2026-11-21T10:05:00Z")], None),
        ([("failed", "0001-01-01T00:00:00Z")], None),
    ],
    ids=["no-task", "one", "the-last", "one-runs", "no-time"],
)
def test_a_service_ended_when_its_last_task_did(tasks: list[tuple[str, str]], ended_at: str | None) -> None:
    found = [swarm.SwarmTask(id=f"t{i}", service_id="s1", service_name="jupyter-ada", node_id="n1", state=state,
                             desired_state="shutdown", labels={}, resources=(), timestamp=timestamp)
             for i, (state, timestamp) in enumerate(tasks)]
    assert swarm.last_ended_at(found) == ended_at


# --- The cluster's inventory ------------------------------------------------------------------------


def test_only_schedulable_nodes_add_devices_each_tagged_with_its_node() -> None:
    inventory = inventory_of(cluster())
    assert inventory.problem is None
    assert [(d.node, d.uuid) for d in inventory.devices] == [
        ("n1", "GPU-w1-0"), ("n1", "GPU-w1-1"),
        ("n2", "GPU-w2-0"), ("n2", "MIG-w2-1-0"), ("n2", "MIG-w2-1-1"), ("n2", "MIG-w2-1-2"),
    ]  # gpu03 drained, gpu04 paused, gpu05 down: Swarm places nothing there


def test_whole_gpus_take_model_and_memory_from_their_nodes_labels() -> None:
    device = inventory_of(cluster()).by_uuid()["GPU-w1-0"]
    assert (device.name, device.memory_total, device.is_mig, device.healthy) == (A100, 80 * GiB, False, True)
    assert GPURequest(count=1, model="A100", min_memory=40 * GiB).matches(device)
    assert not GPURequest(count=1, model="H100").matches(device)


def test_mig_kinds_become_mig_devices_of_their_profile_with_its_memory() -> None:
    devices = inventory_of(cluster()).by_uuid()
    small, large = devices["MIG-w2-1-0"], devices["MIG-w2-1-2"]
    assert (small.is_mig, small.mig_profile, small.name, small.model, small.memory_total) == (
        True, "1g.10gb", f"{A100} MIG 1g.10gb", A100, 10 * GiB)
    assert (large.mig_profile, large.memory_total) == ("3g.40gb", 40 * GiB)
    assert GPURequest(mig_profile="1g.10gb").matches(small) and not GPURequest(mig_profile="1g.10gb").matches(large)
    assert not GPURequest(count=1).matches(small)  # a whole-GPU profile never gets a slice


@pytest.mark.parametrize(
    ("node_labels", "engine_labels", "model"),
    [(gpu_labels(), {**DRIVER, **gpu_labels("Tesla T4")}, A100), ({}, {**DRIVER, **gpu_labels("Tesla T4")}, "Tesla T4")],
    ids=["node-label-first", "else-the-engines"],
)
def test_the_model_comes_from_the_nodes_label_else_its_engines(node_labels: dict[str, str], engine_labels: dict[str, str],
                                                               model: str) -> None:
    devices = inventory_of([node_json("n1", "gpu01", W1_GPUS, labels=node_labels, engine_labels=engine_labels)]).devices
    assert {d.model for d in devices} == {model}


def test_a_node_without_gpuspawner_labels_still_offers_its_gpus_to_profiles_that_ask_no_more() -> None:
    devices = inventory_of([node_json("n1", "gpu01", W1_GPUS, labels={}, engine_labels={})]).devices
    assert {(d.name, d.memory_total) for d in devices} == {("NVIDIA GPU", 0)}
    assert GPURequest(count=1).matches(devices[0]) and not GPURequest(count=1, min_memory=GiB).matches(devices[0])


def test_resources_of_other_kinds_are_not_gpus() -> None:
    node = node_json("n1", "fpga01", [("FPGA", "xcvu9p-0"), ("NVIDIA-GPU-EXTRA", "x")] + W1_GPUS[:1], labels=gpu_labels())
    assert [d.uuid for d in inventory_of([node]).devices] == ["GPU-w1-0"]


@pytest.mark.parametrize(
    "api_nodes",
    [[], [node_json("m1", "manager", role="manager")], [node_json("n3", "gpu03", W1_GPUS, availability="drain")]],
    ids=["no-nodes", "no-gpu-node", "gpu-node-drained"],
)
def test_a_swarm_without_schedulable_gpus_says_so_and_refuses_gpu_servers(api_nodes: list[Json]) -> None:
    inventory = inventory_of(api_nodes)
    assert inventory.devices == () and inventory.problem == "no schedulable node of the swarm advertises GPUs"
    result = allocate(GPURequest(count=1), inventory, {}, holder=Holder("ada"), busy_memory_threshold=GiB)
    assert isinstance(result, Refusal) and "no schedulable node of the swarm advertises GPUs" in result.message()


# --- Who holds what -------------------------------------------------------------------------------


def running_swarm() -> tuple[list[Json], list[Json]]:
    """Tasks and services: ada's and bob's servers of this hub, another hub's server, a training job
    of another service, a server still pending, one that ended."""
    services = [server_service("s-ada", "ada"), server_service("s-bob", "bob", "train"),
                server_service("s-eve", "eve", hub="hub-000000000000"), service_json("s-job", "nightly-train", {"team": "vision"}),
                server_service("s-cyd", "cyd"), server_service("s-dan", "dan")]
    tasks = [
        task_json("t-ada", service_id="s-ada", node_id="n1", resources=[W1_GPUS[0]]),
        task_json("t-bob", service_id="s-bob", node_id="n2", resources=[W2_RESOURCES[1]]),
        task_json("t-eve", service_id="s-eve", node_id="n2", resources=[W2_RESOURCES[0]]),
        task_json("t-job", service_id="s-job", node_id="n2", resources=[W2_RESOURCES[2]]),
        task_json("t-cyd", service_id="s-cyd", state="pending"),  # no node has a free device for it yet
        task_json("t-dan", service_id="s-dan", node_id="n1", state="complete", desired="shutdown", resources=[W1_GPUS[1]]),
    ]
    return tasks, services


def test_this_hubs_servers_hold_by_their_labels_and_other_services_without_a_user() -> None:
    tasks, services = running_swarm()
    assert swarm.cluster_claims(tasks_of(tasks, services), hub_id=HUB) == {
        "GPU-w1-0": Holder("ada", ""),
        "MIG-w2-1-0": Holder("bob", "train"),
        "GPU-w2-0": Holder("", "jupyter-eve"),  # another hub's server is another service here
        "MIG-w2-1-1": Holder("", "nightly-train"),
    }  # cyd's pending task holds nothing yet; dan's ended task holds nothing any more


def test_a_server_gets_a_device_no_task_holds_and_admins_see_who_holds_the_rest() -> None:
    tasks, services = running_swarm()
    inventory, claims = inventory_of(cluster()), swarm.cluster_claims(tasks_of(tasks, services), hub_id=HUB)
    granted = allocate(GPURequest(count=1), inventory, claims, holder=Holder("cyd"), busy_memory_threshold=GiB)
    assert isinstance(granted, Grant) and granted.uuids == ("GPU-w1-1",)
    refused = allocate(GPURequest(mig_profile="1g.10gb"), inventory, claims, holder=Holder("cyd"), busy_memory_threshold=GiB)
    assert isinstance(refused, Refusal)
    assert refused.message(admin=True).endswith("Held by: nightly-train, bob/train.")


# --- What a service asks of Swarm ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "resources"),
    [(GPURequest(), {}), (GPURequest(count=1), {"NVIDIA-GPU": 1}), (GPURequest(count=4, model="A100"), {"NVIDIA-GPU": 4}),
     (GPURequest(mig_profile="1g.10gb"), {"NVIDIA-MIG-1g.10gb": 1})],
    ids=["cpu-only", "one-gpu", "four-gpus", "mig"],
)
def test_a_service_asks_swarm_for_generic_resources_of_its_kind(request_: GPURequest, resources: dict[str, int]) -> None:
    assert swarm.generic_resources(request_) == resources


@pytest.mark.parametrize(
    ("node_labels", "engine_labels", "constraints"),
    [
        (gpu_labels(), DRIVER, ["node.labels.gpuspawner.gpu-model==NVIDIA A100-SXM4-80GB"]),
        ({}, {**DRIVER, **gpu_labels()}, ["engine.labels.gpuspawner.gpu-model==NVIDIA A100-SXM4-80GB"]),
        (gpu_labels(), {**DRIVER, **gpu_labels()}, ["node.labels.gpuspawner.gpu-model==NVIDIA A100-SXM4-80GB"]),
    ],
    ids=["labelled-on-the-manager", "labelled-only-in-daemon-json", "both"],
)
def test_a_service_is_placed_on_a_node_with_the_model_the_queue_found_free(
    node_labels: dict[str, str], engine_labels: dict[str, str], constraints: list[str],
) -> None:
    nodes = [swarm.node_from_api(node_json("n1", "gpu01", W1_GPUS, labels=node_labels, engine_labels=engine_labels))]
    assert swarm.placement(A100, nodes) == constraints
    assert swarm.placement(None, nodes) == []


# --- What a GPU node's engine is told -------------------------------------------------------------------


def host_inventory() -> Inventory:
    """A GPU node as NVML reads it: two whole GPUs, one in MIG mode with three MIG devices, one lost."""
    def gpu(n: int, **kw: Any) -> Device:
        return Device(uuid=f"GPU-{n}", index=n, name=A100, memory_total=80 * GiB, memory_used=0,
                      pci_bus_id=f"00000000:{0x10 + n:02X}:00.0", **kw)

    def mig(slot: int, profile: str, memory: int) -> Device:
        return Device(uuid=f"MIG-2-{slot}", index=2, name=f"{A100} MIG {profile}", memory_total=memory * GiB,
                      memory_used=0, parent_uuid="GPU-2", mig_profile=profile)

    return Inventory(
        devices=(gpu(0), gpu(1), gpu(2, mig_enabled=True), mig(0, "1g.10gb", 10), mig(1, "1g.10gb", 10),
                 mig(2, "3g.40gb", 40),
                 Device(uuid="GPU-3", index=3, name="unknown", memory_total=0, memory_used=0, healthy=False,
                        problem="NVML: GPU is lost")),
        driver_version="550.54.15", cuda_driver_version="12.4",
    )


def test_a_node_advertises_its_whole_gpus_and_mig_devices_never_a_gpu_in_mig_mode_or_a_lost_one() -> None:
    config = swarm.node_daemon_config(host_inventory())
    assert config["node-generic-resources"] == [
        "NVIDIA-GPU=GPU-0", "NVIDIA-GPU=GPU-1",
        "NVIDIA-MIG-1g.10gb=MIG-2-0", "NVIDIA-MIG-1g.10gb=MIG-2-1", "NVIDIA-MIG-3g.40gb=MIG-2-2",
    ]
    assert config["labels"] == [
        "gpuspawner.cuda=12.4", f"gpuspawner.gpu-memory={80 * GiB}", f"gpuspawner.gpu-model={A100}",
        f"gpuspawner.mig-memory.1g.10gb={10 * GiB}", f"gpuspawner.mig-memory.3g.40gb={40 * GiB}",
        "gpuspawner.nvidia-driver=550.54.15",
    ]


def advertised(config: Mapping[str, object], node_id: str, hostname: str, node_labels: Mapping[str, str] | None = None) -> Json:
    """The node as the manager lists it once its engine runs with `config` in daemon.json (and the
    manager gave it `node_labels`)."""
    pairs = [tuple(entry.split("=", 1)) for entry in config["node-generic-resources"]]  # type: ignore[attr-defined]
    engine_labels = dict(entry.split("=", 1) for entry in config["labels"])  # type: ignore[attr-defined]
    return node_json(node_id, hostname, pairs, labels=node_labels, engine_labels=engine_labels)  # type: ignore[arg-type]


def test_the_node_labels_to_set_on_the_manager_say_the_model_and_memory_of_healthy_devices() -> None:
    assert swarm.node_labels(host_inventory()) == {
        "gpuspawner.gpu-model": A100, "gpuspawner.gpu-memory": str(80 * GiB),
        "gpuspawner.mig-memory.1g.10gb": str(10 * GiB), "gpuspawner.mig-memory.3g.40gb": str(40 * GiB),
    }


@pytest.mark.parametrize("labelled_on_the_manager", [False, True], ids=["daemon-json-only", "and-node-labels"])
def test_what_a_node_advertises_is_what_the_hub_then_allocates_from(labelled_on_the_manager: bool) -> None:
    host = host_inventory()
    node_labels = swarm.node_labels(host) if labelled_on_the_manager else None
    seen = inventory_of([advertised(swarm.node_daemon_config(host), "n9", "gpu09", node_labels)])
    on_host = {d.uuid: d for d in host.devices if d.healthy and not d.mig_enabled}
    assert {d.uuid: (d.model, d.mig_profile, d.memory_total) for d in seen.devices} == {
        u: (d.model, d.mig_profile, d.memory_total) for u, d in on_host.items()}
    assert {d.node for d in seen.devices} == {"n9"}


def test_a_node_without_usable_gpus_advertises_nothing() -> None:
    config = swarm.node_daemon_config(Inventory(problem="no NVIDIA driver is usable on this host (NVML: Driver Not Loaded)"))
    assert config == {"node-generic-resources": [], "labels": []}


def test_nvidias_runtime_reads_one_variable_per_kind_as_docker_names_it() -> None:
    # Swarm names the variable DOCKER_RESOURCE_ + the kind in upper case (swarmkit's
    # api/genericresource EnvFormat), so a MIG profile's letters are upper case there.
    assert swarm.resource_variables(host_inventory()) == [
        "DOCKER_RESOURCE_NVIDIA-GPU", "DOCKER_RESOURCE_NVIDIA-MIG-1G.10GB", "DOCKER_RESOURCE_NVIDIA-MIG-3G.40GB",
    ]


# --- Nodes whose driver cannot run an image ------------------------------------------------------------


def cuda_nodes() -> list[swarm.SwarmNode]:
    """Three GPU nodes with drivers of CUDA 12.2, 12.4 and 13.0, and one with MIG devices only."""
    def driver(version: str, cuda: str) -> dict[str, str]:
        return {swarm.DRIVER_LABEL: version, swarm.CUDA_LABEL: cuda}

    return [swarm.node_from_api(n) for n in (
        node_json("n1", "gpu01", [(swarm.GPU_KIND, "GPU-1")], labels=gpu_labels(), engine_labels=driver("535.104.05", "12.2")),
        node_json("n2", "gpu02", [(swarm.GPU_KIND, "GPU-2")], labels=gpu_labels(), engine_labels=driver("550.54.15", "12.4")),
        node_json("n3", "gpu03", [(swarm.GPU_KIND, "GPU-3")], labels=gpu_labels(), engine_labels=driver("580.65.06", "13.0")),
        node_json("n4", "mig01", [(swarm.mig_kind("1g.10gb"), "MIG-4")], labels=gpu_labels(), engine_labels=driver("550.54.15", "12.4")),
    )]


def requiring(text: str) -> swarm.cudareq.ImageRequirements:
    return swarm.cudareq.image_requirements({"NVIDIA_REQUIRE_CUDA": text})


@pytest.mark.parametrize(
    ("text", "request_", "met", "unfit"),
    [
        ("cuda>=12.4", GPURequest(count=1), True, {"n1"}),
        ("cuda>=13.0", GPURequest(count=1), True, {"n1", "n2"}),
        ("cuda>=12.0", GPURequest(count=1), True, set()),
        ("cuda>=13.1", GPURequest(count=1), False, {"n1", "n2", "n3"}),
        ("cuda>=13.0", GPURequest(mig_profile="1g.10gb"), False, {"n4"}),
    ],
    ids=["one-node-too-old", "only-the-newest", "all", "none", "mig-node-too-old"],
)
def test_a_node_whose_driver_cannot_run_the_image_is_left_out(
    text: str, request_: GPURequest, met: bool, unfit: set[str],
) -> None:
    nodes = swarm.gpu_nodes(request_, cuda_nodes())
    verdict, found_unfit = swarm.judge_nodes(requiring(text), nodes, image="lab/torch:2")
    assert (verdict.met, set(found_unfit)) == (met, unfit)


def test_where_no_node_can_run_it_the_sentence_names_the_closest() -> None:
    nodes = swarm.gpu_nodes(GPURequest(count=1), cuda_nodes())
    verdict, _ = swarm.judge_nodes(requiring("cuda>=13.1"), nodes, image="lab/torch:2")
    assert verdict.reason == (
        'Image lab/torch:2 requires CUDA >= 13.1 (NVIDIA_REQUIRE_CUDA="cuda>=13.1"), but node gpu03\'s NVIDIA driver '
        "580.65.06 supports CUDA 13.0 (the newest of the swarm's 3 nodes with such GPUs). Choose a profile whose "
        "image fits, or ask an admin to update the driver.")


def test_the_node_of_the_granted_devices_is_the_one_judged() -> None:
    (node,) = swarm.gpu_nodes(GPURequest(count=1), cuda_nodes(), devices=["GPU-2"])
    assert node.id == "n2"
    verdict, _ = swarm.judge_nodes(requiring("cuda>=13.0"), [node], image="lab/torch:2")
    assert not verdict.met and "but node gpu02's NVIDIA driver 550.54.15 supports CUDA 12.4. " in verdict.reason


def test_devices_of_unfit_nodes_are_not_allocated_and_swarm_is_told_to_avoid_those_nodes() -> None:
    nodes = cuda_nodes()
    inventory = swarm.without_nodes(swarm.cluster_inventory(nodes), {"n1", "n2"})
    assert [d.uuid for d in inventory.devices] == ["GPU-3", "MIG-4"]
    grant = allocate(GPURequest(count=1), inventory, {}, holder=Holder("ada"), busy_memory_threshold=GiB)
    assert isinstance(grant, Grant) and grant.uuids == ("GPU-3",)
    assert swarm.placement(A100, nodes, avoid={"n2", "n1"}) == [
        "node.labels.gpuspawner.gpu-model==NVIDIA A100-SXM4-80GB", "node.id!=n1", "node.id!=n2"]
    assert swarm.placement(None, nodes, avoid={"n1"}) == ["node.id!=n1"]
    assert swarm.without_nodes(inventory, ()) is inventory
