"""GPU-hours from the audit records, against sums worked out by hand: overlapping servers, MIG slices,
open servers, and servers that span the period's edges."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpuspawner.audit import AuditRecord, RecordedDevice
from gpuspawner.store import AuditStore
from gpuspawner.times import parse_time
from gpuspawner.usage import gpu_share, gpu_usage, held_seconds

A100 = "NVIDIA A100-SXM4-80GB"
DAY = "2026-11-21T"


def gpu(n: int) -> RecordedDevice:
    return RecordedDevice(uuid=f"GPU-{n}", model=A100, memory_total=80 << 30)


def mig(profile: str = "1g.10gb") -> RecordedDevice:
    return RecordedDevice(uuid="MIG-0", model=A100, memory_total=10 << 30, mig_parent="GPU-9", mig_profile=profile)


def record(rid: str, user: str, start: str | None, stop: str | None, *devices: RecordedDevice, server: str = "",
           profile: str | None = "gpu") -> AuditRecord:
    return AuditRecord(
        id=rid, hub_id="hub-1", user=user, server=server, requested_at=f"{DAY}{start or '08:00'}:00+00:00",
        started_at=f"{DAY}{start}:00+00:00" if start else None, stopped_at=f"{DAY}{stop}:00+00:00" if stop else None,
        devices=devices, profile=profile, outcome="stopped" if stop else "running",
    )


RECORDS = [
    record("r1", "ada", "10:00", "12:00", gpu(0)),  # 2 h in the period
    record("r2", "ada", "11:00", "11:30", gpu(1), server="b"),  # overlaps r1: another server, 0.5 h
    record("r3", "bob", "11:00", "11:30", gpu(2), gpu(3)),  # 2 GPUs for 0.5 h: 1 GPU-hour
    record("r4", "cyd", "09:00", "13:00", mig(), profile="mig"),  # spans both edges: 2 h of 1/7 of a GPU
    record("r5", "dan", "11:00", None, gpu(4)),  # still running: counts up to now (12:30), cut at until
    record("r6", "eve", None, None, gpu(5)),  # its spawn failed before a container started: nothing
    record("r7", "fay", "07:00", "09:30", gpu(6)),  # over before the period began: nothing
    record("r8", "gus", "10:30", "11:00", profile=None),  # CPU only: no GPU-hours
]
SINCE, UNTIL, NOW = parse_time(f"{DAY}10:00"), parse_time(f"{DAY}12:00"), parse_time(f"{DAY}12:30")


def by(column: str, until: str = f"{DAY}12:00") -> dict[str, tuple[float, float, int]]:
    rows = gpu_usage(RECORDS, by=[column], since=SINCE, until=parse_time(until), now=NOW)
    return {r.key[0]: (round(r.gpu_hours, 4), round(r.device_hours, 4), r.servers) for r in rows}


def test_gpu_hours_by_user_as_worked_out_by_hand() -> None:
    assert by("user") == {
        "ada": (2.5, 2.5, 2),  # 2 h + 0.5 h on two servers at once
        "bob": (1.0, 1.0, 1),  # two GPUs for half an hour
        "dan": (1.0, 1.0, 1),  # 11:00 to the period's end, 12:00
        "cyd": (round(2 / 7, 4), 2.0, 1),  # a 1g slice for the 2 h inside the period
    }


def test_an_open_server_counts_up_to_now_when_the_period_reaches_past_it() -> None:
    assert by("user", until=f"{DAY}23:00")["dan"] == (1.5, 1.5, 1)  # 11:00 to now, 12:30
    assert by("user", until=f"{DAY}23:00")["ada"] == (2.5, 2.5, 2)


def test_gpu_hours_by_profile_server_and_model() -> None:
    assert by("profile") == {"gpu": (4.5, 4.5, 4), "mig": (round(2 / 7, 4), 2.0, 1)}
    assert by("server")["ada/b"] == (0.5, 0.5, 1)
    assert by("model") == {A100: (4.5, 4.5, 4), f"{A100} MIG 1g.10gb": (round(2 / 7, 4), 2.0, 1)}


@pytest.mark.parametrize(("profile", "share"), [(None, 1.0), ("1g.10gb", 1 / 7), ("3g.40gb", 3 / 7), ("7g.80gb", 1.0),
                                                ("1c.2g.20gb", 2 / 7), ("odd", 1.0)])
def test_a_mig_device_counts_its_share_of_the_gpu(profile: str | None, share: float) -> None:
    device = RecordedDevice(uuid="x", model=A100, memory_total=1, mig_parent="p" if profile else None, mig_profile=profile)
    assert gpu_share(device) == pytest.approx(share)


def test_held_time_is_cut_at_the_period_and_never_negative() -> None:
    r = record("r", "ada", "09:00", "10:30", gpu(0))
    assert held_seconds(r, since=SINCE, until=UNTIL, now=NOW) == 1800
    assert held_seconds(r, since=parse_time(f"{DAY}11:00"), until=UNTIL, now=NOW) == 0


def test_an_unknown_grouping_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot group usage by 'group'; allowed: user, server, profile, model"):
        gpu_usage(RECORDS, by=["group"], since=None, until=UNTIL, now=NOW)


def test_the_usage_command_reads_the_hubs_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    store = AuditStore(url, key=bytes(range(32)))
    for r in RECORDS:
        store.insert(r)
    store.dispose()
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(f'c = get_config()  # noqa\nc.GPUSpawner.hub_id = "hub-1"\nc.GPUSpawner.audit_db_url = {url!r}\n')
    out = subprocess.run(
        [sys.executable, "-m", "gpuspawner.cli", "usage", "-f", str(config), "--since", f"{DAY}10:00",
         "--until", f"{DAY}12:00", "--by", "user", "--format", "json"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    rows = {r["user"]: r["gpu_hours"] for r in json.loads(out.stdout)["rows"]}
    assert rows == {"ada": 2.5, "bob": 1.0, "dan": 1.0, "cyd": round(2 / 7, 4)}
    table = subprocess.run([sys.executable, "-m", "gpuspawner.cli", "usage", "-f", str(config), "--since", f"{DAY}10:00",
                            "--until", f"{DAY}12:00", "--by", "group"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 1 and "--by: cannot group usage by 'group'" in table.stderr
