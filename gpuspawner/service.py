"""The audit log as a JupyterHub-managed service, for admins, at ``/services/<name>/``.

Log in through the hub (OAuth); admins, or users holding the custom scope
``custom:gpuspawner-audit:read``, see the records in a filterable table and download them as
CSV, JSONL or an RO-Crate, and each record as JSON, RO-Crate and its ``docker run`` line. Holders
of the scope filtered to users (``custom:gpuspawner-audit:read!user``, which
:func:`users_read_own_records` grants every user) see those users' records only, and get 403 for
any other's. Everyone else gets 403. Add it to ``jupyterhub_config.py`` with::

    from gpuspawner.service import audit_service, users_read_own_records
    audit_service(c, config_file=__file__)
    users_read_own_records(c)

The service reads the same ``jupyterhub_config.py`` as the ``gpuspawner audit`` commands to
find the audit database, so admins never type a database URL. JupyterHub starts a managed
service with a bare environment, so the hub's ``GPUSPAWNER_*`` variables (the data folder
above all) are handed to it: the configuration then resolves in the service exactly as in the
hub, and the service reads the hub's own records.

The service is also the audit log's *witness* (:class:`AuditWitness`, deciding with
:mod:`gpuspawner.witness`): it keeps the newest head of the log it has seen in a file of its own
(``--witness-file``, with a history beside it), checks every ``--witness-seconds`` that the log
still extends that head, and every ``--full-check-seconds`` reads the whole log. What it finds
is on the page (a banner at the top) and at ``/services/<name>/metrics`` for Prometheus, read
with a token that holds ``read:metrics`` (the token that scrapes the hub's ``/hub/metrics``).
Run it in a container of its own, where the hub cannot write its witness file (see
``docker/docker-compose.yml``), and register it with :func:`external_audit_service`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlparse

from jupyterhub.services.auth import HubAuth, HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from tornado import web
from tornado.ioloop import IOLoop

from . import audit, export, witness
from .auditlog import Head, Witness
from .form import TEMPLATES, template_environment
from .store import (
    AuditStore,
    AuditStoreError,
    AuditStoreMissing,
    Filters,
    StoreOpener,
    load_key,
    read_head,
    write_head,
)
from .times import TimeError, stored_time
from .witness import Banner, Check, WitnessState

log = logging.getLogger("gpuspawner.service")  # by name: the service runs as __main__

SCOPE = "custom:gpuspawner-audit:read"
OWN_RECORDS = SCOPE + "!user"  # the reader's scope filtered to the user's own records (the hub expands it per user)
TABLE_LIMIT = 500


ENV_PREFIX = "GPUSPAWNER_"


def audit_service(
    c: Any, *, config_file: str, name: str = "audit", port: int = 10101, pass_env: Iterable[str] = (),
    witness_file: str | None = None,
) -> None:
    """Register the audit service in a hub's configuration ``c`` (a traitlets Config), started by the hub.

    The service re-reads ``config_file`` to find the audit database. JupyterHub gives a managed
    service none of the hub's environment but ``PATH`` and a few others, so every ``GPUSPAWNER_*``
    variable set now, and those named in ``pass_env`` (variables of your own that the
    configuration reads), go to the service as they are when the hub loads its configuration.
    ``witness_file``: where its witness keeps the heads it has seen (None: in memory only). A
    service the hub starts runs as the hub's user, who can write that file too; for a witness the
    hub cannot reach, run the service apart and register it with :func:`external_audit_service`.
    """
    command = [sys.executable, "-m", "gpuspawner.service", "-f", os.path.abspath(config_file)]
    if witness_file:
        command += ["--witness-file", os.path.abspath(witness_file)]
    _add_service(c, {
        "name": name,
        "url": f"http://127.0.0.1:{port}",
        "command": command,
        "environment": service_environment(os.environ, pass_env=pass_env),
    })


def external_audit_service(c: Any, *, url: str, api_token: str, name: str = "audit") -> None:
    """Register an audit service that runs apart from the hub (a container of its own), at `url`,
    e.g. ``http://audit:10101``: the hub routes ``/services/<name>/`` to it and logs readers in
    for it (OAuth). `api_token`: the service's token, which it must be given too (as
    ``JUPYTERHUB_API_TOKEN`` or ``--api-token-file``); at least 32 characters.
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not parsed.port:
        raise ValueError(f"external_audit_service: url is {url!r}; it must name a scheme, a host and a port, "
                         "such as http://audit:10101.")
    if len(api_token) < 32:
        raise ValueError(f"external_audit_service: the api_token is {len(api_token)} characters long; "
                         "give it at least 32 random ones (e.g. `openssl rand -hex 32`).")
    _add_service(c, {"name": name, "url": url, "api_token": api_token})


