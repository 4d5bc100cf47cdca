"""The one path to the audit database: SQLAlchemy, SQLite by default, any SQLAlchemy URL.

One table, ``gpuspawner_audit``: the columns admins filter on, the full record as JSON, and
the seal. A record is inserted when a spawn begins and updated as the server moves on; its
final update seals it (the next sequence number and the chained hash) in the same
transaction, so a sealed record is never half-written and never changes again.

Every write goes through :meth:`AuditStore.transaction`: a database that is busy, locked or
briefly gone (SQLite "database is locked", PostgreSQL serialization failures, deadlocks, lost
connections) is tried again with backoff; what :func:`is_transient` calls fatal is not. Either
way the caller gets a domain error, :class:`AuditStoreUnavailable`, never a driver's exception.
Sealing takes the write lock before it reads the last sequence number (SQLite ``BEGIN
IMMEDIATE``, a PostgreSQL transaction-level advisory lock), so hub processes and threads that
seal into one store at once take turns and the sequence has no gaps and no duplicates.

PostgreSQL needs a driver: ``pip install 'psycopg[binary]'`` (or ``gpuspawner[postgresql]``)
and a URL naming it, ``postgresql+psycopg://gpuspawner@db/audit``. A plain ``postgresql://``
URL asks SQLAlchemy for psycopg2, which works too where it is installed.

:class:`AuditStore` blocks (database I/O); :class:`AsyncAuditStore` runs it in a thread of
its own so the hub's event loop never waits on the database, and keeps a final write that
the database refused for now until it can be made (:meth:`AsyncAuditStore.finish_eventually`).
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from . import audit, seams
from .audit import AuditRecord, Verification
from .times import stored_time

T = TypeVar("T")

log = logging.getLogger(__name__)

metadata = sa.MetaData()
records_table = sa.Table(
    "gpuspawner_audit",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, unique=True, nullable=True),
    sa.Column("hub_id", sa.String(255), nullable=False, index=True),
    sa.Column("user", sa.String(255), nullable=False, index=True),
    sa.Column("server", sa.String(255), nullable=False),
    sa.Column("profile", sa.String(255), nullable=True, index=True),
    sa.Column("outcome", sa.String(16), nullable=False, index=True),
    sa.Column("requested_at", sa.String(40), nullable=False, index=True),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=True),
    sa.Column("hash", sa.String(64), nullable=True),
    # the opening seal: the record's number among all records written, and its MAC
    sa.Column("opened", sa.Integer, nullable=True),
    sa.Column("open_mac", sa.String(64), nullable=True),
    sa.Index("ix_gpuspawner_audit_opened", "opened", unique=True),
)
# The store's own facts, each under the sealing key's MAC: "sealing" says which key seals the
# store since when, and where the records sealed before it end.
meta_table = sa.Table(
    "gpuspawner_audit_meta",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Any constant will do: every process sealing into this database takes the same lock.
_SEQ_LOCK_KEY = 0x67707573_61756469  # "gpusaudi"

class AuditStoreError(Exception):
    """The audit database refused an operation; the message says which record and why."""


class AuditStoreMissing(AuditStoreError):
    """There is no audit store (or no sealing key) where the configuration says."""


class AuditRecordSealed(AuditStoreError):
    """The record was sealed already: its final state is written and cannot change."""


class AuditStoreUnavailable(AuditStoreError):
    """The database could not do the write now: it did not answer in time, or refused it.

    The record itself is fine; the same call may succeed later. ``transient`` is False where
    the database gave an error that waiting alone will not cure (a full disk, a read-only file).
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class RetryPolicy:
    """How one database call tries again through transient errors.

    Up to ``tries`` tries, waiting ``first_delay`` seconds after the first failure, doubling up
    to ``max_delay``; no try starts later than ``budget`` seconds after the first one.
    """

    tries: int = 6
    first_delay: float = 0.05
    max_delay: float = 1.0
    budget: float = 10.0

    def delays(self) -> Iterator[float]:
        """The waits between tries, in order: one fewer than ``tries``."""
        delay = self.first_delay
        for _ in range(self.tries - 1):
            yield delay
            delay = min(delay * 2, self.max_delay)


ONE_TRY = RetryPolicy(tries=1)

