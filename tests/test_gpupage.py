"""The GPU page (gpuspawner.gpupage): what it makes of the hub's metrics, how much history it keeps,
what it says when it cannot read them, who may see it, and how it is registered.

The metrics below are written by hand from the series gpuspawner.metrics exposes. The page runs
end to end (a real hub, its real metrics, a real browser) in ``test_browser.py``.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import AsyncIterator, Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from traitlets.config import Config

from gpuspawner import gpupage
from gpuspawner.audit import AuditRecord, RecordedDevice
from gpuspawner.charts import Sample
from gpuspawner.gpupage import (
    GPUsHandler,
    History,
    MetricsError,
    MonthUsage,
    MonthUsageCache,
    Sampler,
    Snapshot,
    gpu_page_service,
    http_failure,
    make_app,
    page_view,
    parse_metrics,
    render_page,
)
from gpuspawner.service import SCOPE, audit_service
from gpuspawner.store import AuditStore
from gpuspawner.usage import Usage

A100 = "NVIDIA A100-SXM4-80GB"
GPU0, GPU1, GPU2, GPU3 = (f"GPU-0000000{n}-0000-4000-8000-00000000000{n}" for n in range(4))
MIG0, MIG1 = "MIG-00000002-0000-4000-8000-000000000000", "MIG-00000002-0001-4000-8000-000000000001"
NOW = 1_763_719_205.0  # 2025-11-21 10:00:05 UTC
HOUR = 3600.0

# Four GPUs: 0 held by ada (idle 12 min, 45 min left), 1 busy outside the hub, 2 split into two MIG
# devices (one held by bob's server "exp<1>", 10 min left; one free), 3 lost (NVML reads nothing).
METRICS = f"""\
# HELP gpuspawner_device_info A device NVML lists.
# TYPE gpuspawner_device_info gauge
gpuspawner_device_info{{index="0",mig_profile="",model="{A100}",parent_uuid="",uuid="{GPU0}"}} 1.0
gpuspawner_device_info{{index="1",mig_profile="",model="{A100}",parent_uuid="",uuid="{GPU1}"}} 1.0
gpuspawner_device_info{{index="2",mig_profile="",model="{A100}",parent_uuid="",uuid="{GPU2}"}} 1.0
gpuspawner_device_info{{index="2",mig_profile="1g.10gb",model="{A100} MIG 1g.10gb",parent_uuid="{GPU2}",uuid="{MIG1}"}} 1.0
gpuspawner_device_info{{index="2",mig_profile="1g.10gb",model="{A100} MIG 1g.10gb",parent_uuid="{GPU2}",uuid="{MIG0}"}} 1.0
gpuspawner_device_info{{index="3",mig_profile="",model="NVIDIA H100 80GB HBM3",parent_uuid="",uuid="{GPU3}"}} 1.0
# HELP gpuspawner_device_utilization_ratio NVML utilisation at the last sample.
# TYPE gpuspawner_device_utilization_ratio gauge
gpuspawner_device_utilization_ratio{{uuid="{GPU0}"}} 0.63
gpuspawner_device_utilization_ratio{{uuid="{GPU1}"}} 0.97
gpuspawner_device_utilization_ratio{{uuid="{GPU2}"}} 0.0
# HELP gpuspawner_device_memory_used_bytes Device memory in use.
# TYPE gpuspawner_device_memory_used_bytes gauge
gpuspawner_device_memory_used_bytes{{uuid="{GPU0}"}} 2.147483648e+10
gpuspawner_device_memory_used_bytes{{uuid="{GPU1}"}} 8.589934592e+09
gpuspawner_device_memory_used_bytes{{uuid="{GPU2}"}} 0.0
gpuspawner_device_memory_used_bytes{{uuid="{MIG0}"}} 1.073741824e+09
gpuspawner_device_memory_used_bytes{{uuid="{MIG1}"}} 0.0
gpuspawner_device_memory_used_bytes{{uuid="{GPU3}"}} 0.0
# HELP gpuspawner_device_memory_total_bytes Device memory in all.
# TYPE gpuspawner_device_memory_total_bytes gauge
gpuspawner_device_memory_total_bytes{{uuid="{GPU0}"}} 8.589934592e+10
gpuspawner_device_memory_total_bytes{{uuid="{GPU1}"}} 8.589934592e+10
gpuspawner_device_memory_total_bytes{{uuid="{GPU2}"}} 8.589934592e+10
gpuspawner_device_memory_total_bytes{{uuid="{MIG0}"}} 1.073741824e+10
gpuspawner_device_memory_total_bytes{{uuid="{MIG1}"}} 1.073741824e+10
gpuspawner_device_memory_total_bytes{{uuid="{GPU3}"}} 0.0
# HELP gpuspawner_device_holder The server of this hub holding a device.
# TYPE gpuspawner_device_holder gauge
gpuspawner_device_holder{{profile="a100-1",server="",user="ada",uuid="{GPU0}"}} 1.0
gpuspawner_device_holder{{profile="mig",server="exp<1>",user="bob",uuid="{MIG0}"}} 1.0
# HELP gpuspawner_device_state A device's state now.
# TYPE gpuspawner_device_state gauge
gpuspawner_device_state{{state="held",uuid="{GPU0}"}} 1.0
gpuspawner_device_state{{state="busy",uuid="{GPU1}"}} 1.0
gpuspawner_device_state{{state="mig",uuid="{GPU2}"}} 1.0
gpuspawner_device_state{{state="free",uuid="{MIG1}"}} 1.0
gpuspawner_device_state{{state="held",uuid="{MIG0}"}} 1.0
gpuspawner_device_state{{state="unhealthy",uuid="{GPU3}"}} 1.0
# HELP gpuspawner_devices Devices per model and state.
# TYPE gpuspawner_devices gauge
gpuspawner_devices{{model="{A100}",state="free"}} 0.0
gpuspawner_devices{{model="{A100}",state="held"}} 1.0
gpuspawner_devices{{model="{A100}",state="busy"}} 1.0
gpuspawner_devices{{model="{A100}",state="unhealthy"}} 0.0
gpuspawner_devices{{model="{A100} MIG 1g.10gb",state="free"}} 1.0
gpuspawner_devices{{model="{A100} MIG 1g.10gb",state="held"}} 1.0
gpuspawner_devices{{model="NVIDIA H100 80GB HBM3",state="free"}} 0.0
gpuspawner_devices{{model="NVIDIA H100 80GB HBM3",state="held"}} 0.0
gpuspawner_devices{{model="NVIDIA H100 80GB HBM3",state="busy"}} 0.0
gpuspawner_devices{{model="NVIDIA H100 80GB HBM3",state="unhealthy"}} 1.0
# HELP gpuspawner_queue_length Spawns waiting in the GPU queue.
# TYPE gpuspawner_queue_length gauge
gpuspawner_queue_length{{profile="a100-2"}} 2.0
gpuspawner_queue_length{{profile="mig"}} 0.0
# HELP gpuspawner_spawn_duration_seconds How long spawns took.
# TYPE gpuspawner_spawn_duration_seconds histogram
gpuspawner_spawn_duration_seconds_bucket{{le="10.0",outcome="ready",profile="a100-1"}} 1.0
gpuspawner_spawn_duration_seconds_bucket{{le="+Inf",outcome="ready",profile="a100-1"}} 1.0
gpuspawner_spawn_duration_seconds_count{{outcome="ready",profile="a100-1"}} 1.0
gpuspawner_spawn_duration_seconds_sum{{outcome="ready",profile="a100-1"}} 4.2
# HELP gpuspawner_spawn_refusals_total Spawns refused.
# TYPE gpuspawner_spawn_refusals_total counter
gpuspawner_spawn_refusals_total{{reason="no_devices"}} 3.0
# HELP gpuspawner_gpu_seconds_total GPU-seconds held.
# TYPE gpuspawner_gpu_seconds_total counter
gpuspawner_gpu_seconds_total{{profile="a100-1",user="ada"}} 5400.0
# HELP gpuspawner_server_idle_seconds How long the server's GPUs have been idle.
# TYPE gpuspawner_server_idle_seconds gauge
gpuspawner_server_idle_seconds{{server="",user="ada"}} 754.0
# HELP gpuspawner_server_time_left_seconds Time left before the sooner of the server's limits stops it.
# TYPE gpuspawner_server_time_left_seconds gauge
gpuspawner_server_time_left_seconds{{server="",user="ada"}} 2700.0
gpuspawner_server_time_left_seconds{{server="exp<1>",user="bob"}} 600.0
# HELP gpuspawner_sample_timestamp_seconds When the hub last read NVML.
# TYPE gpuspawner_sample_timestamp_seconds gauge
gpuspawner_sample_timestamp_seconds {NOW - 5}
# HELP jupyterhub_active_users JupyterHub's own series are there too.
# TYPE jupyterhub_active_users gauge
jupyterhub_active_users{{period="24h"}} 2.0
"""

NOVEMBER = datetime.datetime(2025, 11, 1, tzinfo=datetime.timezone.utc)
NO_USAGE = MonthUsage(NOVEMBER, datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc))


class Page(HTMLParser):
    """What a browser shows of the page: each table row's cell texts (SVG titles left out), the error, the charts."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.svgs = 0
        self.texts: list[str] = []
        self._cell: list[str] | None = None
        self._svg = 0
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self._cell = []
        elif tag == "svg":
            self._svg += 1
            self.svgs += 1
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "svg":
            self._svg -= 1

    def handle_data(self, data: str) -> None:
        if self._svg:
            return
        self.texts.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.texts).split())


