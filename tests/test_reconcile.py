"""The hub's plan for containers and records no server accounts for (pure: no Docker, no hub)."""

from __future__ import annotations

import pytest

from gpuspawner.allocation import Holder
from gpuspawner.reconcile import (
    ABANDONED_WHILE_STARTING,
    GONE_UNSEEN,
    ContainerView,
    Ending,
    OpenRecord,
    ServerView,
    ended_container,
    engine_time,
    finished_at,
    plan,
    stopped_at,
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


# --- When a record ends: the engine's end time ----------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-21T10:00:02.123456789Z", "2026-11-21T10:00:02.123456+00:00"),  # Docker: nanoseconds, cut
    ("2026-11-21T10:00:02.999999999Z", "2026-11-21T10:00:02.999999+00:00"),  # never rounded into the next second
    ("2026-11-21T10:00:02Z", "2026-11-21T10:00:02.000000+00:00"),
    ("2026-11-21T10:00:02.5z", "2026-11-21T10:00:02.500000+00:00"),
    ("2026-11-21T12:00:02.1+02:00", "2026-11-21T10:00:02.100000+00:00"),
    ("2026-11-21T08:30:02-0130", "2026-11-21T10:00:02.000000+00:00"),
    ("2026-11-21 10:00:02.25", "2026-11-21T10:00:02.250000+00:00"),  # no zone: UTC
    (" 2026-11-21T10:00:02Z\n", "2026-11-21T10:00:02.000000+00:00"),
    ("0001-01-01T00:00:00Z", None),  # Docker's zero time: the container never finished
    ("0001-01-01T00:00:00+01:00", None),
    ("", None),
    (None, None),
    (1764000000, None),
    ("yesterday", None),
    ("2026-13-01T00:00:00Z", None),
    ("2026-11-21T10:00:02Zjunk", None),
], ids=["nanoseconds", "no-rounding-up", "whole-seconds", "lower-z", "offset", "offset-without-colon", "no-zone",
        "blanks", "zero-time", "zero-time-offset", "empty", "none", "number", "words", "month-13", "trailing"])
def test_an_engine_time_is_read_as_the_audit_log_stores_times(text: object, expected: str | None) -> None:
    assert engine_time(text) == expected


@pytest.mark.parametrize(("state", "expected"), [
    ({"Running": False, "StartedAt": "2026-11-21T10:00:00.1Z", "FinishedAt": "2026-11-21T10:05:00.123456789Z"},
     "2026-11-21T10:05:00.123456+00:00"),
    ({"Running": False, "FinishedAt": "2026-11-21T10:05:00Z"}, "2026-11-21T10:05:00.000000+00:00"),
    ({"Running": True, "StartedAt": "2026-11-21T10:00:00Z", "FinishedAt": "0001-01-01T00:00:00Z"}, None),
    ({"Running": False, "StartedAt": "0001-01-01T00:00:00Z", "FinishedAt": "0001-01-01T00:00:00Z"}, None),  # created
    # a kept container started again shows its previous end while it runs, and after a failed start
    ({"Running": True, "StartedAt": "2026-11-21T11:00:00Z", "FinishedAt": "2026-11-21T10:05:00Z"}, None),
    ({"Running": False, "StartedAt": "2026-11-21T11:00:00Z", "FinishedAt": "2026-11-21T10:05:00Z"}, None),
    ({}, None),
], ids=["exited", "no-start-time", "running", "never-started", "restarted-running", "restarted-unfinished", "no-state"])
def test_a_container_ended_when_the_engine_says_it_finished_its_last_run(state: dict, expected: str | None) -> None:
    assert finished_at({"State": state}) == expected


def test_an_ended_container_ends_its_record_when_the_engine_says_and_the_time_is_no_field_of_the_record() -> None:
    ending = ended_container({"Id": "c1", "State": {"ExitCode": 137, "FinishedAt": "2026-11-21T10:05:00.123456789Z"}})
    assert ending.ended_at == "2026-11-21T10:05:00.123456+00:00"
    assert "ended_at" not in ending.changes()
    assert Ending("stopped", ended_at="2026-11-21T10:05:00.000000+00:00").changes() == {"outcome": "stopped"}


REQUESTED, STARTED, READY = "2026-11-21T10:00:00.000000+00:00", "2026-11-21T10:00:01.000000+00:00", "2026-11-21T10:00:03.000000+00:00"
NOW = "2026-11-21T10:05:30.000000+00:00"


@pytest.mark.parametrize(("ended", "not_before", "expected"), [
    ("2026-11-21T10:05:00.123456+00:00", (REQUESTED, STARTED, READY), "2026-11-21T10:05:00.123456+00:00"),
    (None, (REQUESTED, STARTED, READY), NOW),  # the engine did not say: when the hub closes it
    ("2026-11-21T10:06:00.000000+00:00", (REQUESTED, STARTED, READY), NOW),  # an engine clock ahead: never in the future
    ("2026-11-21T10:00:00.500000+00:00", (REQUESTED, STARTED, None), STARTED),  # ended as it started: not before its start
    ("2026-11-21T10:00:02.000000+00:00", (REQUESTED, STARTED, READY), READY),
    ("2026-11-21T09:59:00.000000+00:00", (REQUESTED, None, None), REQUESTED),  # never noted started
    ("2026-11-21T10:05:00.000000+00:00", (), "2026-11-21T10:05:00.000000+00:00"),
    ("2026-11-21T10:05:00.000000+00:00", ("", "not a time", STARTED), "2026-11-21T10:05:00.000000+00:00"),
    ("2026-11-21T12:05:00.000000+02:00", (STARTED,), "2026-11-21T12:05:00.000000+02:00"),  # compared as times
], ids=["engine", "unknown", "future", "before-start", "before-ready", "before-request", "no-record-times",
        "bad-record-times", "other-zone"])
def test_a_record_stops_when_its_container_ended_within_its_own_times(
    ended: str | None, not_before: tuple, expected: str
) -> None:
    assert stopped_at(ended, now=NOW, not_before=not_before) == expected
