"""The audit database: records written, updated, sealed once, streamed back, and checked.

Every test that takes ``store_url`` runs twice: against SQLite and against a real PostgreSQL
server (the ``postgres_url`` fixture: Debian's ``postgresql``, started by the test bed).
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest
import sqlalchemy as sa

from gpuspawner import seams
from gpuspawner.audit import GENESIS, AuditRecord, ChainHead
from gpuspawner.store import (
    AsyncAuditStore,
    AuditRecordSealed,
    AuditStore,
    AuditStoreError,
    AuditStoreMissing,
    AuditStoreUnavailable,
    Filters,
    RetryPolicy,
    advance_head,
    default_audit_url,
    is_transient,
    load_key,
    read_head,
)

ROOT = Path(__file__).resolve().parent.parent

KEY = bytes(range(32))  # the tests' sealing key (a hub's is random, in a 0600 file)


def key_file(url: str) -> Path:
    """A key file holding KEY, for the stores the hub's way (AsyncAuditStore reads a file)."""
    import tempfile

    path = Path(tempfile.mkdtemp()) / "audit.key"
    path.write_text(KEY.hex() + "\n")
    return path


# Small budgets so a lock "held too long" costs a test well under a second.
SHORT = RetryPolicy(tries=3, first_delay=0.05, max_delay=0.1, budget=0.4)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[AuditStore]:
    store = AuditStore(store_url, key=KEY)
    yield store
    store.dispose()


def record(n: int, **kw: Any) -> AuditRecord:
    fields: dict[str, Any] = dict(
        id=f"r{n:03d}", hub_id="hub-1", user="ada", server="", requested_at=f"2026-11-{n % 28 + 1:02d}T10:00:00+00:00"
    )
    fields.update(kw)
    return AuditRecord(**fields)


def new(store: AuditStore, n: int, **kw: Any) -> AuditRecord:
    rec = record(n, **kw)
    store.insert(rec)
    return rec


class WriteLock:
    """Another program holding the audit table against writers (readers go on), until released.

    SQLite: an open ``BEGIN EXCLUSIVE``. PostgreSQL: ``LOCK TABLE … IN EXCLUSIVE MODE``.
    """

    def __init__(self, url: str) -> None:
        self.conn: Any
        if url.startswith("sqlite"):
            self.conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
            self.conn.execute("BEGIN EXCLUSIVE")
        else:
            self.conn = psycopg.connect(sa.make_url(url).set(drivername="postgresql").render_as_string(False))
            self.conn.execute("LOCK TABLE gpuspawner_audit IN EXCLUSIVE MODE")

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()

    def release_after(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self.release)
        timer.start()
        return timer


@contextmanager
def write_lock(url: str) -> Iterator[WriteLock]:
    lock = WriteLock(url)
    try:
        yield lock
    finally:
        try:
            lock.release()
        except Exception:
            pass  # released already


# --- Records, seals, exports -------------------------------------------------------------


def test_a_record_is_updated_then_sealed_once(store: AuditStore) -> None:
    new(store, 1)
    store.update("r001", outcome="running", image_id="sha256:abc")
    sealed = store.finish("r001", outcome="stopped", stopped_at="2026-11-21T12:00:00+00:00")
    assert (sealed.seq, sealed.outcome, sealed.image_id) == (1, "stopped", "sha256:abc")
    assert store.get("r001") == sealed
    with pytest.raises(AuditRecordSealed, match="audit record r001 is sealed and cannot change"):
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


def test_many_records_written_in_batches_carry_opening_seals_that_verify(store_url: str, tmp_path: Path) -> None:
    head = tmp_path / "audit.head"
    store = AuditStore(store_url, key=KEY, head_file=head)
    new(store, 1)
    many = [record(n, groups=("ml", "vision") if n % 2 else (), idle_gpu_seconds=n * 60.0 if n % 3 else None)
            for n in range(2, 12)]
    assert store.insert_many(iter(many), batch=4) == 10
    assert read_head(head) == ChainHead(0, GENESIS, 11)  # numbered on from the record inserted alone
    assert [store.get(r.id) for r in many] == many  # groups and idle time read back as written
    store.finish("r005", outcome="stopped")
    result = store.verify()
    assert result.ok, result.problems
    assert (result.checked, result.open_records, result.head) == (1, 10, read_head(head))