def snapshot(text: str = METRICS, *, read_at: float = NOW) -> Snapshot:
    return parse_metrics(text, read_at=read_at)


def render(snap: Snapshot | None, history: History | None = None, *, error: str | None = None,
           usage: MonthUsage = NO_USAGE, started_at: float = NOW - 600) -> str:
    return render_page(page_view(snap, history or History(), error=error, usage=usage, now=NOW,
                                 started_at=started_at, period=30))


# --- The page model, from the hub's metrics -----------------------------------------------------------


def test_every_device_is_a_row_with_its_state_holder_readings_and_limits() -> None:
    page = Page(render(snapshot()))
    columns = [r[:8] + r[9:] for r in page.rows[1:]]  # the chart's cell (9th) is an SVG or empty
    assert columns == [
        ["0", A100, GPU0, "held", "ada", "a100-1", "63 %", "20.0 / 80 GiB", "12 min", "45 min"],
        ["1", A100, GPU1, "busy", "", "", "97 %", "8.0 / 80 GiB", "", ""],
        ["2", A100, GPU2, "MIG", "", "", "0 %", "0.0 / 80 GiB", "", ""],
        ["2", f"{A100} MIG 1g.10gb", MIG0, "held", "bob/exp<1>", "mig", "n/a", "1.0 / 10 GiB", "", "10 min"],
        ["2", f"{A100} MIG 1g.10gb", MIG1, "free", "", "", "n/a", "0.0 / 10 GiB", "", ""],
        ["3", "NVIDIA H100 80GB HBM3", GPU3, "unhealthy", "", "", "n/a", "n/a", "", ""],
    ]


