"""The audit service: its page (the records as a table, the filters as typed, the download links,
the witness's banner), its witness checking a real store, its metrics, and how a hub registers it.

The service itself (OAuth, 403 for non-admins, CSV and JSONL) runs end to end in
``test_e2e_audit.py``, and in a container of its own beside the hub's in ``test_e2e_deploy.py``.
"""

from __future__ import annotations

import json
import re
import sqlite3
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from jupyterhub.app import JupyterHub
from jupyterhub.services.auth import HubAuth
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from traitlets.config import Config

from gpuspawner import auditlog, witness
from gpuspawner.audit import AuditRecord, RecordedDevice
from gpuspawner.auditlog import Head
from gpuspawner.service import (
    OWN_RECORDS,
    SCOPE,
    TABLE_LIMIT,
    AuditWitness,
    Readable,
    TableHandler,
    _page,
    audit_service,
    external_audit_service,
    main,
    make_app,
    metrics_registry,
    readable_by,
    users_read_own_records,
)
from gpuspawner.store import AuditStore, AuditStoreError, Filters, load_key, read_head
from helpers import ROOT

PREFIX = "/services/audit/"
A100 = RecordedDevice(uuid="GPU-5fb1e2a3", model="NVIDIA A100-SXM4-80GB", memory_total=80 * 2**30)
GET = "JSON · RO-Crate · docker run"  # the text of a row's last cell: its downloads