def test_a_record_sealed_before_groups_and_idle_time_were_recorded_still_verifies(store: AuditStore) -> None:
    from gpuspawner import audit

    old = record(1, outcome="stopped")
    content = {k: v for k, v in old.content().items() if k not in ("groups", "idle_gpu_seconds")}
    text = audit.canonical_json(content)
    seal = audit.seal_digest(seq=1, prev_hash=GENESIS, content_json=text, key=KEY)
    t = sa.table("gpuspawner_audit", *(sa.column(c) for c in (
        "id", "seq", "hub_id", "user", "server", "profile", "outcome", "requested_at", "data", "prev_hash", "hash",
        "opened", "open_mac")))
    with store.engine.begin() as conn:
        conn.execute(t.insert().values(
            id=old.id, seq=1, hub_id=old.hub_id, user=old.user, server=old.server, profile=None, outcome="stopped",
            requested_at=old.requested_at, data=text, prev_hash=GENESIS, hash=seal, opened=1,
            open_mac=audit.opening_digest(key=KEY, opened=1, opening=audit.opening_json(content)),
        ))
    loaded = store.get(old.id)
    assert loaded is not None and (loaded.groups, loaded.idle_gpu_seconds) == ((), None)
    new(store, 2, groups=("ml",))
    store.finish("r002", outcome="stopped", idle_gpu_seconds=12.5)
    result = store.verify()
    assert result.ok and result.checked == 2, result.problems


def test_queued_updates_land_in_order_before_anything_submitted_after_them(store_url: str) -> None:
    async def spawn_like() -> tuple[AuditRecord, list[object]]:
        store = AsyncAuditStore(store_url, key_file=key_file(store_url))
        await store.insert(record(1))
        queued = [
            store.update_soon("r001", outcome="starting", image_id="sha256:one"),
            store.update_soon("r001", image_id="sha256:two", container_id="c1"),
            store.update_soon("r002", outcome="running"),  # no such record: fails alone
        ]
        sealed = await store.finish("r001", outcome="stopped")
        results = await asyncio.gather(*queued, return_exceptions=True)
        await store.close()
        return sealed, results

    sealed, results = asyncio.run(spawn_like())
    assert (sealed.outcome, sealed.image_id, sealed.container_id, sealed.seq) == ("stopped", "sha256:two", "c1", 1)
    assert isinstance(results[2], AuditStoreError) and "no audit record r002" in str(results[2])


def test_changing_one_field_in_the_database_is_caught_by_verify(store: AuditStore) -> None:
    for n in range(1, 6):
        new(store, n)
        store.finish(f"r{n:03d}", outcome="stopped", image_id="sha256:" + "a" * 64)
    t = sa.table("gpuspawner_audit", sa.column("id"), sa.column("data"))
    with store.engine.begin() as conn:
        data = conn.execute(sa.select(t.c.data).where(t.c.id == "r004")).scalar_one()
        conn.execute(t.update().where(t.c.id == "r004").values(data=data.replace("a" * 64, "b" * 64)))
    result = store.verify()
    assert (result.ok, result.checked) == (False, 5)
    assert result.problems == ("record r004 (#4): its content does not match its seal",)


@pytest.mark.parametrize(
    ("hub_db", "expected"),
    [
        ("sqlite:////srv/hub/jupyterhub.sqlite", "sqlite:////srv/hub/gpuspawner-audit.sqlite"),
        ("sqlite:///jupyterhub.sqlite", "sqlite:////cwd/gpuspawner-audit.sqlite"),
        ("sqlite:///data/jupyterhub.sqlite", "sqlite:////cwd/data/gpuspawner-audit.sqlite"),
        ("sqlite+pysqlite:////srv/hub/jupyterhub.sqlite", "sqlite:////srv/hub/gpuspawner-audit.sqlite"),
        ("sqlite:///:memory:", "sqlite:////cwd/gpuspawner-audit.sqlite"),
        ("sqlite://", "sqlite:////cwd/gpuspawner-audit.sqlite"),
        ("postgresql://hub@db/jupyterhub", "sqlite:////cwd/gpuspawner-audit.sqlite"),
    ],
    ids=["absolute", "relative", "relative-folder", "named-driver", "memory", "memory-short", "postgresql"],
)
def test_default_store_sits_beside_the_hub_database(hub_db: str, expected: str) -> None:
    assert default_audit_url(hub_db, cwd="/cwd") == expected


