"""A Docker Swarm's GPUs as plain data: what its nodes advertise, what its tasks hold, what a server asks.

On a swarm, each GPU node's engine advertises its GPUs and MIG devices as *named generic
resources* (``node-generic-resources`` in its daemon.json, written by ``gpuspawner
swarm-node-config``): kind ``NVIDIA-GPU`` for whole GPUs, ``NVIDIA-MIG-<profile>`` for each MIG
profile, one value per device UUID; its engine labels (daemon.json) say its driver and CUDA
versions, and its node labels (set on the manager with ``docker node update --label-add``) its GPU
model and memory, which a service's placement constraints can name. A service asks for a number of a kind; Swarm places it on a node with that many
free and hands its task the UUIDs (the task's ``GenericResources`` in the API), which the container
sees in ``DOCKER_RESOURCE_<KIND>`` (the kind in upper case) and NVIDIA's runtime turns into devices.

This module turns the swarm's nodes and tasks (as the Docker API lists them) into the
:class:`gpuspawner.devices.Inventory` and claim table that the rest of gpuspawner works with,
each device tagged with its node, so the profiles, quotas, queue, form and ``gpuspawner gpus``
work unchanged; and it says what a service asks of Swarm for a request.

Pure code: no docker, pynvml, jupyterhub or database imports.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from . import cudareq
from .allocation import GPURequest, Holder
from .audit import RecordedDevice
from .devices import Device, Inventory
from .labels import PREFIX, identity_from_labels
from .reconcile import engine_time

GPU_KIND = "NVIDIA-GPU"
MIG_KIND_PREFIX = "NVIDIA-MIG-"
RESOURCE_ENV_PREFIX = "DOCKER_RESOURCE_"  # + kind, upper-cased (resource_variable): the UUIDs Swarm gave a container
# Node labels (Spec.Labels, set on the manager): what a service's placement constraints can name.
MODEL_LABEL = "gpuspawner.gpu-model"
MEMORY_LABEL = "gpuspawner.gpu-memory"  # bytes per whole GPU
MIG_MEMORY_LABEL_PREFIX = "gpuspawner.mig-memory."  # + profile: bytes per MIG device
# Engine labels (daemon.json "labels", Description.Engine.Labels): what only the node itself knows.
DRIVER_LABEL = "gpuspawner.nvidia-driver"
CUDA_LABEL = "gpuspawner.cuda"
# A task holds its resources in these states (Swarm's task states); pending ones hold none yet.
HOLDING_STATES = frozenset({"assigned", "accepted", "preparing", "ready", "starting", "running"})
# A task in one of these has ended, and its Status.Timestamp says when it did.
FINISHED_STATES = frozenset({"complete", "failed", "shutdown", "rejected", "orphaned"})


def mig_kind(profile: str) -> str:
    return f"{MIG_KIND_PREFIX}{profile}"


def is_device_kind(kind: str) -> bool:
    """Whether a generic resource kind is gpuspawner's: whole GPUs or a MIG profile's devices."""
    return kind == GPU_KIND or kind.startswith(MIG_KIND_PREFIX)


def kind_of(request: GPURequest) -> str:
    """The generic resource kind a request asks Swarm for."""
    return mig_kind(request.mig_profile) if request.mig_profile else GPU_KIND


@dataclass(frozen=True)
class SwarmNode:
    """One node as the manager lists it."""

    id: str
    hostname: str
    ready: bool  # Status.State is "ready"
    active: bool  # Spec.Availability is "active" (not drained or paused)
    engine_version: str
    labels: Mapping[str, str]  # the node's labels (Spec.Labels)
    engine_labels: Mapping[str, str]  # its engine's labels (daemon.json)
    resources: tuple[tuple[str, str], ...]  # (kind, value): the named generic resources it advertises

    def label(self, name: str) -> str | None:
        """A label of the node, else of its engine."""
        return self.labels.get(name) or self.engine_labels.get(name)

    @property
    def schedulable(self) -> bool:
        """Whether Swarm places new tasks here: up and not drained or paused."""
        return self.ready and self.active


@dataclass(frozen=True)
class SwarmTask:
    """One task of a service, as the manager lists it."""

    id: str
    service_id: str
    service_name: str
    node_id: str
    state: str  # Status.State
    desired_state: str
    labels: Mapping[str, str]  # its service's labels
    resources: tuple[tuple[str, str], ...]  # (kind, value) Swarm assigned it (the task's GenericResources)
    address: str = ""  # its address on the hub's network, without the prefix length
    container_id: str = ""  # the container its node made for it
    error: str = ""  # why it ended or waits, as Swarm says (Status.Err, else Status.Message)
    timestamp: str = ""  # when it reached its state, as Swarm says (Status.Timestamp, RFC 3339)

    @property
    def ended_at(self) -> str | None:
        """When the task ended, as Swarm says (ISO 8601 UTC, see :func:`gpuspawner.reconcile.engine_time`);
        None while it has not, or where Swarm does not say."""
        return engine_time(self.timestamp) if self.state in FINISHED_STATES else None

    @property
    def holds(self) -> bool:
        """Whether the task holds its resources now: from its assignment to a node until it has ended,
        whatever its desired state (a task being stopped still runs on its devices, and Swarm's scheduler
        counts them as used until the task is past "running")."""
        return self.state in HOLDING_STATES


def named_resources(spec: Sequence[Mapping[str, object]] | None) -> tuple[tuple[str, str], ...]:
    """(kind, value) of each NamedResourceSpec in a Docker API list of generic resources."""
    found = []
    for entry in spec or ():
        named = entry.get("NamedResourceSpec")
        if type(named) is dict or isinstance(named, Mapping):
            found.append((str(named.get("Kind", "")), str(named.get("Value", ""))))
    return tuple(found)


def node_from_api(node: Mapping[str, object]) -> SwarmNode:
    """A node from the Docker API's ``GET /nodes`` entry."""
    description = _map(node.get("Description"))
    engine = _map(description.get("Engine"))
    resources = _map(description.get("Resources"))
    return SwarmNode(
        id=str(node.get("ID", "")), hostname=str(description.get("Hostname", "")),
        ready=_map(node.get("Status")).get("State") == "ready",
        active=_map(node.get("Spec")).get("Availability", "active") == "active",
        engine_version=str(engine.get("EngineVersion", "")),
        labels={str(k): str(v) for k, v in _map(_map(node.get("Spec")).get("Labels")).items()},
        engine_labels={str(k): str(v) for k, v in _map(engine.get("Labels")).items()},
        resources=named_resources(resources.get("GenericResources")),  # type: ignore[arg-type]
    )


