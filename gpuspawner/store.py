"""The one path to the audit database: SQLAlchemy, SQLite by default, any SQLAlchemy URL.

One table, ``gpuspawner_audit``: the columns admins filter on, the full record as JSON, and
the seal. A record is inserted when a spawn begins and updated as the server moves on; its
final update seals it (the next sequence number and the chained hash) in the same
transaction, so a sealed record is never half-written and never changes again.

:class:`AuditStore` blocks (database I/O); :class:`AsyncAuditStore` runs it in a thread of
its own so the hub's event loop never waits on the database.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import sqlalchemy as sa

from . import audit
from .audit import AuditRecord, Verification

T = TypeVar("T")

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


class AuditStoreError(Exception):
    """The audit database refused an operation; the message says which record and why."""


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


def _connect_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL: the CLI and the audit service read while the hub writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class AuditStore:
    """Blocking access to the audit table. Create it once per process and share it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sa.create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _connect_sqlite)
        metadata.create_all(self.engine)

    def insert(self, record: AuditRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(records_table.insert().values(**_columns(record)))

    def get(self, record_id: str) -> AuditRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(records_table).where(records_table.c.id == record_id)).first()
        return _row_to_record(row) if row else None

    def update(self, record_id: str, **changes: Any) -> AuditRecord:
        """Change an open record; a sealed one is refused."""
        with self.engine.begin() as conn:
            record = self._open_record(conn, record_id)
            updated = replace(record, **changes)
            conn.execute(records_table.update().where(records_table.c.id == record_id).values(**_columns(updated)))
        return updated

    def finish(self, record_id: str, **changes: Any) -> AuditRecord:
        """Give an open record its final state (``outcome`` in changes) and seal it."""
        with self.engine.begin() as conn:
            record = replace(self._open_record(conn, record_id), **changes)
            last = conn.execute(
                sa.select(records_table.c.seq, records_table.c.hash)
                .where(records_table.c.seq.is_not(None))
                .order_by(records_table.c.seq.desc())
                .limit(1)
            ).first()
            sealed = audit.seal(record, seq=(last.seq + 1) if last else 1, prev_hash=last.hash if last else audit.GENESIS)
            conn.execute(records_table.update().where(records_table.c.id == record_id).values(**_columns(sealed)))
        return sealed

    def _open_record(self, conn: Any, record_id: str) -> AuditRecord:
        row = conn.execute(sa.select(records_table).where(records_table.c.id == record_id)).first()
        if row is None:
            raise AuditStoreError(f"no audit record {record_id}")
        record = _row_to_record(row)
        if record.sealed:
            raise AuditStoreError(f"audit record {record_id} is sealed and cannot change")
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
    """The store for the hub's event loop: every call runs in one thread of its own, in order."""

    def __init__(self, url: str) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gpuspawner-audit")
        self._store: AuditStore | None = None
        self.url = url

    def _sync(self) -> AuditStore:
        if self._store is None:
            self._store = AuditStore(self.url)
        return self._store

    def submit(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Queue a call now and return its future. Calls run one at a time, in the order submitted."""

        def run() -> T:
            return method(self._sync(), *args, **kwargs)

        return asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.submit(method, *args, **kwargs)

    def update_soon(self, record_id: str, **changes: Any) -> asyncio.Future[AuditRecord]:
        """Queue an update without waiting for it; anything submitted later sees it done."""
        return self.submit(AuditStore.update, record_id, **changes)

    async def insert(self, record: AuditRecord) -> None:
        await self.call(AuditStore.insert, record)

    async def update(self, record_id: str, **changes: Any) -> AuditRecord:
        return await self.call(AuditStore.update, record_id, **changes)

    async def finish(self, record_id: str, **changes: Any) -> AuditRecord:
        return await self.call(AuditStore.finish, record_id, **changes)

    async def get(self, record_id: str) -> AuditRecord | None:
        return await self.call(AuditStore.get, record_id)

    async def open_records(self, hub_id: str) -> list[AuditRecord]:
        return await self.call(AuditStore.open_records, hub_id)


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
