"""What the hub's availability step costs on a big Docker Swarm: 100 GPU nodes of 8 GPUs (a tenth of them
with their GPUs in MIG mode), some drained, paused or down, and about 600 running tasks, most of them
this hub's servers, with the task history Swarm keeps.

    python benchmarks/swarm_availability.py [--repeat 200]

On a swarm, every view of the spawn form and every look at the GPU queue turns the manager's lists (as
the Docker API returns them: ``GET /nodes``, ``/services``, ``/tasks``) into the hub's inventory and
claim table, then decides, all on the hub's event loop. This measures each pure part of that step
and the whole:

- reading the lists: ``swarm.node_from_api`` over the nodes, ``swarm.task_from_api`` over the tasks
  (with their services' names and labels, and their addresses on the hub's network), as
  GPUSwarmSpawner does;
- ``swarm.cluster_inventory`` (the schedulable nodes' devices; a node's devices are remembered until its
  resources or labels change, so it is timed both ways) and ``swarm.cluster_claims``;
- ``gpuqueue.serve`` for one waiter (a 2-GPU server, served on one node);
- ``form.form_entries``: the spawn form's availability for each of six profiles.

The lists are built once, as JSON-shaped dicts; fetching them from the manager is I/O (in a thread in
the hub) and is not measured here. Prints medians and 95th percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable, Iterator
from typing import Any

from allocation import measure  # benchmarks/ is on sys.path when a benchmark runs

from gpuspawner import labels, swarm
from gpuspawner.allocation import GPURequest, Holder
from gpuspawner.devices import GiB
from gpuspawner.form import form_entries
from gpuspawner.gpuqueue import Turn, Waiter, serve
from gpuspawner.profiles import parse_profiles

HUB = "hub-bench"
NETWORK = "nw0gpuspawner0overlay00001"
MODELS = ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3")
MIG_LAYOUTS = ({"1g.10gb": 7}, {"3g.40gb": 2})  # MIG devices per GPU, alternating over the MIG nodes
Json = dict[str, Any]


def api_node(n: int) -> Json:
    """Node n as ``GET /nodes`` lists it: every tenth in MIG mode; 93-95 drained, 96 paused, 97-98 down."""
    model = MODELS[n % 2]
    resources, node_labels = [], {swarm.MODEL_LABEL: model, swarm.MEMORY_LABEL: str(80 * GiB)}
    for g in range(8):
        if n % 10 == 9:
            for profile, count in MIG_LAYOUTS[(n // 10) % 2].items():
                node_labels[swarm.MIG_MEMORY_LABEL_PREFIX + profile] = str(int(profile.split(".")[1][:-2]) * GiB)
                resources += [{"NamedResourceSpec": {"Kind": swarm.mig_kind(profile), "Value": f"MIG-{n:03d}-{g}-{s}"}}
                              for s in range(count)]
        else:
            resources.append({"NamedResourceSpec": {"Kind": swarm.GPU_KIND, "Value": f"GPU-{n:03d}-{g}"}})
    availability = "drain" if 93 <= n <= 95 else "pause" if n == 96 else "active"
    state = "down" if n in (97, 98) else "ready"
    return {
        "ID": f"node{n:03d}xxxxxxxxxxxxxxxxx", "Version": {"Index": 1000 + n},
        "CreatedAt": "2026-11-01T08:00:00.000000000Z", "UpdatedAt": "2026-11-21T09:00:00.000000000Z",
        "Spec": {"Labels": node_labels, "Role": "worker", "Availability": availability},
        "Description": {
            "Hostname": f"gpu{n:03d}", "Platform": {"Architecture": "x86_64", "OS": "linux"},
            "Resources": {"NanoCPUs": 128_000_000_000, "MemoryBytes": 1_081_000_000_000, "GenericResources": resources},
            "Engine": {"EngineVersion": "20.10.24+dfsg1",
                       "Labels": {swarm.DRIVER_LABEL: "550.54.15", swarm.CUDA_LABEL: "12.4"},
                       "Plugins": [{"Type": "Log", "Name": "json-file"}, {"Type": "Network", "Name": "overlay"}]},
            "TLSInfo": {"TrustRoot": "-----BEGIN CERTIFICATE-----…", "CertIssuerSubject": "MBMx…", "CertIssuerPublicKey": "MFkw…"},
        },
        "Status": {"State": state, "Addr": f"10.20.{n // 250}.{n % 250 + 1}"},
    }


def api_task(n: int, *, service_id: str, node_id: str, held: list[str], kind: str, state: str = "running",
             desired: str = "running") -> Json:
    """Task n as ``GET /tasks`` lists it (the engine names its devices in GenericResources)."""
    task: Json = {
        "ID": f"task{n:05d}xxxxxxxxxxxxxxxx", "Version": {"Index": 5000 + n},
        "CreatedAt": "2026-11-21T08:00:00.000000000Z", "UpdatedAt": "2026-11-21T08:00:03.000000000Z", "Labels": {},
        "Spec": {"ContainerSpec": {"Image": "registry.lab/notebook@sha256:" + "ab" * 32, "Isolation": "default"},
                 "Resources": {"Reservations": {"GenericResources": [
                     {"DiscreteResourceSpec": {"Kind": kind, "Value": max(1, len(held))}}]}},
                 "Networks": [{"Target": NETWORK}], "ForceUpdate": 0},
        "ServiceID": service_id, "Slot": 1,
        "Status": {"Timestamp": "2026-11-21T08:00:03.000000000Z", "State": state, "Message": state,
                   "ContainerStatus": {"ContainerID": f"{n:064x}", "PID": 1000 + n, "ExitCode": 0}, "PortStatus": {}},
        "DesiredState": desired,
        "NetworksAttachments": [{
            "Network": {"ID": NETWORK, "Version": {"Index": 24}, "Spec": {"Name": "gpuspawner", "Attachable": True, "Scope": "swarm"},
                        "DriverState": {"Name": "overlay"}},
            "Addresses": [f"10.214.{n // 250}.{n % 250 + 2}/16"]}],
    }
    if node_id:
        task["NodeID"] = node_id
    if held:
        task["GenericResources"] = [{"NamedResourceSpec": {"Kind": kind, "Value": u}} for u in held]
    return task


def api_service(service_id: str, name: str, service_labels: dict[str, str]) -> Json:
    return {"ID": service_id, "Version": {"Index": 77},
            "Spec": {"Name": name, "Labels": service_labels, "Mode": {"Replicated": {"Replicas": 1}},
                     "TaskTemplate": {"ContainerSpec": {"Image": "registry.lab/notebook"}}, "EndpointSpec": {"Mode": "dnsrr"}}}


def cluster() -> tuple[list[Json], list[Json], list[Json]]:
    """Nodes, services and tasks: ~600 running tasks holding 1, 2 or 4 GPUs or one MIG device (nine in
    ten of them this hub's servers), 20 pending, and the ended tasks of earlier servers."""
    nodes = [api_node(n) for n in range(100)]
    services: list[Json] = []
    tasks: list[Json] = []

    def place(node: Json, kind: str, held: list[str], *, state: str = "running", desired: str = "running") -> None:
        n = len(tasks)
        service_id = f"svc{n:05d}xxxxxxxxxxxxxxxxx"
        if n % 10 == 7:  # a tenth are other services: training jobs, another team's tools
            services.append(api_service(service_id, f"train-{n:05d}", {"team": "vision"}))
        else:
            identity = labels.ServerIdentity(HUB, f"user{n % 400:03d}", "" if n < 400 else f"s{n}")
            services.append(api_service(service_id, f"jupyter-{identity.user}{'-' + identity.server if identity.server else ''}",
                                        labels.server_labels(identity, version="2.1.0", profile="a100-1", record=f"rec{n}")))
        tasks.append(api_task(n, service_id=service_id, node_id=node["ID"] if held else "", held=held, kind=kind,
                              state=state, desired=desired))

    for node in nodes:
        devices = [(r["NamedResourceSpec"]["Kind"], r["NamedResourceSpec"]["Value"]) for r in node["Description"]["Resources"]["GenericResources"]]
        schedulable = node["Spec"]["Availability"] == "active" and node["Status"]["State"] == "ready"
        if not schedulable:
            continue
        free = [u for _, u in devices]
        sizes = iter_sizes(node["ID"], kind=devices[0][0])
        while len(free) > 1:  # leave about one device per node free
            size = next(sizes)
            if size > len(free) - 1:
                break
            held, free = free[:size], free[size:]
            place(node, devices[0][0], held)
    for _ in range(20):  # waiting for a node with enough free
        place(nodes[0], swarm.GPU_KIND, [], state="pending")
    for n in range(300):  # history: earlier servers' tasks, ended; their services are gone or replaced
        node = nodes[n % 90]
        place(node, swarm.GPU_KIND, [f"GPU-{n % 90:03d}-{n % 8}"], state=("complete", "shutdown", "failed")[n % 3],
              desired="shutdown")
    return nodes, services, tasks


def iter_sizes(node_id: str, *, kind: str) -> Iterator[int]:
    """How many devices each task of a node holds: MIG tasks one, GPU tasks mostly one, some 2 or 4."""
    pattern = (1,) if kind != swarm.GPU_KIND else (1, 1, 2, 1, 4, 1, 1, 2)[int(node_id[4:7]) % 3:]
    while True:
        yield from pattern


PROFILES = parse_profiles([
    {"slug": "cpu", "display_name": "CPU", "image": "lab/notebook:2026.11"},
    {"slug": "a100-1", "display_name": "1 × A100", "image": "lab/notebook:2026.11", "gpus": {"count": 1, "model": "A100"}},
    {"slug": "a100-2", "display_name": "2 × A100", "image": "lab/notebook:2026.11", "gpus": {"count": 2, "model": "A100"}, "default": True},
    {"slug": "h100-4", "display_name": "4 × H100", "image": "lab/notebook:2026.11", "gpus": {"count": 4, "model": "H100"}},
    {"slug": "mig-small", "display_name": "MIG 1g.10gb", "image": "lab/notebook:2026.11", "gpus": {"mig_profile": "1g.10gb"}},
    {"slug": "mig-large", "display_name": "MIG 3g.40gb", "image": "lab/notebook:2026.11", "gpus": {"mig_profile": "3g.40gb"}},
])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="runs per measurement (default 200)")
    args = parser.parse_args()

    nodes, services, tasks = cluster()
    me = Holder("newcomer")
    waiter = Waiter(id="w1", holder=me, request=GPURequest(count=2, model="A100"), joined=0.0)

    def read_nodes() -> list[swarm.SwarmNode]:
        return [swarm.node_from_api(n) for n in nodes]

    def read_tasks() -> list[swarm.SwarmTask]:  # as GPUSwarmSpawner.swarm_tasks
        return swarm.tasks_from_api(tasks, services, network_id=NETWORK)

    swarm_nodes, swarm_tasks = read_nodes(), read_tasks()
    inventory = swarm.cluster_inventory(swarm_nodes)
    claims = swarm.cluster_claims(swarm_tasks, hub_id=HUB)

    def cold_inventory() -> object:
        swarm._node_devices.cache_clear()  # as after every node's labels or resources changed
        return swarm.cluster_inventory(swarm_nodes)

    def queue_look() -> Turn:
        return serve([waiter], inventory, claims, busy_memory_threshold=GiB)

    def form() -> list[dict[str, Any]]:
        return form_entries(PROFILES, inventory, claims, holder=me, busy_memory_threshold=GiB, waiting=True,
                            last_choice=None)

    def read_holding_tasks() -> list[swarm.SwarmTask]:  # as GPUSwarmSpawner.device_claims
        return swarm.tasks_from_api(swarm.holding(tasks), services, network_id=NETWORK)

    def whole_step() -> object:
        inv = swarm.cluster_inventory(read_nodes())
        table = swarm.cluster_claims(read_holding_tasks(), hub_id=HUB)
        serve([waiter], inv, table, busy_memory_threshold=GiB)
        return form_entries(PROFILES, inv, table, holder=me, busy_memory_threshold=GiB, waiting=True, last_choice=None)

    turn = queue_look()
    running = sum(1 for t in swarm_tasks if t.state == "running")
    mine = sum(1 for h in claims.values() if h.user)
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.processor() or 'cpu'}")
    print(f"swarm: {len(nodes)} nodes ({sum(1 for n in swarm_nodes if n.schedulable)} schedulable), "
          f"{sum(len(n.resources) for n in swarm_nodes)} devices advertised, {len(inventory.devices)} counted; "
          f"{len(tasks)} tasks ({running} running, {sum(1 for t in swarm_tasks if t.state == 'pending')} pending), "
          f"{len(services)} services; {len(claims)} devices held ({mine} by this hub's servers), "
          f"{len(inventory.devices) - len(claims)} free")
    print(f"the waiter (2 × A100) is {'served' if turn.grants else 'waiting' if turn.places else 'refused'}; "
          "the form: " + ", ".join(f"{e['slug']} {e['availability']}" for e in form()))
    steps: list[tuple[str, Callable[[], object]]] = [
        ("node_from_api × nodes", read_nodes),
        ("task_from_api × tasks (with services)", read_tasks),
        ("task_from_api × the tasks holding devices", read_holding_tasks),
        ("cluster_inventory, nodes as at the last look", lambda: swarm.cluster_inventory(swarm_nodes)),
        ("cluster_inventory, every node changed", cold_inventory),
        ("cluster_claims", lambda: swarm.cluster_claims(swarm_tasks, hub_id=HUB)),
        ("gpuqueue.serve, one waiter", queue_look),
        ("form_entries, six profiles", form),
        ("the whole step", whole_step),
    ]
    print(f"\n{'step':<44}{'median':>10}{'p95':>10}")
    for label, fn in steps:
        med, p95 = measure(fn, args.repeat)
        print(f"{label:<44}{med:>7.3f} ms{p95:>7.3f} ms")


if __name__ == "__main__":
    main()