class Page(HTMLParser):
    """What a browser shows of the page: the table's rows of cell texts, the inputs, the links."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.inputs: dict[str, str] = {}
        self.links: list[str] = []
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self._cell = []
        elif tag == "input":
            self.inputs[found["name"]] = found["value"]
        elif tag == "a":
            self.links.append(found["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def record(n: int, **kw: Any) -> AuditRecord:
    fields: dict[str, Any] = dict(id=f"r{n}", hub_id="hub-1", user="ada", server="", requested_at=f"2026-11-21T10:00:0{n}+00:00")
    fields.update(kw)
    return AuditRecord(**fields)


def test_each_record_is_a_row_with_its_image_gpus_and_seal() -> None:
    records = [
        record(1, profile="a100-1", outcome="stopped", stopped_at="2026-11-21T11:00:00+00:00",
               repo_digest="lab/pytorch@sha256:" + "c" * 64, devices=(A100,), seq=1, prev_hash="a" * 64, hash="b" * 64),
        record(2, user="bob", server="big", outcome="failed", image_id="sha256:" + "d" * 64, error="No free GPU."),
    ]
    page = Page(_page(records, Filters(), "", prefix=PREFIX))
    assert page.rows[1:] == [
        ["r1", "ada", "", "a100-1", "stopped", "2026-11-21T10:00:01+00:00", "2026-11-21T11:00:00+00:00",
         "lab/pytorch@sha256:" + "c" * 64, "NVIDIA A100-SXM4-80GB GPU-5fb1e2a3", "", "sealed", GET],
        ["r2", "bob", "big", "", "failed", "2026-11-21T10:00:02+00:00", "",
         f"sha256:{'d' * 64} (no repository digest)", "", "No free GPU.", "open", GET],
    ]
    assert page.rows[0] == []  # the header row has <th> cells
    # each record's own downloads: the record as JSON, its RO-Crate, its docker run line
    assert page.links[3:] == [f"{PREFIX}records/r{n}/{name}" for n in (1, 2)
                              for name in ("record.json", "ro-crate-metadata.json", "reproduce.sh")]


def test_text_from_users_and_images_is_shown_as_text_never_run_as_markup() -> None:
    html = _page([record(1, user="<script>alert(1)</script>", error='a & "b"')], Filters(user="<x>\"y"), "", prefix=PREFIX)
    assert "<script>" not in html and '"y' not in html
    page = Page(html)
    assert page.rows[1][1] == "<script>alert(1)</script>" and page.rows[1][9] == 'a & "b"'
    assert page.inputs["user"] == '<x>"y'


def test_the_filters_stay_filled_in_and_the_downloads_keep_them() -> None:
    filters = Filters(since="2026-11-01", user="ada", profile="a100-1")
    page = Page(_page([], filters, "since=2026-11-01&user=ada&profile=a100-1", prefix=PREFIX))
    assert page.inputs == {"user": "ada", "profile": "a100-1", "since": "2026-11-01", "until": ""}
    assert page.links == [f"{PREFIX}export.{fmt}?since=2026-11-01&user=ada&profile=a100-1" for fmt in ("csv", "jsonl", "ro-crate")]
    assert page.rows == [[]]  # the header row only


def test_the_page_says_how_many_records_the_table_shows_at_most() -> None:
    assert f"the table shows the first {TABLE_LIMIT}" in _page([], Filters(), "", prefix=PREFIX)


# --- The witness: the service's loop against a real store --------------------------------------------
# A hub's store in tmp_path (SQLite, sealed with a key in a 0600 file, the hub's head file beside it),
# and the witness as the service runs it, its clock pinned. Someone who can write the database then
# rolls it back or rewrites it with sqlite3, as they could, and puts it back.


T0 = 1_795_000_000.0


@dataclass
class Bed:
    """A hub's audit store, written by the hub's own code, and the audit service's witness of it."""

    folder: Path
    clock: list[float]

    @property
    def db(self) -> Path:
        return self.folder / "data" / "gpuspawner-audit.sqlite"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db}"

    @property
    def key_file(self) -> Path:
        return self.folder / "secrets" / "gpuspawner-audit.key"

    @property
    def head_file(self) -> Path:
        return self.folder / "data" / "gpuspawner-audit.head"

    @property
    def witness_file(self) -> Path:
        return self.folder / "witness" / "head.json"

    def hub(self) -> AuditStore:
        self.db.parent.mkdir(exist_ok=True)
        return AuditStore(self.url, key=load_key(self.key_file, create=True), head_file=self.head_file)

    def servers(self, *numbers: int) -> None:
        """Each server's record opened and ended, as the hub writes them (two entries each)."""
        store = self.hub()
        for n in numbers:
            store.insert(record(n, requested_at=f"2026-11-21T10:{n:02d}:00+00:00"))
            store.finish(f"r{n}", outcome="stopped", stopped_at=f"2026-11-21T11:{n:02d}:00+00:00")
        store.dispose()

    def watcher(self, *, key_file: Path | None = None, witness_file: Path | None = None, memory_only: bool = False,
                poll_seconds: float = 1e-9) -> AuditWitness:
        """A witness of the bed's store. Its polls are as short as can be, so it reads only what is new at a
        poll (a log that reads whole in a tenth of a poll is read whole at every poll: see the test of that)."""
        return AuditWitness(self.url, key_file=str(key_file or self.key_file), head_file=str(self.head_file),
                            witness_file=None if memory_only else str(witness_file or self.witness_file),
                            poll_seconds=poll_seconds, full_seconds=600, clock=lambda: self.clock[0])

    def rows(self, statement: str, *args: object) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(statement, args).fetchall()

    def newest(self) -> int:
        return int(self.rows("SELECT max(n) FROM gpuspawner_audit_log")[0][0])

    def roll_back(self, count: int) -> list[tuple[Any, ...]]:
        """Delete the newest `count` entries; returns them, to put back."""
        kept = self.rows("SELECT * FROM gpuspawner_audit_log WHERE n > ? ORDER BY n", self.newest() - count)
        self.rows("DELETE FROM gpuspawner_audit_log WHERE n > ?", self.newest() - count)
        return kept

    def put_back(self, rows: list[tuple[Any, ...]]) -> None:
        marks = ", ".join("?" * len(rows[0]))
        with sqlite3.connect(self.db) as conn:
            conn.executemany(f"INSERT INTO gpuspawner_audit_log VALUES ({marks})", rows)

    async def check(self, watcher: AuditWitness, *, after: float = 30) -> witness.Verdict:
        self.clock[0] += after
        return witness.verdict(await watcher.check())


@pytest.fixture
def bed(tmp_path: Path) -> Bed:
    bed = Bed(tmp_path, [T0])
    bed.servers(1, 2)  # entries #1 (genesis) to #5
    return bed


def metrics(watcher: AuditWitness) -> dict[str, float]:
    text = generate_latest(metrics_registry(watcher)).decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith("_created")}


