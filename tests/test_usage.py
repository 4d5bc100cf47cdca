"""GPU-hours from the audit records, against sums worked out by hand: overlapping servers, MIG slices,
open servers, servers that span the period's edges, users in several groups, and idle GPU-hours."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpuspawner.audit import AuditRecord, RecordedDevice
from gpuspawner.store import AuditStore
from gpuspawner.times import parse_time
from gpuspawner.usage import gpu_share, gpu_usage, held_seconds, usage_report

A100 = "NVIDIA A100-SXM4-80GB"
DAY = "2026-11-21T"


def gpu(n: int) -> RecordedDevice:
    return RecordedDevice(uuid=f"GPU-{n}", model=A100, memory_total=80 << 30)


def mig(profile: str = "1g.10gb") -> RecordedDevice:
    return RecordedDevice(uuid="MIG-0", model=A100, memory_total=10 << 30, mig_parent="GPU-9", mig_profile=profile)


def record(rid: str, user: str, start: str | None, stop: str | None, *devices: RecordedDevice, server: str = "",
           profile: str | None = "gpu", groups: tuple[str, ...] = (), idle: float | None = None) -> AuditRecord:
    return AuditRecord(
        id=rid, hub_id="hub-1", user=user, server=server, requested_at=f"{DAY}{start or '08:00'}:00+00:00",
        started_at=f"{DAY}{start}:00+00:00" if start else None, stopped_at=f"{DAY}{stop}:00+00:00" if stop else None,
        devices=devices, profile=profile, outcome="stopped" if stop else "running", groups=groups, idle_gpu_seconds=idle,
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
    with pytest.raises(ValueError, match="cannot group usage by 'hostname'; allowed: user, server, profile, model, group"):
        gpu_usage(RECORDS, by=["hostname"], since=None, until=UNTIL, now=NOW)


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
                            "--until", f"{DAY}12:00", "--by", "hostname"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 1 and "--by: cannot group usage by 'hostname'" in table.stderr


# --- Groups --------------------------------------------------------------------------------------

GROUPED = [
    record("g1", "ada", "10:00", "12:00", gpu(0), groups=("ml", "vision"), idle=3600),  # 2 GPU-h in both groups
    record("g2", "bob", "11:00", "11:30", gpu(1), gpu(2), groups=("ml",)),  # 2 GPUs for 0.5 h; never sampled
    record("g3", "cyd", "09:00", "11:00", mig(), idle=3600 / 7),  # no group; 1 h of its 2 inside: 1/7 GPU-h
]


def test_grouped_by_group_a_server_counts_once_in_each_of_its_groups() -> None:
    report = usage_report(GROUPED, by=["group"], since=SINCE, until=UNTIL, now=NOW)
    rows = {r.key[0]: (round(r.gpu_hours, 4), round(r.device_hours, 4), r.servers) for r in report.rows}
    assert rows == {
        "ml": (3.0, 3.0, 2),  # ada's 2 GPU-h and bob's 1
        "vision": (2.0, 2.0, 1),  # ada's 2 GPU-h again
        "(no group)": (round(1 / 7, 4), 1.0, 1),
    }
    # the groups add up to 5 1/7 GPU-hours; every record counted once, they are 3 1/7
    assert (round(report.total.gpu_hours, 4), report.total.servers) == (round(3 + 1 / 7, 4), 3)


def test_group_combines_with_other_columns() -> None:
    rows = gpu_usage(GROUPED, by=["group", "user"], since=SINCE, until=UNTIL, now=NOW)
    assert {r.key: round(r.gpu_hours, 4) for r in rows} == {
        ("ml", "ada"): 2.0, ("vision", "ada"): 2.0, ("ml", "bob"): 1.0, ("(no group)", "cyd"): round(1 / 7, 4),
    }


# --- Idle GPU-hours --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "stop", "idle", "expected"),
    [
        ("10:00", "11:00", 1800, 0.5),  # wholly inside the period: all of its idle time
        ("09:00", "11:00", 3600, 0.5),  # half of it inside (cut at since): half its idle hour
        ("11:30", "12:30", 1800, 0.25),  # half of it inside (cut at until): half its idle half hour
        ("10:00", "11:00", 0, 0.0),  # sampled and never idle: 0
        ("10:00", "11:00", None, None),  # never sampled: unknown, not 0
        ("11:00", None, None, None),  # still running: the hub writes its idle time when it stops
    ],
    ids=["inside", "cut-at-since", "cut-at-until", "never-idle", "never-sampled", "running"],
)
def test_idle_gpu_hours_count_the_records_part_inside_the_period(
    start: str, stop: str | None, idle: float | None, expected: float | None
) -> None:
    (row,) = gpu_usage([record("r", "ada", start, stop, gpu(0), idle=idle)], by=["user"], since=SINCE, until=UNTIL, now=NOW)
    assert row.idle_gpu_hours == (None if expected is None else pytest.approx(expected))


IDLE = [
    record("i1", "ada", "10:00", "11:00", gpu(0), idle=1800),
    record("i2", "ada", "09:00", "11:00", gpu(1), idle=3600),
    record("i3", "bob", "10:00", "11:00", gpu(2)),  # never sampled
    record("i4", "cyd", "10:00", "11:00", gpu(3), mig("3g.40gb"), idle=1800),  # 1 + 3/7 of a GPU, 1800 s idle
    record("i5", "dan", "10:00", "11:00", gpu(4), idle=0),
    record("i6", "dan", "11:00", None, gpu(5)),  # running
]


def idle_by(column: str) -> dict[str, float | None]:
    rows = gpu_usage(IDLE, by=[column], since=SINCE, until=UNTIL, now=NOW)
    return {r.key[0]: None if r.idle_gpu_hours is None else round(r.idle_gpu_hours, 4) for r in rows}


def test_a_rows_idle_hours_add_up_its_sampled_records_and_are_unknown_only_if_none_was() -> None:
    assert idle_by("user") == {"ada": 1.0, "bob": None, "cyd": 0.5, "dan": 0.0}
    assert usage_report(IDLE, by=["user"], since=SINCE, until=UNTIL, now=NOW).total.idle_gpu_hours == pytest.approx(1.5)


def test_grouped_by_model_a_servers_idle_time_is_split_by_its_devices_gpu_shares() -> None:
    # i4's 1800 idle GPU-seconds: 1/(10/7) = 7/10 to the whole A100 (1260 s), 3/10 to the 3g slice (540 s)
    assert idle_by("model") == {A100: round(0.5 + 0.5 + 0.35 + 0.0, 4), f"{A100} MIG 3g.40gb": 0.15}


# --- The command ---------------------------------------------------------------------------------------


def usage_command(tmp_path: Path, records: list[AuditRecord], *args: str) -> str:
    """The usage command's output for `records` in the period 10:00 to 12:00, run as an admin runs it."""
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    config = tmp_path / "jupyterhub_config.py"
    if not config.exists():
        store = AuditStore(url, key=bytes(range(32)))
        store.insert_many(records)
        store.dispose()
        config.write_text(f'c = get_config()  # noqa\nc.GPUSpawner.hub_id = "hub-1"\nc.GPUSpawner.audit_db_url = {url!r}\n')
    out = subprocess.run(
        [sys.executable, "-m", "gpuspawner.cli", "usage", "-f", str(config), "--since", f"{DAY}10:00",
         "--until", f"{DAY}12:00", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_usage_command_shows_groups_and_idle_hours_in_each_format(tmp_path: Path) -> None:
    data = json.loads(usage_command(tmp_path, GROUPED, "--by", "group", "--format", "json"))
    assert data["rows"] == [
        {"group": "ml", "gpu_hours": 3.0, "device_hours": 3.0, "servers": 2, "idle_gpu_hours": 1.0},
        {"group": "vision", "gpu_hours": 2.0, "device_hours": 2.0, "servers": 1, "idle_gpu_hours": 1.0},
        # g3: 1/7 of a GPU idle for 1 h, of which half inside the period
        {"group": "(no group)", "gpu_hours": round(1 / 7, 4), "device_hours": 1.0, "servers": 1,
         "idle_gpu_hours": round(1 / 14, 4)},
    ]
    assert data["total"] == {"gpu_hours": round(3 + 1 / 7, 4), "device_hours": 4.0, "servers": 3,
                             "idle_gpu_hours": round(1 + 1 / 14, 4)}

    rows = list(csv.DictReader(io.StringIO(usage_command(tmp_path, GROUPED, "--by", "user", "--format", "csv"))))
    assert {r["user"]: (r["gpu_hours"], r["idle_gpu_hours"]) for r in rows} == {
        "ada": ("2.0", "1.0"), "bob": ("1.0", ""), "cyd": (str(round(1 / 7, 4)), str(round(1 / 14, 4))),
    }

    table = usage_command(tmp_path, GROUPED, "--by", "user").splitlines()
    assert table[0].split() == ["USER", "GPU-HOURS", "DEVICE-HOURS", "SERVERS", "IDLE-GPU-HOURS"]
    assert table[2].split() == ["bob", "1.00", "1.00", "1", "-"]  # never sampled: unknown
    assert table[-1].endswith(": 3.14, idle 1.07 (a MIG slice counts its share of its GPU)")
    by_group = usage_command(tmp_path, GROUPED, "--by", "group").splitlines()
    assert by_group[-1].endswith(": 3.14, idle 1.07 (a MIG slice counts its share of its GPU; a server counts in each "
                                 "of its groups, so the groups add up to more)")


# --- Reading a large log in parts, side by side ----------------------------------------------------


def parted_store(tmp_path: Path) -> AuditStore:
    """A store of RECORDS and GROUPED twenty times over (new ids), plus rows a database writer forged
    outside the numbering and one whose number is text, in a table rebuilt without constraints."""
    import sqlite3

    from gpuspawner import auditlog

    path = tmp_path / "audit.sqlite"
    store = AuditStore(f"sqlite:///{path}", key=bytes(range(32)))
    store.insert_many(
        AuditRecord(**{**r.__dict__, "id": f"{r.id}-{i}"}) for i in range(20) for r in [*RECORDS, *GROUPED]
    )
    columns = ", ".join(f'"{c}"' for c in auditlog.COLUMNS)
    with sqlite3.connect(path) as db:
        db.executescript(
            f"CREATE TABLE loose ({columns}); INSERT INTO loose SELECT {columns} FROM gpuspawner_audit_log;"
            "DROP TABLE gpuspawner_audit_log; ALTER TABLE loose RENAME TO gpuspawner_audit_log;"
        )
        (top,) = db.execute("SELECT max(n) FROM gpuspawner_audit_log").fetchone()
        (ended,) = db.execute("SELECT n FROM gpuspawner_audit_log WHERE kind = 'ended' LIMIT 1").fetchone()
        renumbered = columns.replace('"n"', "?", 1)
        for n in (None, 0, -1, top + 5, f"{ended}"):  # copies of a real closing entry, renumbered
            db.execute(f"INSERT INTO gpuspawner_audit_log ({columns}) SELECT {renumbered} FROM gpuspawner_audit_log "
                       "WHERE n = ?", (n, ended))
    return store


def test_every_row_of_the_log_falls_in_exactly_one_part(tmp_path: Path) -> None:
    store = parted_store(tmp_path)
    parts = store.usage_parts(3, smallest=1)
    assert len(parts) == 3
    counts = []
    for part in parts:
        read: list = []
        counts.append((sum(1 for _ in store.iter_held(read=read, part=part)), read[0].rejected))
    whole: list = []
    assert sum(c for c, _ in counts) == sum(1 for _ in store.iter_held(read=whole))
    assert sum(r for _, r in counts) == whole[0].rejected == 5  # each forged copy once, in whichever part holds it
    assert store.usage_parts(3) == [store.usage_parts(1)[0]]  # a small log is read in one part


@pytest.mark.parametrize("by", [["user"], ["model"], ["group", "profile"], ["server"]], ids=str)
def test_usage_read_in_parts_side_by_side_is_the_usage_read_at_once(tmp_path: Path, by: list[str]) -> None:
    from gpuspawner import cli

    store = parted_store(tmp_path)
    period = {"by": by, "since": SINCE, "until": UNTIL, "now": NOW}
    whole, rejected = cli._usage_read(store, 1, until_arg=None, **period)
    parted, parted_rejected = cli._usage_read(store, 3, until_arg=None, smallest=1, **period)  # three processes
    assert (parted_rejected, rejected) == (5, 5)
    assert [r.key for r in parted.rows] == [r.key for r in whole.rows]
    for mine, theirs in zip([*parted.rows, parted.total], [*whole.rows, whole.total], strict=True):
        assert (mine.servers, mine.idle_gpu_hours is None) == (theirs.servers, theirs.idle_gpu_hours is None)
        assert (mine.gpu_hours, mine.device_hours, mine.idle_gpu_hours or 0) == pytest.approx(
            (theirs.gpu_hours, theirs.device_hours, theirs.idle_gpu_hours or 0))
    assert whole.total.servers == 20 * 5 + 20 * 3  # each once, the running ones (r5) in the first part only
