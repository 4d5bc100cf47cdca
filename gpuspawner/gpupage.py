"""The GPUs as they are now, for admins: a JupyterHub-managed service at ``/services/<name>/``.

One table row per device NVML lists (its model or MIG profile, UUID, state, the server holding
it, utilisation and memory now, a chart of its utilisation over the last hour, how long its
server's GPUs have been idle and how long before a time limit stops it), and a bar chart of
GPU-hours by user this month. Who may read the audit records may see it: admins, and users
holding ``custom:gpuspawner-audit:read``; everyone else gets 403. Add it to
``jupyterhub_config.py`` with::

    from gpuspawner.gpupage import gpu_page_service
    gpu_page_service(c, config_file=__file__)

The live part comes from the hub's own Prometheus metrics (``/hub/api/metrics``, the series of
:mod:`gpuspawner.metrics`), read every ``sample_seconds`` with the service's token, which the
registration grants ``read:metrics``. The utilisation history is kept in this process's memory
only, so the charts start when the service started. The month's GPU-hours come from the audit
records (:func:`gpuspawner.usage.gpu_usage`), found from ``jupyterhub_config.py`` exactly as the
audit service finds them, and are recomputed every few minutes at most.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from jupyterhub.utils import url_path_join
from markupsafe import Markup
from prometheus_client.parser import text_string_to_metric_families
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.ioloop import IOLoop, PeriodicCallback

from . import charts
from .form import TEMPLATES, template_environment
from .service import SCOPE, _Base, define_reader_scope, service_app, service_environment
from .store import AuditStore, StoreOpener, UsageRead
from .usage import Usage, gpu_usage

log = logging.getLogger("gpuspawner.gpupage")

SAMPLE_SECONDS = 30.0
HISTORY_SECONDS = 3600.0
USAGE_CACHE_SECONDS = 300.0  # the month's GPU-hours are read from the audit store at most this often
USAGE_BARS = 15  # users shown by name in the month's chart; the rest are one bar
METRICS_TIMEOUT = 10.0
SERIES = frozenset({  # what the page reads of gpuspawner.metrics
    "gpuspawner_device_info", "gpuspawner_device_utilization_ratio", "gpuspawner_device_memory_used_bytes",
    "gpuspawner_device_memory_total_bytes", "gpuspawner_device_holder", "gpuspawner_device_state", "gpuspawner_devices",
    "gpuspawner_queue_length", "gpuspawner_server_idle_seconds", "gpuspawner_server_time_left_seconds",
    "gpuspawner_sample_timestamp_seconds",
})


def gpu_page_service(
    c: Any, *, config_file: str, name: str = "gpus", port: int = 10102, sample_seconds: float = SAMPLE_SECONDS,
    history_seconds: float = HISTORY_SECONDS, pass_env: Iterable[str] = (),
) -> None:
    """Register the GPU page in a hub's configuration ``c`` (a traitlets Config).

    Adds the service (started by the hub with its own Python, given the hub's ``GPUSPAWNER_*``
    variables and those named in ``pass_env``, as :func:`gpuspawner.service.audit_service` does),
    a role granting it ``read:metrics`` (appended to ``c.JupyterHub.load_roles``), and the audit
    readers' scope if the audit service has not defined it. ``sample_seconds``: how often it
    reads the hub's metrics (and the page refreshes itself); ``history_seconds``: how far back
    its charts go.
    """
    if sample_seconds <= 0 or history_seconds < sample_seconds:
        raise ValueError(
            f"gpu_page_service: sample_seconds is {sample_seconds!r} and history_seconds {history_seconds!r}; "
            "both must be above 0, and history_seconds at least sample_seconds (e.g. 30 and 3600)."
        )
    services = list(c.JupyterHub.services) if "services" in c.JupyterHub else []
    services.append({
        "name": name,
        "url": f"http://127.0.0.1:{port}",
        "command": [sys.executable, "-m", "gpuspawner.gpupage", "-f", os.path.abspath(config_file),
                    "--sample-seconds", f"{sample_seconds:g}", "--history-seconds", f"{history_seconds:g}"],
        "environment": service_environment(os.environ, pass_env=pass_env),
        "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": [SCOPE],
        "display": True,
    })
    c.JupyterHub.services = services
    roles = list(c.JupyterHub.load_roles) if "load_roles" in c.JupyterHub else []
    roles.append({"name": f"{name}-metrics", "scopes": ["read:metrics"], "services": [name]})
    c.JupyterHub.load_roles = roles
    define_reader_scope(c)


# --- The hub's metrics, read into dataclasses (plain functions) ----------------------------------


class MetricsError(Exception):
    """The hub's metrics could not be read or made sense of; the message is a sentence for the page."""


