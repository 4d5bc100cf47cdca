"""The audit database: an append-only log of entries; records opened, changed, ended once, streamed back, checked.

Every test that takes ``store_url`` runs twice: against SQLite and against a real PostgreSQL
server (the ``postgres_url`` fixture: Debian's ``postgresql``, started by the test bed).
"""

from __future__ import annotations

import asyncio
import json
import re
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

from gpuspawner import auditlog, seams
from gpuspawner.audit import AuditRecord
from gpuspawner.auditlog import Head
from gpuspawner.store import (
    AsyncAuditStore,
    AuditLogRefused,
    AuditRecordSealed,
    AuditStore,
    AuditStoreError,
    AuditStoreMissing,
    AuditStoreUnavailable,
    Filters,
    RetryPolicy,
    default_audit_url,
    is_transient,
    load_key,
    read_head,
    write_head,
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
            self.conn.execute("LOCK TABLE gpuspawner_audit_log IN EXCLUSIVE MODE")

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
    # entries: 1 the genesis, 2 opened, 3 the change, 4 the end
    assert (sealed.seq, sealed.outcome, sealed.image_id) == (4, "stopped", "sha256:abc")
    assert store.get("r001") == sealed
    assert [(e.n, e.kind) for e in store.iter_log()] == [(1, "genesis"), (2, "opened"), (3, "running"), (4, "ended")]
    with pytest.raises(AuditRecordSealed, match="audit record r001 has ended and cannot change"):
        store.update("r001", user="mallory")
    with pytest.raises(AuditStoreError, match="has ended"):
        store.finish("r001", outcome="failed")


def test_entries_chain_in_the_order_they_are_written(store: AuditStore) -> None:
    for n in (1, 2, 3):
        new(store, n)
    for rid in ("r002", "r003", "r001"):
        store.finish(rid, outcome="stopped")
    entries = list(store.iter_log())
    assert [(e.n, e.kind, e.record_id) for e in entries if e.kind == "ended"] == [(5, "ended", "r002"), (6, "ended", "r003"), (7, "ended", "r001")]
    assert all(e.prev == before.mac for before, e in zip(entries, entries[1:], strict=False))
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


def test_many_records_written_in_batches_verify(store_url: str, tmp_path: Path) -> None:
    head = tmp_path / "audit.head"
    store = AuditStore(store_url, key=KEY, head_file=head)
    new(store, 1)
    many = [record(n, groups=("ml", "vision") if n % 2 else (), idle_gpu_seconds=n * 60.0 if n % 3 else None)
            for n in range(2, 12)]
    assert store.insert_many(iter(many), batch=4) == 10
    assert read_head(head) == store.head() and store.head().n == 12  # numbered on from the record inserted alone
    assert [store.get(r.id) for r in many] == many  # groups and idle time read back as written
    store.finish("r005", outcome="stopped")
    result = store.verify()
    assert result.ok, result.problems
    assert (result.entries, result.records, result.open_records, result.head) == (13, 11, 10, read_head(head))


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
    assert (sealed.outcome, sealed.image_id, sealed.container_id, sealed.seq) == ("stopped", "sha256:two", "c1", 5)
    assert isinstance(results[2], AuditStoreError) and "no audit record r002" in str(results[2])


def test_changing_one_field_in_the_database_is_caught_by_verify_and_marked_by_readers(store: AuditStore) -> None:
    for n in range(1, 6):
        new(store, n)
        store.finish(f"r{n:03d}", outcome="stopped", image_id="sha256:" + "a" * 64)
    t = sa.table("gpuspawner_audit_log", sa.column("n"), sa.column("record_id"), sa.column("kind"), sa.column("body"))
    with store.engine.begin() as conn:
        body = conn.execute(sa.select(t.c.body).where(t.c.record_id == "r004", t.c.kind == "ended")).scalar_one()
        conn.execute(t.update().where(t.c.record_id == "r004", t.c.kind == "ended").values(body=body.replace("a" * 64, "b" * 64)))
    result = store.verify()
    assert (result.ok, result.entries) == (False, 11)
    assert result.problems == ("entry #9 (ended of record r004): its content does not match its seal",)
    marked = {r.id: r.integrity for r in store.iter_records()}
    assert marked == {"r001": None, "r002": None, "r003": None, "r004": "entry #9 does not match its seal", "r005": None}


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
    entries = list(store.iter_log())
    assert [e.n for e in entries] == list(range(1, 482))
    assert sorted(e.record_id for e in entries if e.kind == "ended") == ids
    assert store.verify().ok


def test_threads_sealing_through_one_store_take_turns(store: AuditStore) -> None:
    ids = [new(store, n).id for n in range(1, 61)]
    threads = [threading.Thread(target=lambda mine=ids[i::6]: [store.finish(r, outcome="stopped") for r in mine]) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e.record_id for e in store.iter_log() if e.kind == "ended") == ids
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
    assert (sealed.seq, store.verify().ok) == (3, True)


def test_a_lock_held_past_the_retries_is_a_sentence_not_a_driver_error(store_url: str) -> None:
    store = AuditStore(store_url, key=KEY, retry=SHORT, lock_wait=0.1)
    new(store, 1)
    with write_lock(store_url), pytest.raises(AuditStoreUnavailable) as caught:
        store.finish("r001", outcome="stopped")
    assert caught.value.transient
    assert str(caught.value).startswith("The audit database at ")
    assert "did not answer while trying to seal audit record r001" in str(caught.value)
    assert re.search(r"\b[23] tries in 0\.\d s", str(caught.value)), str(caught.value)  # tried again within SHORT's budget
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
    assert (after.sealed, after.seq, after.outcome, after.error) == (True, 3, "stopped", "Quota exceeded.")


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
        pytest.param(sqlite_error(sa.exc.IntegrityError, "UNIQUE constraint failed: gpuspawner_audit_log.n"), True, id="sqlite-number-taken"),
        pytest.param(sqlite_error(sa.exc.IntegrityError, "UNIQUE constraint failed: gpuspawner_audit.id"), False, id="sqlite-duplicate-id"),
        pytest.param(sqlite_error(sa.exc.OperationalError, "disk I/O error"), False, id="sqlite-disk-error"),
        pytest.param(sqlite_error(sa.exc.OperationalError, "attempt to write a readonly database"), False, id="sqlite-read-only"),
        pytest.param(sqlite_error(sa.exc.OperationalError, "no such table: gpuspawner_audit_log"), False, id="sqlite-no-table"),
        pytest.param(pg_error(sa.exc.OperationalError, psycopg.errors.SerializationFailure("could not serialize")), True, id="pg-serialization"),
        pytest.param(pg_error(sa.exc.OperationalError, psycopg.errors.DeadlockDetected("deadlock detected")), True, id="pg-deadlock"),
        pytest.param(pg_error(sa.exc.OperationalError, psycopg.errors.LockNotAvailable("lock timeout")), True, id="pg-lock-timeout"),
        pytest.param(pg_error(sa.exc.OperationalError, psycopg.errors.AdminShutdown("terminating")), True, id="pg-server-restarting"),
        pytest.param(pg_error(sa.exc.OperationalError, psycopg.OperationalError("connection refused")), True, id="pg-connection-refused"),
        pytest.param(lost_connection(), True, id="connection-lost"),
        pytest.param(
            pg_error(sa.exc.IntegrityError, psycopg.errors.UniqueViolation('duplicate key value violates unique constraint "gpuspawner_audit_log_pkey"')),
            True, id="pg-number-taken",
        ),
        pytest.param(
            pg_error(sa.exc.IntegrityError, psycopg.errors.UniqueViolation('duplicate key value violates unique constraint "other_pkey"')),
            False, id="pg-other-duplicate",
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
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE gpuspawner_audit_log")
    started = time.monotonic()
    with pytest.raises(AuditStoreUnavailable, match=r"^The audit database at .* refused to write audit record r002: no such table") as caught:
        store.insert(record(2))
    assert not caught.value.transient and time.monotonic() - started < 0.5


def test_a_record_id_the_log_holds_is_not_opened_again(store: AuditStore) -> None:
    new(store, 1)
    with pytest.raises(AuditStoreError, match="audit record r001 exists already"):
        store.insert(record(1))
    assert [e.kind for e in store.iter_log()] == ["genesis", "opened"]


# --- Stores of the earlier format, carried over once -----------------------------------------

LEGACY_SCHEMA = """
CREATE TABLE gpuspawner_audit (
    id VARCHAR(64) NOT NULL PRIMARY KEY, seq INTEGER UNIQUE, hub_id VARCHAR(255) NOT NULL,
    user VARCHAR(255) NOT NULL, server VARCHAR(255) NOT NULL, profile VARCHAR(255),
    outcome VARCHAR(16) NOT NULL, requested_at VARCHAR(40) NOT NULL, data TEXT NOT NULL,
    prev_hash VARCHAR(64), hash VARCHAR(64)
)
"""


def legacy_store(path: Path, sealed: int, open_: int, *, key: bytes | None = None, drop: tuple[str, ...] = ()) -> None:
    """A store as an earlier gpuspawner wrote it: records sealed whole when final. Without `key` as 0.1
    wrote it (plain SHA-256 seals); with it as 0.2 did (keyed seals, opening seals, the sealing start).
    `drop`: fields left out of every record's content, as a gpuspawner that did not record them yet."""
    from gpuspawner import audit

    conn = sqlite3.connect(path)
    conn.execute(LEGACY_SCHEMA)
    if key is not None:
        conn.execute("ALTER TABLE gpuspawner_audit ADD COLUMN opened INTEGER")
        conn.execute("ALTER TABLE gpuspawner_audit ADD COLUMN open_mac VARCHAR(64)")
        conn.execute("CREATE TABLE gpuspawner_audit_meta (name VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)")
        start = audit.SealingStart(key_id=audit.key_id(key), introduced_at="2026-01-01T00:00:00+00:00").signed(key)
        conn.execute("INSERT INTO gpuspawner_audit_meta VALUES ('sealing', ?)", (start.to_json(),))
    prev = audit.GENESIS
    for n in range(1, sealed + open_ + 1):
        rec = record(n, outcome="stopped" if n <= sealed else "running")
        content = {k: v for k, v in rec.content().items() if k not in drop}
        text = audit.canonical_json(content)
        seq = digest = None
        if n <= sealed:
            seq, digest = n, audit.seal_digest(seq=n, prev_hash=prev, content_json=text, key=key)
        row = (rec.id, seq, rec.hub_id, rec.user, rec.server, rec.profile, rec.outcome, rec.requested_at, text,
               prev if seq else None, digest)
        if key is None:
            conn.execute("INSERT INTO gpuspawner_audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        else:
            mac = audit.opening_digest(key=key, opened=n, opening=audit.opening_json(content))
            conn.execute("INSERT INTO gpuspawner_audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*row, n, mac))
        prev = digest or prev
    conn.commit()
    conn.close()


@pytest.mark.parametrize("key", [None, KEY], ids=["0.1-plain-sha256", "0.2-keyed"])
def test_a_store_of_the_earlier_format_is_carried_over_once_with_its_history(tmp_path: Path, key: bytes | None) -> None:
    path = tmp_path / "audit.sqlite"
    legacy_store(path, sealed=3, open_=2, key=key)
    store = AuditStore(f"sqlite:///{path}", key=KEY, head_file=tmp_path / "head")
    result = store.verify()
    assert result.ok, result.problems
    assert (result.entries, result.records, result.open_records) == (6, 5, 2)
    assert "carried over 5 records of an earlier store" in result.message()
    assert store.tables() == ["gpuspawner_audit_log"]  # the old tables are gone: nothing to carry over twice
    assert [r.id for r in store.open_records("hub-1")] == ["r004", "r005"]
    carried = store.get("r002")
    assert carried is not None and (carried.sealed, carried.outcome, carried.user) == (True, "stopped", "ada")
    genesis = json.loads(next(store.iter_log()).body)
    assert genesis["adopted"]["verified"] and genesis["adopted"]["legacy_head"].startswith("3:")
    # the open records go on in the log
    store.finish("r004", outcome="stopped")
    new(store, 6)
    assert store.verify().ok
    assert AuditStore(f"sqlite:///{path}", key=KEY, head_file=tmp_path / "head").verify().entries == 8


def test_a_server_still_running_when_its_store_was_carried_over_counts_in_usage(tmp_path: Path) -> None:
    import datetime

    from gpuspawner.audit import RecordedDevice
    from gpuspawner.usage import usage_report

    path = tmp_path / "audit.sqlite"
    legacy_store(path, sealed=1, open_=1, key=KEY)
    gpu = RecordedDevice(uuid="GPU-0", model="A100", memory_total=1).__dict__
    with sqlite3.connect(path) as db:  # the running server holds a GPU since 09:00
        (data,) = db.execute("SELECT data FROM gpuspawner_audit WHERE id = 'r002'").fetchone()
        data = json.loads(data) | {"devices": [gpu], "started_at": "2026-11-03T09:00:00+00:00"}
        db.execute("UPDATE gpuspawner_audit SET data = ? WHERE id = 'r002'", (json.dumps(data),))
    store = AuditStore(f"sqlite:///{path}", key=KEY, accept_adoption_problems=True)  # its opening seal no longer holds
    now = datetime.datetime(2026, 11, 3, 11, tzinfo=datetime.timezone.utc)
    report = usage_report(store.iter_held(), by=["user"], since=None, until=now, now=now)
    assert report.total.gpu_hours == pytest.approx(2.0)


def test_a_record_written_before_groups_and_idle_time_were_recorded_is_carried_over(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    legacy_store(path, sealed=1, open_=0, key=KEY, drop=("groups", "idle_gpu_seconds"))
    store = AuditStore(f"sqlite:///{path}", key=KEY)
    loaded = store.get("r001")
    assert loaded is not None and (loaded.groups, loaded.idle_gpu_seconds, loaded.sealed) == ((), None, True)
    assert store.verify().ok


def test_an_earlier_store_that_fails_its_own_checks_is_carried_over_only_when_an_admin_says_so(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    legacy_store(path, sealed=3, open_=0, key=KEY)
    with sqlite3.connect(path) as db:
        data = db.execute("SELECT data FROM gpuspawner_audit WHERE id = 'r002'").fetchone()[0]
        db.execute("UPDATE gpuspawner_audit SET data = ? WHERE id = 'r002'", (data.replace('"ada"', '"eve"'),))
    with pytest.raises(AuditLogRefused, match="fails its own checks, so the hub does not carry it over: record r002"):
        AuditStore(f"sqlite:///{path}", key=KEY)
    with sqlite3.connect(path) as db:  # nothing changed
        assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} == {"gpuspawner_audit", "gpuspawner_audit_meta"}
    store = AuditStore(f"sqlite:///{path}", key=KEY, accept_adoption_problems=True)
    genesis = json.loads(next(store.iter_log()).body)
    assert genesis["adopted"]["verified"] is False
    assert "record r002 (#2): its content does not match its seal" in genesis["adopted"]["problems"]


# --- Sealing key, head, missing stores ---------------------------------------------------


def test_the_log_is_dated_by_the_clock_seam_and_verify_shows_that_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seams, "now_iso", lambda: "2030-01-02T03:04:05.000006+00:00")
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}", key=KEY)
    new(store, 1)
    store.finish("r001", outcome="stopped")
    result = store.verify()
    assert result.ok and result.genesis is not None
    assert result.genesis["created_at"] == "2030-01-02T03:04:05.000006+00:00"
    assert "log started 2030-01-02T03:04:05.000006+00:00." in result.message()
    assert {e.at for e in store.iter_log()} == {"2030-01-02T03:04:05.000006+00:00"}


def test_a_hub_with_another_key_writes_nothing(store_url: str) -> None:
    store = AuditStore(store_url, key=KEY)
    new(store, 1)
    with pytest.raises(AuditStoreError, match=r"sealed with another key .* GPUSpawner.audit_key_file"):
        AuditStore(store_url, key=b"m" * 32)
    assert [e.n for e in store.iter_log()] == [1, 2]


def test_a_missing_store_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "audit.sqlite"
    with pytest.raises(AuditStoreMissing, match=f"no audit store at {path}"):
        AuditStore(f"sqlite:///{path}", create=False)
    assert not path.exists()
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()
    with pytest.raises(AuditStoreMissing, match="has no gpuspawner_audit_log table"):
        AuditStore(f"sqlite:///{empty}", create=False)
    with pytest.raises(AuditStoreMissing, match="has no gpuspawner_audit_log table"):
        AuditStore(f"sqlite:///{empty}")  # without a key nothing is created either


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


def test_the_head_kept_outside_moves_forward_only_with_every_entry(store_url: str, tmp_path: Path) -> None:
    head = tmp_path / "audit.head"
    store = AuditStore(store_url, key=KEY, head_file=head)
    new(store, 1)
    new(store, 2)
    assert read_head(head) == store.head() and store.head().n == 3
    sealed = store.finish("r002", outcome="stopped")
    assert read_head(head) == Head(4, sealed.hash or "")
    write_head(head, Head(2, "0" * 64))  # a late writer with an older head
    assert read_head(head) == Head(4, sealed.hash or "")
    assert store.verify().head == read_head(head)


def _sql(store: AuditStore, statement: str) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql(statement)


def test_a_log_behind_its_head_is_refused_and_its_numbers_are_never_used_again(store_url: str, tmp_path: Path) -> None:
    """Roll back, then wait: the hub once numbered on from the database and wrote over the gap."""
    head = tmp_path / "audit.head"
    store = AuditStore(store_url, key=KEY, head_file=head)
    for n in range(1, 4):
        new(store, n)
        store.finish(f"r{n:03d}", outcome="stopped")
    _sql(store, "DELETE FROM gpuspawner_audit_log WHERE n >= 6")
    for fresh in (store, AuditStore(store_url, key=KEY, head_file=head)):  # this hub, and a restarted one
        with pytest.raises(AuditLogRefused, match=r"ends at entry #5, but .* has seen #7: the store was rolled back"):
            fresh.insert(record(9))
        assert fresh.refusal is not None
    assert [e.n for e in store.iter_log()] == [1, 2, 3, 4, 5]
    assert read_head(head) is not None and read_head(head).n == 7  # type: ignore[union-attr]


def test_a_log_rewritten_at_its_head_is_refused(store_url: str, tmp_path: Path) -> None:
    store = AuditStore(store_url, key=KEY, head_file=tmp_path / "audit.head")
    new(store, 1)
    _sql(store, "UPDATE gpuspawner_audit_log SET mac = '" + "e" * 64 + "' WHERE n = 2")
    with pytest.raises(AuditLogRefused, match=r"Entry #2 of the audit log .* is not the one .* has seen: the log was rewritten"):
        store.update("r001", outcome="running")


def test_an_unreadable_head_file_refuses_before_anything_is_written(tmp_path: Path) -> None:
    head = tmp_path / "audit.head"
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}", key=KEY, head_file=head)
    new(store, 1)
    head.write_text("{not json")
    with pytest.raises(AuditLogRefused, match=r"the audit log's head .* is unreadable: not JSON\. The hub writes no records"):
        store.insert(record(2))
    assert [e.record_id for e in store.iter_log()] == ["", "r001"]  # no open entry left behind the refusal


def test_a_head_file_that_cannot_be_written_after_the_commit_does_not_fail_the_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    head = tmp_path / "audit.head"
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}", key=KEY, head_file=head)
    head.unlink()
    head.mkdir()  # not a file: reading it fails with EISDIR, writing it fails too
    head.rmdir()
    (tmp_path / "audit.head.tmp").mkdir()  # the head's temporary file cannot be made
    new(store, 1)
    assert store.get("r001") is not None
    assert "Could not move the audit log's head" in caplog.text


def test_a_row_injected_as_an_open_record_of_this_hub_is_not_taken_for_one(store: AuditStore) -> None:
    new(store, 1)
    forged = auditlog.opening(record(7, user="mallory"), at="2026-11-21T10:00:00+00:00")
    values = {name: getattr(forged, name) for name in auditlog.COLUMNS}
    values.update(n=0, prev="0" * 64, mac="f" * 64)
    with store.engine.begin() as conn:
        conn.execute(sa.table("gpuspawner_audit_log", *(sa.column(c) for c in values)).insert().values(**values))
    assert [r.id for r in store.open_records("hub-1")] == ["r001"]
    assert {r.id: r.integrity for r in store.iter_records()}["r007"] == "entry number 0 is outside the log's numbering"


def test_a_change_edited_in_the_database_is_left_out_when_the_hub_ends_the_record(store: AuditStore) -> None:
    """Edit an open record: the hub once sealed whatever the row held when the server stopped."""
    new(store, 1)
    store.update("r001", image_id="sha256:" + "a" * 64)
    _sql(store, "UPDATE gpuspawner_audit_log SET body = replace(body, 'aaaa', 'bbbb') WHERE n = 3")
    ended = store.finish("r001", outcome="stopped")
    assert ended.image_id is None
    problems = store.verify().problems
    assert problems == ("entry #3 (image of record r001): its content does not match its seal",)
