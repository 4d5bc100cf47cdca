"""The claim table: rebuilt from this hub's containers, plus spawns in progress."""

import pytest

from gpuspawner import labels
from gpuspawner.allocation import Holder
from gpuspawner.claims import ClaimBook, claims_from_containers, foreign_claims, profiles_of_servers
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