def test_on_a_swarm_the_table_names_each_devices_node_and_groups_them_by_node() -> None:
    node_of = {GPU0: "gpu-node-2", GPU1: "gpu-node-2", GPU2: "gpu-node-1", MIG0: "gpu-node-1", MIG1: "gpu-node-1", GPU3: "gpu-node-1"}
    on_nodes = METRICS
    for uuid, node in node_of.items():  # the first line naming a device with value 1 is its gpuspawner_device_info
        on_nodes = on_nodes.replace(f'uuid="{uuid}"}} 1.0', f'uuid="{uuid}",node="{node}"}} 1.0', 1)
    html = render(snapshot(on_nodes))
    assert [(r[0], r[1], r[3]) for r in Page(html).rows[1:]] == [
        ("gpu-node-1", "2", GPU2), ("gpu-node-1", "2", MIG0), ("gpu-node-1", "2", MIG1), ("gpu-node-1", "3", GPU3),
        ("gpu-node-2", "0", GPU0), ("gpu-node-2", "1", GPU1),
    ]
    assert "<th>Node</th>" in html and "<th>Node</th>" not in render(snapshot())  # one host: no Node column


def test_each_device_with_utilisation_has_its_chart_and_mig_devices_none() -> None:
    history = History()
    history.add(snapshot())
    html = render(snapshot(), history)
    assert Page(html).svgs == 3 + 1  # GPUs 0, 1, 2, and the month's chart
    assert f'aria-label="{A100} {GPU0} utilisation over the last hour: now 63 %, mean 63 %, highest 63 %"' in html