def _add_service(c: Any, service: dict[str, Any]) -> None:
    services = list(c.JupyterHub.services) if "services" in c.JupyterHub else []
    services.append({**service, "oauth_no_confirm": True, "oauth_client_allowed_scopes": [SCOPE], "display": True})
    c.JupyterHub.services = services
    define_reader_scope(c)


def define_reader_scope(c: Any) -> None:
    """Define :data:`SCOPE` among the hub's custom scopes (the services that admit its holders need it)."""
    scopes = dict(c.JupyterHub.custom_scopes) if "custom_scopes" in c.JupyterHub else {}
    scopes[SCOPE] = {"description": "Read gpuspawner's audit records of every server."}
    c.JupyterHub.custom_scopes = scopes


def users_read_own_records(c: Any, *, name: str = "audit") -> None:
    """Let every user read the records of their own servers at ``/services/<name>/`` (admins and holders of
    :data:`SCOPE` still read all): JupyterHub's built-in ``user`` role gets ``access:services!service=<name>``
    and :data:`OWN_RECORDS`, through ``JupyterHub.extra_user_scopes`` (JupyterHub 6; on JupyterHub 5 the
    ``user`` role is redefined in ``load_roles`` with ``self`` and these two scopes, added to any scopes an
    earlier definition there gave it)."""
    from jupyterhub._version import version_info

    wanted = [f"access:services!service={name}", OWN_RECORDS]
    if version_info >= (6,):
        have = list(c.JupyterHub.extra_user_scopes) if "extra_user_scopes" in c.JupyterHub else []
        c.JupyterHub.extra_user_scopes = set(have) | set(wanted)
    else:
        roles = list(c.JupyterHub.load_roles) if "load_roles" in c.JupyterHub else []
        user = next((r for r in roles if r.get("name") == "user"), None)
        scopes = list((user or {}).get("scopes") or ["self"])
        merged = {**(user or {"name": "user"}), "scopes": scopes + [s for s in wanted if s not in scopes]}
        c.JupyterHub.load_roles = [merged if r is user else r for r in roles] + ([] if user else [merged])
    define_reader_scope(c)


@dataclass(frozen=True)
class Readable:
    """Whose records a reader may read: everyone's (``users`` None), or only those of ``users``."""

    users: frozenset[str] | None = None

    def allows(self, user: str) -> bool:
        return self.users is None or user in self.users

    def only(self, records: Iterable[audit.AuditRecord]) -> Iterator[audit.AuditRecord]:
        """The records of `records` this reader may read, as they stream."""
        return (r for r in records if self.allows(r.user))


def readable_by(model: Mapping[str, Any]) -> Readable | None:
    """What the hub's model of a logged-in user lets them read: all records for an admin or a holder of
    :data:`SCOPE`; those of the users named in :data:`SCOPE` filtered by ``!user=NAME`` (their own, from
    :data:`OWN_RECORDS`); None: nothing. Other filters of the scope (``!group=``) grant nothing here."""
    scopes = model.get("scopes") or []
    if model.get("admin") or SCOPE in scopes:
        return Readable()
    prefix = SCOPE + "!user="
    users = frozenset(s.removeprefix(prefix) for s in scopes if isinstance(s, str) and s.startswith(prefix))
    return Readable(users) if users else None


def service_environment(environ: Mapping[str, str], *, pass_env: Iterable[str] = ()) -> dict[str, str]:
    """The variables of ``environ`` the configuration may depend on: ``GPUSPAWNER_*`` and ``pass_env``."""
    wanted = set(pass_env)
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX) or k in wanted}


