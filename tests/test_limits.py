"""Time limits: how long a GPU server may run, how long its GPUs may idle, and what the user is told."""

from __future__ import annotations

import pytest

from gpuspawner.limits import (
    Limits,
    Verdict,
    format_duration,
    held_status,
    idle_since,
    judge,
    limits_from_label,
    parse_duration,
    parse_percent,
)
from gpuspawner.settings import ConfigError

H = 3600.0


@pytest.mark.parametrize(("value", "seconds"), [
    ("8h", 8 * H), ("90m", 5400), ("90min", 5400), ("1h30m", 5400), ("2d", 48 * H), ("45s", 45), ("1.5h", 5400),
    (120, 120), (2.5, 2.5), (None, None), (0, None), ("0h", None),
])
def test_durations(value: object, seconds: float | None) -> None:
    assert parse_duration(value, where="x") == seconds


@pytest.mark.parametrize("value", ["8 hours", "", "h", -5, True, [1], "1h-30m"])
def test_bad_durations_say_what_is_allowed(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^p.max_runtime is .*; allowed: a duration such as '8h'"):
        parse_duration(value, where="p.max_runtime")


@pytest.mark.parametrize("value", [-1, 101, "5", True])
def test_bad_thresholds(value: object) -> None:
    with pytest.raises(ConfigError, match="allowed: a percentage from 0 to 100"):
        parse_percent(value, where="x")


@pytest.mark.parametrize(("seconds", "text"), [(0, "0 s"), (45, "45 s"), (60, "1 min"), (2400, "40 min"), (7200, "2 h"),
                                              (5400, "1 h 30 min")])
def test_durations_in_words(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("previous", "utilizations", "expected"), [
    (None, [0, 3], 100.0),  # both under 5 %: idle from now
    (50.0, [0, 3], 50.0),  # still idle: the clock keeps running from when it began
    (50.0, [0, 80], None),  # one busy GPU: not idle
    (50.0, [None], None),  # a MIG device reports no utilisation: never idle
    (None, [], None),  # no GPU: never idle
    (None, [5], None),  # at the threshold is not under it
])
def test_the_idle_clock(previous: float | None, utilizations: list, expected: float | None) -> None:
    assert idle_since(previous, utilizations, threshold=5, now=100.0) == expected


LIMITS = Limits(max_runtime=8 * H, idle_timeout=2 * H, idle_threshold=5, warn_before=600)


@pytest.mark.parametrize(("started", "idle_from", "now", "expected"), [
    (0, None, H, Verdict("keep", time_left=7 * H)),
    (0, None, 8 * H - 300, Verdict("warn", "This server stops in 5 min: its 8 h time limit ends. Save your work.", 300)),
    (0, None, 8 * H, Verdict("stop", "Stopped by the hub: it reached its 8 h time limit.", 0.0)),
    (0, H, 3 * H - 60, Verdict("warn", "This server stops in 1 min: its GPU has been idle (under 5 %); it is stopped "
                               "after 2 h idle. Save your work.", 60)),
    (0, H, 3 * H, Verdict("stop", "Stopped by the hub: its GPU was idle (under 5 %) for 2 h.", 0.0)),
    (0, 7 * H, 8 * H, Verdict("stop", "Stopped by the hub: it reached its 8 h time limit.", 0.0)),  # the first stop decides
], ids=["running", "runtime-warning", "runtime-stop", "idle-warning", "idle-stop", "runtime-first"])
def test_judging_a_server(started: float, idle_from: float | None, now: float, expected: Verdict) -> None:
    assert judge(LIMITS, started=started, idle_from=idle_from, now=now) == expected


def test_no_limits_keep_every_server() -> None:
    assert judge(Limits(), started=0, idle_from=0, now=1e9) == Verdict("keep") and not Limits().any


@pytest.mark.parametrize(("limits", "idle_from", "text"), [
    (LIMITS, 3 * H, "idle 1 h (stopped after 2 h idle) · 4 h of 8 h left"),
    (LIMITS, None, "busy (stopped after 2 h idle) · 4 h of 8 h left"),
    (Limits(max_runtime=8 * H), None, "4 h of 8 h left"),
    (Limits(), None, ""),
])
def test_what_gpuspawner_gpus_says_of_a_held_servers_limits(limits: Limits, idle_from: float | None, text: str) -> None:
    assert held_status(limits, started=0, idle_from=idle_from, now=4 * H) == text


@pytest.mark.parametrize(("label", "limits"), [
    ('{"idle_threshold": 5.0, "idle_timeout": 7200.0, "max_runtime": null, "warn_before": 600.0}', Limits(idle_timeout=7200)),
    ("", Limits()),
    ("not json", Limits()),
    ('{"max_runtime": 60, "from_a_newer_version": 1}', Limits(max_runtime=60)),
])
def test_limits_read_back_from_a_containers_label(label: str, limits: Limits) -> None:
    assert limits_from_label(label) == limits
