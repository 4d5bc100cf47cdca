"""A spawn's audit record through the recorder: begun, noted, closed, each step stamped by the clock seam."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gpuspawner import seams
from gpuspawner.audit import AuditRecord
from gpuspawner.reconcile import Ending
from gpuspawner.recorder import SpawnRecorder
from gpuspawner.store import AsyncAuditStore

STARTED, READY, STOPPED = "2030-01-02T03:04:05.000001+00:00", "2030-01-02T03:04:06.000002+00:00", "2030-01-02T05:00:00.000003+00:00"


async def test_the_record_holds_the_times_the_clock_seam_gave_at_each_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = AsyncAuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}", key_file=tmp_path / "audit.key")
    recorder = SpawnRecorder(lambda: store, lambda: logging.getLogger("test"), lambda: "ada's server")
    try:
        await recorder.begin(AuditRecord(id="r1", hub_id="hub-1", user="ada", server="", requested_at="2030-01-02T03:04:00+00:00"))
        for now, note in ((STARTED, recorder.note_started), (READY, recorder.note_running)):
            monkeypatch.setattr(seams, "now_iso", lambda now=now: now)
            note("r1")
            await recorder.flush()
        monkeypatch.setattr(seams, "now_iso", lambda: STOPPED)
        await recorder.finish("r1", Ending("stopped"))
        record = await store.get("r1")
    finally:
        await store.close()
    assert record is not None and record.sealed
    assert (record.started_at, record.ready_at, record.stopped_at, record.outcome) == (STARTED, READY, STOPPED, "stopped")


@pytest.mark.parametrize(("ended_at", "expected"), [
    ("2030-01-02T04:59:58.123456+00:00", "2030-01-02T04:59:58.123456+00:00"),  # the engine's end, not the hub's notice
    (None, STOPPED),  # the engine did not say: when the hub closed it
    ("2030-01-02T03:04:05.000000+00:00", READY),  # ended as it started: never before the record's start
    ("2030-01-02T03:04:05.500000+00:00", READY),  # nor before the hub saw it answer
    ("2030-01-02T06:00:00.000000+00:00", STOPPED),  # an engine clock ahead: never in the future
], ids=["engine", "unknown", "before-start", "before-ready", "future"])
async def test_a_record_stops_when_the_engine_says_its_container_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ended_at: str | None, expected: str
) -> None:
    store = AsyncAuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}", key_file=tmp_path / "audit.key")
    recorder = SpawnRecorder(lambda: store, lambda: logging.getLogger("test"), lambda: "ada's server")
    try:
        await recorder.begin(AuditRecord(id="r1", hub_id="hub-1", user="ada", server="", requested_at="2030-01-02T03:04:00+00:00"))
        monkeypatch.setattr(seams, "now_iso", lambda: STARTED)
        recorder.note_started("r1")
        monkeypatch.setattr(seams, "now_iso", lambda: READY)
        recorder.note_running("r1")
        monkeypatch.setattr(seams, "now_iso", lambda: STOPPED)
        await recorder.finish("r1", Ending("died", exit_code=137, ended_at=ended_at))
        record = await store.get("r1")
    finally:
        await store.close()
    assert record is not None and record.sealed
    assert (record.stopped_at, record.outcome, record.exit_code) == (expected, "died", 137)