class _Base(HubOAuthenticated, web.RequestHandler):  # type: ignore[misc]
    @property
    def store(self) -> AuditStore:
        try:
            store: AuditStore = self.settings["store"]()
        except AuditStoreMissing as e:
            raise web.HTTPError(503, "There is no audit log yet: the hub makes it when it starts. (%s)", e) from None
        return store

    def check_reader(self) -> dict[str, Any]:
        user: dict[str, Any] | None = self.get_current_user()
        if user is None:
            raise web.HTTPError(403)
        if not (user.get("admin") or SCOPE in (user.get("scopes") or [])):
            raise web.HTTPError(403, "The audit records are for admins.")
        return user

    def check_records_reader(self) -> Readable:
        """Whose records the logged-in user may read; 403 for someone who may read none."""
        user: dict[str, Any] | None = self.get_current_user()
        found = readable_by(user) if user is not None else None
        if found is None:
            raise web.HTTPError(403, "The audit records are for admins, and each user's own for that user.")
        return found

    def reader_filters(self, readable: Readable) -> Filters:
        """The form's filters for this reader: a reader of some users' records only asks for theirs (403 for
        another's), and one who may read one user's asks for that user's without saying so."""
        filters = self.filters()
        if readable.users is None:
            return filters
        if filters.user is not None and not readable.allows(filters.user):
            raise web.HTTPError(403, "You may read the records of your own servers only.")
        if filters.user is None and len(readable.users) == 1:
            return replace(filters, user=next(iter(readable.users)))
        return filters

    def filters(self) -> Filters:
        """The form's filters; a time that is not one is a 400 that says what is allowed."""

        def arg(name: str) -> str | None:
            return self.get_argument(name, "").strip() or None

        since, until = arg("since"), arg("until")
        try:
            for name, value in (("Since", since), ("Until", until)):
                if value:
                    stored_time(value, where=name)
        except TimeError as e:
            raise web.HTTPError(400, reason="Bad time", log_message=str(e)) from None
        return Filters(since=since, until=until, user=arg("user"), profile=arg("profile"))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        error = kwargs.get("exc_info", (None, None))[1]
        detail = error.log_message if isinstance(error, web.HTTPError) and status_code == 400 else None
        self.finish(f"{status_code}: {detail or self._reason}\n")

    async def stream(self, chunks: Iterator[str]) -> None:
        """Write a generator's chunks as they come, reading them off the event loop."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await loop.run_in_executor(None, lambda: "".join(islice(chunks, 500)))
            if not batch:
                break
            self.write(batch)
            await self.flush()
        self.finish()


class TableHandler(_Base):
    @web.authenticated
    async def get(self) -> None:
        readable = self.check_records_reader()
        filters = self.reader_filters(readable)
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(
            None, lambda: list(islice(readable.only(self.store.iter_records(filters)), TABLE_LIMIT)))
        query = urlencode({k: v for k, v in vars(filters).items() if v})
        watcher: AuditWitness | None = self.settings.get("witness")
        banner = watcher.banner() if watcher is not None and readable.users is None else None
        self.finish(_page(records, filters, query, prefix=self.settings["prefix"], banner=banner,
                          own=readable.users is not None))


class ExportHandler(_Base):
    @web.authenticated
    async def get(self, fmt: str) -> None:
        readable = self.check_records_reader()
        records = readable.only(self.store.iter_records(self.reader_filters(readable)))
        if fmt == "csv":
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            chunks = export.csv_lines(records)
        elif fmt == "jsonl":
            self.set_header("Content-Type", "application/x-ndjson; charset=utf-8")
            chunks = export.jsonl_lines(records)
        else:
            self.set_header("Content-Type", "application/ld+json; charset=utf-8")
            chunks = export.ro_crate_chunks(records)
        filename = "ro-crate-metadata.json" if fmt == "ro-crate" else f"gpuspawner-audit.{fmt}"
        self.set_header("Content-Disposition", f'attachment; filename="{filename}"')
        await self.stream(chunks)


RECORD_FILES = {  # a record's downloads: file name, content type
    "record.json": "application/json; charset=utf-8",
    "ro-crate-metadata.json": "application/ld+json; charset=utf-8",
    "reproduce.sh": "text/x-shellscript; charset=utf-8",
}


class RecordHandler(_Base):
    """One record: as ``gpuspawner audit show`` prints it, as an RO-Crate, or its ``docker run`` line
    (as ``gpuspawner reproduce`` prints it); 404 for no such record, 403 for another user's."""

    @web.authenticated
    async def get(self, record_id: str, name: str) -> None:
        readable = self.check_records_reader()
        loop = asyncio.get_running_loop()
        record = await loop.run_in_executor(None, lambda: self.store.get(record_id))
        if record is None:
            raise web.HTTPError(404, "There is no such audit record.")
        if not readable.allows(record.user):
            raise web.HTTPError(403, "This record is of another user's server: you may read your own.")
        self.set_header("Content-Type", RECORD_FILES[name])
        self.set_header("Content-Disposition", f'attachment; filename="{name}"')
        if name == "record.json":
            self.finish(json.dumps(audit.record_to_dict(record), indent=2, ensure_ascii=False) + "\n")
        elif name == "reproduce.sh":
            self.finish(export.reproduce_command(record, extra_names=self.settings.get("redact_names", ())) + "\n")
        else:
            await self.stream(export.ro_crate_chunks([record], title=f"gpuspawner server {record.id}"))


