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
million records take constant memory.
"""

from __future__ import annotations

import datetime
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

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


def _holding(record: AuditRecord, now: datetime.datetime) -> tuple[datetime.datetime, datetime.datetime] | None:
    """When the record's server held its devices: its start to its stop (or now); None if it held none."""
    if not record.devices or not record.started_at:
        return None
    end = parse_time(record.stopped_at) if record.stopped_at else now
    return parse_time(record.started_at), end


def _within(start: datetime.datetime, end: datetime.datetime, *, since: datetime.datetime | None,
            until: datetime.datetime) -> float:
    start = max(start, since) if since is not None else start
    return max(0.0, (min(end, until) - start).total_seconds())


def held_seconds(record: AuditRecord, *, since: datetime.datetime | None, until: datetime.datetime,
                 now: datetime.datetime) -> float:
    """Seconds the record's server held its devices within [since, until): from its start to its stop (or now)."""
    span = _holding(record, now)
    return _within(*span, since=since, until=until) if span else 0.0


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


@dataclass
class UsageReport:
    """The rows, largest GPU-hours first, and the total of every record counted once."""

    rows: list[Usage]
    total: Usage


def usage_report(
    records: Iterable[AuditRecord], *, by: Sequence[str], since: datetime.datetime | None, until: datetime.datetime,
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
    until = min(until, now)
    rows: dict[tuple[str, ...], Usage] = {}
    total = Usage(())
    for record in records:
        span = _holding(record, now)
        if span is None:
            continue
        seconds = _within(*span, since=since, until=until)
        if seconds <= 0:
            continue
        idle = _idle_in_period(record, seconds, span)
        shares = [gpu_share(d) for d in record.devices]
        gpus = sum(shares)
        total.add(seconds=seconds, gpus=gpus, devices=len(shares), idle_seconds=idle)
        for key, (key_gpus, key_devices) in _split(record, by, shares).items():
            part = None if idle is None or not gpus else idle * key_gpus / gpus
            row = rows.get(key)
            if row is None:
                row = rows[key] = Usage(key)
            row.add(seconds=seconds, gpus=key_gpus, devices=key_devices, idle_seconds=part)
    return UsageReport(sorted(rows.values(), key=lambda r: (-r.gpu_hours, r.key)), total)


def gpu_usage(
    records: Iterable[AuditRecord], *, by: Sequence[str], since: datetime.datetime | None, until: datetime.datetime,
    now: datetime.datetime,
) -> list[Usage]:
    """The rows of :func:`usage_report`."""
    return usage_report(records, by=by, since=since, until=until, now=now).rows


def _idle_in_period(record: AuditRecord, seconds: float,
                    span: tuple[datetime.datetime, datetime.datetime]) -> float | None:
    """The record's idle GPU-seconds in the period: its share `seconds` of the whole holding time."""
    if record.idle_gpu_seconds is None:
        return None
    held = (span[1] - span[0]).total_seconds()
    return record.idle_gpu_seconds * seconds / held if held > 0 else 0.0


def _split(record: AuditRecord, by: Sequence[str], shares: Sequence[float]) -> dict[tuple[str, ...], tuple[float, int]]:
    """Key -> (GPUs, devices) of the record: one key, or one per model, times one per group.
    `shares`: each device's :func:`gpu_share`."""
    if "model" not in by:  # every device under the same keys
        return {key: (sum(shares), len(shares)) for key in _keys(record, None, by)}
    keys: dict[tuple[str, ...], tuple[float, int]] = {}
    for device, share in zip(record.devices, shares, strict=True):
        for key in _keys(record, device, by):
            gpus, devices = keys.get(key, (0.0, 0))
            keys[key] = (gpus + share, devices + 1)
    return keys


def _keys(record: AuditRecord, device: RecordedDevice | None, by: Sequence[str]) -> Iterator[tuple[str, ...]]:
    return itertools.product(*(_values(record, device, b) for b in by))


def _values(record: AuditRecord, device: RecordedDevice | None, name: str) -> tuple[str, ...]:
    if name == "group":
        return tuple(dict.fromkeys(record.groups)) or (NO_GROUP,)
    if name == "model":
        assert device is not None
        return (device.model + (f" MIG {device.mig_profile}" if device.mig_profile else ""),)
    if name == "server":
        return (f"{record.user}/{record.server}" if record.server else record.user,)
    if name == "profile":
        return (record.profile or NO_PROFILE,)
    return (record.user,)