def kept(watcher: AuditWitness) -> tuple[Head | None, list[str]]:
    """The witness file's head and the history's lines, as `gpuspawner audit verify --witness` reads them."""
    assert watcher.witness_file is not None
    history = watcher.witness_file.with_name("head.json.history")
    return read_head(watcher.witness_file), history.read_text().splitlines() if history.exists() else []


async def test_a_store_that_extends_the_witnessed_head_is_ok_and_each_new_head_is_kept(bed: Bed) -> None:
    watcher = bed.watcher()
    found = await bed.check(watcher)  # at start: the full check
    assert (found.ok, found.seals_checked, watcher.state.full is not None) == (True, True, True)
    assert kept(watcher) == (Head(5, watcher.state.witnessed.mac), [f"2026-11-18T11:07:10+00:00 5:{watcher.state.witnessed.mac}"])
    bed.servers(3)
    assert (await bed.check(watcher)).ok and watcher.state.poll is not None
    head, history = kept(watcher)
    assert head is not None and head.n == 7 and len(history) == 2
    assert auditlog.head_from_text(bed.witness_file.read_text()) == head  # what verify --witness reads
    assert (await bed.check(watcher)).ok and len(kept(watcher)[1]) == 2  # nothing new: no new line
    assert metrics(watcher) == {
        "gpuspawner_audit_verified": 1, "gpuspawner_audit_seals_checked": 1,
        "gpuspawner_audit_last_check_timestamp_seconds": T0 + 90, "gpuspawner_audit_witnessed_entry": 7,
        "gpuspawner_audit_check_failures_total": 0,
    }


async def test_a_rollback_is_flagged_until_the_entries_are_back(bed: Bed, caplog: pytest.LogCaptureFixture) -> None:
    watcher = bed.watcher()
    bed.servers(3)
    await bed.check(watcher)
    taken = bed.roll_back(2)
    for _ in range(2):
        found = await bed.check(watcher)
        assert found.ok is False and found.since == T0 + 60
        assert found.problems == ("the log ends at entry #5, but the audit service's witness has seen #7: entries #6-#7 "
                                  "are gone (the store was rolled back or replaced)",)
    assert metrics(watcher)["gpuspawner_audit_verified"] == 0 and metrics(watcher)["gpuspawner_audit_check_failures_total"] == 2
    assert metrics(watcher)["gpuspawner_audit_witnessed_entry"] == 7 and kept(watcher)[0] == watcher.state.witnessed
    page = _page([], Filters(), "", prefix=PREFIX, banner=watcher.banner())
    assert page.index('id="witness" class="witness failed" role="alert"') < page.index("<table>")
    assert "entries #6-#7 are gone (the store was rolled back or replaced)" in page
    bed.put_back(taken)
    found = await bed.check(watcher)
    assert (found.ok, found.since) == (True, None) and metrics(watcher)["gpuspawner_audit_verified"] == 1
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "gpuspawner.service"]
    assert [level for level, _ in said] == ["ERROR", "WARNING"]  # the failure once, the recovery once
    assert "fails its check" in said[0][1] and "entries #6-#7 are gone" in said[0][1]
    assert "holds the witnessed head again" in said[1][1]


async def test_entry_n_rewritten_is_flagged(bed: Bed) -> None:
    watcher = bed.watcher()
    await bed.check(watcher)
    bed.rows("UPDATE gpuspawner_audit_log SET user = 'eve', mac = ? WHERE n = 5", "ab" * 32)
    found = await bed.check(watcher)
    assert found.ok is False and "entry #5 is not the one the audit service's witness has seen: the log was rewritten" in found.problems


async def test_a_log_that_ends_before_the_witnessed_entry_is_flagged_after_a_restart_too(bed: Bed) -> None:
    await bed.check(bed.watcher())
    bed.roll_back(1)
    restarted = bed.watcher()  # reads its head from its own file
    assert restarted.state.witnessed.n == 5
    found = await bed.check(restarted)
    assert found.ok is False and found.problems[0].startswith("the log ends at entry #4, but the audit service's witness has seen #5")