FILTER_FIELDS = [("user", "User"), ("profile", "Profile"), ("since", "Since"), ("until", "Until")]


def _page(records: list[audit.AuditRecord], filters: Filters, query: str, *, prefix: str,
          banner: Banner | None = None, own: bool = False) -> str:
    """The table page's HTML, from gpuspawner's ``templates/audit.html`` (every value escaped);
    `banner`: what the witness says, at the top; `own`: the reader sees their own servers only."""
    fields = [(name, label, getattr(filters, name) or "") for name, label in FILTER_FIELDS]
    return template_environment(TEMPLATES).get_template("audit.html").render(
        rows=[{"cells": _cells(r), "path": f"{prefix}records/{quote(r.id, safe='')}/"} for r in records],
        filters=fields, prefix=prefix, query=query, limit=TABLE_LIMIT, banner=banner, own=own,
    )


def _cells(r: audit.AuditRecord) -> list[str]:
    """One record's table row, in the order of the page's columns."""
    values = (
        r.id, r.user, r.server, r.profile, r.outcome, r.requested_at, r.stopped_at,
        r.repo_digest or f"{r.image_id} (no repository digest)",
        ", ".join(f"{d.model} {d.uuid}" for d in r.devices), r.error,
        (f"NOT TRUSTED: {r.integrity}" if r.integrity else "sealed" if r.sealed else "open"),
    )
    return ["" if v is None else str(v) for v in values]


# --- The witness: heads of the log kept apart, and the checks that the log still extends them ------


