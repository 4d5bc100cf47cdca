"""After a spawn fails or is interrupted: make sure the container it made no longer runs.

The spawn's Docker calls may still be running in their threads (a ``docker start`` goes on
after the spawn is cancelled), so this waits for them first, then removes the container made
for the spawn's record, or stops the kept one (``remove = False``) it started.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import docker.errors

from . import labels


async def remove_spawned_container(
    call: Callable[..., Awaitable[Any]], *, name: str, record_id: str, container_id: str,
    in_flight: Collection[concurrent.futures.Future[Any]], wait_seconds: float, log: Any,
) -> tuple[bool, str | None]:
    """(True when no container of this spawn runs any more, the id of the container removed or
    stopped). `name` is the server's container name, `container_id` the container the spawn
    started (if any), `in_flight` its Docker calls still running."""
    try:
        calls = [asyncio.wrap_future(c) for c in list(in_flight)]
        if calls:
            await asyncio.wait(calls, timeout=wait_seconds)
        obj = await call("inspect_container", name)
        if (obj["Config"].get("Labels") or {}).get(labels.RECORD) == record_id:
            log.info("Removing %s, left by a failed spawn", name)
            await call("remove_container", obj["Id"], force=True, v=True)
            return True, str(obj["Id"])
        if obj["Id"] == container_id and obj["State"].get("Running"):
            await call("stop", obj["Id"])  # a kept container (remove = False) this spawn started
            return True, str(obj["Id"])
        return True, None
    except docker.errors.NotFound:
        return True, None
    except Exception:
        log.exception("Could not make sure the container %s of a failed spawn is gone", name)
        return False, None