# --- Concurrent writers ------------------------------------------------------------------

SEALER = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    from gpuspawner.store import AuditStore

    url, go, ids = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    store = AuditStore(url, key=bytes(range(32)))
    failures = []

    def seal(mine):
        for rid in mine:
            try:
                store.finish(rid, outcome="stopped")
            except Exception as e:
                failures.append(f"{rid}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=seal, args=(ids[i::4],)) for i in range(4)]
    while not go.exists():  # both processes start sealing at the same moment
        time.sleep(0.005)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
    """
)


def test_two_processes_of_four_threads_each_seal_every_record_once_without_gaps(store: AuditStore, tmp_path: Path) -> None:
    ids = [new(store, n).id for n in range(1, 241)]
    go = tmp_path / "go"
    sealers = [
        subprocess.Popen(
            [sys.executable, "-c", SEALER, store.url, str(go), ",".join(ids[half::2])],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for half in (0, 1)
    ]
    time.sleep(0.5)  # both imported and connected, waiting for the word
    go.touch()
    outputs = [p.communicate(timeout=120)[0] for p in sealers]
    assert [p.returncode for p in sealers] == [0, 0], outputs
    sealed = list(store.iter_sealed())
    assert sorted(e.seq or 0 for e in sealed) == list(range(1, 241))
    assert sorted(e.id for e in sealed) == ids
    assert store.verify().ok


def test_threads_sealing_through_one_store_take_turns(store: AuditStore) -> None:
    ids = [new(store, n).id for n in range(1, 61)]
    threads = [threading.Thread(target=lambda mine=ids[i::6]: [store.finish(r, outcome="stopped") for r in mine]) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.seq for e in store.iter_sealed()] == list(range(1, 61))
    assert store.verify().ok


# --- A locked or busy database -----------------------------------------------------------


def test_finish_waits_for_a_lock_held_for_a_second_then_seals(store_url: str) -> None:
    store = AuditStore(store_url, key=KEY, lock_wait=0.2)
    new(store, 1)
    with write_lock(store_url) as lock:
        lock.release_after(1.0)
        started = time.monotonic()
        sealed = store.finish("r001", outcome="stopped")
    assert time.monotonic() - started >= 0.9
    assert (sealed.seq, store.verify().ok) == (1, True)


def test_a_lock_held_past_the_retries_is_a_sentence_not_a_driver_error(store_url: str) -> None:
    store = AuditStore(store_url, key=KEY, retry=SHORT, lock_wait=0.1)
    new(store, 1)
    with write_lock(store_url), pytest.raises(AuditStoreUnavailable) as caught:
        store.finish("r001", outcome="stopped")
    assert caught.value.transient
    assert str(caught.value).startswith("The audit database at ")
    assert "did not answer while trying to seal audit record r001" in str(caught.value)
    assert "3 tries" in str(caught.value)
    assert store.get("r001") is not None and not store.get("r001").sealed  # type: ignore[union-attr]


def run_async_store(url: str, scenario: Any) -> Any:
    async def main() -> Any:
        store = AsyncAuditStore(url, key_file=key_file(url), retry=SHORT, lock_wait=0.1, retry_later=(0.2, 0.4))
        try:
            return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(main())


async def wait_until(predicate: Any, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_a_final_write_the_database_refuses_is_kept_and_sealed_in_the_background(store_url: str) -> None:
    async def scenario(store: AsyncAuditStore) -> tuple[Any, ...]:
        await store.insert(record(1))
        with write_lock(store_url):
            returned = await store.finish_eventually("r001", outcome="stopped", error="Quota exceeded.")
            waiting = store.pending_finishes()
            while_locked = await store.get("r001")
        await wait_until(lambda: store.pending_finishes() == 0, timeout=3)
        return returned, waiting, while_locked, await store.get("r001")

    returned, waiting, while_locked, after = run_async_store(store_url, scenario)
    assert (returned, waiting, while_locked.sealed) == (None, 1, False)
    assert (after.sealed, after.seq, after.outcome, after.error) == (True, 1, "stopped", "Quota exceeded.")


def test_flush_pending_seals_the_kept_final_writes_now(store_url: str) -> None:
    async def scenario(store: AsyncAuditStore) -> tuple[int, int, bool]:
        for n in (1, 2):
            await store.insert(record(n))
        with write_lock(store_url):
            for rid in ("r001", "r002"):
                await store.finish_eventually(rid, outcome="stopped")
        waiting = store.pending_finishes()
        left = await store.flush_pending(timeout=2)
        return waiting, left, all(r is not None and r.sealed for r in [await store.get("r001"), await store.get("r002")])

    assert run_async_store(store_url, scenario) == (2, 0, True)


def test_a_kept_final_write_for_a_record_sealed_meanwhile_is_dropped(store_url: str) -> None:
    async def scenario(store: AsyncAuditStore) -> tuple[int, str | None]:
        await store.insert(record(1))
        with write_lock(store_url):
            await store.finish_eventually("r001", outcome="stopped")
        AuditStore(store_url, key=KEY).finish("r001", outcome="failed")  # another hub process got there first
        left = await store.flush_pending(timeout=2)
        sealed = await store.get("r001")
        return left, sealed.outcome if sealed else None

    assert run_async_store(store_url, scenario) == (0, "failed")


def test_an_update_the_database_refused_goes_with_the_seal(store_url: str) -> None:
    async def scenario(store: AsyncAuditStore) -> tuple[BaseException | None, AuditRecord]:
        await store.insert(record(1))
        with write_lock(store_url):
            failed = (await asyncio.gather(store.update_soon("r001", container_id="c1"), return_exceptions=True))[0]
        sealed = await store.finish("r001", outcome="stopped")
        return failed if isinstance(failed, BaseException) else None, sealed

    failed, sealed = run_async_store(store_url, scenario)
    assert isinstance(failed, AuditStoreUnavailable)
    assert (sealed.container_id, sealed.outcome) == ("c1", "stopped")


# --- Which database errors are worth another try -----------------------------------------


def sqlite_error(kind: type[sa.exc.DBAPIError], message: str) -> sa.exc.DBAPIError:
    orig = (sqlite3.IntegrityError if kind is sa.exc.IntegrityError else sqlite3.OperationalError)(message)
    return kind("UPDATE gpuspawner_audit …", {}, orig)


def pg_error(kind: type[sa.exc.DBAPIError], orig: Exception) -> sa.exc.DBAPIError:
    return kind("UPDATE gpuspawner_audit …", {}, orig)


def lost_connection() -> sa.exc.DBAPIError:
    return sa.exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("server closed the connection"), connection_invalidated=True)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        pytest.param(sqlite_error(sa.exc.OperationalError, "database is locked"), True, id="sqlite-locked"),
        pytest.param(sqlite_error(sa.exc.OperationalError, "database is busy"), True, id="sqlite-busy"),
        pytest.param(sqlite_error(sa.exc.OperationalError, "database table is locked"), True, id="sqlite-table-locked"),
        pytest.param(sqlite_error(sa.exc.IntegrityError, "UNIQUE constraint failed: gpuspawner_audit.seq"), True, id="sqlite-seq-taken"),
        pytest.param(sqlite_error(sa.exc.IntegrityError, "UNIQUE constraint failed: gpuspawner_audit.id"), False, id="sqlite-duplicate-id"),
        pytest.param(sqlite_error(sa.exc.OperationalError, "disk I/O error"), False, id="sqlite-disk-error"),
        pytest.param(sqlite_error(sa.exc.OperationalError, "attempt to write a readonly database"), False, id="sqlite-read-only"),
        pytest.param(sqlite_error(sa.exc.OperationalError, "no such table: gpuspawner_audit"), False, id="sqlite-no-table"),
        pytest.param(pg_error(sa.exc.OperationalError, psycopg.errors.SerializationFailure("could not serialize")), True, id="pg-serialization"),
        pytest.param(pg_error(sa.exc.OperationalError, psycopg.errors.DeadlockDetected("deadlock detected")), True, id="pg-deadlock"),
        pytest.param(pg_error(sa.exc.OperationalError, psycopg.errors.LockNotAvailable("lock timeout")), True, id="pg-lock-timeout"),
        pytest.param(pg_error(sa.exc.OperationalError, psycopg.errors.AdminShutdown("terminating")), True, id="pg-server-restarting"),
        pytest.param(pg_error(sa.exc.OperationalError, psycopg.OperationalError("connection refused")), True, id="pg-connection-refused"),
        pytest.param(lost_connection(), True, id="connection-lost"),
        pytest.param(
            pg_error(sa.exc.IntegrityError, psycopg.errors.UniqueViolation('duplicate key value violates unique constraint "gpuspawner_audit_seq_key"')),
            True, id="pg-seq-taken",
        ),
        pytest.param(
            pg_error(sa.exc.IntegrityError, psycopg.errors.UniqueViolation('duplicate key value violates unique constraint "gpuspawner_audit_pkey"')),
            False, id="pg-duplicate-id",
        ),
        pytest.param(pg_error(sa.exc.OperationalError, psycopg.errors.DiskFull("could not extend file")), False, id="pg-disk-full"),
        pytest.param(pg_error(sa.exc.ProgrammingError, psycopg.errors.UndefinedTable("no such relation")), False, id="pg-no-table"),
        pytest.param(sa.exc.TimeoutError("QueuePool limit reached"), True, id="pool-timeout"),
        pytest.param(ValueError("not a database error"), False, id="not-a-database-error"),
    ],
)
def test_database_errors_are_sorted_into_transient_and_fatal(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


@pytest.mark.parametrize(
    ("policy", "delays"),
    [
        pytest.param(RetryPolicy(), [0.05, 0.1, 0.2, 0.4, 0.8], id="default"),
        pytest.param(RetryPolicy(tries=4, first_delay=0.5, max_delay=0.75), [0.5, 0.75, 0.75], id="capped"),
        pytest.param(RetryPolicy(tries=1), [], id="once"),
    ],
)
def test_tries_back_off_doubling_up_to_a_cap(policy: RetryPolicy, delays: list[float]) -> None:
    assert list(policy.delays()) == delays


def test_a_fatal_database_error_is_not_retried_and_reads_as_a_sentence(tmp_path: Path) -> None:
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}", key=KEY)
    new(store, 1)
    started = time.monotonic()
    with pytest.raises(AuditStoreUnavailable, match=r"^The audit database at .* refused to write audit record r001: UNIQUE") as caught:
        store.insert(record(1))
    assert not caught.value.transient and time.monotonic() - started < 0.5


# --- Sealing key, chain head, missing stores -----------------------------------------------

LEGACY_SCHEMA = """
CREATE TABLE gpuspawner_audit (
    id VARCHAR(64) NOT NULL PRIMARY KEY, seq INTEGER UNIQUE, hub_id VARCHAR(255) NOT NULL,
    user VARCHAR(255) NOT NULL, server VARCHAR(255) NOT NULL, profile VARCHAR(255),
    outcome VARCHAR(16) NOT NULL, requested_at VARCHAR(40) NOT NULL, data TEXT NOT NULL,
    prev_hash VARCHAR(64), hash VARCHAR(64)
)
"""


def legacy_store(path: Path, sealed: int, open_: int) -> None:
    """A store as gpuspawner 0.1 wrote it: plain SHA-256 seals, no opening seals, no key."""
    from gpuspawner import audit

    conn = sqlite3.connect(path)
    conn.execute(LEGACY_SCHEMA)
    prev = audit.GENESIS
    for n in range(1, sealed + open_ + 1):
        rec = record(n, outcome="stopped" if n <= sealed else "running")
        content = audit.canonical_json(rec.content())
        seq = digest = None
        if n <= sealed:
            seq, digest = n, audit.seal_digest(seq=n, prev_hash=prev, content_json=content, key=None)
        conn.execute(
            "INSERT INTO gpuspawner_audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rec.id, seq, rec.hub_id, rec.user, rec.server, rec.profile, rec.outcome, rec.requested_at, content,
             prev if seq else None, digest),
        )
        prev = digest or prev
    conn.commit()
    conn.close()


def test_a_store_sealed_before_keys_is_taken_over_without_breaking_its_history(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    legacy_store(path, sealed=3, open_=2)
    store = AuditStore(f"sqlite:///{path}", key=KEY, head_file=tmp_path / "head")
    result = store.verify()
    assert result.ok, result.problems
    assert (result.checked, result.open_records, result.head.opened) == (3, 2, 5)
    assert "records 1-3 were sealed with plain SHA-256 before it" in result.message()
    # the open records seal with the key, chained onto the old ones
    store.finish("r004", outcome="stopped")
    new(store, 6)
    assert store.verify().ok
    # an old record changed after the take-over is caught, though its seal is plain SHA-256
    with sqlite3.connect(path) as db:
        data = db.execute("SELECT data FROM gpuspawner_audit WHERE id = 'r002'").fetchone()[0]
        db.execute("UPDATE gpuspawner_audit SET data = ? WHERE id = 'r002'", (data.replace('"ada"', '"eve"'),))
    assert "record r002 (#2): its content does not match its seal" in store.verify().problems
    # taking over happens once: a second hub process with the same key finds it done
    assert AuditStore(f"sqlite:///{path}", key=KEY).verify(key=KEY).start == result.start


def test_the_sealing_key_is_dated_by_the_clock_seam_and_verify_shows_that_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seams, "now_iso", lambda: "2030-01-02T03:04:05.000006+00:00")
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}", key=KEY)
    new(store, 1)
    store.finish("r001", outcome="stopped")
    result = store.verify()
    assert result.ok and result.start is not None
    assert result.start.introduced_at == "2030-01-02T03:04:05.000006+00:00"
    assert "used since 2030-01-02T03:04:05.000006+00:00." in result.message()


def test_a_hub_with_another_key_writes_nothing(store_url: str) -> None:
    store = AuditStore(store_url, key=KEY)
    new(store, 1)
    with pytest.raises(AuditStoreError, match=r"sealed with another key .* GPUSpawner.audit_key_file"):
        AuditStore(store_url, key=b"m" * 32)


def test_a_missing_store_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "audit.sqlite"
    with pytest.raises(AuditStoreMissing, match=f"no audit store at {path}"):
        AuditStore(f"sqlite:///{path}", create=False)
    assert not path.exists()
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()
    with pytest.raises(AuditStoreMissing, match="has no gpuspawner_audit table"):
        AuditStore(f"sqlite:///{empty}", create=False)


def test_the_hub_makes_its_key_once_for_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "audit.key"
    with pytest.raises(AuditStoreMissing, match="no audit sealing key"):
        load_key(path)
    key = load_key(path, create=True)
    assert len(key) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_key(path, create=True) == key == load_key(path)
    path.write_text("not a key\n")
    with pytest.raises(AuditStoreError, match="cannot read the audit sealing key"):
        load_key(path)


def test_the_head_kept_outside_moves_forward_only_with_every_record(store_url: str, tmp_path: Path) -> None:
    head = tmp_path / "audit.head"
    store = AuditStore(store_url, key=KEY, head_file=head)
    new(store, 1)
    new(store, 2)
    assert read_head(head) == ChainHead(0, GENESIS, 2)
    sealed = store.finish("r002", outcome="stopped")
    assert read_head(head) == ChainHead(1, sealed.hash, 2)
    advance_head(head, ChainHead(0, GENESIS, 1))  # a late writer with an older head
    assert read_head(head) == ChainHead(1, sealed.hash, 2)
    assert store.verify().head == read_head(head)