async def test_a_forged_entry_after_the_witnessed_head_is_flagged_and_its_removal_recovers(bed: Bed) -> None:
    watcher = bed.watcher()
    await bed.check(watcher)
    mac = bed.rows("SELECT mac FROM gpuspawner_audit_log WHERE n = 5")[0][0]
    bed.rows("INSERT INTO gpuspawner_audit_log (n, prev, mac, record_id, kind, at, body, body_sha256) "
             "VALUES (6, ?, ?, 'r9', 'opened', '2026-11-21T12:00:00+00:00', '{}', ?)", mac, "cd" * 32, "ef" * 32)
    found = await bed.check(watcher)
    assert found.problems == ("entry #6 (opened of record r9): its content does not match its seal",)
    assert watcher.state.witnessed.n == 5  # not witnessed
    bed.rows("DELETE FROM gpuspawner_audit_log WHERE n = 6")
    assert (await bed.check(watcher)).ok is True


async def test_without_the_key_seals_are_unchecked_but_a_rollback_is_still_caught(bed: Bed) -> None:
    watcher = bed.watcher(key_file=bed.folder / "nowhere.key")
    found = await bed.check(watcher)
    assert (found.ok, found.seals_checked) == (True, False)
    assert metrics(watcher)["gpuspawner_audit_seals_checked"] == 0
    assert any(line.startswith("Seals are not checked") for line in watcher.banner().lines)
    bed.roll_back(2)
    found = await bed.check(watcher)
    assert found.ok is False and found.problems[0].startswith("the log ends at entry #3, but the audit service's witness has seen #5")


async def test_the_full_check_finds_an_old_entry_changed_that_a_poll_does_not_read(bed: Bed) -> None:
    watcher = bed.watcher()
    await bed.check(watcher)
    bed.rows("UPDATE gpuspawner_audit_log SET user = 'eve' WHERE n = 2")
    assert (await bed.check(watcher)).ok is True  # a poll reads from #5 on
    found = await bed.check(watcher, after=600)
    assert found.ok is False and found.problems == ("entry #2 (opened of record r1): its content does not match its seal",)
    assert (await bed.check(watcher)).ok is False  # a failed full check runs again at every poll
    bed.rows("UPDATE gpuspawner_audit_log SET user = 'ada' WHERE n = 2")
    assert (await bed.check(watcher)).ok is True


async def test_a_log_that_reads_whole_in_a_tenth_of_a_poll_is_read_whole_at_every_poll(bed: Bed) -> None:
    watcher = bed.watcher(poll_seconds=30)
    await bed.check(watcher)  # the first check reads it all, and times it
    bed.rows("UPDATE gpuspawner_audit_log SET user = 'eve' WHERE n = 2")
    found = await bed.check(watcher)  # 30 s later: the next poll, long before the next full check is due
    assert found.ok is False and found.problems == ("entry #2 (opened of record r1): its content does not match its seal",)


async def test_a_store_not_made_yet_is_waited_for_and_a_store_deleted_is_flagged(tmp_path: Path) -> None:
    bed = Bed(tmp_path, [T0])
    watcher = bed.watcher()
    assert (await bed.check(watcher)).ok is None
    assert watcher.banner().level == "warning" and "the hub makes it when it first starts" in watcher.banner().lines[0]
    assert "gpuspawner_audit_verified" not in metrics(watcher)
    bed.servers(1)
    assert (await bed.check(watcher)).ok is True
    bed.db.unlink()
    found = await bed.check(watcher)
    assert found.ok is False and found.problems[0].startswith("there is no audit log any more (no audit store at ")


async def test_a_witness_without_a_file_says_its_heads_are_in_memory_only(bed: Bed) -> None:
    watcher = bed.watcher(memory_only=True)
    assert (await bed.check(watcher)).ok is True
    assert watcher.banner().lines[-1].startswith("The witnessed heads are kept in memory only")


def test_a_broken_witness_file_stops_the_witness_with_what_to_do(bed: Bed) -> None:
    bed.witness_file.parent.mkdir()
    bed.witness_file.write_text("not a head")
    with pytest.raises(AuditStoreError, match=r"unreadable: not JSON\. The witness will not start over from nothing"):
        bed.watcher()