@dataclass(frozen=True)
class Holder:
    user: str
    server: str  # "" for the user's default server
    profile: str  # "" without profiles

    @property
    def server_name(self) -> str:
        return f"{self.user}/{self.server}" if self.server else self.user


@dataclass(frozen=True)
class Device:
    """One device as the hub's metrics describe it."""

    uuid: str
    index: str
    model: str  # "NVIDIA A100-SXM4-80GB"; a MIG device's ends in " MIG <profile>"
    mig_profile: str = ""  # "" for a whole GPU
    node: str = ""  # the swarm node's host name; "" on one host
    parent_uuid: str = ""  # a MIG device's GPU
    utilization: float | None = None  # 0..1; None where NVML gives none (MIG devices)
    memory_used: float | None = None
    memory_total: float | None = None
    holder: Holder | None = None
    state: str = "free"  # free, held, busy (outside the hub), unhealthy, or "MIG" (a GPU split into MIG devices)
    idle_seconds: float | None = None  # the holder's GPUs idle this long; None when busy, unsampled or free
    time_left_seconds: float | None = None  # before the holder's sooner limit stops it; None without limits


@dataclass(frozen=True)
class Snapshot:
    """The hub's metrics at one read: the devices, the counts per model and state, the GPU queue."""

    read_at: float  # when this service read them (Unix time)
    sampled_at: float | None  # when the hub last read NVML; None before its first sample
    devices: tuple[Device, ...] = ()
    counts: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (model, state) -> devices
    queue: Mapping[str, int] = field(default_factory=dict)  # profile -> spawns waiting

    @property
    def when(self) -> float:
        """The time the readings describe: the hub's NVML sample, else the read."""
        return self.sampled_at if self.sampled_at is not None else self.read_at


def parse_metrics(text: str, *, read_at: float) -> Snapshot:
    """The snapshot in the hub's Prometheus text; :class:`MetricsError` if it is not that, or has no gpuspawner series."""
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                series.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    except ValueError as e:
        raise MetricsError(f"cannot read the hub's metrics: its answer is not Prometheus text ({e}).") from None
    if not any(name.startswith("gpuspawner_") for name in series):
        raise MetricsError(
            "the hub's metrics have no gpuspawner series: is GPUSpawner the hub's spawner "
            "(c.JupyterHub.spawner_class = \"gpu\"), and is the hub's gpuspawner as new as this service's?"
        )

    def by_label(name: str, *labels: str) -> dict[tuple[str, ...], float]:
        return {tuple(lb.get(k, "") for k in labels): v for lb, v in series.get(name, [])}

    utilization = by_label("gpuspawner_device_utilization_ratio", "uuid")
    used = by_label("gpuspawner_device_memory_used_bytes", "uuid")
    total = by_label("gpuspawner_device_memory_total_bytes", "uuid")
    idle = by_label("gpuspawner_server_idle_seconds", "user", "server")
    left = by_label("gpuspawner_server_time_left_seconds", "user", "server")
    holders = {lb["uuid"]: Holder(lb.get("user", ""), lb.get("server", ""), lb.get("profile", ""))
               for lb, v in series.get("gpuspawner_device_holder", []) if v}
    counts = {(m, s): int(v) for (m, s), v in by_label("gpuspawner_devices", "model", "state").items()}
    states = {lb.get("uuid", ""): lb.get("state", "") for lb, v in series.get("gpuspawner_device_state", []) if v}
    devices = []
    for lb, _ in series.get("gpuspawner_device_info", []):
        uuid = lb.get("uuid", "")
        holder = holders.get(uuid)
        state = states.get(uuid) or ("held" if holder else "free")
        key = (holder.user, holder.server) if holder else None
        devices.append(Device(
            uuid=uuid, index=lb.get("index", ""), model=lb.get("model", ""), mig_profile=lb.get("mig_profile", ""), node=lb.get("node", ""),
            parent_uuid=lb.get("parent_uuid", ""), utilization=utilization.get((uuid,)),
            memory_used=used.get((uuid,)), memory_total=total.get((uuid,)), holder=holder,
            state="MIG" if state == "mig" else state, idle_seconds=idle.get(key) if key else None, time_left_seconds=left.get(key) if key else None,
        ))
    stamp = series.get("gpuspawner_sample_timestamp_seconds")
    sampled_at = stamp[0][1] if stamp and stamp[0][1] > 0 else None
    return Snapshot(
        read_at=read_at, sampled_at=sampled_at, devices=tuple(sorted(devices, key=_device_order)),
        counts=counts, queue={p: int(v) for (p,), v in by_label("gpuspawner_queue_length", "profile").items() if v},
    )