def task_from_api(task: Mapping[str, object], *, service_name: str = "", service_labels: Mapping[str, str] | None = None,
                  network_id: str = "") -> SwarmTask:
    """A task from the Docker API's ``GET /tasks`` entry; its service's name and labels from the service;
    its address on the network `network_id` (by ID), if attached."""
    status = _map(task.get("Status"))
    address = ""
    for attachment in task.get("NetworksAttachments") or ():  # type: ignore[attr-defined]
        if network_id and _map(_map(attachment).get("Network")).get("ID") == network_id:
            addresses = _map(attachment).get("Addresses") or []
            address = str(addresses[0]).split("/")[0] if addresses else ""  # type: ignore[index]
    return SwarmTask(
        id=str(task.get("ID", "")), service_id=str(task.get("ServiceID", "")), service_name=service_name,
        node_id=str(task.get("NodeID", "")), state=str(status.get("State", "")),
        desired_state=str(task.get("DesiredState", "")), labels=dict(service_labels or {}),
        # The engine sends them as "GenericResources" (moby's api/types/swarm Task); its API reference
        # calls them "AssignedGenericResources".
        resources=named_resources(task.get("GenericResources") or task.get("AssignedGenericResources")),  # type: ignore[arg-type]
        address=address, container_id=str(_map(status.get("ContainerStatus")).get("ContainerID") or ""),
        error=str(status.get("Err") or status.get("Message") or ""), timestamp=str(status.get("Timestamp") or ""),
    )