def test_the_page_sums_up_the_models_and_the_queue() -> None:
    text = Page(render(snapshot())).text
    assert f"{A100}: 1 held, 1 busy" in text and f"{A100} MIG 1g.10gb: 1 free, 1 held" in text
    assert "NVIDIA H100 80GB HBM3: 1 unhealthy" in text
    assert "GPU queue · a100-2: 2 waiting" in text and "mig: 0" not in text


def test_the_page_says_how_old_the_readings_are_and_where_the_charts_start() -> None:
    text = Page(render(snapshot(read_at=NOW - 2), started_at=NOW - 600)).text
    assert "The hub last read the GPUs 5 s ago; this page read the hub's metrics 2 s ago." in text
    assert ("Charts: utilisation over the last hour (0–100 %), kept in this service's memory from when it started, "
            "2025-11-21 09:50 UTC; it reads the hub every 30 s and this page reloads itself as often.") in text
    assert '<meta http-equiv="refresh" content="30">' in render(snapshot())


def test_a_time_limit_close_at_hand_stands_out() -> None:
    html = render(snapshot())
    assert '<td class="num soon">10 min</td>' in html and '<td class="num">45 min</td>' in html


def test_text_from_the_metrics_is_shown_as_text_never_run_as_markup() -> None:
    hostile = METRICS.replace('user="ada"', 'user="<script>x()</script>"')
    html = render(snapshot(hostile))
    assert "<script>" not in html
    assert Page(html).rows[1][4] == "<script>x()</script>"


def test_metrics_without_gpuspawner_series_say_what_to_check() -> None:
    with pytest.raises(MetricsError, match=r"^the hub's metrics have no gpuspawner series: is GPUSpawner the hub's spawner"):
        parse_metrics('# TYPE jupyterhub_active_users gauge\njupyterhub_active_users{period="24h"} 2.0\n', read_at=NOW)


def test_an_answer_that_is_not_prometheus_text_is_a_metrics_error() -> None:
    with pytest.raises(MetricsError, match=r"^cannot read the hub's metrics: its answer is not Prometheus text"):
        parse_metrics("<html>Please log in</html>\n", read_at=NOW)


def test_the_hubs_first_sample_not_yet_taken() -> None:
    snap = snapshot(METRICS.replace(f"gpuspawner_sample_timestamp_seconds {NOW - 5}", "gpuspawner_sample_timestamp_seconds 0.0"))
    assert snap.sampled_at is None and snap.when == NOW
    assert "The hub has not read the GPUs yet; this page read its metrics 0 s ago." in Page(render(snap)).text


def test_each_device_has_the_state_the_hub_gives_it() -> None:
    states = {d.uuid: d.state for d in snapshot(METRICS).devices}
    assert states == {GPU0: "held", GPU1: "busy", GPU2: "MIG", MIG0: "held", MIG1: "free", GPU3: "unhealthy"}