class AuditWitness:
    """The witness's I/O: reads the store off the event loop (one check at a time, in a thread of
    its own), keeps each newly witnessed head in ``witness_file`` (forward only, atomically) and a
    line in ``witness_file + ".history"``, and logs a failure once and the recovery once. What it
    decides comes from :mod:`gpuspawner.witness`; :attr:`state` is what it knows.

    ``url``: the audit database; ``key_file``: the sealing key, read-only (without it the checks
    cover numbers and links, not seals); ``head_file``: the hub's own head file, checked too where
    it can be read. ``clock``: epoch seconds (tests pin it).
    """

    def __init__(
        self, url: str, *, key_file: str | None = None, head_file: str | None = None, witness_file: str | None = None,
        poll_seconds: float = 30.0, full_seconds: float = 600.0, clock: Callable[[], float] = time.time,
    ) -> None:
        self.url, self.key_file, self.head_file = url, key_file, head_file
        self.witness_file = Path(witness_file) if witness_file else None
        self.poll_seconds, self.full_seconds, self.clock = poll_seconds, full_seconds, clock
        self.where = make_url(url).render_as_string(hide_password=True)
        self._key: bytes | None = None
        self._key_problem: str | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gpuspawner-witness")
        self._task: asyncio.Task[None] | None = None
        self._full_cost: float | None = None  # seconds the last full check took
        self.state = WitnessState(witnessed=self._kept_head())

    def _kept_head(self) -> Head:
        if self.witness_file is None:
            return Head()
        try:
            return read_head(self.witness_file) or Head()
        except AuditStoreError as e:
            raise AuditStoreError(
                f"{e}. The witness will not start over from nothing: check the file (a copy of it may be in "
                f"{self.witness_file}.history) and move it aside only if you know why it is broken."
            ) from None

    async def check(self) -> WitnessState:
        """One check: the poll (or, when due, the full check), folded into :attr:`state`."""
        loop = asyncio.get_running_loop()
        now = self.clock()
        # A log small enough to read whole in a tenth of a poll is read whole at every poll: then
        # an edited old entry is seen at once, not at the next full check.
        cheap = self._full_cost is not None and self._full_cost * 10 <= self.poll_seconds
        full = cheap or witness.full_check_due(self.state, now=now, every=self.full_seconds)
        began = time.monotonic()
        found = await loop.run_in_executor(self._executor, self._read, self.state.witnessed, full, now)
        if full and not isinstance(found, str):
            self._full_cost = time.monotonic() - began
        before = self.state
        if isinstance(found, str):
            if found != before.unreadable:
                log.warning("Audit witness: cannot check the audit log at %s now: %s", self.where, found)
            self.state = witness.unreadable(before, found, at=now)
            return self.state
        self.state = witness.record(before, found)
        if self.state.witnessed.n > before.witnessed.n:
            await loop.run_in_executor(self._executor, self._keep, self.state.witnessed, now)
        self._log_news(before, self.state)
        return self.state

    def _log_news(self, before: WitnessState, after: WitnessState) -> None:
        was, now = witness.verdict(before), witness.verdict(after)
        said = witness.news(was, now)
        if said == "failed":
            log.error("Audit witness: the audit log at %s fails its check (last witnessed head %s): %s", self.where,
                      after.witnessed.text(), "; ".join(now.problems))
        elif said == "recovered":
            log.warning("Audit witness: the audit log at %s holds the witnessed head again and checks out "
                        "(failed since %s); now at entry #%d", self.where, witness.when(was.since), after.witnessed.n)

    def _read(self, witnessed: Head, full: bool, at: float) -> Check | str:
        """Runs in the witness's thread: one check of a store opened afresh (a database file replaced
        since the last check is read as it is now), or why the store could not be read."""
        try:
            store = AuditStore(self.url, create=False)
        except AuditStoreMissing as e:
            missing = witness.store_missing(witnessed, str(e), at=at)
            return missing if missing is not None else f"{e}; the hub makes it when it first starts"
        except (AuditStoreError, SQLAlchemyError) as e:
            return str(e)
        try:
            key = self._sealing_key()
            return self._full(store, key, witnessed, at) if full else self._poll(store, key, witnessed, at)
        except (AuditStoreError, SQLAlchemyError, OSError) as e:
            return f"reading it failed: {e}"
        finally:
            store.dispose()

    def _poll(self, store: AuditStore, key: bytes | None, witnessed: Head, at: float) -> Check:
        end = store.head().n
        rows = store.iter_log(after=witnessed.n - 1) if witnessed.n > 0 else store.iter_log()
        return witness.check_extension(witnessed, rows, key=key, at=at, end=end)

    def _full(self, store: AuditStore, key: bytes | None, witnessed: Head, at: float) -> Check:
        also = self._hub_head()
        if key is not None:
            return witness.from_verification(store.verify(key=key, witnesses=[Witness(witnessed, witness.NAME), *also]), at=at)
        return witness.check_extension(witnessed, store.iter_log(), key=None, at=at, kind="full", start=Head(), also=also)

    def _hub_head(self) -> list[Witness]:
        """The hub's head file as one more witness, where it can be read (the hub writes it)."""
        if not self.head_file:
            return []
        try:
            head = read_head(self.head_file)
        except AuditStoreError:
            return []  # the hub refuses to write over a broken head file; the witness's own head still counts
        return [Witness(head, f"the hub's head file ({self.head_file})")] if head is not None else []

    def _sealing_key(self) -> bytes | None:
        if self._key is None and self.key_file:
            try:
                self._key = load_key(self.key_file)
            except AuditStoreError as e:
                if str(e) != self._key_problem:
                    log.warning("Audit witness: seals are not checked, only numbers and links: %s", e)
                self._key_problem = str(e)
        return self._key

    def _keep(self, head: Head, at: float) -> None:
        """Runs in the witness's thread: `head` into the witness file and a line into its history."""
        if self.witness_file is None:
            return
        try:
            kept = write_head(self.witness_file, head)
            if kept == head:
                with open(self.witness_file.with_name(self.witness_file.name + ".history"), "a") as f:
                    f.write(witness.history_line(head, at=at))
                    f.flush()
                    os.fsync(f.fileno())
        except (OSError, AuditStoreError) as e:
            log.error("Audit witness: cannot keep the head %s in %s: %s", head.text(), self.witness_file, e)

    def banner(self) -> Banner:
        return witness.banner(self.state, kept_in=str(self.witness_file) if self.witness_file else None,
                              key_file=self.key_file)

    async def run(self) -> None:
        """Check now and every ``poll_seconds`` after the last check ended, until cancelled."""
        while True:
            try:
                await self.check()
            except Exception:  # a bug here must not end the witness silently
                log.exception("Audit witness: the check failed")
            await asyncio.sleep(self.poll_seconds)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="gpuspawner-audit-witness")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False)