def tasks_from_api(tasks: Iterable[Mapping[str, object]], services: Iterable[Mapping[str, object]], *,
                   network_id: str = "") -> list[SwarmTask]:
    """The tasks of a Docker API listing, each with its service's name and labels (from the services
    listing) and its address on the network `network_id`."""
    specs = {s.get("ID"): _map(s.get("Spec")) for s in services}
    return [task_from_api(t, service_name=str(specs.get(t.get("ServiceID"), {}).get("Name", "")),
                          service_labels=_map(specs.get(t.get("ServiceID"), {}).get("Labels")),  # type: ignore[arg-type]
                          network_id=network_id)
            for t in tasks]


def last_ended_at(tasks: Iterable[SwarmTask]) -> str | None:
    """When the last of a service's `tasks` ended, once every one has (None while one has not, for no
    task, or where Swarm does not say)."""
    ends = [t.ended_at for t in tasks]
    if not ends or None in ends:
        return None
    return max(e for e in ends if e is not None)


def _map(value: object) -> Mapping[str, object]:
    # JSON gives dicts: their exact type is checked first, as the ABC check costs more (a look reads ~1,000 tasks)
    return value if type(value) is dict or isinstance(value, Mapping) else {}


def holding(tasks: Iterable[Mapping[str, object]]) -> list[Mapping[str, object]]:
    """The tasks of a Docker API listing that hold their resources (by their state), before the work of
    reading each: on a swarm that keeps a long task history, most of a listing holds nothing."""
    return [t for t in tasks if _map(t.get("Status")).get("State") in HOLDING_STATES]


def cluster_inventory(nodes: Iterable[SwarmNode]) -> Inventory:
    """Every GPU and MIG device the schedulable nodes advertise, tagged with its node; drained, paused or
    down nodes add none (Swarm places nothing there). A node's model and memory come from its node labels,
    else from its engine's."""
    devices: list[Device] = []
    for node in sorted(nodes, key=lambda n: (n.hostname, n.id)):
        if node.schedulable:
            said = {**node.engine_labels, **{k: v for k, v in node.labels.items() if v}}  # as node.label() reads them
            devices += _node_devices(node.id, node.resources, tuple(sorted((k, v) for k, v in said.items() if k.startswith(PREFIX))))
    problem = None if devices else "no schedulable node of the swarm advertises GPUs"
    return Inventory(devices=tuple(devices), problem=problem)


@functools.lru_cache(maxsize=1024)
def _node_devices(node_id: str, resources: tuple[tuple[str, str], ...], said: tuple[tuple[str, str], ...]) -> tuple[Device, ...]:
    """The devices one node advertises, given its gpuspawner labels. Remembered: a swarm's nodes seldom
    change, and the hub builds the inventory at every form view and queue look (a thousand devices)."""
    labels = dict(said)
    model = labels.get(MODEL_LABEL) or "NVIDIA GPU"
    devices: list[Device] = []
    for kind, value in resources:
        if kind == GPU_KIND:
            devices.append(Device(uuid=value, index=len(devices), name=model, memory_total=_bytes(labels.get(MEMORY_LABEL)),
                                  memory_used=0, node=node_id))
        elif kind.startswith(MIG_KIND_PREFIX):
            profile = kind.removeprefix(MIG_KIND_PREFIX)
            devices.append(Device(
                uuid=value, index=len(devices), name=f"{model} MIG {profile}", node=node_id,
                memory_total=_bytes(labels.get(MIG_MEMORY_LABEL_PREFIX + profile)), memory_used=0,
                parent_uuid=f"{node_id}/{profile}", mig_profile=profile,
            ))
    return tuple(devices)