# --- The metrics: for a token that holds read:metrics --------------------------------------------


class FakeHubUser(web.RequestHandler):
    """The hub's /hub/api/user: a model for the tokens it knows, JupyterHub's 403 for any other."""

    TOKENS: dict[str, dict[str, Any]] = {
        "scraper": {"kind": "service", "name": "prometheus", "scopes": ["read:metrics"]},
        "someone": {"kind": "user", "name": "bob", "scopes": ["access:services", "read:users:name!user=bob"]},
    }

    def get(self) -> None:
        model = self.TOKENS.get(self.request.headers.get("Authorization", "").removeprefix("token "))
        if model is None:
            self.set_status(403)
            self.finish({"status": 403, "message": "Not authorized"})
        else:
            self.finish(model)


@pytest.fixture
async def service_url(bed: Bed, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """The service as main() runs it, its witness having checked once; the hub's API answered by the test."""
    hub_sock, hub_port = bind_unused_port()
    hub = HTTPServer(web.Application([("/hub/api/user", FakeHubUser)]))
    hub.add_sockets([hub_sock])
    watcher = bed.watcher()
    await watcher.check()
    auth = HubAuth(api_url=f"http://127.0.0.1:{hub_port}/hub/api", api_token="the-service", cache_max_age=0)
    sock, port = bind_unused_port()
    server = HTTPServer(make_app(bed.hub(), watcher=watcher, hub_auth=lambda: auth))
    server.add_sockets([sock])
    monkeypatch.setattr(TableHandler, "get_current_user", lambda self: {"name": "boss", "admin": True, "scopes": []})
    yield f"http://127.0.0.1:{port}/services/audit/"
    server.stop()
    hub.stop()
    await watcher.stop()


@pytest.mark.parametrize(
    ("authorization", "status"),
    [("Bearer scraper", 200), ("token scraper", 200), ("Bearer someone", 403), ("Bearer unknown", 403), (None, 403)],
    ids=["prometheus-bearer", "token-scheme", "without-read-metrics", "unknown-token", "no-token"],
)
async def test_the_metrics_are_for_a_token_that_holds_read_metrics(service_url: str, authorization: str | None, status: int) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await AsyncHTTPClient().fetch(service_url + "metrics", headers=headers, raise_error=False)
    assert response.code == status
    body = response.body.decode()
    if status == 200:
        assert "gpuspawner_audit_verified 1.0" in body and "gpuspawner_audit_witnessed_entry 5.0" in body
    else:
        assert "gpuspawner_audit" not in body


async def test_the_page_shows_the_witness_at_its_top(service_url: str) -> None:
    response = await AsyncHTTPClient().fetch(service_url, raise_error=False)
    assert response.code == 200
    body = response.body.decode()
    assert 'class="witness ok" role="status"' in body
    assert "The audit log extends entry #5 that the witness has seen" in body


def test_the_banner_shows_what_was_found_as_text_never_run_as_markup() -> None:
    state = witness.record(witness.WitnessState(), witness.Check("poll", False, ("record '<script>alert(1)</script>'",), at=T0))
    html = _page([], Filters(), "", prefix=PREFIX, banner=witness.banner(state, kept_in=None, key_file=None))
    assert "<script>" not in html and "Found: record '&lt;script&gt;alert(1)&lt;/script&gt;'" in html.replace("&#39;", "'")


# --- Registration: an audit service the hub starts, or one apart from it ----------------------------


def test_the_hub_starts_the_service_with_its_witness_file_when_given_one() -> None:
    c = Config()
    audit_service(c, config_file="/srv/jupyterhub_config.py", witness_file="/srv/witness/head.json")
    (service,) = c.JupyterHub.services
    assert service["command"][1:] == ["-m", "gpuspawner.service", "-f", "/srv/jupyterhub_config.py",
                                      "--witness-file", "/srv/witness/head.json"]


def test_a_service_apart_from_the_hub_is_registered_by_its_url_and_token() -> None:
    c = Config()
    external_audit_service(c, url="http://audit:10101", api_token="t" * 64)
    assert c.JupyterHub.services == [{
        "name": "audit", "url": "http://audit:10101", "api_token": "t" * 64, "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": [SCOPE], "display": True,
    }]
    assert SCOPE in c.JupyterHub.custom_scopes


@pytest.mark.parametrize(
    ("url", "token", "said"),
    [("audit:10101", "t" * 64, "it must name a scheme, a host and a port"), ("http://audit", "t" * 64, "a port"),
     ("http://audit:10101", "short", "the api_token is 5 characters long")],
    ids=["no-scheme", "no-port", "short-token"],
)
def test_a_service_apart_that_cannot_work_is_refused_when_the_hub_loads_its_config(url: str, token: str, said: str) -> None:
    with pytest.raises(ValueError, match=re.escape(said)):
        external_audit_service(Config(), url=url, api_token=token)


def load_shipped_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> Any:
    monkeypatch.setenv("GPUSPAWNER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GPUSPAWNER_NETWORK", "gpuspawner")  # no Docker engine asked for its bridge
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = JupyterHub()
    app.load_config_file(str(ROOT / "jupyterhub_config.py"))
    return app.config


def test_the_shipped_config_registers_the_service_apart_with_a_token_made_beside_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "secrets" / "gpuspawner-audit.key"
    config = load_shipped_config(tmp_path, monkeypatch, GPUSPAWNER_AUDIT_SERVICE_URL="http://audit:10101",
                                 GPUSPAWNER_AUDIT_KEY_FILE=str(key))
    (service,) = [s for s in config.JupyterHub.services if s["name"] == "audit"]
    token_file = tmp_path / "secrets" / "audit-service.token"
    assert service["url"] == "http://audit:10101" and "command" not in service
    assert service["api_token"] == token_file.read_text().strip() and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert config.GPUSpawner.audit_key_file == str(key)
    assert config.GPUSpawner.audit_head_file == str(key.with_name("gpuspawner-audit.head"))


def test_the_shipped_config_moves_a_key_and_head_kept_in_the_data_folder_beside_the_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = tmp_path / "data" / "gpuspawner-audit.key"
    old.parent.mkdir()
    load_key(old, create=True)
    before = old.read_text()
    old_head = old.with_name("gpuspawner-audit.head")
    old_head.write_text('{"format": 3, "n": 7, "mac": "' + "ab" * 32 + '"}\n')
    key = tmp_path / "secrets" / "gpuspawner-audit.key"
    config = load_shipped_config(tmp_path, monkeypatch, GPUSPAWNER_AUDIT_KEY_FILE=str(key))
    assert key.read_text() == before and not old.exists() and stat.S_IMODE(key.stat().st_mode) == 0o600
    head = key.with_name("gpuspawner-audit.head")  # the head file goes with the key, apart from the database
    assert config.GPUSpawner.audit_head_file == str(head) and '"n": 7' in head.read_text() and not old_head.exists()


def test_without_a_service_url_the_hub_starts_the_service_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUSPAWNER_AUDIT_SERVICE_URL", raising=False)
    monkeypatch.delenv("GPUSPAWNER_AUDIT_KEY_FILE", raising=False)
    config = load_shipped_config(tmp_path, monkeypatch)
    (service,) = [s for s in config.JupyterHub.services if s["name"] == "audit"]
    assert service["command"][1:3] == ["-m", "gpuspawner.service"] and "api_token" not in service


def test_the_service_refuses_a_full_check_more_often_than_its_polls(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["-f", "x.py", "--witness-seconds", "60", "--full-check-seconds", "30"])
    assert "--full-check-seconds at least as long" in capsys.readouterr().err


# --- Each user reads their own records: the scope filtered to the user, honoured by the service ---------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"name": "boss", "admin": True, "scopes": []}, Readable()),
        ({"name": "aud", "admin": False, "scopes": ["access:services", SCOPE]}, Readable()),
        ({"name": "ada", "admin": False, "scopes": [f"{SCOPE}!user=ada", "access:services!service=audit"]},
         Readable(frozenset({"ada"}))),
        ({"name": "pi", "admin": False, "scopes": [f"{SCOPE}!user=pi", f"{SCOPE}!user=ada"]}, Readable(frozenset({"pi", "ada"}))),
        ({"name": "bob", "admin": False, "scopes": ["access:services", "read:users:name!user=bob"]}, None),
        ({"name": "grp", "admin": False, "scopes": [f"{SCOPE}!group=ml-lab"]}, None),
        ({"name": "odd", "admin": False, "scopes": [f"{SCOPE}-other!user=odd"]}, None),
    ],
    ids=["admin", "reader-of-all", "own", "several-users", "no-scope", "group-filter-not-honoured", "another-scope"],
)
def test_whose_records_a_logged_in_user_reads(model: dict[str, Any], expected: Readable | None) -> None:
    assert readable_by(model) == expected