# PostgreSQL SQLSTATEs a later try may not meet: serialization_failure, deadlock_detected,
# lock_not_available (our lock_timeout), admin_shutdown, crash_shutdown, cannot_connect_now,
# too_many_connections. Class 08 (connection exceptions) is transient as a whole.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"})
_TRANSIENT_SQLITE_MESSAGES = ("database is locked", "database is busy", "database table is locked")
# A unique violation on seq means another writer sealed first; sealing again takes the next one.
_SEQ_CONSTRAINT_MESSAGES = ("gpuspawner_audit.seq", "gpuspawner_audit_seq_key")


def is_transient(error: BaseException) -> bool:
    """True for a database error that a later try of the same transaction may not meet.

    The one place errors are sorted: locks and busy databases, serialization failures,
    deadlocks, lost or refused connections and a collision on ``seq`` are transient; anything
    else (a full disk, a missing table, a bad query, a duplicate record id) is fatal.
    """
    if isinstance(error, (sa.exc.TimeoutError, sa.exc.DisconnectionError)):
        return True  # no pooled connection came free in time; the database dropped us
    if not isinstance(error, sa.exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    orig = error.orig
    message = str(orig)
    if isinstance(error, sa.exc.IntegrityError):
        return any(name in message for name in _SEQ_CONSTRAINT_MESSAGES)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate:
        return sqlstate in _TRANSIENT_SQLSTATES or str(sqlstate).startswith("08")
    if isinstance(orig, sqlite3.Error):
        name = getattr(orig, "sqlite_errorname", "")
        return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or any(m in message for m in _TRANSIENT_SQLITE_MESSAGES)
    # A driver's OperationalError with no SQLSTATE is the connection failing (refused, reset).
    return isinstance(error, sa.exc.OperationalError)


def _reason(error: BaseException) -> str:
    orig = getattr(error, "orig", None) or error
    text = str(orig).strip().splitlines()
    return (text[0] if text else type(orig).__name__)[:300]


@dataclass(frozen=True)
class Filters:
    """Which records to export.

    ``since`` and ``until`` are ISO 8601 text in any zone (none: UTC), as :func:`gpuspawner.times.parse_time`
    reads it; they are compared as times. A value that is not a time raises :class:`gpuspawner.times.TimeError`.
    """

    since: str | None = None
    until: str | None = None
    user: str | None = None
    profile: str | None = None
    hub_id: str | None = None


def _row_to_record(row: Any) -> AuditRecord:
    data = json.loads(row.data)
    data.update(seq=row.seq, prev_hash=row.prev_hash, hash=row.hash)
    return audit.record_from_dict(data)


_FILTER_COLUMNS = ("id", "hub_id", "user", "server", "profile", "outcome", "requested_at")


def _columns_agree(row: Any) -> bool:
    data = json.loads(row.data)
    return all(data.get(name) == getattr(row, name) for name in _FILTER_COLUMNS)


def _columns(record: AuditRecord) -> dict[str, Any]:
    return {
        "id": record.id, "seq": record.seq, "hub_id": record.hub_id, "user": record.user,
        "server": record.server, "profile": record.profile, "outcome": record.outcome,
        "requested_at": record.requested_at, "data": audit.canonical_json(record.content()),
        "prev_hash": record.prev_hash, "hash": record.hash,
    }


# --- The sealing key and the chain head, kept outside the database -----------------------------


def load_key(path: str | os.PathLike[str], *, create: bool = False) -> bytes:
    """The hub's sealing key: 32 random bytes, as hex, in a file only its owner reads.

    ``create``: make it (mode 0600) if it is missing; the hub does on first start. Anyone else
    (``verify``) needs the hub's key and gets :class:`AuditStoreMissing` without it.
    """
    path = Path(path)
    if not path.exists():
        if not create:
            raise AuditStoreMissing(
                f"no audit sealing key at {path}: the hub creates it on first start "
                "(GPUSpawner.audit_key_file); verify needs the hub's key"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it a moment ago: use theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            log.info("Created the audit sealing key %s (mode 0600); back it up with the hub's other secrets", path)
    try:
        text = path.read_text().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError) as e:
        raise AuditStoreError(f"cannot read the audit sealing key {path}: {e}") from None
    if len(key) < 32:
        raise AuditStoreError(f"the audit sealing key {path} is not a gpuspawner key (64 hex digits expected)")
    if path.stat().st_mode & 0o077:
        log.warning("The audit sealing key %s can be read by others than its owner: chmod 600 it", path)
    return key


def read_head(path: str | os.PathLike[str]) -> audit.ChainHead | None:
    """The chain head kept in `path`, or None if there is none."""
    try:
        data = json.loads(Path(path).read_text())
        return audit.ChainHead(int(data["seq"]), str(data["hash"]), int(data.get("opened", 0)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AuditStoreError(f"cannot read the audit chain head {path}: {e}") from None


def advance_head(path: str | os.PathLike[str], head: audit.ChainHead) -> audit.ChainHead:
    """Move the head kept in `path` forward to `head` (never back), atomically, across processes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = read_head(path)
        newest = current.advanced(head) if current else head
        if newest == current:
            return newest
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps({"seq": newest.seq, "hash": newest.hash, "opened": newest.opened}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return newest


def _sqlite_setup(lock_wait_ms: int) -> Callable[[Any, Any], None]:
    def connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own BEGIN is deferred and sent late; we send BEGIN ourselves (see _sqlite_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: the CLI and the audit service read while the hub writes.
        cursor.execute("PRAGMA journal_mode=WAL")
        # Short, so a lock held longer is met by RetryPolicy's backoff, not one long wait.
        cursor.execute(f"PRAGMA busy_timeout={lock_wait_ms}")
        cursor.close()

    return connect


def _sqlite_begin(conn: sa.Connection) -> None:
    # Writers take the write lock at BEGIN: one that read first and wrote later would meet a
    # newer writer's commit as SQLITE_BUSY at once, without waiting, and sealing must read the
    # last seq under the same lock it writes the next one with.
    mode = "IMMEDIATE" if conn.get_execution_options().get("gpuspawner_write") else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")


class AuditStore:
    """Blocking access to the audit table. Create it once per process and share it.

    ``key``: the sealing key (:func:`load_key`); a store without one reads and exports but
    cannot write. ``head_file``: where the chain head is kept outside the database; every
    insert and seal moves it forward. ``create``: make the tables if they are missing (the
    hub); without it a missing store is :class:`AuditStoreMissing`, never a new empty one.
    A hub opening a store that has no sealing key yet (one written by gpuspawner 0.1) takes it
    over: it records the switch, numbers the records already there and seals from then on with
    the key, so the old records stay checkable and held fast by the new ones.

    ``retry`` says how each write tries again through transient errors; ``lock_wait`` is how
    long one try waits for another writer's lock (SQLite busy_timeout, PostgreSQL lock_timeout).
    """

    def __init__(
        self,
        url: str,
        *,
        key: bytes | None = None,
        head_file: str | os.PathLike[str] | None = None,
        create: bool = True,
        retry: RetryPolicy = RetryPolicy(),
        lock_wait: float = 2.0,
    ) -> None:
        self.url = url
        self.retry = retry
        self.key = key
        self.head_file = Path(head_file) if head_file else None
        parsed = sa.engine.make_url(url)
        backend = parsed.get_backend_name()
        if backend == "sqlite" and not create and parsed.database not in (None, "", ":memory:"):
            if not Path(parsed.database or "").exists():
                raise AuditStoreMissing(f"no audit store at {parsed.database}")
        options: dict[str, Any] = {}
        if backend == "postgresql":
            options = {"pool_pre_ping": True, "connect_args": {"options": f"-c lock_timeout={int(lock_wait * 1000)}"}}
        try:
            self.engine = sa.create_engine(url, **options)
        except ModuleNotFoundError as e:
            raise AuditStoreError(
                f"The audit database {url!r} needs the Python module {e.name!r}, which is not installed. "
                "For PostgreSQL install psycopg 3 (pip install 'psycopg[binary]') and use a "
                "postgresql+psycopg://… URL."
            ) from e
        if backend == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_setup(int(lock_wait * 1000)))
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        self._writer = self.engine.execution_options(gpuspawner_write=True)
        self._where = self.engine.url.render_as_string(hide_password=True)
        if create:
            self.transaction(self._create_or_upgrade, what="create the audit table")
        else:
            try:
                with self.engine.connect() as conn:
                    present = sa.inspect(conn).has_table(records_table.name)
            except sa.exc.DBAPIError as e:
                raise AuditStoreUnavailable(f"cannot read the audit database at {self._where}: {_reason(e)}", transient=is_transient(e)) from e
            if not present:
                raise AuditStoreMissing(f"no audit store at {self._where} (the database has no {records_table.name} table)")
        if key is not None:
            head = self.transaction(self._take_over, what="take over the audit store with the sealing key")
            if head is not None:
                self._write_head(head)

    @staticmethod
    def _create_or_upgrade(conn: sa.Connection) -> None:
        """The tables, and the opening-seal columns on a table made by gpuspawner 0.1."""
        columns = {c["name"] for c in sa.inspect(conn).get_columns(records_table.name)} if sa.inspect(conn).has_table(records_table.name) else None
        if columns is not None and "opened" not in columns:
            conn.exec_driver_sql(f"ALTER TABLE {records_table.name} ADD COLUMN opened INTEGER")
            conn.exec_driver_sql(f"ALTER TABLE {records_table.name} ADD COLUMN open_mac VARCHAR(64)")
        metadata.create_all(conn)

    def _take_over(self, conn: sa.Connection) -> audit.ChainHead | None:
        """Check the store is sealed with our key; a store sealed with none yet is taken over."""
        assert self.key is not None
        start = self._sealing_start(conn)
        if start is not None:
            if not start.valid_for(self.key):
                raise AuditStoreError(
                    f"The audit store at {self._where} is sealed with another key ({start.key_id}) than "
                    f"this hub's ({audit.key_id(self.key)}): GPUSpawner.audit_key_file must name the key "
                    "the store was sealed with. The hub writes no records until it does."
                )
            return None
        self._lock_sequence(conn)
        t = records_table
        last = conn.execute(sa.select(t.c.seq, t.c.hash).where(t.c.seq.is_not(None)).order_by(t.c.seq.desc()).limit(1)).first()
        opened = conn.execute(sa.select(sa.func.max(t.c.opened))).scalar() or 0
        unnumbered = conn.execute(
            sa.select(t.c.id, t.c.hub_id, t.c.user, t.c.server, t.c.requested_at)
            .where(t.c.opened.is_(None)).order_by(t.c.requested_at, t.c.id)
        ).all()
        for row in unnumbered:
            opened += 1
            conn.execute(t.update().where(t.c.id == row.id).values(
                opened=opened, open_mac=audit.opening_digest(key=self.key, opened=opened, opening=audit.opening_json(dict(row._mapping))),
            ))
        start = audit.SealingStart(
            key_id=audit.key_id(self.key), introduced_at=seams.now_iso(),
            legacy_sealed=last.seq if last else 0, legacy_head=last.hash if last else audit.GENESIS,
            opened_before=len(unnumbered),
        ).signed(self.key)
        conn.execute(meta_table.insert().values(name="sealing", value=start.to_json()))
        if last or unnumbered:
            log.warning(
                "Audit store %s taken over with sealing key %s: %d sealed record(s) before it stay checkable as "
                "plain SHA-256, %d record(s) numbered", self._where, start.key_id, start.legacy_sealed, len(unnumbered),
            )
        return audit.ChainHead(start.legacy_sealed, start.legacy_head, opened)

    def _sealing_start(self, conn: sa.Connection) -> audit.SealingStart | None:
        value = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.name == "sealing")).scalar()
        if value is None:
            return None
        try:
            return audit.SealingStart.from_json(value)
        except (ValueError, KeyError, TypeError):
            return audit.SealingStart(key_id="unreadable", introduced_at="")

    def _write_head(self, head: audit.ChainHead) -> None:
        if self.head_file is not None:
            try:
                advance_head(self.head_file, head)
            except OSError as e:
                log.error("Could not move the audit chain head %s forward to %s: %s", self.head_file, head.text(), e)

    def _require_key(self) -> bytes:
        if self.key is None:
            raise AuditStoreError("this audit store was opened without the sealing key, so it cannot write records")
        return self.key

    def transaction(self, work: Callable[[sa.Connection], T], *, what: str, policy: RetryPolicy | None = None) -> T:
        """Run ``work`` in one write transaction, again from the start after a transient error.

        Raises :class:`AuditStoreUnavailable` when the tries run out or the error is fatal
        (``what`` completes its message: "… while trying to <what>"); errors ``work`` raises
        itself, such as :class:`AuditStoreError`, pass through untouched.
        """
        policy = policy or self.retry
        started = time.monotonic()
        delays = policy.delays()
        tries = 0
        while True:
            tries += 1
            try:
                with self._writer.begin() as conn:
                    return work(conn)
            except (sa.exc.DBAPIError, sa.exc.TimeoutError, sa.exc.DisconnectionError) as e:
                elapsed = time.monotonic() - started
                if not is_transient(e):
                    raise AuditStoreUnavailable(
                        f"The audit database at {self._where} refused to {what}: {_reason(e)}.", transient=False
                    ) from e
                delay = next(delays, None)
                if delay is None or elapsed + delay > policy.budget:
                    raise AuditStoreUnavailable(
                        f"The audit database at {self._where} did not answer while trying to {what}: "
                        f"{_reason(e)} ({tries} {'try' if tries == 1 else 'tries'} in {elapsed:.1f} s). "
                        "Another program may hold it locked, or the database server may be down.",
                        transient=True,
                    ) from e
                log.debug("Audit database busy while trying to %s (%s); trying again in %.2f s", what, _reason(e), delay)
                time.sleep(delay)

    def insert(self, record: AuditRecord) -> None:
        """Write a new, open record with its opening seal (the next opening number)."""
        key = self._require_key()

        def work(conn: sa.Connection) -> int:
            self._lock_sequence(conn)
            opened = (conn.execute(sa.select(sa.func.max(records_table.c.opened))).scalar() or 0) + 1
            columns = _columns(record)
            mac = audit.opening_digest(key=key, opened=opened, opening=audit.opening_json(columns))
            conn.execute(records_table.insert().values(**columns, opened=opened, open_mac=mac))
            return opened

        opened = self.transaction(work, what=f"write audit record {record.id}")
        self._write_head(audit.ChainHead(opened=opened))

    def insert_many(self, records: Iterable[AuditRecord], *, batch: int = 10_000) -> int:
        """Write many new records as :meth:`insert` writes each (the next opening numbers, in order),
        `batch` to a transaction: for imports and benchmarks, where one transaction a record is slow.

        `records` is read a batch at a time, so any number take constant memory. A batch is written
        whole or not at all; the head kept outside the database moves forward after each. Returns
        how many records were written.
        """
        key = self._require_key()
        written = 0
        it = iter(records)
        while chunk := list(itertools.islice(it, batch)):

            def work(conn: sa.Connection, chunk: list[AuditRecord] = chunk) -> int:
                self._lock_sequence(conn)
                opened = conn.execute(sa.select(sa.func.max(records_table.c.opened))).scalar() or 0
                rows = []
                for record in chunk:
                    opened += 1
                    columns = _columns(record)
                    mac = audit.opening_digest(key=key, opened=opened, opening=audit.opening_json(columns))
                    rows.append({**columns, "opened": opened, "open_mac": mac})
                conn.execute(records_table.insert(), rows)
                return opened

            opened = self.transaction(work, what=f"write {len(chunk)} audit records from {chunk[0].id}")
            self._write_head(audit.ChainHead(opened=opened))
            written += len(chunk)
        return written

    def get(self, record_id: str) -> AuditRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(records_table).where(records_table.c.id == record_id)).first()
        return _row_to_record(row) if row else None

    def update(self, record_id: str, **changes: Any) -> AuditRecord:
        """Change an open record; a sealed one is refused (:class:`AuditRecordSealed`)."""

        def work(conn: sa.Connection) -> AuditRecord:
            updated = replace(self._open_record(conn, record_id), **changes)
            self._write_open(conn, updated)
            return updated

        return self.transaction(work, what=f"update audit record {record_id}")

    def finish(self, record_id: str, **changes: Any) -> AuditRecord:
        """Give an open record its final state (``outcome`` in changes) and seal it.

        Concurrent sealers, in threads or in other processes, take turns: each record gets
        the next sequence number exactly once.
        """
        return self.finish_with(record_id, changes, policy=self.retry)

    def finish_with(self, record_id: str, changes: dict[str, Any], *, policy: RetryPolicy) -> AuditRecord:
        """:meth:`finish` with its own retry policy (the background retries try once each time)."""

        def work(conn: sa.Connection) -> AuditRecord:
            self._lock_sequence(conn)
            record = replace(self._open_record(conn, record_id), **changes)
            last = conn.execute(
                sa.select(records_table.c.seq, records_table.c.hash)
                .where(records_table.c.seq.is_not(None))
                .order_by(records_table.c.seq.desc())
                .limit(1)
            ).first()
            sealed = audit.seal(
                record, seq=(last.seq + 1) if last else 1, prev_hash=last.hash if last else audit.GENESIS, key=key
            )
            self._write_open(conn, sealed)
            return sealed

        key = self._require_key()
        sealed = self.transaction(work, what=f"seal audit record {record_id}", policy=policy)
        assert sealed.seq is not None and sealed.hash is not None
        self._write_head(audit.ChainHead(sealed.seq, sealed.hash))
        return sealed

    def _lock_sequence(self, conn: sa.Connection) -> None:
        # SQLite: BEGIN IMMEDIATE took the database's write lock already. PostgreSQL: readers
        # go on; sealers queue here until the one before them commits, then read its seq.
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SEQ_LOCK_KEY)))

    def _write_open(self, conn: sa.Connection, record: AuditRecord) -> None:
        # "still unsealed" in the WHERE: a writer that read the record before a concurrent seal
        # committed must not write the unsealed copy back over it.
        t = records_table
        result = conn.execute(t.update().where(t.c.id == record.id, t.c.hash.is_(None)).values(**_columns(record)))
        if result.rowcount != 1:
            raise AuditRecordSealed(f"audit record {record.id} is sealed and cannot change")

    def _open_record(self, conn: sa.Connection, record_id: str) -> AuditRecord:
        row = conn.execute(sa.select(records_table).where(records_table.c.id == record_id)).first()
        if row is None:
            raise AuditStoreError(f"no audit record {record_id}")
        record = _row_to_record(row)
        if record.sealed:
            raise AuditRecordSealed(f"audit record {record_id} is sealed and cannot change")
        return record

    def open_records(self, hub_id: str) -> list[AuditRecord]:
        """This hub's records not yet sealed."""
        query = sa.select(records_table).where(records_table.c.hub_id == hub_id, records_table.c.hash.is_(None))
        with self.engine.connect() as conn:
            return [_row_to_record(row) for row in conn.execute(query)]

    def iter_records(self, filters: Filters = Filters(), *, batch: int = 1000) -> Iterator[AuditRecord]:
        """Records in the order they were requested, streamed in batches (constant memory)."""
        t = records_table
        conditions = []
        if filters.since:
            conditions.append(t.c.requested_at >= stored_time(filters.since, where="since"))
        if filters.until:
            conditions.append(t.c.requested_at < stored_time(filters.until, where="until"))
        if filters.user:
            conditions.append(t.c.user == filters.user)
        if filters.profile:
            conditions.append(t.c.profile == filters.profile)
        if filters.hub_id:
            conditions.append(t.c.hub_id == filters.hub_id)
        # Keyset pagination: each batch is one short query, so no cursor stays open while the
        # caller writes out rows, and the hub's writes are never held up by an export.
        after: tuple[str, str] | None = None
        while True:
            query = sa.select(t).where(*conditions).order_by(t.c.requested_at, t.c.id).limit(batch)
            if after is not None:
                query = query.where(sa.tuple_(t.c.requested_at, t.c.id) > after)
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            for row in rows:
                yield _row_to_record(row)
            if len(rows) < batch:
                return
            after = (rows[-1].requested_at, rows[-1].id)

    def iter_sealed(self, *, batch: int = 5000) -> Iterator[audit.SealedEntry]:
        """Sealed records in sequence order, as stored, streamed.

        A record whose filter columns (user, hub, server, profile, outcome, time) disagree with
        its sealed content is given a content that cannot match its seal, so verify names it.
        """
        t = records_table
        after = 0
        while True:
            query = sa.select(t).where(t.c.seq > after).order_by(t.c.seq).limit(batch)
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            for row in rows:
                content = row.data if _columns_agree(row) else "columns changed: " + row.data
                yield audit.SealedEntry(row.id, row.seq, row.prev_hash, row.hash, content)
            if len(rows) < batch:
                return
            after = rows[-1].seq

    def iter_opened(self, *, batch: int = 5000) -> Iterator[audit.OpenedEntry]:
        """Every record in opening order, then those without an opening number, streamed."""
        t = records_table
        columns = (t.c.id, t.c.opened, t.c.open_mac, t.c.seq, t.c.hash, *(t.c[name] for name in _FILTER_COLUMNS[1:]), t.c.data)

        def entry(row: Any) -> audit.OpenedEntry:
            opening = audit.opening_json(dict(row._mapping))
            if not _columns_agree(row):  # the filter columns were changed: cannot match its seal
                opening = "columns changed: " + opening
            return audit.OpenedEntry(row.id, row.opened, row.open_mac, opening, row.seq, row.hash)

        after = 0
        while True:
            query = sa.select(*columns).where(t.c.opened > after).order_by(t.c.opened).limit(batch)
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            yield from (entry(row) for row in rows)
            if len(rows) < batch:
                break
            after = rows[-1].opened
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(*columns).where(t.c.opened.is_(None)).order_by(t.c.id)).all()
        yield from (entry(row) for row in rows)

    def verify(self, *, key: bytes | None = None, expected_head: tuple[int, str] | None = None) -> Verification:
        """Check every record against `key` (the store's own by default), the head kept outside
        the database (where the store has a head file) and `expected_head`."""
        key = key or self._require_key()
        with self.engine.connect() as conn:
            start = self._sealing_start(conn)
        head = read_head(self.head_file) if self.head_file else None
        return audit.verify_store(
            key=key, start=start, sealed=self.iter_sealed(), opened=self.iter_opened(),
            head_file=head, head_file_name=str(self.head_file or ""), expected_head=expected_head,
            head_required=self.head_file is not None,
        )

    def dispose(self) -> None:
        self.engine.dispose()


class AsyncAuditStore:
    """The store for the hub's event loop: every call runs in one thread of its own, in order.

    A final write the database cannot take now is kept (:meth:`finish_eventually`) and tried
    again in the background, every ``retry_later[0]`` seconds at first, backing off to
    ``retry_later[1]``, until it lands or the record turns out to be sealed already. Changes
    from updates that failed the same way are folded into the record's next update or seal.
    """

    def __init__(
        self,
        url: str,
        *,
        key_file: str | os.PathLike[str] | None = None,
        head_file: str | os.PathLike[str] | None = None,
        retry: RetryPolicy = RetryPolicy(),
        lock_wait: float = 2.0,
        retry_later: tuple[float, float] = (5.0, 60.0),
    ) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gpuspawner-audit")
        self._store: AuditStore | None = None
        self.url = url
        self.key_file = key_file
        self.head_file = head_file
        self._retry = retry
        self._lock_wait = lock_wait
        self._retry_later = retry_later
        self._pending: dict[str, dict[str, Any]] = {}  # final changes not yet written; event loop only
        self._unsaved: dict[str, dict[str, Any]] = {}  # changes of failed updates; audit thread only
        self._tasks: set[asyncio.Task[None]] = set()

    def _sync(self) -> AuditStore:
        if self._store is None:
            key = load_key(self.key_file, create=True) if self.key_file else None
            self._store = AuditStore(self.url, key=key, head_file=self.head_file, retry=self._retry, lock_wait=self._lock_wait)
        return self._store

    def submit(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Queue a call now and return its future. Calls run one at a time, in the order submitted."""

        def run() -> T:
            return method(self._sync(), *args, **kwargs)

        return asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.submit(method, *args, **kwargs)

    def _with_unsaved(self, record_id: str, changes: dict[str, Any], write: Callable[[dict[str, Any]], T]) -> T:
        # Runs in the audit thread: what earlier failed updates left is written first, in order.
        merged = {**self._unsaved.pop(record_id, {}), **changes}
        try:
            return write(merged)
        except AuditStoreUnavailable:
            self._unsaved[record_id] = merged
            raise

    def update_soon(self, record_id: str, **changes: Any) -> asyncio.Future[AuditRecord]:
        """Queue an update without waiting for it; anything submitted later sees it done.

        Transient errors are retried (:class:`RetryPolicy`); an update that still fails raises
        :class:`AuditStoreUnavailable` from the future, and its changes go with the record's
        next update or seal.
        """
        return self.submit(
            lambda store: self._with_unsaved(record_id, changes, lambda merged: store.update(record_id, **merged))
        )

    async def insert(self, record: AuditRecord) -> None:
        await self.call(AuditStore.insert, record)

    async def update(self, record_id: str, **changes: Any) -> AuditRecord:
        return await self.update_soon(record_id, **changes)

    async def finish(self, record_id: str, **changes: Any) -> AuditRecord:
        """Seal the record now; raises :class:`AuditStoreUnavailable` if the database cannot."""
        return await self.call(
            lambda store: self._with_unsaved(record_id, changes, lambda merged: store.finish(record_id, **merged))
        )

    async def finish_eventually(self, record_id: str, **changes: Any) -> AuditRecord | None:
        """Seal the record now if the database lets us, or keep the change and seal it later.

        Returns the sealed record, or None where the write was queued (one warning is logged;
        :meth:`pending_finishes` counts them). Never raises for the database being busy, locked,
        down or refusing the write. Raises :class:`AuditRecordSealed` if the record was sealed
        already and :class:`AuditStoreError` if there is no such record.
        """
        if record_id in self._pending:  # an earlier final write waits: this one joins it
            self._pending[record_id].update(changes)
            return None
        try:
            return await self.finish(record_id, **changes)
        except AuditStoreUnavailable as e:
            self._pending[record_id] = dict(changes)
            log.warning("Audit record %s not sealed yet; retrying in the background: %s", record_id, e)
            self._retry_in_background()
            return None

    def pending_finishes(self) -> int:
        """How many final writes wait for the database."""
        return len(self._pending)

    async def flush_pending(self, timeout: float) -> int:
        """Try the waiting final writes now (each with the usual retries); returns how many still wait."""
        try:
            await asyncio.wait_for(self._try_pending(self._retry), timeout)
        except asyncio.TimeoutError:
            pass
        return len(self._pending)

    async def _try_pending(self, policy: RetryPolicy) -> None:
        for record_id, changes in list(self._pending.items()):
            try:
                await self.call(self._finish_queued, record_id, changes, policy)
            except AuditStoreUnavailable:
                return  # still down: the rest would only wait as long
            except AuditStoreError as e:  # sealed meanwhile (another process), or gone
                log.warning("Audit record %s: queued final write dropped: %s", record_id, e)
            else:
                log.info("Audit record %s sealed after waiting for the database", record_id)
            if self._pending.get(record_id) is changes:
                del self._pending[record_id]

    def _finish_queued(self, store: AuditStore, record_id: str, changes: dict[str, Any], policy: RetryPolicy) -> AuditRecord:
        # Runs in the audit thread: a queued final write, tried under `policy`.
        return self._with_unsaved(record_id, changes, lambda merged: store.finish_with(record_id, merged, policy=policy))

    def _retry_in_background(self) -> None:
        if not any(not task.done() for task in self._tasks):
            task = asyncio.get_running_loop().create_task(self._retry_loop(), name="gpuspawner-audit-retry")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _retry_loop(self) -> None:
        delay, longest = self._retry_later
        while self._pending:
            await asyncio.sleep(delay)
            try:
                await self._try_pending(ONE_TRY)
            except Exception:  # a bug here must not end the retries silently
                log.exception("Retrying the queued audit writes failed")
            delay = min(delay * 2, longest)

    async def open_records(self, hub_id: str) -> list[AuditRecord]:
        return await self.call(AuditStore.open_records, hub_id)

    async def get(self, record_id: str) -> AuditRecord | None:
        return await self.call(AuditStore.get, record_id)

    async def close(self) -> None:
        """Stop the background retries and release the database; final writes still queued stay unwritten."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pending:
            log.warning(
                "%d audit record(s) could not be sealed before the store closed: %s",
                len(self._pending), ", ".join(sorted(self._pending)),
            )
        if self._store is not None:
            await self.call(AuditStore.dispose)
        self._executor.shutdown(wait=False)


def default_audit_url(hub_db_url: str, *, cwd: str) -> str:
    """An SQLite file beside the hub's own SQLite database; in the hub's folder otherwise.

    A relative SQLite path is taken from `cwd`, as the hub takes it. An in-memory SQLite
    database, or another backend (``postgresql://…``), puts the file in `cwd`.
    """
    hub = sa.engine.make_url(hub_db_url)
    path = hub.database if hub.get_backend_name() == "sqlite" else None
    folder = os.path.dirname(os.path.join(cwd, path)) if path and path != ":memory:" else cwd
    # Not URL.render_as_string(): it would %-escape the path, and hubconfig.data_folder reads it back by slicing.
    return "sqlite:///" + os.path.join(folder, "gpuspawner-audit.sqlite")
