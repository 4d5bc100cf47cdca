"""The claim table: rebuilt from this hub's containers, plus spawns in progress."""

import pytest

from gpuspawner import labels
from gpuspawner.allocation import Holder
from gpuspawner.claims import ClaimBook, claims_from_containers, profiles_of_servers
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
    book.reserve(Holder("bob"), ("GPU-5",))
    assert book.merged({"GPU-1": Holder("ada")}) == {"GPU-1": Holder("ada"), "GPU-5": Holder("bob")}
    assert book.release(Holder("bob")) == ("GPU-5",)
    assert book.merged({}) == {}
    assert book.release(Holder("bob")) == ()


def test_profiles_of_live_servers() -> None:
    containers = [
        container("running", profile="a100-1"),
        container("running", user="bob", profile=""),
        container("exited", user="eve", profile="cpu"),
        container("running", user="dan", hub="hub-2", profile="cpu"),
    ]
    assert profiles_of_servers(containers, hub_id="hub-1") == {Holder("ada"): "a100-1"}
