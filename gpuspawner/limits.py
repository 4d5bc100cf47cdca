"""Time limits on GPU servers: how long one may run, and how long its GPUs may sit idle, as pure code.

A profile (or the spawner's settings, without profiles) may set ``max_runtime`` (the server is
stopped that long after it started) and ``gpu_idle_timeout`` with ``gpu_idle_threshold`` (it is
stopped once every one of its GPUs stayed under the threshold, in percent utilisation, for that
long, as the hub's samples saw them). A warning comes ``warn_before`` ahead of either stop.

:func:`idle_since` carries a server's idle clock from one sample to the next, and :func:`judge`
says whether to keep, warn or stop a server now, and why, in words a user reads. A MIG device
reports no utilisation through NVML, so a server holding one is never judged idle.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .settings import ConfigError

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*d)?\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$")


def parse_duration(value: Any, *, where: str) -> float | None:
    """Seconds from "8h", "90m", "1h30m", "2d", "45s" or a number of seconds; None for None or 0 (no limit)."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m and any(m.groups()):
            days, hours, minutes, seconds = (float(g or 0) for g in m.groups())
            total = days * 86400 + hours * 3600 + minutes * 60 + seconds
            return total or None
    raise ConfigError(f"{where} is {value!r}; allowed: a duration such as '8h', '90m', '1h30m' or a number of seconds.")


def parse_percent(value: Any, *, where: str) -> float:
    """A utilisation threshold in percent, from 0 to 100."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ConfigError(f"{where} is {value!r}; allowed: a percentage from 0 to 100, such as 5.")
    return float(value)


def format_duration(seconds: float) -> str:
    """"2 h", "1 h 30 min", "40 min", "45 s"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h" + (f" {minutes} min" if minutes else "")


@dataclass(frozen=True)
class Limits:
    """A server's time limits, in seconds (None: no such limit)."""

    max_runtime: float | None = None
    idle_timeout: float | None = None
    idle_threshold: float = 5.0  # percent
    warn_before: float = 600.0

    @property
    def any(self) -> bool:
        return self.max_runtime is not None or self.idle_timeout is not None


@dataclass(frozen=True)
class Verdict:
    """What to do with a server now, and why (a sentence the user reads)."""

    action: Literal["keep", "warn", "stop"]
    reason: str = ""
    time_left: float | None = None  # seconds until the stop, where one is coming


def idle_since(previous: float | None, utilizations: Sequence[float | None], *, threshold: float, now: float) -> float | None:
    """When the server's GPUs went idle, after one more sample at `now`; None while any is busy.

    Idle means every GPU under `threshold` percent. A device that reports no utilisation (a MIG
    device) or a server without GPUs is never idle.
    """
    if not utilizations or any(u is None for u in utilizations):
        return None
    if all(u is not None and u < threshold for u in utilizations):
        return previous if previous is not None else now
    return None


def judge(limits: Limits, *, started: float, idle_from: float | None, now: float) -> Verdict:
    """Keep, warn or stop a server that started at `started` (and whose GPUs are idle since
    `idle_from`), by its `limits`. The stop that comes first decides."""
    ends: list[tuple[float, str, str]] = []  # (when, why it stops, why it will stop)
    if limits.max_runtime is not None:
        limit = format_duration(limits.max_runtime)
        ends.append((started + limits.max_runtime, f"it reached its {limit} time limit",
                     f"its {limit} time limit ends"))
    if limits.idle_timeout is not None and idle_from is not None:
        idle = format_duration(limits.idle_timeout)
        below = f"under {limits.idle_threshold:g} %"
        ends.append((idle_from + limits.idle_timeout, f"its GPU was idle ({below}) for {idle}",
                     f"its GPU has been idle ({below}); it is stopped after {idle} idle"))
    if not ends:
        return Verdict("keep")
    when, stopped_because, stops_because = min(ends)
    left = when - now
    if left <= 0:
        return Verdict("stop", f"Stopped by the hub: {stopped_because}.", 0.0)
    if left <= limits.warn_before:
        return Verdict("warn", f"This server stops in {format_duration(left)}: {stops_because}. Save your work.", left)
    return Verdict("keep", time_left=left)


def held_status(limits: Limits, *, started: float, idle_from: float | None, now: float) -> str:
    """A held server's limits in words, for ``gpuspawner gpus``: "idle 25 min of 2 h · 6 h 10 min of 8 h left"."""
    parts = []
    if limits.idle_timeout is not None:
        idle = f"idle {format_duration(now - idle_from)}" if idle_from is not None else "busy"
        parts.append(f"{idle} (stopped after {format_duration(limits.idle_timeout)} idle)")
    if limits.max_runtime is not None:
        parts.append(f"{format_duration(started + limits.max_runtime - now)} of {format_duration(limits.max_runtime)} left")
    return " · ".join(parts)


def limits_from_label(text: str) -> Limits:
    """The limits a container's label ``gpuspawner.limits`` holds (no limits for "" or a label it cannot read)."""
    try:
        data = json.loads(text) if text else {}
        return Limits(**{k: v for k, v in data.items() if k in Limits.__dataclass_fields__})
    except (ValueError, TypeError, AttributeError):
        return Limits()