def test_every_user_is_granted_the_service_and_their_own_records(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Config()
    c.JupyterHub.extra_user_scopes = {"read:groups!group=lab"}
    users_read_own_records(c)
    assert c.JupyterHub.extra_user_scopes == {"read:groups!group=lab", "access:services!service=audit", OWN_RECORDS}
    assert OWN_RECORDS == f"{SCOPE}!user" and SCOPE in c.JupyterHub.custom_scopes
    # JupyterHub 5 has no extra_user_scopes: the user role is redefined, keeping what it had
    import jupyterhub._version

    monkeypatch.setattr(jupyterhub._version, "version_info", (5, 4, 0, "", ""))
    c = Config()
    c.JupyterHub.load_roles = [{"name": "user", "scopes": ["self", "read:groups"]}, {"name": "other", "scopes": []}]
    users_read_own_records(c)
    assert c.JupyterHub.load_roles == [
        {"name": "user", "scopes": ["self", "read:groups", "access:services!service=audit", OWN_RECORDS]},
        {"name": "other", "scopes": []},
    ]
    c = Config()
    users_read_own_records(c, name="records")
    assert c.JupyterHub.load_roles == [{"name": "user", "scopes": ["self", "access:services!service=records", OWN_RECORDS]}]


def test_the_shipped_config_lets_every_user_read_their_own_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUSPAWNER_AUDIT_SERVICE_URL", raising=False)
    config = load_shipped_config(tmp_path, monkeypatch)
    assert {"access:services!service=audit", OWN_RECORDS} <= set(config.JupyterHub.extra_user_scopes)


OWN = {
    "boss": {"name": "boss", "admin": True, "scopes": []},
    "ada": {"name": "ada", "admin": False, "scopes": [f"{SCOPE}!user=ada", "access:services!service=audit"]},
    "bob": {"name": "bob", "admin": False, "scopes": [f"{SCOPE}!user=bob", "access:services!service=audit"]},
    "eve": {"name": "eve", "admin": False, "scopes": ["access:services!service=audit"]},
}


@pytest.fixture
async def records_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """The service over a hub's store holding servers of ada (r1, r3) and bob (r2); who asks is the header
    X-Who (one of OWN), as the hub's OAuth would say."""
    from gpuspawner.service import _Base

    store = AuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}", key=load_key(tmp_path / "audit.key", create=True),
                       head_file=tmp_path / "audit.head")
    for n, user in ((1, "ada"), (2, "bob"), (3, "ada")):
        store.insert(record(n, user=user, profile="a100-1", devices=(A100,), repo_digest="lab/torch@sha256:" + "c" * 64,
                            environment={"OMP_NUM_THREADS": "4", "LICENSE_SERVER": "lic.lab:27000"}))
    monkeypatch.setattr(_Base, "get_current_user", lambda self: OWN.get(self.request.headers.get("X-Who", "")))
    sock, port = bind_unused_port()
    server = HTTPServer(make_app(store, redact_names=("LICENSE_SERVER",)))
    server.add_sockets([sock])
    yield f"http://127.0.0.1:{port}/services/audit/"
    server.stop()
    store.dispose()