def _device_order(d: Device) -> tuple[str, int, str, int, str]:
    index = int(d.index) if d.index.isdigit() else 1 << 30
    return (d.node, index, d.parent_uuid or d.uuid, 1 if d.parent_uuid else 0, d.uuid)


def http_failure(code: int, reason: str, body: bytes, *, url: str) -> str:
    """What an HTTP error from the hub's metrics means, as a sentence for the page."""
    detail = ""
    try:
        detail = str(json.loads(body).get("message") or "")
    except (ValueError, AttributeError):
        pass
    said = f"cannot read the hub's metrics: HTTP {code} {reason}".rstrip() + (f" ({detail})" if detail else "") + f" from {url}."
    if code == 403:
        said += (" The service's token needs the read:metrics scope: register the page with "
                 "gpu_page_service(c, config_file=__file__), which grants it.")
    elif code == 404:
        said += " Is the hub a JupyterHub of version 3 or later?"
    return said


# --- The utilisation history -------------------------------------------------------------------------


class History:
    """Each device's utilisation readings of the last ``keep`` seconds, in memory (a deque per UUID)."""

    def __init__(self, *, keep: float = HISTORY_SECONDS) -> None:
        self.keep = keep
        self.series: dict[str, deque[charts.Sample]] = {}

    def add(self, snapshot: Snapshot) -> None:
        """The snapshot's readings, once each: a hub that has not read NVML since the last read adds none."""
        t = snapshot.when
        for d in snapshot.devices:
            if d.utilization is None:
                continue
            readings = self.series.setdefault(d.uuid, deque())
            if not readings or readings[-1].t < t:
                readings.append(charts.Sample(t, d.utilization))
        self.trim(now=max(t, snapshot.read_at))

    def trim(self, *, now: float) -> None:
        """Forget readings older than ``keep`` seconds before ``now``, and devices left without any."""
        for uuid in list(self.series):
            readings = self.series[uuid]
            while readings and readings[0].t < now - self.keep:
                readings.popleft()
            if not readings:
                del self.series[uuid]

    def samples(self, uuid: str) -> list[charts.Sample]:
        return list(self.series.get(uuid, ()))

    def typical_interval(self, uuid: str) -> float | None:
        """The median time between a device's readings, or None with fewer than two."""
        ts = [s.t for s in self.series.get(uuid, ())]
        return statistics.median(b - a for a, b in zip(ts, ts[1:], strict=False)) if len(ts) > 1 else None


# --- What the page shows -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One device's table row, as text (and its chart, an SVG)."""

    node: str
    index: str
    model: str
    mig_profile: str
    uuid: str
    state: str
    holder: str
    profile: str
    utilization: str
    memory: str
    chart: Markup
    idle: str
    time_left: str
    soon: bool  # under 15 minutes left
    mig_child: bool


