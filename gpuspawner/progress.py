"""The progress log of one server's spawn: the messages its user sees while the server starts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

POLL_SECONDS = 0.5


class ProgressLog:
    """Messages for JupyterHub's progress page, each with a percentage that grows to 90."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def clear(self) -> None:
        """Start afresh, for a new spawn."""
        self.events = []

    def say(self, message: str) -> None:
        """Add `message` as the next step."""
        self.events.append({"progress": min(10 + 10 * len(self.events), 90), "message": message})

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        """Every event, as it comes (JupyterHub stops reading once the server is up)."""
        sent = 0
        while True:
            events = self.events
            while sent < len(events):
                yield events[sent]
                sent += 1
            await asyncio.sleep(POLL_SECONDS)
