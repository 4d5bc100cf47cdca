"""The clock and the record ids: every timestamp gpuspawner stores and every new audit record id come from here.

Callers look them up as ``seams.now_iso()`` and ``seams.new_record_id()`` (never imported by
name), so a test pins them with ``monkeypatch.setattr(seams, "now_iso", ...)``.
"""

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