@dataclass(frozen=True)
class MonthUsage:
    """GPU-hours by user from ``since`` (the month's first day) to ``until``, or why there are none."""

    since: datetime.datetime
    until: datetime.datetime
    rows: tuple[Usage, ...] = ()
    error: str | None = None
    rejected: int = 0  # records left out: they fail their seals or lie outside the log's numbering


@dataclass(frozen=True)
class PageView:
    rows: tuple[Row, ...]
    nodes: bool  # the devices are on several hosts (a swarm): the table has a Node column
    summary: tuple[str, ...]  # "NVIDIA A100-SXM4-80GB: 1 free, 1 held"
    queue: tuple[str, ...]  # "a100-2: 2 waiting"
    notes: tuple[str, ...]  # how old the readings are, where the charts start
    error: str | None
    usage_chart: Markup
    usage_title: str
    usage_note: str
    usage_error: str | None
    refresh_seconds: int
    history_span: str


def page_view(
    snapshot: Snapshot | None, history: History, *, error: str | None, usage: MonthUsage, now: float,
    started_at: float, period: float,
) -> PageView:
    """Everything the page shows, as text and SVG, from the latest snapshot (None before the first read)."""
    notes = []
    if snapshot is not None:
        if snapshot.sampled_at is not None:
            notes.append(f"The hub last read the GPUs {duration(now - snapshot.sampled_at)} ago; "
                         f"this page read the hub's metrics {duration(now - snapshot.read_at)} ago.")
        else:
            notes.append(f"The hub has not read the GPUs yet; this page read its metrics {duration(now - snapshot.read_at)} ago.")
    elif error is None:
        notes.append("This page has not read the hub's metrics yet.")
    span = history_span(history.keep)
    notes.append(f"Charts: utilisation over the {span} (0–100 %), kept in this service's memory from when it started, "
                 f"{utc(started_at)}; it reads the hub every {duration(period)} and this page reloads itself as often.")
    rows = tuple(_row(d, history, now=now, started_at=started_at, period=period) for d in (snapshot.devices if snapshot else ()))
    queue = tuple(f"{p or '(no profile)'}: {n} waiting" for p, n in sorted((snapshot.queue if snapshot else {}).items()))
    return PageView(
        rows=rows, nodes=any(r.node for r in rows), summary=_summary(snapshot), queue=queue, notes=tuple(notes), error=error, usage_chart=Markup(_usage_chart(usage)),
        usage_title=f"GPU-hours by user, {usage.since:%B %Y}",
        usage_note=(f"From {usage.since:%Y-%m-%d %H:%M} UTC to {usage.until:%Y-%m-%d %H:%M} UTC, from the audit records: "
                    "running servers count up to now, a MIG slice counts its share of its GPU."),
        usage_error=usage.error or (
            f"{usage.rejected} audit record(s) fail their seals or lie outside the log's numbering and are not counted: "
            "run `gpuspawner audit verify`." if usage.rejected else None),
        refresh_seconds=max(5, round(period)), history_span=span,
    )


def _row(d: Device, history: History, *, now: float, started_at: float, period: float) -> Row:
    readings = history.samples(d.uuid)
    if readings or d.utilization is not None:
        gap = 2.5 * max(period, history.typical_interval(d.uuid) or 0.0)
        chart = charts.sparkline(readings, start=now - history.keep, end=now, gap=gap, known_from=started_at,
                                 label=f"{d.model} {d.uuid} utilisation over the {history_span(history.keep)}")
    else:
        chart = ""  # NVML reports no utilisation for MIG devices
    left = d.time_left_seconds
    return Row(
        node=d.node, index=d.index, model=d.model.removesuffix(f" MIG {d.mig_profile}"),
        mig_profile=f"MIG {d.mig_profile}" if d.mig_profile else "", uuid=d.uuid,
        state=d.state, holder=d.holder.server_name if d.holder else "", profile=d.holder.profile if d.holder else "",
        utilization=charts.percent(d.utilization) if d.utilization is not None else "n/a",
        memory=memory(d.memory_used, d.memory_total), chart=Markup(chart),
        idle=duration(d.idle_seconds) if d.idle_seconds is not None else ("in use" if d.holder and d.utilization else ""),
        time_left=duration(left) if left is not None else ("no limit" if d.holder else ""),
        soon=left is not None and left < 15 * 60, mig_child=bool(d.parent_uuid),
    )


