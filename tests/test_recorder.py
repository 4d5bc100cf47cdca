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
