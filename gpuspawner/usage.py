"""GPU-hours from the audit records: who held how much GPU, and for how long, within a period, as pure code.

A record's server holds its devices from the moment its container started (``started_at``)
until it stopped (``stopped_at``); a server still running counts up to ``now``. Only the part
inside the period counts, so a server spanning the period's edges is cut at them. A record that
never started a container held no GPU for any time.

A whole GPU counts 1 GPU-hour an hour. A MIG device counts its share of its GPU's compute: a
``1g.10gb`` slice is 1/7 of a GPU (NVIDIA's A100 and H100 have 7 compute slices), a ``3g.40gb``
slice 3/7. ``device_hours`` counts every device as 1, whatever it is.

Idle GPU-hours come from the record's ``idle_gpu_seconds``: the GPU-seconds (weighted the same
way) during which the hub's samples saw the server's GPUs under the idle threshold, written
when the server stops. A record cut by the period's edges counts the share of them that its
time inside the period is of its whole holding time. A record never sampled (or still
running) has no idle time known; a row none of whose records has one shows None, not 0.

Grouped by ``group``, a record counts once in each of its user's JupyterHub groups (those the
user was in when the server was requested), so the groups' totals may add up to more than the
whole; a record without groups counts under ``(no group)``. The report's ``total`` counts
every record once.

:func:`usage_report` folds records one at a time into totals keyed by the chosen columns, so a
million records take constant memory; :func:`merged_reports` adds up reports of parts of the
records read side by side.
"""

from __future__ import annotations

import datetime
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .audit import AuditRecord, RecordedDevice
from .times import parse_time

MIG_COMPUTE_SLICES = 7
BY = ("user", "server", "profile", "model", "group")  # what usage can be grouped by
NO_GROUP = "(no group)"
NO_PROFILE = "(no profile)"
_MIG_SLICES = re.compile(r"^(?:\d+c\.)?(\d+)g\.")


def gpu_share(device: RecordedDevice) -> float:
    """How much of a GPU a device is: 1 for a whole GPU, g/7 for a MIG device of g compute slices."""
    if not device.mig_profile:
        return 1.0
    m = _MIG_SLICES.match(device.mig_profile)
    return min(1.0, int(m.group(1)) / MIG_COMPUTE_SLICES) if m else 1.0


def model_label(device: RecordedDevice) -> str:
    """What usage grouped by model calls a device: its model, and its MIG profile for a MIG device."""
    return device.model + (f" MIG {device.mig_profile}" if device.mig_profile else "")


@dataclass(slots=True)  # not frozen: a frozen init costs three times as much, a second a million records
class Held:
    """What usage needs of one server's record: who, which server and profile, its groups, when it
    held its devices (epoch seconds; ``stopped`` None while it runs, ``started`` None if it never
    held any), how many GPUs they are worth (:func:`gpu_share`) and how many there are, its idle
    GPU-seconds, and each device as ``(model label, GPU share)`` (read only to group by model)."""

    user: str
    server: str
    profile: str | None
    groups: tuple[str, ...]
    started: float | None
    stopped: float | None
    gpus: float
    device_count: int
    idle_gpu_seconds: float | None
    devices: Callable[[], Sequence[tuple[str, float]]]

    @classmethod
    def of(cls, record: AuditRecord) -> Held:
        devices = tuple((model_label(d), gpu_share(d)) for d in record.devices)
        return cls(
            user=record.user, server=record.server, profile=record.profile, groups=tuple(record.groups),
            started=parse_time(record.started_at).timestamp() if record.started_at else None,
            stopped=parse_time(record.stopped_at).timestamp() if record.stopped_at else None,
            gpus=float(sum(share for _, share in devices)), device_count=len(devices),
            idle_gpu_seconds=record.idle_gpu_seconds, devices=lambda: devices,
        )


def _holding(held: Held, now: float) -> tuple[float, float] | None:
    """When the server held its devices: its start to its stop (or now); None if it held none."""
    if not held.device_count or held.started is None:
        return None
    return held.started, held.stopped if held.stopped is not None else now


def _within(start: float, end: float, *, since: float | None, until: float) -> float:
    start = max(start, since) if since is not None else start
    return max(0.0, min(end, until) - start)