def test_the_page_reads_the_series_the_hub_exposes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against gpuspawner.metrics itself: its exposition, from the hub's readings, read back by the page."""
    from prometheus_client import REGISTRY, generate_latest

    from gpuspawner.hubwide import resources
    from gpuspawner.metrics import metric_names
    from gpuspawner.readings import DeviceReading, Readings, ServerReading

    assert gpupage.SERIES <= metric_names()
    mig = f"{A100} MIG 1g.10gb"
    monkeypatch.setattr(resources, "readings", Readings(taken_at=NOW - 5, devices=(
        DeviceReading(GPU0, 0, A100, "", "", 63, 20 << 30, 80 << 30, "held", "ada", "", "a100-1"),
        DeviceReading(GPU1, 1, A100, "", "", 97, 8 << 30, 80 << 30, "busy"),
        DeviceReading(GPU2, 2, A100, "", "", 0, 0, 80 << 30, "mig"),
        DeviceReading(MIG0, 2, mig, "1g.10gb", GPU2, None, 1 << 30, 10 << 30, "held", "bob", "exp<1>", "mig"),
        DeviceReading(MIG1, 2, mig, "1g.10gb", GPU2, None, 0, 10 << 30, "free"),
        DeviceReading(GPU3, 3, "NVIDIA H100 80GB HBM3", "", "", None, 0, 0, "unhealthy"),
    ), servers=(ServerReading("ada", "", 754.0, 2700.0), ServerReading("bob", "exp<1>", None, 600.0))))
    exposed = generate_latest(REGISTRY).decode()
    assert Page(render(parse_metrics(exposed, read_at=NOW))).rows[1:] == Page(render(snapshot())).rows[1:]


# --- The history --------------------------------------------------------------------------------------


def at(t: float, utilization: float, *, sampled: float | None = None) -> Snapshot:
    """The fixture's devices, GPU 0 at `utilization`, read at `t` (the hub's sample at `sampled`, else `t`)."""
    base = snapshot()
    devices = tuple(dataclasses.replace(d, utilization=utilization) if d.uuid == GPU0 else d for d in base.devices)
    return Snapshot(read_at=t, sampled_at=t if sampled is None else sampled, devices=devices)


def test_the_history_keeps_the_last_hour_only() -> None:
    history = History(keep=HOUR)
    for minute in range(0, 121, 10):
        history.add(at(NOW - HOUR * 2 + minute * 60, minute / 120))
    kept = history.samples(GPU0)
    assert [s.t for s in kept] == [NOW - HOUR + m * 60 for m in range(0, 61, 10)]
    assert kept[-1] == Sample(NOW, 1.0)


def test_a_device_gone_for_an_hour_is_forgotten() -> None:
    history = History(keep=HOUR)
    history.add(at(NOW - HOUR - 60, 0.5))
    gone = Snapshot(read_at=NOW, sampled_at=NOW, devices=tuple(d for d in snapshot().devices if d.uuid != GPU1))
    history.add(gone)
    assert GPU1 not in history.series and history.samples(GPU0) == [Sample(NOW, 0.63)]


def test_a_reading_is_kept_once_when_the_hub_has_not_sampled_again() -> None:
    history = History()
    history.add(at(NOW - 60, 0.5, sampled=NOW - 90))
    history.add(at(NOW - 30, 0.5, sampled=NOW - 90))
    history.add(at(NOW, 0.7, sampled=NOW - 10))
    assert history.samples(GPU0) == [Sample(NOW - 90, 0.5), Sample(NOW - 10, 0.7)]
    assert history.typical_interval(GPU0) == 80


def test_devices_without_utilisation_keep_no_history() -> None:
    history = History()
    history.add(snapshot())
    assert set(history.series) == {GPU0, GPU1, GPU2}


# --- When the metrics cannot be read ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "body", "said"),
    [
        (403, "Forbidden", b'{"status": 403, "message": "Access to metrics requires scope \'read:metrics\'"}',
         "cannot read the hub's metrics: HTTP 403 Forbidden (Access to metrics requires scope 'read:metrics') from "
         "http://hub/hub/api/metrics. The service's token needs the read:metrics scope: register the page with "
         "gpu_page_service(c, config_file=__file__), which grants it."),
        (404, "Not Found", b"<html>no</html>",
         "cannot read the hub's metrics: HTTP 404 Not Found from http://hub/hub/api/metrics. "
         "Is the hub a JupyterHub of version 3 or later?"),
        (500, "Internal Server Error", b"",
         "cannot read the hub's metrics: HTTP 500 Internal Server Error from http://hub/hub/api/metrics."),
    ],
    ids=["no-scope", "no-such-page", "hub-error"],
)
def test_an_http_error_from_the_hub_is_said_with_what_to_do(code: int, reason: str, body: bytes, said: str) -> None:
    assert http_failure(code, reason, body, url="http://hub/hub/api/metrics") == said