def _bytes(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def cluster_claims(tasks: Iterable[SwarmTask], *, hub_id: str) -> dict[str, Holder]:
    """UUID -> holder for every task that holds resources: a server of this hub by its labels, any other
    service by its name (a holder with no user, as another container on one host)."""
    claims = {}
    for task in tasks:
        if not task.holds:
            continue
        identity = identity_from_labels(task.labels)
        holder = (Holder(identity.user, identity.server) if identity is not None and identity.hub_id == hub_id
                  else Holder("", task.service_name or task.service_id))
        for _, value in task.resources:
            claims[value] = holder
    return claims


def recorded_device(device: Device) -> RecordedDevice:
    """How a server's record keeps a device of the swarm: its UUID, model and memory as its node says."""
    return RecordedDevice(uuid=device.uuid, model=device.model, memory_total=device.memory_total,
                          mig_profile=device.mig_profile)


def unknown_device(uuid: str) -> RecordedDevice:
    """A device Swarm assigned that its node no longer advertises (its daemon.json changed since)."""
    return RecordedDevice(uuid=uuid, model="", memory_total=0)


def generic_resources(request: GPURequest) -> dict[str, int]:
    """What a service asks Swarm for: ``{kind: count}``; none for CPU only."""
    return {kind_of(request): request.device_count} if request.wants_gpu else {}


def placement(model: str | None, nodes: Iterable[SwarmNode] = (), *, avoid: Collection[str] = ()) -> list[str]:
    """The service's constraints: a node labelled with GPUs of `model` (the model the hub's queue found
    free for a request; Swarm's constraints have no pattern matching). The node label, unless the nodes
    of that model say it only in their engine labels (daemon.json). `avoid`: IDs of nodes whose driver
    cannot run the image (:func:`judge_nodes`), which Swarm must not choose."""
    shun = [f"node.id!={node_id}" for node_id in sorted(avoid)]
    if not model:
        return shun
    nodes = list(nodes)
    engine_only = any(n.engine_labels.get(MODEL_LABEL) == model for n in nodes) and not any(
        n.labels.get(MODEL_LABEL) == model for n in nodes)
    return [f"{'engine' if engine_only else 'node'}.labels.{MODEL_LABEL}=={model}", *shun]


def gpu_nodes(request: GPURequest, nodes: Iterable[SwarmNode], *, devices: Collection[str] = ()) -> list[SwarmNode]:
    """The schedulable nodes that advertise devices of `request`'s kind; given `devices` (UUIDs), the nodes
    that have one of them."""
    kind = kind_of(request)
    return [n for n in nodes if n.schedulable and any(
        (value in devices) if devices else (k == kind) for k, value in n.resources)]


def node_host(node: SwarmNode) -> cudareq.Host:
    """What an image's CUDA requirements are judged against on `node`: the driver and CUDA versions its
    engine labels say (``gpuspawner swarm-node-config`` writes them; a node without them is not judged)."""
    return cudareq.Host(driver=node.label(DRIVER_LABEL), cuda=node.label(CUDA_LABEL), where=f"node {node.hostname}")


def judge_nodes(found: cudareq.ImageRequirements, nodes: Sequence[SwarmNode], *, image: str) -> tuple[cudareq.Verdict, frozenset[str]]:
    """Whether a server of `image` can start on one of `nodes` (met where one node's driver meets `found`),
    and the IDs of the nodes whose driver cannot run it. Where none can, the sentence names the node whose
    driver comes closest."""
    verdicts = {n.id: cudareq.judge(found, node_host(n), image=image) for n in nodes}
    unfit = frozenset(node_id for node_id, v in verdicts.items() if not v.met)
    fitting = [v for v in verdicts.values() if v.met]
    if fitting or not nodes:
        return (fitting[0] if fitting else cudareq.judge(found, cudareq.Host(driver=None, cuda=None), image=image)), unfit
    best = max(nodes, key=lambda n: (cudareq.version_key(n.label(CUDA_LABEL)), cudareq.version_key(n.label(DRIVER_LABEL))))
    host = node_host(best)
    if len(nodes) > 1:
        host = replace(host, aside=f" (the newest of the swarm's {len(nodes)} nodes with such GPUs)")
    return cudareq.judge(found, host, image=image), unfit


def without_nodes(inventory: Inventory, node_ids: Collection[str]) -> Inventory:
    """`inventory` without the devices of the nodes `node_ids` (nodes that cannot run a spawn's image)."""
    if not node_ids:
        return inventory
    return replace(inventory, devices=tuple(d for d in inventory.devices if d.node not in node_ids))


def node_daemon_config(inventory: Inventory) -> dict[str, object]:
    """The daemon.json settings that make a GPU host's engine advertise its devices to Swarm: one
    generic resource per whole GPU not in MIG mode and per MIG device, and labels with its model,
    memory, driver and CUDA versions. Unhealthy devices are left out."""
    resources, labels = [], {}
    whole = [d for d in inventory.devices if d.healthy and d.uuid and not d.is_mig and not d.mig_enabled]
    migs = [d for d in inventory.devices if d.healthy and d.uuid and d.is_mig and d.mig_profile]
    resources += [f"{GPU_KIND}={d.uuid}" for d in whole]
    resources += [f"{mig_kind(d.mig_profile or '')}={d.uuid}" for d in migs]
    models = {d.model for d in inventory.devices if d.healthy and not d.is_mig}
    if models:
        labels[MODEL_LABEL] = sorted(models)[0]
    if whole:
        labels[MEMORY_LABEL] = str(min(d.memory_total for d in whole))
    for d in migs:
        labels[MIG_MEMORY_LABEL_PREFIX + (d.mig_profile or "")] = str(d.memory_total)
    if inventory.driver_version:
        labels[DRIVER_LABEL] = inventory.driver_version
    if inventory.cuda_driver_version:
        labels[CUDA_LABEL] = inventory.cuda_driver_version
    return {"node-generic-resources": resources, "labels": [f"{k}={v}" for k, v in sorted(labels.items())]}


def node_labels(inventory: Inventory) -> dict[str, str]:
    """The node labels to set on the manager for a GPU host (``docker node update --label-add``): its GPU
    model and the memory of its GPUs and of each MIG profile, which the hub shows and places by."""
    labels = {}
    models = sorted({d.model for d in inventory.devices if d.healthy and not d.is_mig})
    if models:
        labels[MODEL_LABEL] = models[0]
    whole = [d for d in inventory.devices if d.healthy and d.uuid and not d.is_mig and not d.mig_enabled]
    if whole:
        labels[MEMORY_LABEL] = str(min(d.memory_total for d in whole))
    for d in inventory.devices:
        if d.healthy and d.is_mig and d.mig_profile:
            labels[MIG_MEMORY_LABEL_PREFIX + d.mig_profile] = str(d.memory_total)
    return labels


def resource_variable(kind: str) -> str:
    """The environment variable in which a container gets the values of `kind` Swarm assigned it: Swarm
    writes the kind in upper case (swarmkit's api/genericresource EnvFormat), "DOCKER_RESOURCE_NVIDIA-MIG-1G.10GB"."""
    return (RESOURCE_ENV_PREFIX + kind).upper()


def resource_variables(inventory: Inventory) -> list[str]:
    """The environment variables NVIDIA's container runtime must read on this node (its
    ``swarm-resource`` setting): one per kind the node advertises."""
    kinds = {GPU_KIND} | {mig_kind(d.mig_profile) for d in inventory.devices if d.is_mig and d.mig_profile}
    return sorted(resource_variable(k) for k in kinds)