def _epoch(moment: datetime.datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def held_seconds(record: AuditRecord | Held, *, since: datetime.datetime | None, until: datetime.datetime,
                 now: datetime.datetime) -> float:
    """Seconds the record's server held its devices within [since, until): from its start to its stop (or now)."""
    held = record if isinstance(record, Held) else Held.of(record)
    span = _holding(held, now.timestamp())
    return _within(*span, since=_epoch(since), until=until.timestamp()) if span else 0.0


@dataclass
class Usage:
    """One row: the key's values, GPU-hours (MIG weighted), device-hours, how many servers held GPUs,
    and idle GPU-hours (MIG weighted; None where none of the row's records was sampled)."""

    key: tuple[str, ...]
    gpu_hours: float = 0.0
    device_hours: float = 0.0
    servers: int = 0
    idle_gpu_hours: float | None = None

    def add(self, *, seconds: float, gpus: float, devices: int, idle_seconds: float | None) -> None:
        """One server's `seconds` on `devices` devices that are `gpus` GPUs (:func:`gpu_share`), of
        which `idle_seconds` GPU-seconds idle (None: unknown)."""
        self.gpu_hours += seconds * gpus / 3600
        self.device_hours += seconds * devices / 3600
        self.servers += 1
        if idle_seconds is not None:
            self.idle_gpu_hours = (self.idle_gpu_hours or 0.0) + idle_seconds / 3600

    def merge(self, other: Usage) -> None:
        """Add the figures of `other` (another part of the same records, same key) to this row."""
        self.gpu_hours += other.gpu_hours
        self.device_hours += other.device_hours
        self.servers += other.servers
        if other.idle_gpu_hours is not None:
            self.idle_gpu_hours = (self.idle_gpu_hours or 0.0) + other.idle_gpu_hours


@dataclass
class UsageReport:
    """The rows, largest GPU-hours first, and the total of every record counted once."""

    rows: list[Usage]
    total: Usage


def usage_report(
    records: Iterable[AuditRecord | Held], *, by: Sequence[str], since: datetime.datetime | None, until: datetime.datetime,
    now: datetime.datetime,
) -> UsageReport:
    """GPU-hours and idle GPU-hours by `by` (columns of :data:`BY`) within [since, until).

    Grouped ``by="model"``, a server holding two models counts toward each for its own devices
    (its idle time split by the devices' GPU shares). Grouped ``by="group"``, it counts in full
    in each of its groups. Raises ValueError for a column not in :data:`BY`.
    """
    unknown = [b for b in by if b not in BY]
    if unknown:
        raise ValueError(f"cannot group usage by {unknown[0]!r}; allowed: {', '.join(BY)}")
    now_s, since_s = now.timestamp(), _epoch(since)
    until_s = min(until, now).timestamp()
    rows: dict[tuple[str, ...], Usage] = {}
    keyed: dict[tuple[Any, ...], tuple[Usage, ...]] = {}  # the rows of each (user, server, profile, groups, model)

    def rows_of(held: Held, model: str | None) -> tuple[Usage, ...]:
        who = (held.user, held.server, held.profile, held.groups, model)
        found = keyed.get(who)
        if found is None:
            found = keyed[who] = tuple(rows.setdefault(key, Usage(key)) for key in _keys(held, model, by))
        return found

    by_model = "model" in by
    total = Usage(())
    for record in records:
        held = record if isinstance(record, Held) else Held.of(record)
        span = _holding(held, now_s)
        if span is None:
            continue
        seconds = _within(*span, since=since_s, until=until_s)
        if seconds <= 0:
            continue
        idle = _idle_in_period(held, seconds, span)
        gpus = held.gpus
        total.add(seconds=seconds, gpus=gpus, devices=held.device_count, idle_seconds=idle)
        for model, (key_gpus, key_devices) in (_by_model(held) if by_model else {None: (gpus, held.device_count)}).items():
            part = None if idle is None or not gpus else idle * key_gpus / gpus
            for row in rows_of(held, model):
                row.add(seconds=seconds, gpus=key_gpus, devices=key_devices, idle_seconds=part)
    return UsageReport(sorted(rows.values(), key=lambda r: (-r.gpu_hours, r.key)), total)


def merged_reports(reports: Iterable[UsageReport]) -> UsageReport:
    """One report from reports of disjoint parts of the records (made with the same `by` and period):
    the report :func:`usage_report` gives for all of them at once, but for the order floats are added in."""
    rows: dict[tuple[str, ...], Usage] = {}
    total = Usage(())
    for report in reports:
        total.merge(report.total)
        for row in report.rows:
            mine = rows.get(row.key)
            if mine is None:
                mine = rows[row.key] = Usage(row.key)
            mine.merge(row)
    return UsageReport(sorted(rows.values(), key=lambda r: (-r.gpu_hours, r.key)), total)


def gpu_usage(
    records: Iterable[AuditRecord | Held], *, by: Sequence[str], since: datetime.datetime | None, until: datetime.datetime,
    now: datetime.datetime,
) -> list[Usage]:
    """The rows of :func:`usage_report`."""
    return usage_report(records, by=by, since=since, until=until, now=now).rows


def _idle_in_period(held: Held, seconds: float, span: tuple[float, float]) -> float | None:
    """The record's idle GPU-seconds in the period: its share `seconds` of the whole holding time."""
    if held.idle_gpu_seconds is None:
        return None
    whole = span[1] - span[0]
    return held.idle_gpu_seconds * seconds / whole if whole > 0 else 0.0


def _by_model(held: Held) -> dict[str | None, tuple[float, int]]:
    """Model label -> (GPUs, devices) of the record's devices."""
    models: dict[str | None, tuple[float, int]] = {}
    for model, share in held.devices():
        gpus, devices = models.get(model, (0.0, 0))
        models[model] = (gpus + share, devices + 1)
    return models


def _keys(held: Held, model: str | None, by: Sequence[str]) -> Iterator[tuple[str, ...]]:
    return itertools.product(*(_values(held, model, b) for b in by))


def _values(held: Held, model: str | None, name: str) -> tuple[str, ...]:
    if name == "group":
        return tuple(dict.fromkeys(held.groups)) or (NO_GROUP,)
    if name == "model":
        assert model is not None
        return (model,)
    if name == "server":
        return (f"{held.user}/{held.server}" if held.server else held.user,)
    if name == "profile":
        return (held.profile or NO_PROFILE,)
    return (held.user,)