def test_the_page_still_renders_and_says_why_it_has_no_readings() -> None:
    error = http_failure(403, "Forbidden", b"", url="http://hub/hub/api/metrics")
    page = Page(render(None, error=error))
    assert error in page.text
    assert page.rows[1:] == [["No devices to show."]]


def test_after_a_failed_read_the_last_readings_stay_with_the_error_above_them() -> None:
    page = Page(render(snapshot(read_at=NOW - 95), error="cannot read the hub's metrics: HTTP 502 Bad Gateway."))
    assert "cannot read the hub's metrics: HTTP 502 Bad Gateway." in page.text
    assert "this page read the hub's metrics 1 min ago" in page.text and len(page.rows) == 7


class FakeHub(web.RequestHandler):
    """The hub's /hub/api/metrics: the fixture for the right token, JupyterHub's 403 for any other."""

    def get(self) -> None:
        if self.request.headers.get("Authorization") != "token right":
            self.set_status(403)
            self.finish({"status": 403, "message": "Access to metrics requires scope 'read:metrics'"})
            return
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(METRICS)


@pytest.fixture
async def hub_url() -> AsyncIterator[str]:
    sock, port = bind_unused_port()
    server = HTTPServer(web.Application([("/hub/api/metrics", FakeHub)]))
    server.add_sockets([sock])
    yield f"http://127.0.0.1:{port}/hub/api/metrics"
    server.stop()


async def test_the_sampler_reads_the_hub_with_its_token(hub_url: str) -> None:
    sampler = Sampler(url=hub_url, token="right", clock=lambda: NOW)
    await sampler.sample()
    assert sampler.error is None and sampler.latest is not None
    assert [d.uuid for d in sampler.latest.devices if d.holder] == [GPU0, MIG0]
    assert sampler.history.samples(GPU0) == [Sample(NOW - 5, 0.63)]


async def test_a_sampler_without_the_scope_says_so_and_keeps_what_it_had(hub_url: str) -> None:
    sampler = Sampler(url=hub_url, token="right", clock=lambda: NOW)
    await sampler.sample()
    sampler._token = "wrong"
    await sampler.sample()
    assert (sampler.error or "").startswith("cannot read the hub's metrics: HTTP 403 Forbidden (Access to metrics "
                                            "requires scope 'read:metrics')")
    assert sampler.latest is not None and len(sampler.latest.devices) == 6
    await sampler.sample()  # the same error again: said once in the log, still on the page
    assert sampler.error is not None


async def test_a_hub_that_does_not_answer_is_said_so() -> None:
    sock, port = bind_unused_port()
    sock.close()  # nothing listens there now
    sampler = Sampler(url=f"http://127.0.0.1:{port}/hub/api/metrics", token="t", clock=lambda: NOW)
    await sampler.sample()
    assert (sampler.error or "").startswith(f"cannot read the hub's metrics: http://127.0.0.1:{port}/hub/api/metrics does not answer (")
    assert (sampler.error or "").endswith("Is the hub running?") and sampler.latest is None


# --- This month's GPU-hours ---------------------------------------------------------------------------


def gpu_record(rid: str, user: str, start: str, stop: str | None) -> AuditRecord:
    device = RecordedDevice(uuid=GPU0, model=A100, memory_total=80 << 30)
    return AuditRecord(id=rid, hub_id="hub-1", user=user, server="", requested_at=start, started_at=start,
                       stopped_at=stop, devices=(device,), outcome="stopped" if stop else "running")