def _summary(snapshot: Snapshot | None) -> tuple[str, ...]:
    if snapshot is None:
        return ()
    models: dict[str, dict[str, int]] = {}
    for (model, state), n in sorted(snapshot.counts.items()):
        models.setdefault(model, {})[state] = n
    order = ("free", "held", "busy", "unhealthy")
    return tuple(f"{model}: " + ", ".join(f"{states[s]} {s}" for s in order if states.get(s))
                 for model, states in models.items() if any(states.values()))




def usage_bars(rows: Sequence[Usage], *, limit: int = USAGE_BARS) -> list[tuple[str, float]]:
    """The month's bars: the ``limit`` users with the most GPU-hours, then one bar for all the others."""
    bars = [(r.key[0], r.gpu_hours) for r in rows[:limit]]
    rest = rows[limit:]
    if rest:
        bars.append((f"{len(rest)} other users", sum(r.gpu_hours for r in rest)))
    return bars


def _usage_chart(usage: MonthUsage) -> str:
    if usage.error:
        return ""
    return charts.bar_chart(usage_bars(usage.rows), label=f"GPU-hours by user, {usage.since:%B %Y}",
                            empty="no usage this month")


def month_start(now: datetime.datetime) -> datetime.datetime:
    """The first moment of ``now``'s month, UTC."""
    return now.astimezone(datetime.timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def duration(seconds: float) -> str:
    """A span as people say it: "45 s", "12 min", "2 h 05 min", "3 d 4 h"."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def history_span(seconds: float) -> str:
    """"last hour", "last 6 hours", "last 2 min": how far back the charts go."""
    if seconds == 3600:
        return "last hour"
    if seconds % 3600 == 0:
        return f"last {round(seconds / 3600)} hours"
    return f"last {duration(seconds)}"


def memory(used: float | None, total: float | None) -> str:
    if not total:  # a device NVML cannot read
        return "n/a"
    gib = 2**30
    return f"{(used or 0) / gib:.1f} / {total / gib:.0f} GiB"


def utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def render_page(view: PageView) -> str:
    """The page's HTML, from gpuspawner's ``templates/gpus.html`` (every text escaped; the charts are SVG)."""
    return template_environment(TEMPLATES).get_template("gpus.html").render(view=view)


# --- The service: reading the hub and the audit store, serving the page --------------------------------


class Sampler:
    """Reads the hub's metrics every ``period`` seconds, keeps the latest snapshot and the history."""

    def __init__(self, *, url: str, token: str, period: float = SAMPLE_SECONDS, keep: float = HISTORY_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.url, self._token, self.period, self.clock = url, token, period, clock
        self.history = History(keep=keep)
        self.started_at = clock()
        self.latest: Snapshot | None = None
        self.error: str | None = None
        self._timer: PeriodicCallback | None = None

    async def fetch(self) -> str:
        """The hub's metrics as text; :class:`MetricsError` saying why not."""
        request = HTTPRequest(self.url, headers={"Authorization": f"token {self._token}"}, request_timeout=METRICS_TIMEOUT)
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as e:
            raise MetricsError(f"cannot read the hub's metrics: {self.url} does not answer ({e}). Is the hub running?") from None
        if response.code != 200:
            raise MetricsError(http_failure(response.code, response.reason or "", response.body or b"", url=self.url))
        return response.body.decode("utf-8", "replace")

    async def sample(self) -> None:
        """One read: a new snapshot and readings, or the reason there are none (the last snapshot is kept)."""
        try:
            snapshot = parse_metrics(await self.fetch(), read_at=self.clock())
        except MetricsError as e:
            if str(e) != self.error:
                log.warning("GPU page: %s", e)
            self.error = str(e)
            return
        self.latest, self.error = snapshot, None
        self.history.add(snapshot)

    def start(self) -> None:
        IOLoop.current().add_callback(self.sample)
        self._timer = PeriodicCallback(self.sample, self.period * 1000)
        self._timer.start()


class MonthUsageCache:
    """This month's GPU-hours by user from the audit store, computed off the event loop, kept ``ttl`` seconds."""

    def __init__(self, store: AuditStore | Callable[[], AuditStore], *, ttl: float = USAGE_CACHE_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store if callable(store) else (lambda: store)
        self.ttl, self.clock = ttl, clock
        self._kept: tuple[float, MonthUsage] | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> MonthUsage:
        async with self._lock:  # one computation at a time; those waiting get its result
            if self._kept is None or self.clock() - self._kept[0] >= self.ttl:
                now = datetime.datetime.fromtimestamp(self.clock(), datetime.timezone.utc)
                usage = await asyncio.get_running_loop().run_in_executor(None, self._compute, now)
                self._kept = (self.clock(), usage)
            return self._kept[1]

    def _compute(self, now: datetime.datetime) -> MonthUsage:
        since = month_start(now)
        # a server requested before the month may hold GPUs in it: only the end bounds the stream
        read: list[UsageRead] = []
        try:
            rows = gpu_usage(self.store().iter_held(read=read), by=["user"], since=since, until=now, now=now)
        except Exception as e:  # the page still shows the GPUs; the log has the traceback
            log.exception("GPU page: cannot read the audit records")
            return MonthUsage(since, now, error=f"cannot read the audit records: {e}")
        return MonthUsage(since, now, rows=tuple(rows), rejected=read[0].rejected if read else 0)


class GPUsHandler(_Base):
    @web.authenticated
    async def get(self) -> None:
        self.check_reader()
        sampler: Sampler = self.settings["sampler"]
        usage = await self.settings["usage"].current()
        view = page_view(sampler.latest, sampler.history, error=sampler.error, usage=usage, now=sampler.clock(),
                         started_at=sampler.started_at, period=sampler.period)
        self.finish(render_page(view))


def make_app(sampler: Sampler, usage: MonthUsageCache, *, prefix: str | None = None) -> web.Application:
    prefix = prefix or os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/gpus/")
    return service_app(prefix, [(prefix, GPUsHandler)], sampler=sampler, usage=usage)


def main(argv: list[str] | None = None) -> None:
    from .hubconfig import load_spawner_settings

    parser = argparse.ArgumentParser(description="gpuspawner's GPU page (started by JupyterHub)")
    parser.add_argument("-f", "--config", required=True, help="the hub's jupyterhub_config.py")
    parser.add_argument("--sample-seconds", type=float, default=SAMPLE_SECONDS,
                        help=f"how often to read the hub's metrics (default {SAMPLE_SECONDS:g})")
    parser.add_argument("--history-seconds", type=float, default=HISTORY_SECONDS,
                        help=f"how far back the utilisation charts go (default {HISTORY_SECONDS:g})")
    args = parser.parse_args(argv)
    if args.sample_seconds <= 0 or args.history_seconds < args.sample_seconds:
        parser.error("--sample-seconds must be above 0 and --history-seconds at least as long")
    api_url, token = os.environ.get("JUPYTERHUB_API_URL"), os.environ.get("JUPYTERHUB_API_TOKEN")
    if not api_url or not token:
        parser.error("JUPYTERHUB_API_URL and JUPYTERHUB_API_TOKEN are not set: the GPU page runs as a JupyterHub "
                     "service; register it with gpu_page_service(c, config_file=__file__) in jupyterhub_config.py")
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(asctime)s %(name)s] %(message)s")
    hub = load_spawner_settings(args.config)
    store = StoreOpener(hub.audit_db_url, key_file=hub.audit_key_file, head_file=hub.audit_head_file)
    sampler = Sampler(url=url_path_join(api_url, "metrics"), token=token, period=args.sample_seconds,
                      keep=args.history_seconds)
    url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:10102"))
    make_app(sampler, MonthUsageCache(store)).listen(url.port or 80, url.hostname or "127.0.0.1")
    sampler.start()
    log.info("gpuspawner GPU page on %s, reading %s every %g s", url.geturl(), sampler.url, sampler.period)
    IOLoop.current().start()


if __name__ == "__main__":
    main()