class WitnessCollector(Collector):
    """The witness's state as Prometheus series (read at each scrape, never kept twice)."""

    def __init__(self, watcher: AuditWitness) -> None:
        self.watcher = watcher

    def collect(self) -> Iterator[Metric]:
        state = self.watcher.state
        found = witness.verdict(state)
        if found.ok is not None:
            yield GaugeMetricFamily("gpuspawner_audit_verified",
                                    "1 while the audit log extends the head the witness has seen and checks out, 0 once "
                                    "it does not (until it does again).", value=1 if found.ok else 0)
            yield GaugeMetricFamily("gpuspawner_audit_seals_checked",
                                    "1 where the witness's last check read the sealing key and checked every seal.",
                                    value=1 if found.seals_checked else 0)
            yield GaugeMetricFamily("gpuspawner_audit_last_check_timestamp_seconds",
                                    "When the witness last read the store and checked it (Unix time).", value=found.checked_at)
        yield GaugeMetricFamily("gpuspawner_audit_witnessed_entry",
                                "The number of the newest audit log entry the witness has seen and kept.",
                                value=state.witnessed.n)
        yield CounterMetricFamily("gpuspawner_audit_check_failures",
                                  "Checks of the audit log by the witness that found a problem.", value=state.failures)


def metrics_registry(watcher: AuditWitness) -> CollectorRegistry:
    """A registry of the witness's series alone (never the process's default registry)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(WitnessCollector(watcher))
    return registry


METRICS_SCOPE = "read:metrics"
_TOKEN = re.compile(r"^(?:token|bearer)\s+(\S+)\s*$", re.IGNORECASE)


def may_read_metrics(model: Mapping[str, Any] | None) -> bool:
    """Whether the hub's answer for a token lets it read the metrics: the token holds ``read:metrics``."""
    return model is not None and METRICS_SCOPE in (model.get("scopes") or [])


class MetricsHandler(web.RequestHandler):
    """The witness's series, for a token that holds ``read:metrics`` (as the hub's own /hub/metrics)."""

    async def get(self) -> None:
        found = _TOKEN.match(self.request.headers.get("Authorization", ""))
        if found is None:
            raise web.HTTPError(403, reason="Scrape with a token that holds read:metrics (Authorization: Bearer TOKEN)")
        auth: HubAuth = self.settings["hub_auth"]()
        model = await auth.user_for_token(found.group(1), sync=False)
        if not may_read_metrics(model):
            raise web.HTTPError(403, reason="This token does not hold read:metrics")
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.settings["registry"]))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code}: {self._reason}\n")


def service_app(prefix: str, handlers: list[tuple[str, type[web.RequestHandler]]], **settings: Any) -> web.Application:
    """A service's web app: its pages under `prefix` (in ``settings["prefix"]`` too), JupyterHub's OAuth
    callback, and a new cookie secret (a restart logs readers in again, through the hub)."""
    return web.Application([*handlers, (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler)],
                           prefix=prefix, cookie_secret=os.urandom(32), **settings)


