"""GPU-hours from the audit records: who held how much GPU, and for how long, within a period, as pure code.

A record's server holds its devices from the moment its container started (``started_at``)
until it stopped (``stopped_at``); a server still running counts up to ``now``. Only the part
inside the period counts, so a server spanning the period's edges is cut at them. A record that
never started a container held no GPU for any time.

A whole GPU counts 1 GPU-hour an hour. A MIG device counts its share of its GPU's compute: a
``1g.10gb`` slice is 1/7 of a GPU (NVIDIA's A100 and H100 have 7 compute slices), a ``3g.40gb``
slice 3/7. ``device_hours`` counts every device as 1, whatever it is.

:func:`gpu_usage` folds records one at a time into totals keyed by the chosen columns, so a
million records take constant memory.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .audit import AuditRecord, RecordedDevice
from .times import parse_time

MIG_COMPUTE_SLICES = 7
BY = ("user", "server", "profile", "model")  # what usage can be grouped by
_MIG_SLICES = re.compile(r"^(?:\d+c\.)?(\d+)g\.")


def gpu_share(device: RecordedDevice) -> float:
    """How much of a GPU a device is: 1 for a whole GPU, g/7 for a MIG device of g compute slices."""
    if not device.mig_profile:
        return 1.0
    m = _MIG_SLICES.match(device.mig_profile)
    return min(1.0, int(m.group(1)) / MIG_COMPUTE_SLICES) if m else 1.0


def held_seconds(record: AuditRecord, *, since: datetime.datetime | None, until: datetime.datetime,
                 now: datetime.datetime) -> float:
    """Seconds the record's server held its devices within [since, until): from its start to its stop (or now)."""
    if not record.devices or not record.started_at:
        return 0.0
    start = parse_time(record.started_at)
    end = parse_time(record.stopped_at) if record.stopped_at else now
    start = max(start, since) if since is not None else start
    end = min(end, until)
    return max(0.0, (end - start).total_seconds())


@dataclass
class Usage:
    """One row: the key's values, GPU-hours (MIG weighted), device-hours, and how many servers held GPUs."""

    key: tuple[str, ...]
    gpu_hours: float = 0.0
    device_hours: float = 0.0
    servers: int = 0


def gpu_usage(
    records: Iterable[AuditRecord], *, by: Sequence[str], since: datetime.datetime | None, until: datetime.datetime,
    now: datetime.datetime,
) -> list[Usage]:
    """GPU-hours by `by` (columns of :data:`BY`) within [since, until), largest first.

    Grouped ``by="model"``, a server holding two models counts toward each for its own devices.
    """
    unknown = [b for b in by if b not in BY]
    if unknown:
        raise ValueError(f"cannot group usage by {unknown[0]!r}; allowed: {', '.join(BY)}")
    rows: dict[tuple[str, ...], Usage] = {}
    for record in records:
        seconds = held_seconds(record, since=since, until=min(until, now), now=now)
        if seconds <= 0:
            continue
        groups: dict[tuple[str, ...], list[RecordedDevice]] = {}
        for device in record.devices:
            key = tuple(_column(record, device, b) for b in by)
            groups.setdefault(key, []).append(device)
        for key, devices in groups.items():
            row = rows.setdefault(key, Usage(key))
            row.gpu_hours += seconds * sum(gpu_share(d) for d in devices) / 3600
            row.device_hours += seconds * len(devices) / 3600
            row.servers += 1
    return sorted(rows.values(), key=lambda r: (-r.gpu_hours, r.key))


def _column(record: AuditRecord, device: RecordedDevice, name: str) -> str:
    if name == "model":
        return device.model + (f" MIG {device.mig_profile}" if device.mig_profile else "")
    if name == "server":
        return f"{record.user}/{record.server}" if record.server else record.user
    if name == "profile":
        return record.profile or "(no profile)"
    return record.user
