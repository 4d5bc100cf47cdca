"""The one path to the audit database: SQLAlchemy, SQLite by default, any SQLAlchemy URL.

The store is an append-only log (:mod:`gpuspawner.auditlog`), one table,
``gpuspawner_audit_log``: each row one entry, numbered, sealed with the hub's key over all its
columns and the entry before it when it is written, and never changed after. The hub appends
an entry when a spawn begins, as the server moves on and when it ends; a record is read back by
folding its entries, taking only those whose seals hold.

Before every append the hub checks that the log still ends where it left it: the newest
entry must still be the one the head kept outside the database (the head file) and the hub
itself last saw name. A log that is behind that head was rolled back or rewritten, and the hub
refuses to write (:class:`AuditLogRefused`) rather than number new entries over the gap. The
head file moves forward after every commit, never back.

Every write goes through :meth:`AuditStore.transaction`: a database that is busy, locked or
briefly gone (SQLite "database is locked", PostgreSQL serialization failures, deadlocks, lost
connections) is tried again with backoff; what :func:`is_transient` calls fatal is not. Either
way the caller gets a domain error, :class:`AuditStoreUnavailable`, never a driver's exception.
Appending takes the write lock before it reads the newest entry (SQLite ``BEGIN IMMEDIATE``, a
PostgreSQL transaction-level advisory lock), so writers in several threads or processes take
turns and the numbers have no gaps and no duplicates.

A store written by a gpuspawner that sealed whole records (the ``gpuspawner_audit`` table) is
carried over once, when the hub first opens it or by ``gpuspawner audit adopt``: its records are
checked with its own seals, copied into the log as "adopted" entries after a genesis entry that
says what was carried, and the old tables dropped, in one transaction.

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
import hmac
import itertools
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from . import audit, auditlog, seams
from .audit import FINAL_OUTCOMES, AuditRecord
from .auditlog import Entry, Head, Verification, Witness
from .times import stored_time
from .usage import Held

T = TypeVar("T")

log = logging.getLogger(__name__)

metadata = sa.MetaData()
LOG_TABLE = "gpuspawner_audit_log"
log_table = sa.Table(
    LOG_TABLE,
    metadata,
    # In SQLite an INTEGER PRIMARY KEY holds whole numbers only: a number written as text is refused.
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("prev", sa.String(64), nullable=False),
    sa.Column("mac", sa.String(64), nullable=False),
    sa.Column("record_id", sa.String(64), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("body_sha256", sa.String(64), nullable=False),
    sa.Column("hub_id", sa.String(255), nullable=True),
    sa.Column("user", sa.String(255), nullable=True),
    sa.Column("server", sa.String(255), nullable=True),
    sa.Column("profile", sa.String(255), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=True),
    sa.Column("requested_at", sa.String(40), nullable=True),
    sa.Column("started", sa.Float, nullable=True),
    sa.Column("stopped", sa.Float, nullable=True),
    sa.Column("gpus", sa.Float, nullable=True),
    sa.Column("device_count", sa.Integer, nullable=True),
    sa.Column("idle", sa.Float, nullable=True),
    sa.Column("models", sa.Text, nullable=True),
    sa.Column("groups", sa.Text, nullable=True),
    sa.Column("usage_mac", sa.String(64), nullable=True),
    # records in request order, opening and closing entries apart (exports, the hub's open records)
    sa.Index("ix_gpuspawner_audit_log_kind_requested", "kind", "requested_at", "record_id"),
)
# An end the hub wrote has a usage seal: this (empty) index finds any that has none at once.
sa.Index("ix_gpuspawner_audit_log_unsealed_ends", log_table.c.n,
         sqlite_where=sa.and_(log_table.c.kind == "ended", log_table.c.usage_mac.is_(None)),
         postgresql_where=sa.and_(log_table.c.kind == "ended", log_table.c.usage_mac.is_(None)))
# Usage reads the closing entries' columns from this index alone, never the entries' bodies.
sa.Index(
    "ix_gpuspawner_audit_log_usage", *(log_table.c[name] for name in ("requested_at", *auditlog.USAGE_COLUMNS, "usage_mac")),
    sqlite_where=log_table.c.usage_mac.is_not(None), postgresql_where=log_table.c.usage_mac.is_not(None),
)
OPENING_KINDS = ("opened", "adopted")
CLOSING_KINDS = ("ended", "adopted")

# The tables of the earlier format, read once when a store is carried over, then dropped.
LEGACY_TABLE, LEGACY_META_TABLE = "gpuspawner_audit", "gpuspawner_audit_meta"

# Any constant will do: every process appending to this database takes the same lock.
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
# A unique violation on the entry number means another writer appended first; trying again takes the next one.
_SEQ_CONSTRAINT_MESSAGES = ("gpuspawner_audit_log.n", "gpuspawner_audit_log_pkey")


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


class AuditLogRefused(AuditStoreError):
    """The hub will not write to this log: it was rolled back or rewritten behind the hub's back, or
    the head kept outside it cannot be read. Nothing is written until an admin has looked."""


# --- The sealing key --------------------------------------------------------------------------


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


# --- The head kept outside the database ----------------------------------------------------------


def read_head(path: str | os.PathLike[str]) -> Head | None:
    """The head kept in `path`, or None if there is no such file. :class:`AuditStoreError`, saying
    what is wrong, for a file that is not a head of this log's format."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AuditStoreError(f"cannot read the audit log's head {path}: {e.strerror or e}") from None
    try:
        return Head.from_json(text)
    except ValueError as e:
        raise AuditStoreError(f"the audit log's head {path} is unreadable: {e}") from None