async def test_the_months_usage_counts_from_its_first_day_and_is_kept_a_while(tmp_path: Path) -> None:
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}", key=bytes(range(32)))
    store.insert(gpu_record("r1", "ada", "2025-10-31T22:00:00+00:00", None))  # since October: 2 h of it, then November
    store.insert(gpu_record("r2", "bob", "2025-11-20T08:00:00+00:00", "2025-11-20T09:30:00+00:00"))
    store.insert(gpu_record("r3", "cyd", "2025-10-01T08:00:00+00:00", "2025-10-01T09:00:00+00:00"))  # October only
    clock = [NOW]
    cache = MonthUsageCache(store, ttl=300, clock=lambda: clock[0])
    usage = await cache.current()
    assert usage.since == NOVEMBER and usage.error is None
    assert [(r.key, round(r.gpu_hours, 2)) for r in usage.rows] == [(("ada",), 490.0), (("bob",), 1.5)]  # 20 d 10 h
    store.insert(gpu_record("r4", "dan", "2025-11-21T09:00:00+00:00", "2025-11-21T10:00:00+00:00"))
    clock[0] += 60
    assert await cache.current() is usage  # kept
    clock[0] += 300
    assert [r.key for r in (await cache.current()).rows] == [("ada",), ("bob",), ("dan",)]


async def test_a_record_that_fails_its_seal_is_not_counted_and_the_page_says_so(tmp_path: Path) -> None:
    import sqlite3

    store = AuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}", key=bytes(range(32)))
    for rid, user in (("r1", "ada"), ("r2", "bob")):
        store.insert(gpu_record(rid, user, "2025-11-20T08:00:00+00:00", None))
        store.finish(rid, outcome="stopped", stopped_at="2025-11-20T09:30:00+00:00")
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:  # bob's hours, made up in the database
        db.execute("UPDATE gpuspawner_audit_log SET gpus = 8.0 WHERE kind = 'ended' AND user = 'bob'")
    usage = await MonthUsageCache(store, clock=lambda: NOW).current()
    assert [(r.key, round(r.gpu_hours, 2)) for r in usage.rows] == [(("ada",), 1.5)]
    page = Page(render(snapshot(), usage=usage))
    assert "1 audit record(s) fail their seals or lie outside the log's numbering and are not counted" in page.text


def test_the_months_chart_has_a_bar_per_user_and_one_for_the_rest() -> None:
    rows = tuple(Usage((f"u{n:02d}",), gpu_hours=100 - n) for n in range(18))
    assert gpupage.usage_bars(rows, limit=15)[-2:] == [("u14", 86), ("3 other users", 85 + 84 + 83)]
    page = render(snapshot(), usage=MonthUsage(NOVEMBER, NO_USAGE.until, rows=rows))
    assert "GPU-hours by user, November 2025" in Page(page).text and page.count('class="bar"') == 16


def test_a_month_without_usage_says_so() -> None:
    assert "no usage this month" in render(snapshot())


def test_an_unreadable_audit_store_is_said_and_the_gpus_still_shown() -> None:
    page = Page(render(snapshot(), usage=MonthUsage(NOVEMBER, NO_USAGE.until, error="cannot read the audit records: disk I/O error")))
    assert "cannot read the audit records: disk I/O error" in page.text and len(page.rows) == 7


@pytest.mark.parametrize(
    ("now", "first"),
    [("2026-11-21T10:00:00+00:00", "2026-11-01T00:00:00+00:00"), ("2026-12-01T00:30:00+02:00", "2026-11-01T00:00:00+00:00"),
     ("2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00")],
    ids=["mid-month", "another-zone", "first-moment"],
)
def test_the_month_starts_on_its_first_day_utc(now: str, first: str) -> None:
    assert gpupage.month_start(datetime.datetime.fromisoformat(now)).isoformat() == first


# --- Who may see it -----------------------------------------------------------------------------------


@pytest.fixture
async def page_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Callable[[dict[str, Any]], Any]]:
    """get(user model): the page as that logged-in user gets it (the hub's OAuth answered by the test)."""
    sampler = Sampler(url="http://127.0.0.1:9/", token="t", clock=lambda: NOW)
    sampler.latest = snapshot()
    usage = MonthUsageCache(AuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}", key=bytes(range(32))), clock=lambda: NOW)
    sock, port = bind_unused_port()
    server = HTTPServer(make_app(sampler, usage, prefix="/services/gpus/"))
    server.add_sockets([sock])

    async def get(user: dict[str, Any]) -> Any:
        monkeypatch.setattr(GPUsHandler, "get_current_user", lambda self: user)
        return await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/services/gpus/", raise_error=False)

    yield get
    server.stop()


