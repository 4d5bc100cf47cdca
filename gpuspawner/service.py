"""The audit log as a JupyterHub-managed service, for admins, at ``/services/<name>/``.

Log in through the hub (OAuth); admins, or users holding the custom scope
``custom:gpuspawner-audit:read``, see the records in a filterable table and download them as
CSV or JSONL. Everyone else gets 403. Add it to ``jupyterhub_config.py`` with::

    from gpuspawner.service import audit_service
    audit_service(c, config_file=__file__)

The service reads the same ``jupyterhub_config.py`` as the ``gpuspawner audit`` commands to
find the audit database, so admins never type a database URL. JupyterHub starts a managed
service with a bare environment, so the hub's ``GPUSPAWNER_*`` variables (the data folder
above all) are handed to it: the configuration then resolves in the service exactly as in the
hub, and the service reads the hub's own records.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any
from urllib.parse import urlencode, urlparse

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from sqlalchemy.engine import make_url
from tornado import web
from tornado.ioloop import IOLoop

from . import audit, export
from .form import TEMPLATES, template_environment
from .store import AuditStore, Filters
from .times import TimeError, stored_time

SCOPE = "custom:gpuspawner-audit:read"
TABLE_LIMIT = 500


ENV_PREFIX = "GPUSPAWNER_"


def audit_service(
    c: Any, *, config_file: str, name: str = "audit", port: int = 10101, pass_env: Iterable[str] = ()
) -> None:
    """Register the audit service in a hub's configuration ``c`` (a traitlets Config).

    The service re-reads ``config_file`` to find the audit database. JupyterHub gives a managed
    service none of the hub's environment but ``PATH`` and a few others, so every ``GPUSPAWNER_*``
    variable set now, and those named in ``pass_env`` (variables of your own that the
    configuration reads), go to the service as they are when the hub loads its configuration.
    """
    services = list(c.JupyterHub.services) if "services" in c.JupyterHub else []
    services.append({
        "name": name,
        "url": f"http://127.0.0.1:{port}",
        "command": [sys.executable, "-m", "gpuspawner.service", "-f", os.path.abspath(config_file)],
        "environment": service_environment(os.environ, pass_env=pass_env),
        "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": [SCOPE],
        "display": True,
    })
    c.JupyterHub.services = services
    define_reader_scope(c)


def define_reader_scope(c: Any) -> None:
    """Define :data:`SCOPE` among the hub's custom scopes (the services that admit its holders need it)."""
    scopes = dict(c.JupyterHub.custom_scopes) if "custom_scopes" in c.JupyterHub else {}
    scopes[SCOPE] = {"description": "Read gpuspawner's audit records of every server."}
    c.JupyterHub.custom_scopes = scopes


def service_environment(environ: Mapping[str, str], *, pass_env: Iterable[str] = ()) -> dict[str, str]:
    """The variables of ``environ`` the configuration may depend on: ``GPUSPAWNER_*`` and ``pass_env``."""
    wanted = set(pass_env)
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX) or k in wanted}


class _Base(HubOAuthenticated, web.RequestHandler):  # type: ignore[misc]
    @property
    def store(self) -> AuditStore:
        store: AuditStore = self.settings["store"]
        return store

    def check_reader(self) -> dict[str, Any]:
        user: dict[str, Any] | None = self.get_current_user()
        if user is None:
            raise web.HTTPError(403)
        if not (user.get("admin") or SCOPE in (user.get("scopes") or [])):
            raise web.HTTPError(403, "The audit records are for admins.")
        return user

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
        self.check_reader()
        filters = self.filters()
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(None, lambda: list(islice(self.store.iter_records(filters), TABLE_LIMIT)))
        query = urlencode({k: v for k, v in vars(filters).items() if v})
        self.finish(_page(records, filters, query, prefix=self.settings["prefix"]))


class ExportHandler(_Base):
    @web.authenticated
    async def get(self, fmt: str) -> None:
        self.check_reader()
        records = self.store.iter_records(self.filters())
        if fmt == "csv":
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            chunks = export.csv_lines(records)
        else:
            self.set_header("Content-Type", "application/x-ndjson; charset=utf-8")
            chunks = export.jsonl_lines(records)
        self.set_header("Content-Disposition", f'attachment; filename="gpuspawner-audit.{fmt}"')
        await self.stream(chunks)


FILTER_FIELDS = [("user", "User"), ("profile", "Profile"), ("since", "Since"), ("until", "Until")]


def _page(records: list[audit.AuditRecord], filters: Filters, query: str, *, prefix: str) -> str:
    """The table page's HTML, from gpuspawner's ``templates/audit.html`` (every value escaped)."""
    fields = [(name, label, getattr(filters, name) or "") for name, label in FILTER_FIELDS]
    return template_environment(TEMPLATES).get_template("audit.html").render(
        rows=[_cells(r) for r in records], filters=fields, prefix=prefix, query=query, limit=TABLE_LIMIT,
    )


def _cells(r: audit.AuditRecord) -> list[str]:
    """One record's table row, in the order of the page's columns."""
    values = (
        r.id, r.user, r.server, r.profile, r.outcome, r.requested_at, r.stopped_at,
        r.repo_digest or f"{r.image_id} (no repository digest)",
        ", ".join(f"{d.model} {d.uuid}" for d in r.devices), r.error, "sealed" if r.sealed else "open",
    )
    return ["" if v is None else str(v) for v in values]


def service_app(prefix: str, handlers: list[tuple[str, type[web.RequestHandler]]], **settings: Any) -> web.Application:
    """A service's web app: its pages under `prefix` (in ``settings["prefix"]`` too), JupyterHub's OAuth
    callback, and a new cookie secret (a restart logs readers in again, through the hub)."""
    return web.Application([*handlers, (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler)],
                           prefix=prefix, cookie_secret=os.urandom(32), **settings)


def make_app(store: AuditStore) -> web.Application:
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/audit/")
    return service_app(prefix, [(prefix, TableHandler), (url_path_join(prefix, r"export\.(csv|jsonl)"), ExportHandler)],
                       store=store)


def main(argv: list[str] | None = None) -> None:
    from .hubconfig import load_spawner_settings

    parser = argparse.ArgumentParser(description="gpuspawner's audit service (started by JupyterHub)")
    parser.add_argument("-f", "--config", required=True, help="the hub's jupyterhub_config.py")
    args = parser.parse_args(argv)
    db_url = load_spawner_settings(args.config).audit_db_url
    store = AuditStore(db_url)
    url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:10101"))
    make_app(store).listen(url.port or 80, url.hostname or "127.0.0.1")
    # Which database it reads, so an admin can tell it is the hub's (password hidden).
    shown = make_url(db_url).render_as_string(hide_password=True)
    print(f"gpuspawner audit service on {url.geturl()} ({socket.gethostname()}), records from {shown}", file=sys.stderr)
    IOLoop.current().start()


if __name__ == "__main__":
    main()
