"""A short soak of one real hub (the full one is benchmarks/soak.py): concurrent users with random
profiles and bad options, interrupted spawns, a hub SIGKILLed mid-spawn, containers killed behind
its back and a GPU lost and brought back, checked against the Docker engine's event log.

See tests/testbed/soak.py for what is done and what counts as a violation; the checks of the audit
records against one another and the engine's die events are specified below without Docker.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed import DockerBed
from testbed.hub import RunningHub
from testbed.soak import (
    NS,
    ContainerLife,
    SoakPlan,
    hub_config,
    mig_uuid,
    record_ends_off_die,
    record_overlaps,
    run_soak,
    uuid_of,
    write_gpus,
)

# About 45 s of traffic with each mishap at least once; the whole test takes about a minute on 2 CPUs.
SHORT = SoakPlan(
    duration=45, max_operations=400, seed=11, actors=3, warmup=3, chaos_every=7, gpu_lost_seconds=8,
    max_hub_kills=1, settle_timeout=60, interrupt_share=0.3,
)


@pytest.mark.docker
def test_a_short_soak_breaks_no_rule(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, light_image: str, tmp_path: Path
) -> None:
    spec = tmp_path / "gpus.json"
    write_gpus(spec)
    hub = start_hub(extra=hub_config(spec, light_image))

    report = run_soak(hub=hub, bed=docker_bed, spec=spec, plan=SHORT, log=lambda line: print(line, flush=True))

    assert report.count("hub-kill") == 1 and report.count("gpu-lost") >= 1 and report.count("container-kill") >= 1, (
        "the short soak must have each mishap at least once\n" + report.summary()
    )
    assert sum(a.caught_pending for a in report.attempts) >= 1, "no spawn was interrupted while pending\n" + report.summary()
    if report.violations:
        pytest.fail(f"{len(report.violations)} violations (hub log: {hub.log_file})\n{report.summary()}", pytrace=False)


# --- The soak's checks of the audit records against one another and the engine's die events (pure) ----------


@dataclass(frozen=True)
class Device:
    uuid: str


@dataclass(frozen=True)
class Record:
    """What the checks read of an audit record."""

    id: str
    started_at: str | None
    stopped_at: str | None
    devices: tuple[Device, ...] = ()
    container_id: str | None = None
    user: str = "soak0"
    server: str = ""
    outcome: str = "died"
    sealed: bool = True


T0 = 1_800_000_000 * NS  # 2027-01-15T08:00:00Z


def at(seconds: float) -> str:
    """T0 + seconds, as the audit log writes times."""
    return datetime.datetime.fromtimestamp(T0 / NS + seconds, tz=datetime.timezone.utc).isoformat(timespec="microseconds")


GPU0, MIG_GPU, SLICE0, SLICE1 = uuid_of(0), uuid_of(5), mig_uuid(0), mig_uuid(1)


@pytest.mark.parametrize(("first", "second", "overlap"), [
    ((GPU0, 0, 10), (GPU0, 10, 20), False),  # one ends as the next begins
    ((GPU0, 0, 10.5), (GPU0, 10, 20), True),  # the hub noticed the first's end late
    ((GPU0, 0, None), (GPU0, 10, 20), True),  # still open
    ((GPU0, 0, 30), (uuid_of(1), 10, 20), False),
    ((SLICE0, 0, 30), (SLICE1, 10, 20), False),  # two slices of one GPU
    ((SLICE0, 0, 30), (MIG_GPU, 10, 20), True),  # a slice and the whole GPU it is cut from
    ((GPU0, None, 30), (GPU0, 10, 20), False),  # never started: it counted no GPU time
], ids=["back-to-back", "overlap", "open", "other-gpu", "other-slice", "slice-and-its-gpu", "never-started"])
def test_two_records_of_one_exclusive_device_must_not_overlap(first: tuple, second: tuple, overlap: bool) -> None:
    records = [Record(id=f"r{i}", devices=(Device(u),), started_at=None if s is None else at(s),
                      stopped_at=None if e is None else at(e), sealed=e is not None)
               for i, (u, s, e) in enumerate((first, second))]
    found, _ = record_overlaps(records, t0_ns=T0)
    assert [v.kind for v in found] == (["two-records-one-device"] if overlap else [])


def life(cid: str, *dies: float) -> ContainerLife:
    return ContainerLife(id=cid, user="soak0", server="", name="t-soak0", devices=(GPU0,), devices_from="DeviceRequests",
                         label_devices=(GPU0,), created_ns=T0, runs=[[T0, T0 + int(d * NS)] for d in dies[-1:]],
                         dies=[T0 + int(d * NS) for d in dies])


@pytest.mark.parametrize(("stopped", "dies", "off"), [
    (10.2, (10,), False),
    (9.5, (10,), False),  # within the tolerance either way
    (14.0, (10,), True),  # stopped when the hub's poll noticed, 4 s late
    (8.0, (10,), True),
    (30.1, (10, 30), False),  # a kept container that ran twice: its nearest death
    (30.1, (), False),  # the log never showed it die: left to the other checks
], ids=["just-after", "just-before", "noticed-late", "too-early", "ran-twice", "no-die-event"])
def test_a_record_ends_within_a_second_of_its_containers_die_event(stopped: float, dies: tuple, off: bool) -> None:
    record = Record(id="r1", started_at=at(0), stopped_at=at(stopped), container_id="c1", devices=(Device(GPU0),))
    found, gaps = record_ends_off_die([record], {"c1": life("c1", *dies)}, tolerance_ns=NS, t0_ns=T0)
    assert [v.kind for v in found] == (["record-end-not-at-die"] if off else [])
    assert len(gaps) == (1 if dies else 0)
