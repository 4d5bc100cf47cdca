"""The claim table: rebuilt from this hub's containers, plus spawns in progress; the containers that only read the GPUs."""

import pytest

from gpuspawner import labels
from gpuspawner.allocation import Holder
from gpuspawner.claims import (
    ClaimBook,
    claims_from_containers,
    foreign_claims,
    gpu_readers,
    own_container_ids,
    profiles_of_servers,
)
from gpuspawner.devices import Device, Inventory
from gpuspawner.labels import ServerIdentity


def container(
    state: str, *, user: str = "ada", server: str = "", hub: str = "hub-1", devices: tuple = ("GPU-1",), profile: str = ""
) -> dict:
    identity = ServerIdentity(hub_id=hub, user=user, server=server)
    return {"State": state, "Labels": labels.server_labels(identity, version="1", devices=devices, profile=profile)}


@pytest.mark.parametrize(
    ("state", "holds"),
    [("running", True), ("restarting", True), ("paused", True), ("created", False), ("exited", False), ("dead", False)],
)
def test_only_live_containers_hold_their_devices(state: str, holds: bool) -> None:
    claims = claims_from_containers([container(state)], hub_id="hub-1")
    assert claims == ({"GPU-1": Holder("ada")} if holds else {})


def test_other_hubs_and_foreign_containers_are_ignored() -> None:
    containers = [
        container("running", hub="hub-2", devices=("GPU-2",)),
        {"State": "running", "Labels": {"com.example": "x"}},
        container("running", user="eve", server="train", devices=("GPU-3", "GPU-4")),
    ]
    assert claims_from_containers(containers, hub_id="hub-1") == {
        "GPU-3": Holder("eve", "train"),
        "GPU-4": Holder("eve", "train"),
    }


def test_pending_claims_join_the_table_until_released() -> None:
    book = ClaimBook()
    book.reserve("spawn-1", Holder("bob"), ("GPU-5",))
    assert book.merged({"GPU-1": Holder("ada")}) == {"GPU-1": Holder("ada"), "GPU-5": Holder("bob")}
    assert book.release("spawn-1") == ("GPU-5",)
    assert book.merged({}) == {}
    assert book.release("spawn-1") == ()


def test_a_server_started_again_never_takes_over_its_interrupted_spawns_claim() -> None:
    book = ClaimBook()
    book.reserve("spawn-1", Holder("ada"), ("GPU-0",))  # interrupted; its container may still start
    book.keep_unconfirmed("spawn-1")
    book.reserve("spawn-2", Holder("ada"), ("GPU-1",))  # ada tries again at once
    assert book.merged({}) == {"GPU-0": Holder("ada"), "GPU-1": Holder("ada")}
    assert book.unconfirmed() == (("spawn-1", Holder("ada")),)
    book.release("spawn-2")
    assert book.merged({}) == {"GPU-0": Holder("ada")}  # held until the first container is known gone
    book.release("spawn-1")
    assert book.merged({}) == {} and book.unconfirmed() == ()


INVENTORY = Inventory(devices=(
    Device(uuid="GPU-a", index=0, name="A100", memory_total=1, memory_used=0),
    Device(uuid="GPU-b", index=1, name="A100", memory_total=1, memory_used=0, mig_enabled=True),
    Device(uuid="MIG-b1", index=1, name="A100 MIG 1g.10gb", memory_total=1, memory_used=0, parent_uuid="GPU-b"),
    Device(uuid="GPU-c", index=2, name="A100", memory_total=1, memory_used=0),
))


def inspected(name: str, *, requests: list | None = None, runtime: str = "runc", env: tuple = ()) -> dict:
    return {"Name": f"/{name}", "HostConfig": {"DeviceRequests": requests, "Runtime": runtime}, "Config": {"Env": list(env)}}


