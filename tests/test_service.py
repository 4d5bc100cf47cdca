"""The audit service's page: the records as a table, the filters as typed, the download links.

The service itself (OAuth, 403 for non-admins, CSV and JSONL) runs end to end in
``test_e2e_audit.py``; this is the page's HTML, rendered from ``templates/audit.html``.
"""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

from gpuspawner.audit import AuditRecord, RecordedDevice
from gpuspawner.service import TABLE_LIMIT, _page
from gpuspawner.store import Filters

PREFIX = "/services/audit/"
A100 = RecordedDevice(uuid="GPU-5fb1e2a3", model="NVIDIA A100-SXM4-80GB", memory_total=80 * 2**30)


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
         "lab/pytorch@sha256:" + "c" * 64, "NVIDIA A100-SXM4-80GB GPU-5fb1e2a3", "", "sealed"],
        ["r2", "bob", "big", "", "failed", "2026-11-21T10:00:02+00:00", "",
         f"sha256:{'d' * 64} (no repository digest)", "", "No free GPU.", "open"],
    ]
    assert page.rows[0] == []  # the header row has <th> cells


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
    assert page.links == [f"{PREFIX}export.{fmt}?since=2026-11-01&user=ada&profile=a100-1" for fmt in ("csv", "jsonl")]
    assert page.rows == [[]]  # the header row only


def test_the_page_says_how_many_records_the_table_shows_at_most() -> None:
    assert f"the table shows the first {TABLE_LIMIT}" in _page([], Filters(), "", prefix=PREFIX)
