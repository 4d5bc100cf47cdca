"""Container labels: how a container says which hub, user and server it belongs to."""

import pytest

from gpuspawner import labels
from gpuspawner.labels import ServerIdentity


def test_labels_round_trip_to_the_same_identity() -> None:
    identity = ServerIdentity(hub_id="hub-1", user="ada", server="gpu-run")
    assert labels.identity_from_labels(labels.server_labels(identity, version="1.0")) == identity


def test_default_server_is_the_empty_name() -> None:
    identity = ServerIdentity(hub_id="hub-1", user="ada")
    assert labels.server_labels(identity, version="1.0")[labels.SERVER] == ""


@pytest.mark.parametrize(
    "container_labels",
    [None, {}, {"com.example.other": "x"}, {labels.USER: "ada"}, {labels.HUB: "hub-1"}],
    ids=["none", "empty", "foreign", "user-without-hub", "hub-without-user"],
)
def test_containers_without_our_labels_are_not_ours(container_labels: dict[str, str] | None) -> None:
    assert labels.identity_from_labels(container_labels) is None


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (("host", "sqlite:////srv/jupyterhub.sqlite"), ("host", "sqlite:////srv/jupyterhub.sqlite"), True),
        (("host", "sqlite:////srv/a.sqlite"), ("host", "sqlite:////srv/b.sqlite"), False),
        (("host-a", "sqlite:////srv/jupyterhub.sqlite"), ("host-b", "sqlite:////srv/jupyterhub.sqlite"), False),
    ],
    ids=["restart-keeps-id", "other-database", "other-host"],
)
def test_hub_id_is_stable_per_host_and_database(a: tuple[str, str], b: tuple[str, str], same: bool) -> None:
    id_a = labels.hub_id_for(hostname=a[0], db_url=a[1])
    id_b = labels.hub_id_for(hostname=b[0], db_url=b[1])
    assert (id_a == id_b) is same
    assert id_a.startswith("hub-")


def test_our_labels_win_over_configured_ones_and_others_are_kept() -> None:
    merged = labels.merge_labels(
        {labels.HUB: "forged", "lab.example/owner": "physics"},
        {labels.HUB: "hub-1", labels.USER: "ada"},
    )
    assert merged == {labels.HUB: "hub-1", labels.USER: "ada", "lab.example/owner": "physics"}


def test_hub_filter_selects_by_hub_label() -> None:
    assert labels.hub_filter("hub-1") == {"label": ["gpuspawner.hub=hub-1"]}
