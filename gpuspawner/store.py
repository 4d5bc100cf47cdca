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
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import sqlalchemy as sa

from . import audit
from .audit import AuditRecord, Verification

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
)

# Any constant will do: every process sealing into this database takes the same lock.
_SEQ_LOCK_KEY = 0x67707573_61756469  # "gpusaudi"

class AuditStoreError(Exception):
    """The audit database refused an operation; the message says which record and why."""


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
    """Which records to export; times are ISO 8601 strings compared with requested_at."""

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

    ``retry`` says how each write tries again through transient errors; ``lock_wait`` is how
    long one try waits for another writer's lock (SQLite busy_timeout, PostgreSQL lock_timeout).
    """

    def __init__(self, url: str, *, retry: RetryPolicy = RetryPolicy(), lock_wait: float = 2.0) -> None:
        self.url = url
        self.retry = retry
        backend = sa.engine.make_url(url).get_backend_name()
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
        self.transaction(lambda conn: metadata.create_all(conn), what="create the audit table")

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
        self.transaction(
            lambda conn: conn.execute(records_table.insert().values(**_columns(record))),
            what=f"write audit record {record.id}",
        )

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
            sealed = audit.seal(record, seq=(last.seq + 1) if last else 1, prev_hash=last.hash if last else audit.GENESIS)
            self._write_open(conn, sealed)
            return sealed

        return self.transaction(work, what=f"seal audit record {record_id}", policy=policy)

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
            conditions.append(t.c.requested_at >= filters.since)
        if filters.until:
            conditions.append(t.c.requested_at < filters.until)
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

    def verify(self) -> Verification:
        return audit.verify_chain(self.iter_sealed())

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
        retry: RetryPolicy = RetryPolicy(),
        lock_wait: float = 2.0,
        retry_later: tuple[float, float] = (5.0, 60.0),
    ) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gpuspawner-audit")
        self._store: AuditStore | None = None
        self.url = url
        self._retry = retry
        self._lock_wait = lock_wait
        self._retry_later = retry_later
        self._pending: dict[str, dict[str, Any]] = {}  # final changes not yet written; event loop only
        self._unsaved: dict[str, dict[str, Any]] = {}  # changes of failed updates; audit thread only
        self._tasks: set[asyncio.Task[None]] = set()

    def _sync(self) -> AuditStore:
        if self._store is None:
            self._store = AuditStore(self.url, retry=self._retry, lock_wait=self._lock_wait)
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
                await self.call(
                    lambda store: self._with_unsaved(
                        record_id, changes, lambda merged: store.finish_with(record_id, merged, policy=policy)
                    )
                )
            except AuditStoreUnavailable:
                return  # still down: the rest would only wait as long
            except AuditStoreError as e:  # sealed meanwhile (another process), or gone
                log.warning("Audit record %s: queued final write dropped: %s", record_id, e)
            else:
                log.info("Audit record %s sealed after waiting for the database", record_id)
            if self._pending.get(record_id) is changes:
                del self._pending[record_id]

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
    """An SQLite file beside the hub's own SQLite database; in the hub's folder otherwise."""
    import os

    prefix = "sqlite:///"
    if hub_db_url.startswith(prefix) and hub_db_url[len(prefix):] not in ("", ":memory:"):
        path = hub_db_url[len(prefix):]
        folder = os.path.dirname(path if os.path.isabs(path) else os.path.join(cwd, path))
    else:
        folder = cwd
    return prefix + os.path.join(folder, "gpuspawner-audit.sqlite")