def make_app(store: AuditStore | Callable[[], AuditStore], *, watcher: AuditWitness | None = None,
             hub_auth: Callable[[], HubAuth] = HubOAuth.instance, redact_names: Sequence[str] = ()) -> web.Application:
    """The service's app: the table, the downloads, each record's and, with a `watcher`, its banner and
    ``metrics`` (each scrape's token checked with the hub through `hub_auth`). `redact_names`:
    ``GPUSpawner.audit_redact_names``, for the ``docker run`` lines."""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/audit/")
    opener = store if callable(store) else (lambda: store)
    files = "|".join(re.escape(name) for name in RECORD_FILES)
    handlers: list[tuple[str, type[web.RequestHandler]]] = [
        (prefix, TableHandler), (url_path_join(prefix, r"export\.(csv|jsonl|ro-crate)"), ExportHandler),
        (url_path_join(prefix, rf"records/([^/]+)/({files})"), RecordHandler),
    ]
    settings: dict[str, Any] = {"store": opener, "redact_names": tuple(redact_names)}
    if watcher is not None:
        handlers.append((url_path_join(prefix, "metrics"), MetricsHandler))
        settings.update(witness=watcher, registry=metrics_registry(watcher), hub_auth=hub_auth)
    return service_app(prefix, handlers, **settings)


def main(argv: list[str] | None = None) -> None:
    from .hubconfig import load_spawner_settings

    parser = argparse.ArgumentParser(description="gpuspawner's audit service and the audit log's witness (a JupyterHub service)")
    parser.add_argument("-f", "--config", required=True, help="the hub's jupyterhub_config.py")
    parser.add_argument("--witness-file", metavar="PATH",
                        help="where the witness keeps the newest head of the audit log it has seen (a head file's JSON, "
                             "which `gpuspawner audit verify --witness PATH` reads), with PATH.history beside it; keep "
                             "it where the hub and the database cannot write. Without it: in memory only")
    parser.add_argument("--witness-seconds", type=float, default=30.0,
                        help="how often the witness checks that the log still extends the head it has seen (default 30)")
    parser.add_argument("--full-check-seconds", type=float, default=600.0,
                        help="how often it reads and checks every entry of the log (default 600; also at start; "
                             "at every poll while reading it all takes under a tenth of --witness-seconds)")
    parser.add_argument("--api-token-file", metavar="PATH",
                        help="a file holding the service's API token, for a service the hub does not start "
                             "(default: $JUPYTERHUB_API_TOKEN); waited for while it is missing")
    args = parser.parse_args(argv)
    if args.witness_seconds <= 0 or args.full_check_seconds < args.witness_seconds:
        parser.error("--witness-seconds must be above 0 and --full-check-seconds at least as long")
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(asctime)s %(name)s] %(message)s")
    if args.api_token_file:
        os.environ["JUPYTERHUB_API_TOKEN"] = _wait_for_token(Path(args.api_token_file))
    hub = load_spawner_settings(args.config)
    db_url = hub.audit_db_url
    store = StoreOpener(db_url, key_file=hub.audit_key_file, head_file=hub.audit_head_file)
    try:
        watcher = AuditWitness(db_url, key_file=hub.audit_key_file, head_file=hub.audit_head_file,
                               witness_file=args.witness_file, poll_seconds=args.witness_seconds,
                               full_seconds=args.full_check_seconds)
    except AuditStoreError as e:
        parser.exit(2, f"gpuspawner audit service: {e}\n")
    url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:10101"))
    make_app(store, watcher=watcher, redact_names=hub.audit_redact_names).listen(url.port or 80, url.hostname or "127.0.0.1")
    IOLoop.current().add_callback(watcher.start)
    # Which database it reads, so an admin can tell it is the hub's (password hidden).
    shown = make_url(db_url).render_as_string(hide_password=True)
    log.info("gpuspawner audit service on %s (%s), records from %s; witness heads in %s, checked every %g s",
             url.geturl(), socket.gethostname(), shown, args.witness_file or "memory only", args.witness_seconds)
    IOLoop.current().start()


def _wait_for_token(path: Path, *, every: float = 2.0) -> str:
    """The token in `path`, waiting while the file is missing or empty (the hub writes it on its first start)."""
    said = False
    while True:
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            token = ""
        if token:
            return token
        if not said:
            log.info("Waiting for the hub to write the service's token to %s", path)
            said = True
        time.sleep(every)


if __name__ == "__main__":
    main()
