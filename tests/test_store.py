"""The audit database: records written, updated, sealed once, streamed back, and checked."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gpuspawner.audit import AuditRecord
from gpuspawner.store import AsyncAuditStore, AuditStore, AuditStoreError, Filters, default_audit_url


@pytest.fixture
def store(tmp_path: Path) -> AuditStore:
    return AuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}")


def new(store: AuditStore, n: int, **kw: object) -> AuditRecord:
    fields: dict = dict(id=f"r{n:03d}", hub_id="hub-1", user="ada", server="", requested_at=f"2026-11-{n % 28 + 1:02d}T10:00:00+00:00")
    fields.update(kw)
    record = AuditRecord(**fields)
    store.insert(record)
    return record


def test_a_record_is_updated_then_sealed_once(store: AuditStore) -> None:
    new(store, 1)
    store.update("r001", outcome="running", image_id="sha256:abc")
    sealed = store.finish("r001", outcome="stopped", stopped_at="2026-11-21T12:00:00+00:00")
    assert (sealed.seq, sealed.outcome, sealed.image_id) == (1, "stopped", "sha256:abc")
    assert store.get("r001") == sealed
    with pytest.raises(AuditStoreError, match="audit record r001 is sealed and cannot change"):
        store.update("r001", user="mallory")
    with pytest.raises(AuditStoreError, match="sealed"):
        store.finish("r001", outcome="failed")


def test_seals_chain_in_the_order_records_end(store: AuditStore) -> None:
    for n in (1, 2, 3):
        new(store, n)
    for rid in ("r002", "r003", "r001"):
        store.finish(rid, outcome="stopped")
    assert [(r.id, r.seq) for r in store.iter_sealed()] == [("r002", 1), ("r003", 2), ("r001", 3)]
    assert store.verify().ok


def test_open_records_are_this_hubs_unsealed_ones(store: AuditStore) -> None:
    new(store, 1)
    new(store, 2, hub_id="hub-2")
    new(store, 3)
    store.finish("r003", outcome="failed")
    assert [r.id for r in store.open_records("hub-1")] == ["r001"]


def test_export_filters_and_streams_past_one_batch(store: AuditStore) -> None:
    for n in range(1, 26):
        new(store, n, user="ada" if n % 2 else "bob", profile="gpu" if n % 5 == 0 else "cpu")
    everything = list(store.iter_records(batch=4))
    assert len(everything) == 25
    assert [r.requested_at for r in everything] == sorted(r.requested_at for r in everything)
    assert {r.user for r in store.iter_records(Filters(user="bob"), batch=4)} == {"bob"}
    assert [r.id for r in store.iter_records(Filters(profile="gpu"))] == ["r005", "r010", "r015", "r020", "r025"]
    window = list(store.iter_records(Filters(since="2026-11-05", until="2026-11-08")))
    assert [r.id for r in window] == ["r004", "r005", "r006"]


def test_queued_updates_land_in_order_before_anything_submitted_after_them(tmp_path: Path) -> None:
    async def spawn_like() -> tuple[AuditRecord, list[object]]:
        store = AsyncAuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}")
        await store.insert(AuditRecord(id="r001", hub_id="hub-1", user="ada", server="", requested_at="2026-11-21T10:00:00+00:00"))
        queued = [
            store.update_soon("r001", outcome="starting", image_id="sha256:one"),
            store.update_soon("r001", image_id="sha256:two", container_id="c1"),
            store.update_soon("r002", outcome="running"),  # no such record: fails alone
        ]
        sealed = await store.finish("r001", outcome="stopped")
        return sealed, await asyncio.gather(*queued, return_exceptions=True)

    sealed, results = asyncio.run(spawn_like())
    assert (sealed.outcome, sealed.image_id, sealed.container_id, sealed.seq) == ("stopped", "sha256:two", "c1", 1)
    assert isinstance(results[2], AuditStoreError) and "no audit record r002" in str(results[2])


def test_changing_one_field_in_the_database_is_caught_by_verify(store: AuditStore, tmp_path: Path) -> None:
    for n in range(1, 6):
        new(store, n)
        store.finish(f"r{n:03d}", outcome="stopped", image_id="sha256:" + "a" * 64)
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        (data,) = db.execute("SELECT data FROM gpuspawner_audit WHERE id = 'r004'").fetchone()
        db.execute("UPDATE gpuspawner_audit SET data = ? WHERE id = 'r004'", (data.replace("a" * 64, "b" * 64),))
    result = store.verify()
    assert (result.ok, result.first_bad, result.checked) == (False, "r004", 3)


@pytest.mark.parametrize(
    ("hub_db", "expected"),
    [
        ("sqlite:////srv/hub/jupyterhub.sqlite", "sqlite:////srv/hub/gpuspawner-audit.sqlite"),
        ("sqlite:///jupyterhub.sqlite", "sqlite:////cwd/gpuspawner-audit.sqlite"),
        ("postgresql://hub@db/jupyterhub", "sqlite:////cwd/gpuspawner-audit.sqlite"),
    ],
)
def test_default_store_sits_beside_the_hub_database(hub_db: str, expected: str) -> None:
    assert default_audit_url(hub_db, cwd="/cwd") == expected