async def fetch(url: str, who: str) -> tuple[int, str]:
    response = await AsyncHTTPClient().fetch(url, headers={"X-Who": who}, raise_error=False, follow_redirects=False)
    return response.code, response.body.decode()


def users_of(fmt: str, body: str) -> list[str]:
    """The users of the records an export holds."""
    if fmt == "csv":
        import csv
        import io

        return [row["user"] for row in csv.DictReader(io.StringIO(body))]
    if fmt == "jsonl":
        return [json.loads(line)["user"] for line in body.splitlines()]
    graph = json.loads(body)["@graph"]
    return [e["agent"]["@id"].removeprefix("#user-") for e in graph if e["@type"] == "CreateAction"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "ro-crate"])
@pytest.mark.parametrize(
    ("who", "query", "status", "users"),
    [
        ("ada", "", 200, ["ada", "ada"]),
        ("ada", "?user=ada", 200, ["ada", "ada"]),
        ("ada", "?user=bob", 403, None),
        ("bob", "", 200, ["bob"]),
        ("boss", "", 200, ["ada", "bob", "ada"]),
        ("boss", "?user=bob", 200, ["bob"]),
        ("eve", "", 403, None),
    ],
    ids=["own", "own-by-name", "another-users", "bob-own", "admin-all", "admin-one-user", "no-scope"],
)
async def test_an_export_holds_the_readers_own_records_only(
    records_url: str, fmt: str, who: str, query: str, status: int, users: list[str] | None
) -> None:
    code, body = await fetch(f"{records_url}export.{fmt}{query}", who)
    assert code == status, body
    if users is not None:
        assert users_of(fmt, body) == users


