"""Time and identifiers come from here, and only from here, so tests can pin them."""

from __future__ import annotations

import datetime
import uuid


def now_iso() -> str:
    """The current time, UTC, ISO 8601 with microseconds: sorts as text in time order."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def new_record_id() -> str:
    """A new audit record id: time-ordered prefix, random suffix."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{uuid.uuid4().hex[:12]}"
