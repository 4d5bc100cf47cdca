"""The hub's plan for containers and records no server accounts for (pure: no Docker, no hub)."""

from __future__ import annotations

import pytest

from gpuspawner.allocation import Holder
from gpuspawner.reconcile import (
    ABANDONED_WHILE_STARTING,
    GONE_UNSEEN,
    ContainerView,
    OpenRecord,
    ServerView,
    ended_container,
    plan,
)


def container(state: str = "running", *, id: str = "c1", user: str = "ada", server: str = "", record: str = "r1") -> ContainerView:
    return ContainerView(id=id, name=f"t-{user}", user=user, server=server, state=state, record_id=record)


def server(*, user: str = "ada", name: str = "", active: bool = True, spawning: bool = False, ready: bool = True,
           container_id: str = "c1", record: str = "r1") -> ServerView:
    return ServerView(user=user, server=name, active=active, spawning=spawning, ready=ready,
                      container_id=container_id, record_id=record)


def record(id: str = "r1", *, user: str = "ada", outcome: str = "running") -> OpenRecord:
    return OpenRecord(id=id, user=user, server="", outcome=outcome)


@pytest.mark.parametrize(("servers", "stopped"), [
    ([server()], False),
    ([server(spawning=True, ready=False, container_id="")], False),  # it may have just created it
    ([server(container_id="")], False),  # a server that has not noted its container yet
    ([], True),  # the hub has no such server: a hub died mid-spawn
    ([server(active=False)], True),  # the server stopped, its container ran on
    ([server(container_id="c2")], True),  # the server runs another container
    ([server(user="bob")], True),
], ids=["owned", "spawning", "owner-without-id", "no-server", "inactive", "other-container", "other-user"])
def test_a_running_container_is_stopped_only_when_no_active_server_owns_it(servers: list, stopped: bool) -> None:
    todo = plan([container()], servers, [record()])
    assert [c.id for c in todo.stop] == (["c1"] if stopped else [])
    assert todo.close == []  # an orphan's record is closed with it, never as lost


@pytest.mark.parametrize(("remove", "removed"), [(True, ["c1"]), (False, [])], ids=["remove", "keep"])
def test_a_dead_unowned_container_closes_its_open_record_and_is_removed_only_if_containers_are(
    remove: bool, removed: list
) -> None:
    todo = plan([container("exited")], [], [record()], remove=remove)
    assert [c.id for c in todo.ended] == ["c1"]
    assert [c.id for c in todo.remove] == removed
    assert todo.stop == [] and todo.close == []


def test_a_kept_container_whose_record_is_sealed_is_left_alone() -> None:
    todo = plan([container("exited")], [], [], remove=False)
    assert (todo.ended, todo.remove, todo.stop, todo.close) == ([], [], [], [])


@pytest.mark.parametrize(("outcome", "expected"), [
    ("requested", {"outcome": "abandoned", "error": ABANDONED_WHILE_STARTING}),
    ("starting", {"outcome": "abandoned", "error": ABANDONED_WHILE_STARTING}),
    ("running", {"outcome": "died", "error": GONE_UNSEEN}),
])
def test_an_open_record_with_neither_server_nor_container_is_closed(outcome: str, expected: dict) -> None:
    assert [(r, e.changes()) for r, e in plan([], [], [record(outcome=outcome)]).close] == [("r1", expected)]


def test_a_spawn_in_progress_keeps_its_record_open() -> None:
    todo = plan([], [server(spawning=True, ready=False, container_id="")], [record(outcome="requested")])
    assert todo.close == [] and todo.now_running == []


def test_a_server_the_hub_resumed_is_recorded_running() -> None:
    resumed = server(record="")  # its state was saved before its record id was known to the hub
    todo = plan([container()], [resumed], [record(outcome="starting")])
    assert todo.adopt == [("ada", "", "r1")]
    assert todo.now_running == ["r1"]
    assert todo.close == [] and todo.stop == []


@pytest.mark.parametrize(("containers", "servers", "released"), [
    ([], [], ["s1"]),
    ([container("exited")], [], ["s1"]),
    ([container("running")], [server()], []),
    ([container("created")], [server()], []),
    ([], [server(spawning=True, ready=False, container_id="", record="r2")], []),  # a new spawn of ada decides
], ids=["gone", "exited", "running", "created", "respawning"])
def test_an_unconfirmed_claim_is_dropped_once_its_server_has_no_live_container(
    containers: list, servers: list, released: list
) -> None:
    assert plan(containers, servers, [], unconfirmed=[("s1", Holder("ada"))]).release == released


@pytest.mark.parametrize(("state", "expected"), [
    (None, {"outcome": "died", "error": "Its container was removed outside the hub."}),
    ({"ExitCode": 137, "OOMKilled": False},
     {"outcome": "died", "exit_code": 137, "oom_killed": False,
      "error": "Its container ended by itself or was stopped outside the hub, exit code 137."}),
    ({"ExitCode": 137, "OOMKilled": True},
     {"outcome": "died", "exit_code": 137, "oom_killed": True,
      "error": "Its container ran out of memory and was killed (OOM), exit code 137."}),
    ({"ExitCode": 0, "OOMKilled": False},
     {"outcome": "died", "exit_code": 0, "oom_killed": False, "error": "Its container ended by itself (exit code 0)."}),
], ids=["removed", "killed", "oom", "exited"])
def test_how_an_ended_container_is_recorded(state: dict | None, expected: dict) -> None:
    assert ended_container(None if state is None else {"State": state}).changes() == expected


def test_an_ending_names_the_container_it_was_read_from() -> None:
    ending = ended_container({"Id": "c1", "Name": "/jupyter-ada", "State": {"ExitCode": 1}})
    assert (ending.container_id, ending.container_name, ending.exit_code) == ("c1", "jupyter-ada", 1)