@pytest.mark.parametrize(
    ("user", "status"),
    [
        ({"name": "boss", "admin": True, "scopes": []}, 200),
        ({"name": "aud", "admin": False, "scopes": ["access:services", SCOPE]}, 200),
        ({"name": "bob", "admin": False, "scopes": ["access:services"]}, 403),
        ({"name": "eve", "scopes": None}, 403),
    ],
    ids=["admin", "audit-reader", "user", "no-scopes"],
)
async def test_admins_and_audit_readers_see_the_page_and_others_get_403(
    page_url: Callable[[dict[str, Any]], Any], user: dict[str, Any], status: int
) -> None:
    response = await page_url(user)
    assert response.code == status
    if status == 200:
        assert GPU0 in response.body.decode()
    else:
        assert response.body.decode() == "403: Forbidden\n" and GPU0 not in response.body.decode()


# --- Registration -------------------------------------------------------------------------------------


def test_the_registration_adds_the_service_its_metrics_role_and_the_readers_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSPAWNER_DATA_DIR", "/srv/hub")
    c = Config()
    c.JupyterHub.services = [{"name": "idle-culler"}]
    c.JupyterHub.load_roles = [{"name": "idle-culler", "scopes": ["list:users"], "services": ["idle-culler"]}]
    gpu_page_service(c, config_file="/srv/jupyterhub_config.py", sample_seconds=10, port=10200)
    (service,) = [s for s in c.JupyterHub.services if s["name"] == "gpus"]
    assert service["url"] == "http://127.0.0.1:10200"
    assert service["command"][1:] == ["-m", "gpuspawner.gpupage", "-f", "/srv/jupyterhub_config.py",
                                      "--sample-seconds", "10", "--history-seconds", "3600"]
    assert service["environment"]["GPUSPAWNER_DATA_DIR"] == "/srv/hub"
    assert service["oauth_no_confirm"] and service["display"] and service["oauth_client_allowed_scopes"] == [SCOPE]
    assert [r["name"] for r in c.JupyterHub.load_roles] == ["idle-culler", "gpus-metrics"]
    assert c.JupyterHub.load_roles[-1] == {"name": "gpus-metrics", "scopes": ["read:metrics"], "services": ["gpus"]}
    assert SCOPE in c.JupyterHub.custom_scopes


def test_the_page_and_the_audit_service_go_together_in_either_order() -> None:
    for order in ([audit_service, gpu_page_service], [gpu_page_service, audit_service]):
        c = Config()
        for register in order:
            register(c, config_file="/srv/jupyterhub_config.py")
        assert sorted(s["name"] for s in c.JupyterHub.services) == ["audit", "gpus"]
        assert list(c.JupyterHub.custom_scopes) == [SCOPE]


@pytest.mark.parametrize(("sample", "history"), [(0, 3600), (60, 30)], ids=["no-sampling", "history-shorter"])
def test_sampling_that_cannot_work_is_refused_when_the_hub_loads_its_config(sample: float, history: float) -> None:
    with pytest.raises(ValueError, match=r"^gpu_page_service: sample_seconds is .* \(e\.g\. 30 and 3600\)\.$"):
        gpu_page_service(Config(), config_file="x.py", sample_seconds=sample, history_seconds=history)


def test_the_service_refuses_to_start_outside_a_hub(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("JUPYTERHUB_API_URL", raising=False)
    with pytest.raises(SystemExit):
        gpupage.main(["-f", "jupyterhub_config.py"])
    assert "the GPU page runs as a JupyterHub service" in capsys.readouterr().err


def test_the_shipped_config_adds_the_gpu_page(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from jupyterhub.app import JupyterHub

    monkeypatch.setenv("GPUSPAWNER_DATA_DIR", str(tmp_path))
    app = JupyterHub()
    app.load_config_file(str(Path(__file__).resolve().parent.parent / "jupyterhub_config.py"))
    services = {s["name"]: s for s in app.config.JupyterHub.services}
    assert services["gpus"]["command"][1:3] == ["-m", "gpuspawner.gpupage"]
    assert {"name": "gpus-metrics", "scopes": ["read:metrics"], "services": ["gpus"]} in app.config.JupyterHub.load_roles