def read_legacy_head(path: str | os.PathLike[str]) -> audit.ChainHead | None:
    """The chain head an earlier gpuspawner kept in `path` (``{"seq", "hash", "opened"}``), if that is what it holds."""
    try:
        data = json.loads(Path(path).read_text())
        return audit.ChainHead(int(data["seq"]), str(data["hash"]), int(data.get("opened", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_head(path: str | os.PathLike[str], head: Head, *, forward_only: bool = True) -> Head:
    """Keep `head` in `path`, atomically and across processes; with `forward_only`, never a head
    older than the one there (writers in several processes finish in any order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = read_head(path) if forward_only else None
        if current is not None and current.n >= head.n:
            return current
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(head.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return head


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


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _entry(row: Any) -> Entry:
    return Entry(**{name: getattr(row, name) for name in auditlog.COLUMNS})


def _values(entry: Entry) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in auditlog.COLUMNS}


@dataclass(frozen=True)
class UsageRead:
    """What a usage read left out: closing entries whose seals do not hold or whose numbers are
    outside the log (counted, never added up)."""

    rejected: int = 0


@dataclass(frozen=True)
class UsagePart:
    """A part of the log a usage read takes (:meth:`AuditStore.usage_parts`): the rows numbered above
    `after` up to `upto`; None is no bound. The first part (no `after`) also takes rows without a number
    and the servers still running; the last (no `upto`) also rows whose number is no number at all (text
    sorts after numbers). The default is the whole log."""

    after: int | None = None
    upto: int | None = None

    def conditions(self, n: sa.ColumnElement[Any]) -> list[sa.ColumnElement[bool]]:
        found: list[sa.ColumnElement[bool]] = []
        if self.upto is not None:
            found.append(n <= self.upto if self.after is not None else sa.or_(n <= self.upto, n.is_(None)))
        if self.after is not None:
            found.append(n > self.after)
        return found


class AuditStore:
    """Blocking access to the audit log. Create it once per process and share it.

    ``key``: the sealing key (:func:`load_key`); a store without one reads, exports and marks
    rows outside the log's numbering, but cannot write or check seals. ``head_file``: where the
    head is kept outside the database; every append moves it forward. ``create`` (with a key:
    the hub): make the log if it is missing, carrying over a store of the earlier format;
    otherwise a missing store is :class:`AuditStoreMissing`, never a new empty one.

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
        accept_adoption_problems: bool = False,
    ) -> None:
        self.url = url
        self.retry = retry
        self.key = key
        self.head_file = Path(head_file) if head_file else None
        self._known = Head()  # the newest entry this process wrote or checked
        self.refusal: str | None = None  # why the hub last refused to write, until a write succeeds
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
        if create and key is not None:
            head = self.transaction(lambda conn: self._create_or_adopt(conn, accept_problems=accept_adoption_problems),
                                    what="create the audit log")
            if head is not None:
                self._known = head
                self._keep_head(head)
        else:
            tables = self.tables()
            if LOG_TABLE not in tables:
                detail = (f"; it holds a store of an earlier gpuspawner ({LEGACY_TABLE}), which the hub carries over when "
                          "it starts (or `gpuspawner audit adopt`)") if LEGACY_TABLE in tables else ""
                raise AuditStoreMissing(f"no audit store at {self._where} (the database has no {LOG_TABLE} table{detail})")

    def tables(self) -> list[str]:
        """The database's tables whose names say they are gpuspawner's audit tables."""
        try:
            with self.engine.connect() as conn:
                names = sa.inspect(conn).get_table_names()
        except sa.exc.DBAPIError as e:
            raise AuditStoreUnavailable(f"cannot read the audit database at {self._where}: {_reason(e)}", transient=is_transient(e)) from e
        return sorted(n for n in names if n.startswith(LEGACY_TABLE))

    # --- Creating the log, or carrying over a store of the earlier format ---------------------

    def _create_or_adopt(self, conn: sa.Connection, *, accept_problems: bool) -> Head | None:
        """Make the log (with its genesis entry) unless it is there; a store of the earlier format is carried over."""
        key = self._require_key()
        self._lock_sequence(conn)
        if sa.inspect(conn).has_table(LOG_TABLE):
            self._check_genesis(conn)
            return None
        kept = self._head_from_file()
        if kept is not None and kept.n > 0:
            raise AuditLogRefused(
                f"The audit store at {self._where} has no log, but the head kept outside it ({self.head_file}) says it "
                f"held {kept.n} entries: the log was deleted. The hub writes no records, and so starts no servers, until "
                "an admin restores the store from a backup (or, knowingly starting a new log, moves the head file aside)."
            )
        at = seams.now_iso()
        adopted: dict[str, Any] | None = None
        entries: list[Entry] = []
        if sa.inspect(conn).has_table(LEGACY_TABLE):
            adopted, entries = self._carry_over(conn, at=at, accept_problems=accept_problems)
        metadata.create_all(conn, tables=[log_table])
        sealed = auditlog.chain([auditlog.genesis(key=key, at=at, adopted=adopted), *entries], after=Head(), key=key)
        for chunk in _batched(sealed, 5000):
            conn.execute(log_table.insert(), [_values(e) for e in chunk])
        if adopted is not None:
            conn.exec_driver_sql(f"DROP TABLE {LEGACY_TABLE}")
            if sa.inspect(conn).has_table(LEGACY_META_TABLE):
                conn.exec_driver_sql(f"DROP TABLE {LEGACY_META_TABLE}")
            log.warning(
                "Audit store %s carried over to the append-only log: %d records (%d final) copied as entries #2-#%d, "
                "checked with their earlier seals: %s", self._where, adopted["records"], adopted["final"], len(sealed),
                "OK" if adopted["verified"] else "; ".join(adopted["problems"]),
            )
        return Head(sealed[-1].n, sealed[-1].mac)

    def _check_genesis(self, conn: sa.Connection) -> None:
        """Refuse a log that was not started with this hub's key (or whose first entry is gone)."""
        key = self._require_key()
        row = conn.execute(sa.select(log_table).where(log_table.c.n == 1)).first()
        if row is None or row.kind != "genesis":
            raise AuditLogRefused(f"The audit log at {self._where} has no genesis entry (#1): its first rows were deleted. {_NO_WRITES}")
        entry = _entry(row)
        named = json.loads(entry.body).get("key_id") if entry.body_matches else None
        if named != audit.key_id(key):
            raise AuditStoreError(
                f"The audit log at {self._where} is sealed with another key ({named}) than this hub's "
                f"({audit.key_id(key)}): GPUSpawner.audit_key_file must name the key the log was started with. "
                "The hub writes no records until it does."
            )
        if not auditlog.seal_holds(key, entry):
            raise AuditLogRefused(f"The audit log at {self._where} has a genesis entry whose seal does not hold. {_NO_WRITES}")

    def _carry_over(self, conn: sa.Connection, *, at: str, accept_problems: bool) -> tuple[dict[str, Any], list[Entry]]:
        """The earlier store's records as "adopted" entries, after checking them with their own seals."""
        key = self._require_key()
        legacy = sa.Table(LEGACY_TABLE, sa.MetaData(), autoload_with=conn)
        columns = set(legacy.c.keys())
        rows = conn.execute(sa.select(legacy)).all()
        verdict = self._verify_legacy(conn, legacy, rows)
        if not verdict.ok and not accept_problems:
            raise AuditLogRefused(
                f"The audit store at {self._where} is of an earlier format and fails its own checks, so the hub does not "
                f"carry it over: {verdict.first_problem}. Check it with a backup; `gpuspawner audit adopt "
                "--accept-problems` carries it over with the problems written into the new log."
            )

        def order(row: Any) -> tuple[Any, ...]:
            opened = row.opened if "opened" in columns else None
            return (opened is None, opened if isinstance(opened, int) else 0, str(row.requested_at), str(row.id))

        entries = []
        for row in sorted(rows, key=order):
            data = json.loads(row.data)
            record = audit.record_from_dict(data)
            body_record = replace(record, seq=None, prev_hash=None, hash=None)
            entry = auditlog.closing(body_record, at=at, kind="adopted")
            body = json.loads(entry.body)
            body["legacy_seal"] = {
                "seq": row.seq, "prev_hash": row.prev_hash, "hash": row.hash,
                "opened": row.opened if "opened" in columns else None, "open_mac": row.open_mac if "open_mac" in columns else None,
            }
            entries.append(replace(entry, body=audit.canonical_json(body)).with_body_digest())
        adopted = {
            "records": len(rows), "final": sum(1 for r in rows if r.outcome in FINAL_OUTCOMES),
            "legacy_head": verdict.head.text() if verdict.head else None, "verified": verdict.ok,
            "problems": list(verdict.problems[:5]), "key_id": audit.key_id(key),
        }
        return adopted, entries

    def _verify_legacy(self, conn: sa.Connection, legacy: sa.Table, rows: Sequence[Any]) -> audit.Verification:
        key = self._require_key()
        columns = set(legacy.c.keys())
        sealed = sorted((r for r in rows if r.seq is not None), key=lambda r: int(r.seq))
        start = None
        if sa.inspect(conn).has_table(LEGACY_META_TABLE):
            value = conn.execute(sa.text(f"SELECT value FROM {LEGACY_META_TABLE} WHERE name = 'sealing'")).scalar()
            start = audit.SealingStart.from_json(value) if value else None
        elif "opened" not in columns:  # gpuspawner 0.1: plain SHA-256 seals, no key, no opening numbers
            last = sealed[-1] if sealed else None
            start = audit.SealingStart(
                key_id=audit.key_id(key), introduced_at="", legacy_sealed=int(last.seq) if last else 0,
                legacy_head=last.hash if last else audit.GENESIS,
            ).signed(key)
        opened = sorted((r for r in rows if "opened" in columns and r.opened is not None), key=lambda r: int(r.opened))
        head = read_legacy_head(self.head_file) if self.head_file else None
        return audit.verify_store(
            key=key, start=start,
            sealed=[audit.SealedEntry(r.id, r.seq, r.prev_hash, r.hash, r.data) for r in sealed],
            opened=[audit.OpenedEntry(r.id, r.opened, r.open_mac, audit.opening_json(dict(r._mapping)), r.seq, r.hash) for r in opened],
            head_file=head, head_required=False,
        )

    # --- Appending ----------------------------------------------------------------------------

    def _head_from_file(self) -> Head | None:
        if self.head_file is None:
            return None
        if read_legacy_head(self.head_file) is not None:
            return None  # the earlier format's head: checked when its store is carried over
        try:
            return read_head(self.head_file)
        except AuditStoreError as e:
            raise AuditLogRefused(
                f"{e}. The hub writes no records, and so starts no servers, until an admin checks the log "
                "(`gpuspawner audit verify --witness` with a head kept elsewhere) and moves the broken file aside."
            ) from None

    def _newest(self, conn: sa.Connection) -> Head:
        """The log's newest entry, refusing a log that no longer holds what this hub last saw or what its head file names."""
        row = conn.execute(sa.select(log_table.c.n, log_table.c.mac).order_by(log_table.c.n.desc()).limit(1)).first()
        if row is None:
            raise AuditLogRefused(f"The audit log at {self._where} is empty: its genesis entry was deleted. {_NO_WRITES}")
        if not auditlog.is_number(row.n):
            raise AuditLogRefused(
                f"The audit log at {self._where} has a row numbered {row.n!r:.40} at its end, outside the log's numbering: "
                f"someone wrote to the database. {_NO_WRITES}"
            )
        newest = Head(row.n, row.mac)
        for head, where in ((self._head_from_file(), f"the head kept outside it ({self.head_file})"), (self._known, "this hub")):
            if head is None or head.n == 0:
                continue
            if head.n > newest.n:
                raise AuditLogRefused(
                    f"The audit log at {self._where} ends at entry #{newest.n}, but {where} has seen #{head.n}: the store "
                    f"was rolled back or replaced. {_NO_WRITES}"
                )
            mac = newest.mac if head.n == newest.n else conn.execute(
                sa.select(log_table.c.mac).where(log_table.c.n == head.n)).scalar()
            if mac != head.mac:
                raise AuditLogRefused(
                    f"Entry #{head.n} of the audit log at {self._where} is not the one {where} has seen: the log was "
                    f"rewritten. {_NO_WRITES}"
                )
        return newest

    def _checked_end(self, conn: sa.Connection) -> Head:
        """Take the write lock, then the log's newest entry, checked: the first step of every append."""
        self._lock_sequence(conn)
        return self._newest(conn)

    def _append(self, conn: sa.Connection, entries: Sequence[Entry], *, after: Head) -> list[Entry]:
        sealed = auditlog.chain(entries, after=after, key=self._require_key())
        conn.execute(log_table.insert(), [_values(e) for e in sealed])
        return sealed

    def _appended(self, sealed: Sequence[Entry]) -> None:
        """After a commit: the hub's own head and the head file move forward. Never raises: the
        entries are written, so the caller must not be told otherwise."""
        head = Head(sealed[-1].n, sealed[-1].mac)
        if head.n > self._known.n:
            self._known = head
        self.refusal = None
        self._keep_head(head)

    def _keep_head(self, head: Head) -> None:
        if self.head_file is None:
            return
        try:
            if read_legacy_head(self.head_file) is not None:
                write_head(self.head_file, head, forward_only=False)  # the store was carried over just now
            else:
                write_head(self.head_file, head)
        except (OSError, AuditStoreError) as e:
            log.error("Could not move the audit log's head %s forward to %s: %s", self.head_file, head.text(), e)

    def _refused(self, refusal: AuditLogRefused) -> None:
        """Keep why the store refuses to write; log it once, not at every refused write."""
        if self.refusal != str(refusal):
            log.error("%s", refusal)
        self.refusal = str(refusal)

    def _write(self, work: Callable[[sa.Connection], tuple[list[Entry], T]], *, what: str,
               policy: RetryPolicy | None = None) -> T:
        try:
            sealed, result = self.transaction(work, what=what, policy=policy)
        except AuditLogRefused as e:
            self._refused(e)
            raise
        self._appended(sealed)
        return result

    @property
    def known(self) -> Head:
        """The newest entry this process wrote or checked."""
        return self._known

    def head(self) -> Head:
        """The log's newest entry, as stored (unchecked)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(log_table.c.n, log_table.c.mac).order_by(log_table.c.n.desc()).limit(1)).first()
        return Head(row.n, row.mac) if row is not None and auditlog.is_number(row.n) else Head()

    def check_head(self) -> Head:
        """The log's newest entry, checked against the head file and what this process has seen
        (:class:`AuditLogRefused` where the log was rolled back or rewritten); the head file is
        brought up to it."""
        try:
            with self.engine.connect() as conn:
                head = self._newest(conn)
            if self.head_file is not None and not self.head_file.exists() and head.n > 1:
                log.warning("The audit log's head file %s was missing; written anew at %s. Check the log with "
                            "`gpuspawner audit verify --witness` against a head kept elsewhere.", self.head_file, head.text())
        except AuditLogRefused as e:
            self._refused(e)
            raise
        self.refusal = None
        self._known = head if head.n > self._known.n else self._known
        self._keep_head(head)
        return head

    def insert(self, record: AuditRecord) -> None:
        """Open a record: append its opening entry. A record id the log holds already is refused."""

        def work(conn: sa.Connection) -> tuple[list[Entry], None]:
            end = self._checked_end(conn)
            if conn.execute(sa.select(log_table.c.n).where(log_table.c.record_id == record.id).limit(1)).first():
                raise AuditStoreError(f"audit record {record.id} exists already")
            return self._append(conn, [auditlog.opening(record, at=seams.now_iso())], after=end), None

        self._write(work, what=f"write audit record {record.id}")

    def insert_many(self, records: Iterable[AuditRecord], *, batch: int = 10_000) -> int:
        """Write many records as the hub would have, in order, `batch` to a transaction: for imports
        and benchmarks. An open record gets its opening entry; a final one its opening entry, one
        entry of its devices and start, and its closing entry. Constant memory; returns how many
        records were written."""
        written = 0
        it = iter(records)
        while chunk := list(itertools.islice(it, batch)):
            at = seams.now_iso()
            entries = [e for record in chunk for e in _life(record, at=at)]
            self._write(lambda conn, entries=entries: (self._append(conn, entries, after=self._checked_end(conn)), None),  # type: ignore[misc]
                        what=f"write {len(chunk)} audit records from {chunk[0].id}")
            written += len(chunk)
        return written

    def update(self, record_id: str, **changes: Any) -> AuditRecord:
        """Append a change to an open record; an ended one is refused (:class:`AuditRecordSealed`)."""

        def work(conn: sa.Connection) -> tuple[list[Entry], AuditRecord]:
            end = self._checked_end(conn)
            record = self._open_record(conn, record_id)
            sealed = self._append(conn, [auditlog.change(record_id, changes, at=seams.now_iso())], after=end)
            return sealed, replace(record, **changes)

        return self._write(work, what=f"update audit record {record_id}")

    def finish(self, record_id: str, **changes: Any) -> AuditRecord:
        """End an open record (``outcome`` in changes): append its closing entry, which holds the whole
        final record. Writers in threads or other processes take turns; a record ends once."""
        return self.finish_with(record_id, changes, policy=self.retry)

    def finish_with(self, record_id: str, changes: dict[str, Any], *, policy: RetryPolicy) -> AuditRecord:
        """:meth:`finish` with its own retry policy (the background retries try once each time)."""

        def work(conn: sa.Connection) -> tuple[list[Entry], AuditRecord]:
            end = self._checked_end(conn)
            final = replace(self._open_record(conn, record_id), **changes)
            if final.outcome not in FINAL_OUTCOMES:
                raise ValueError(f"record {record_id} would end {final.outcome}; a record ends {', '.join(sorted(FINAL_OUTCOMES))}")
            sealed = self._append(conn, [auditlog.closing(final, at=seams.now_iso())], after=end)
            return sealed, replace(final, seq=sealed[-1].n, prev_hash=sealed[-1].prev, hash=sealed[-1].mac)

        return self._write(work, what=f"seal audit record {record_id}", policy=policy)

    def _lock_sequence(self, conn: sa.Connection) -> None:
        # SQLite: BEGIN IMMEDIATE took the database's write lock already. PostgreSQL: readers
        # go on; writers queue here until the one before them commits, then read its newest entry.
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SEQ_LOCK_KEY)))

    # --- Reading records back -----------------------------------------------------------------

    def _entries_of(self, conn: sa.Connection, record_ids: Sequence[str]) -> dict[str, list[Entry]]:
        found: dict[str, list[Entry]] = {rid: [] for rid in record_ids}
        query = sa.select(log_table).where(log_table.c.record_id.in_(record_ids)).order_by(log_table.c.n)
        for row in conn.execute(query):
            found.setdefault(row.record_id, []).append(_entry(row))
        return found

    def _view(self, entries: Sequence[Entry]) -> AuditRecord | None:
        """A record from its entries, those that fail a reader's check left out and named in ``integrity``.

        An ended record is shown from its opening and closing entries, so only their seals are
        checked here (``verify`` checks every one); an open record's are all checked."""
        problems = []
        good = []
        ended = any(e.kind == "ended" for e in entries)
        for entry in entries:
            shown = not ended or entry.kind in OPENING_KINDS or entry.kind == "ended"
            problem = auditlog.row_problem(entry, key=self.key if shown else None)
            if problem:
                problems.append(problem)
            else:
                good.append(entry)
        openings = [e for e in good if e.kind in OPENING_KINDS]
        closings = [e for e in good if e.kind == "ended"]
        if len(openings) > 1:
            problems.append(f"it is opened {len(openings)} times (entries {', '.join(f'#{e.n}' for e in openings)})")
        if len(closings) > 1:
            problems.append(f"it is ended {len(closings)} times (entries {', '.join(f'#{e.n}' for e in closings)})")
        if closings and openings and closings[0] is not good[-1]:
            problems.append("it has entries after its end")
        record = auditlog.fold(good if not closings else closings[:1]) or auditlog.fold(entries)
        if record is None:
            return None
        if not good:
            record = replace(record, seq=None, prev_hash=None, hash=None)
        if problems:
            record = replace(record, integrity="; ".join(problems))
        elif self.key is None:
            record = replace(record, integrity="seals not checked (no key)")
        return record

    def _open_record(self, conn: sa.Connection, record_id: str) -> AuditRecord:
        entries = self._entries_of(conn, [record_id])[record_id]
        record = self._view(entries)
        if record is None:
            raise AuditStoreError(f"no audit record {record_id}")
        if record.integrity:
            log.error("Audit record %s: %s; its entries that fail their seals are left out", record_id, record.integrity)
            record = replace(record, integrity=None)
        if record.sealed:
            raise AuditRecordSealed(f"audit record {record_id} has ended and cannot change")
        return record

    def get(self, record_id: str) -> AuditRecord | None:
        """The record as its entries say, or None; ``integrity`` names entries left out."""
        with self.engine.connect() as conn:
            return self._view(self._entries_of(conn, [record_id])[record_id])

    def open_records(self, hub_id: str) -> list[AuditRecord]:
        """This hub's records that have not ended (those whose opening seal holds)."""
        with self.engine.connect() as conn:
            ids = self._unended(conn, log_table.c.hub_id == hub_id)
            views = self._entries_of(conn, ids) if ids else {}
        records = [self._view(entries) for entries in views.values()]
        return [r for r in records if r is not None and not r.sealed and not r.integrity]

    def iter_records(self, filters: Filters = Filters(), *, batch: int = 1000) -> Iterator[AuditRecord]:
        """Records in the order they were requested, streamed in batches (constant memory); a record
        with an entry a reader must not trust says so in ``integrity``."""
        t = log_table
        conditions: list[sa.ColumnElement[bool]] = [t.c.kind.in_(OPENING_KINDS)]
        if filters.since:
            conditions.append(t.c.requested_at >= stored_time(filters.since, where="since"))
        if filters.until:
            conditions.append(t.c.requested_at < stored_time(filters.until, where="until"))
        for name in ("user", "profile", "hub_id"):
            value = getattr(filters, name)
            if value:
                conditions.append(t.c[name] == value)
        # Keyset pagination: each batch is one short query, so no cursor stays open while the
        # caller writes out rows, and the hub's writes are never held up by an export.
        after: tuple[str, str] | None = None
        while True:
            query = sa.select(t.c.record_id, t.c.requested_at).where(*conditions).order_by(t.c.requested_at, t.c.record_id).limit(batch)
            if after is not None:
                query = query.where(sa.tuple_(t.c.requested_at, t.c.record_id) > after)
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
                ids = list(dict.fromkeys(row.record_id for row in rows))
                views = self._entries_of(conn, ids) if ids else {}
            for rid in ids:
                record = self._view(views[rid])
                if record is not None:
                    yield record
            if len(rows) < batch:
                return
            after = (rows[-1].requested_at, rows[-1].record_id)

    def usage_parts(self, count: int, *, smallest: int = 10_000) -> list[UsagePart]:
        """`count` parts (one for a log of fewer than `smallest` entries a part) that :meth:`iter_held` can
        read side by side: every row of the log falls in exactly one of them, whatever its number holds."""
        with self.engine.connect() as conn:
            top = conn.execute(sa.select(sa.func.max(log_table.c.n)).where(log_table.c.n < 2**62)).scalar()
        if count <= 1 or not isinstance(top, int) or not auditlog.is_number(top) or top < smallest * count:
            return [UsagePart()]
        cuts = [top * i // count for i in range(1, count)]
        return [UsagePart(after, upto) for after, upto in zip([None, *cuts], [*cuts, None], strict=True)]

    def iter_held(self, *, until: str | None = None, read: list[UsageRead] | None = None, part: UsagePart = UsagePart(),
                  batch: int = 20_000) -> Iterator[Held]:
        """What usage needs of every record requested before `until`, streamed: ended servers from the
        columns of their closing entries (their usage seals checked when the store has the key), running
        ones from their entries. Rows that fail their check are left out and counted in ``read[0]``.
        With `part` (of :meth:`usage_parts`), only the records of that part."""
        rejected = 0
        t = log_table
        conditions: list[sa.ColumnElement[bool]] = [t.c.usage_mac.is_not(None), *part.conditions(t.c.n)]
        if until:
            conditions.append(t.c.requested_at < stored_time(until, where="until"))
        key = self.key
        at = {name: i for i, name in enumerate(auditlog.USAGE_COLUMNS)}
        user, server, profile, outcome, started, stopped, gpus, count, idle, models, groups = (
            at[name] for name in ("user", "server", "profile", "outcome", "started", "stopped", "gpus", "device_count",
                                  "idle", "models", "groups"))
        sealed_text = "\x1f".join(["%s"] * len(auditlog.USAGE_COLUMNS))  # auditlog.usage_text, as one C-level format
        group_lists: dict[str | None, tuple[str, ...]] = {}  # a few distinct lists, read once each
        digest, is_number, final = hmac.digest, auditlog.is_number, FINAL_OUTCOMES
        query = sa.select(*(t.c[name] for name in auditlog.USAGE_COLUMNS), t.c.usage_mac).where(*conditions)
        with self.engine.connect() as conn:
            for row in conn.execution_options(yield_per=batch).execute(query):
                if not is_number(row[0]) or (key is not None and digest(key, (sealed_text % row[:-1]).encode(), "sha256").hex() != row[-1]):
                    rejected += 1
                    continue
                if row[started] is None or row[outcome] not in final:
                    continue
                listed = group_lists.get(row[groups])
                if listed is None:
                    listed = group_lists[row[groups]] = tuple(json.loads(row[groups] or "[]"))
                yield Held(
                    user=row[user], server=row[server], profile=row[profile], groups=listed, started=row[started],
                    stopped=row[stopped], gpus=row[gpus] or 0.0, device_count=row[count] or 0, idle_gpu_seconds=row[idle],
                    devices=_device_shares(row[models]),
                )
        if part.after is None:  # the first part also reads what has no closing entry with a usage seal
            with self.engine.connect() as conn:  # an end without a usage seal is none the hub wrote
                rejected += conn.execute(sa.select(sa.func.count()).where(t.c.kind == "ended", t.c.usage_mac.is_(None))).scalar() or 0
            for record in self._running(until):
                if record.integrity and key is not None:
                    rejected += 1
                else:
                    yield Held.of(record)
        if read is not None:
            read.append(UsageRead(rejected))
    @staticmethod
    def _unended(conn: sa.Connection, *conditions: sa.ColumnElement[bool]) -> list[str]:
        """The ids of the records that have not ended (opened, or carried over before they ended) and meet `conditions`."""
        t = log_table
        ended = sa.select(t.c.record_id).where(t.c.kind == "ended")
        query = sa.select(t.c.record_id).where(
            t.c.kind.in_(OPENING_KINDS), t.c.record_id.not_in(ended),
            sa.or_(t.c.kind == "opened", t.c.outcome.not_in(tuple(FINAL_OUTCOMES))), *conditions,
        )
        return [row.record_id for row in conn.execute(query)]

    def _running(self, until: str | None) -> Iterator[AuditRecord]:
        before = [log_table.c.requested_at < stored_time(until, where="until")] if until else []
        with self.engine.connect() as conn:
            ids = self._unended(conn, *before)
        for chunk in _batched(ids, 1000):
            with self.engine.connect() as conn:
                views = self._entries_of(conn, chunk)
            for entries in views.values():
                record = self._view(entries)
                if record is not None and record.started_at and not record.sealed:
                    yield record

    def iter_log(self, *, after: int | None = None) -> Iterator[Entry]:
        """Every row of the log in the order of their numbers, rows without a number first, streamed;
        with `after`, only the entries numbered above it (a witness checking what is new)."""
        query = sa.select(log_table).order_by(log_table.c.n)
        if after is not None:
            query = query.where(log_table.c.n > after)
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=5000).execute(query)
            for row in result:
                yield _entry(row)

    def verify(self, *, key: bytes | None = None, witnesses: Iterable[Witness] = ()) -> Verification:
        """Check every row of the log with `key` (the store's own by default), and that it still
        holds the head file's head and each of `witnesses`."""
        key = key or self._require_key()
        kept = list(witnesses)
        if self.head_file is not None:
            head = read_head(self.head_file)
            if head is None:
                result = auditlog.verify_log(self.iter_log(), key=key, witnesses=kept)
                return _with_problem(result, f"the head kept outside the database ({self.head_file}) is missing")
            kept.insert(0, Witness(head, f"the head kept outside the database ({self.head_file})"))
        result = auditlog.verify_log(self.iter_log(), key=key, witnesses=kept)
        stray = [name for name in self.tables() if name != LOG_TABLE]
        if stray:
            result = _with_problem(result, f"the database holds audit tables that are not the log: {', '.join(stray)}")
        return result

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

    def dispose(self) -> None:
        self.engine.dispose()


_NO_WRITES = (
    "The hub writes no records, and so starts no servers, until an admin checks the store (`gpuspawner audit verify`) "
    "and restores it from a backup."
)


def _with_problem(result: Verification, problem: str) -> Verification:
    return replace(result, ok=False, problems=(*result.problems, problem))


def _device_shares(models: str | None) -> Callable[[], list[tuple[str, float]]]:
    return lambda: [(m, s) for m, s in json.loads(models or "[]")]


def _life(record: AuditRecord, *, at: str) -> list[Entry]:
    """The entries the hub would have written for `record`: opened, devices and start (once it has
    either), ended (once it has ended)."""
    opened = replace(record, outcome="requested", devices=(), started_at=None, stopped_at=None)
    ended = record.outcome in FINAL_OUTCOMES
    entries = [auditlog.opening(opened if ended else replace(opened, outcome=record.outcome), at=at)]
    if record.devices or record.started_at:
        middle = {"devices": record.devices, "started_at": record.started_at, "outcome": "starting" if ended else record.outcome}
        entries.append(auditlog.change(record.id, middle, at=at))
    return [*entries, auditlog.closing(record, at=at)] if ended else entries


class StoreOpener:
    """A reader's store (a service, a page), opened on first use and again while it is missing: a
    service may start before the hub has made the log. The key is used where it is readable."""

    def __init__(self, url: str, *, key_file: str | os.PathLike[str] | None = None,
                 head_file: str | os.PathLike[str] | None = None) -> None:
        self.url, self.key_file, self.head_file = url, key_file, head_file
        self._store: AuditStore | None = None

    def __call__(self) -> AuditStore:
        """The store; :class:`AuditStoreMissing` while there is none."""
        if self._store is None:
            key = None
            if self.key_file:
                try:
                    key = load_key(self.key_file)
                except AuditStoreError as e:
                    log.warning("Audit records are read without checking their seals: %s", e)
            self._store = AuditStore(self.url, key=key, head_file=self.head_file, create=False)
        return self._store


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

    @property
    def where(self) -> str:
        """The database, its password hidden."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    @property
    def refusal(self) -> str | None:
        """Why the store refuses to write (see :class:`AuditLogRefused`), or None."""
        return self._store.refusal if self._store is not None else None

    @property
    def head(self) -> Head:
        """The newest entry this process wrote or checked."""
        return self._store.known if self._store is not None else Head()

    async def check_head(self) -> Head:
        """The log's newest entry, checked (:meth:`AuditStore.check_head`)."""
        return await self.call(AuditStore.check_head)

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