async def test_the_table_lists_the_readers_own_servers_only(records_url: str) -> None:
    code, body = await fetch(records_url, "ada")
    page = Page(body)
    assert code == 200 and "Your servers and their environments" in body
    assert [row[:2] for row in page.rows[1:]] == [["r1", "ada"], ["r3", "ada"]]
    assert page.inputs["user"] == "ada"
    assert f"{PREFIX}records/r1/ro-crate-metadata.json" in page.links
    code, body = await fetch(records_url, "boss")
    assert code == 200 and [row[1] for row in Page(body).rows[1:]] == ["ada", "bob", "ada"]
    assert (await fetch(records_url + "?user=bob", "ada"))[0] == 403
    assert (await fetch(records_url, "eve"))[0] == 403


@pytest.mark.parametrize("name", ["record.json", "ro-crate-metadata.json", "reproduce.sh"])
@pytest.mark.parametrize(
    ("who", "record_id", "status"),
    [("ada", "r1", 200), ("ada", "r2", 403), ("bob", "r2", 200), ("boss", "r2", 200), ("eve", "r1", 403),
     ("ada", "r9", 404)],
    ids=["own", "another-users", "bob-own", "admin", "no-scope", "no-such-record"],
)
async def test_one_record_is_the_owners_and_the_admins_and_403_for_anyone_else(
    records_url: str, name: str, who: str, record_id: str, status: int
) -> None:
    code, body = await fetch(f"{records_url}records/{record_id}/{name}", who)
    assert code == status, body
    if status != 200:
        assert record_id not in body and "OMP_NUM_THREADS" not in body
        return
    if name == "record.json":
        assert json.loads(body)["id"] == record_id
    elif name == "ro-crate-metadata.json":
        actions = [e for e in json.loads(body)["@graph"] if e["@type"] == "CreateAction"]
        assert [a["@id"] for a in actions] == [f"#server-{record_id}"]
    else:  # as `gpuspawner reproduce` prints it, the admin's names redacted too
        assert body.endswith("docker run --rm -it -p 8888:8888 --gpus 1 -e LICENSE_SERVER -e OMP_NUM_THREADS=4 "
                              "lab/torch@sha256:" + "c" * 64 + " jupyter server --ip=0.0.0.0 --port=8888\n"), body
        assert "lic.lab" not in body


async def test_a_records_downloads_are_attachments_of_their_type(records_url: str) -> None:
    response = await AsyncHTTPClient().fetch(f"{records_url}records/r1/ro-crate-metadata.json", headers={"X-Who": "ada"})
    assert response.headers["Content-Type"] == "application/ld+json; charset=utf-8"
    assert response.headers["Content-Disposition"] == 'attachment; filename="ro-crate-metadata.json"'
    response = await AsyncHTTPClient().fetch(f"{records_url}export.ro-crate", headers={"X-Who": "ada"})
    assert response.headers["Content-Disposition"] == 'attachment; filename="ro-crate-metadata.json"'