@pytest.mark.parametrize(("container", "held"), [
    (inspected("by-uuid", requests=[{"Driver": "nvidia", "DeviceIDs": ["GPU-c"], "Capabilities": [["gpu"]]}]), {"GPU-c"}),
    (inspected("by-index", requests=[{"Driver": "nvidia", "DeviceIDs": ["0"], "Capabilities": [["gpu"]]}]), {"GPU-a"}),
    (inspected("gpus-1", requests=[{"Driver": "", "Count": 1, "Capabilities": [["gpu"]]}]), {"GPU-a"}),
    (inspected("gpus-all", requests=[{"Driver": "", "Count": -1, "Capabilities": [["gpu"]]}]),
     {"GPU-a", "GPU-b", "MIG-b1", "GPU-c"}),
    (inspected("cdi", requests=[{"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=GPU-c"]}]), {"GPU-c"}),
    (inspected("cdi-all", requests=[{"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=all"]}]),
     {"GPU-a", "GPU-b", "MIG-b1", "GPU-c"}),
    (inspected("mig", requests=[{"Driver": "nvidia", "DeviceIDs": ["MIG-b1"], "Capabilities": [["gpu"]]}]), {"MIG-b1"}),
    (inspected("nvidia-runtime", runtime="nvidia", env=("NVIDIA_VISIBLE_DEVICES=1",)), {"GPU-b", "MIG-b1"}),
    (inspected("nvidia-runtime-void", runtime="nvidia", env=("NVIDIA_VISIBLE_DEVICES=void",)), set()),
    (inspected("plain"), set()),
    (inspected("other-driver", requests=[{"Driver": "tpu", "Count": -1, "Capabilities": [["tpu"]]}]), set()),
], ids=lambda v: v["Name"].lstrip("/") if isinstance(v, dict) else None)
def test_containers_this_hub_did_not_make_hold_what_they_requested(container: dict, held: set) -> None:
    claims = foreign_claims([container], INVENTORY)
    assert set(claims) == held
    assert all(h == Holder("", f"container {container['Name'].lstrip('/')}") for h in claims.values())
    assert all(str(h) == f"container {container['Name'].lstrip('/')}" for h in claims.values())


def test_profiles_of_live_servers() -> None:
    containers = [
        container("running", profile="a100-1"),
        container("running", user="bob", profile=""),
        container("exited", user="eve", profile="cpu"),
        container("running", user="dan", hub="hub-2", profile="cpu"),
    ]
    assert profiles_of_servers(containers, hub_id="hub-1") == {Holder("ada"): "a100-1"}


HUB_ID = "4f1c" + "a" * 60  # the hub's own container
AUDIT_ID = "77be" + "b" * 60
OTHER_ID = "90d3" + "c" * 60


def listed(ident: str, **labelled: str) -> dict:
    """A running container as the engine's list shows it; `labelled` as label=value with dots spelled _."""
    return {"Id": ident, "State": "running", "Labels": {k.replace("_", "."): v for k, v in labelled.items()}}


def mountinfo(ident: str, *, root: str = "/var/lib/docker/containers/{}/hostname", at: str = "/etc/hostname") -> str:
    return (
        "1321 1204 0:62 / / rw,relatime master:310 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/X\n"
        f"1336 1321 8:1 {root.format(ident)} {at} rw,relatime - ext4 /dev/sda1 rw\n"
    )


