"""Times that admins type (``--since``, ``--until``, the audit service's form), read one way.

Audit records store ``requested_at`` as ISO 8601 text in UTC with microseconds
(``2026-11-21T10:00:01.000000+00:00``, see :func:`gpuspawner.seams.now_iso`), which sorts as
text in time order. A bound typed in another zone, or without a time, sorts wrongly against
that text; so every bound is parsed here and rewritten in the stored form before it is
compared.

Pure code: no docker, pynvml, jupyterhub or database imports.
"""

from __future__ import annotations

import datetime

from .userinput import quote

ACCEPTED = (
    "an ISO 8601 date or time, such as 2026-11-21, 2026-11-21T12:00, 2026-11-21T12:00Z "
    "or 2026-11-21T12:00+02:00 (without a zone: UTC)"
)


class TimeError(ValueError):
    """Text that is not a time gpuspawner can compare; the message says what is allowed."""


def parse_time(text: str, *, where: str | None = None) -> datetime.datetime:
    """An aware UTC datetime from ISO 8601 text; a time without a zone is taken as UTC.

    Raises :class:`TimeError` naming ``where`` (if given), a short prefix of the text and what
    is allowed.
    """
    try:
        value = datetime.datetime.fromisoformat(text.strip())
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.astimezone(datetime.timezone.utc)
    except (AttributeError, TypeError, ValueError, OverflowError):  # OverflowError: year 1 or 9999 shifted out of range
        said = f"{where} is {quote(text)}, which" if where else quote(text)
        raise TimeError(f"{said} is not a time; allowed: {ACCEPTED}.") from None


def stored_time(text: str, *, where: str | None = None) -> str:
    """``text`` as the audit store writes times, so comparing the two as text compares the times."""
    return parse_time(text, where=where).isoformat(timespec="microseconds")