@pytest.mark.parametrize(("mounts", "cgroup", "hostname", "found"), [
    (mountinfo(HUB_ID), "0::/\n", "jupyterhub", (HUB_ID,)),
    (mountinfo(HUB_ID, at="/etc/resolv.conf"), "0::/\n", "x", (HUB_ID,)),
    (mountinfo(HUB_ID, root="/containers/{}/hosts", at="/etc/hosts"), "", "x", (HUB_ID,)),  # /var/lib/docker its own disk
    (mountinfo(HUB_ID, root="/containers/storage/overlay-containers/{}/userdata/hostname"), "", "x", (HUB_ID,)),
    ("", f"12:memory:/docker/{HUB_ID}\n11:cpu:/docker/{HUB_ID}\n", "x", (HUB_ID,)),
    ("", f"0::/system.slice/docker-{HUB_ID}.scope\n", "x", (HUB_ID,)),
    ("", "0::/\n", HUB_ID[:12], (HUB_ID[:12],)),
    (mountinfo(HUB_ID), f"1:cpu:/docker/{HUB_ID}\n", HUB_ID[:12], (HUB_ID, HUB_ID[:12])),
    # on the host: the engine's own folders are mounted (a container's /dev/shm), but not over /etc/hostname
    (mountinfo(HUB_ID, root="/var/lib/docker/containers/{}/mounts/shm", at="/var/lib/docker/containers/x/mounts/shm"),
     "0::/user.slice/session-3.scope\n", "gpu-server-1", ()),
    ("", "4:memory:/process_api/787705c48e365127a646066d2623cd0a\n", "gpu-server-1", ()),
    ("", "", "deadbeef", ()),  # too short for a container's id
], ids=["docker-mountinfo", "resolv-conf", "docker-root-own-disk", "podman", "cgroup-v1", "systemd-scope",
        "default-hostname", "all-three", "on-the-host", "other-cgroup", "short-hostname"])
def test_what_may_name_the_hubs_own_container(mounts: str, cgroup: str, hostname: str, found: tuple) -> None:
    assert own_container_ids(mountinfo=mounts, cgroup=cgroup, hostname=hostname) == found


PROJECT = {"com_docker_compose_project": "gpuspawner"}


@pytest.mark.parametrize(("containers", "own_ids", "readers"), [
    ([listed(HUB_ID), listed(OTHER_ID)], (HUB_ID,), {HUB_ID}),
    ([listed(HUB_ID), listed(OTHER_ID)], (HUB_ID[:12],), {HUB_ID}),
    ([listed(HUB_ID), listed(OTHER_ID)], ("0" * 64, HUB_ID[:12]), {HUB_ID}),  # an outer container's id names none
    ([listed(HUB_ID), listed(OTHER_ID)], (), set()),  # a hub not in a container
    ([listed(OTHER_ID)], (HUB_ID,), set()),  # in a container of another engine
    ([listed(HUB_ID), listed(HUB_ID[:12] + "d" * 52)], (HUB_ID[:12],), set()),  # a prefix two ids share
    ([listed(HUB_ID), listed(OTHER_ID)], (HUB_ID[:8],), set()),
    ([listed(HUB_ID, **PROJECT, org_gpuspawner_role="hub"), listed(AUDIT_ID, **PROJECT, org_gpuspawner_role="audit"),
      listed(OTHER_ID, **PROJECT)], (HUB_ID,), {HUB_ID, AUDIT_ID}),
    ([listed(HUB_ID, **PROJECT), listed(AUDIT_ID, com_docker_compose_project="lab2", org_gpuspawner_role="audit")],
     (HUB_ID,), {HUB_ID}),  # another project's service label counts for nothing
    ([listed(HUB_ID), listed(AUDIT_ID, org_gpuspawner_role="audit")], (HUB_ID,), {HUB_ID}),  # the hub in no project
    ([listed(HUB_ID, **PROJECT, org_gpuspawner_role="hub"), listed(AUDIT_ID, **PROJECT, org_gpuspawner_role="audit")],
     (), set()),  # the labels alone name no hub
], ids=["full-id", "hostname", "best-that-names-one", "not-in-a-container", "another-engine", "ambiguous-prefix",
        "too-short", "services-beside-it", "other-project", "no-project", "labels-alone"])
def test_the_hubs_own_container_and_its_services_only_read_the_gpus(
    containers: list, own_ids: tuple, readers: set
) -> None:
    assert gpu_readers(containers, own_ids=own_ids) == readers
