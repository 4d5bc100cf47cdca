"""Handing a server its GPUs: what the engine's containers hold, and the wait for free devices.

:func:`engine_claims` reads which devices every running container on the engine holds; and
:func:`claim_devices` reads NVML, decides under the hub's lock (one decision at a time, by
:func:`gpuspawner.allocation.allocate`) and notes a pending claim, waiting for devices to free
up where ``GPUSpawner.gpu_wait_timeout`` allows. Refusals are :class:`NoDevices`, with the HTTP
status the spawner answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import docker.errors

from . import labels
from .allocation import GPURequest, Grant, Holder, allocate, quota_refusal
from .claims import claims_from_containers, foreign_claims
from .devices import Inventory
from .hubwide import resources
from .nvml import NVMLTimeout

WAIT_POLL_SECONDS = 2.0

Docker = Callable[..., Awaitable[Any]]  # GPUSpawner.docker: one docker-py call off the event loop


class NoDevices(Exception):
    """A spawn gets no devices: `status` 403 (over quota) or 503 (none free, NVML silent)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Ask:
    """Who asks for which devices, under what limits."""

    request: GPURequest
    holder: Holder
    record_id: str  # the spawn's audit record: its pending claim is noted under it
    quota: int | None  # the most GPUs the user may hold (None: no limit)
    busy_memory_threshold: int
    wait_seconds: float  # how long to wait for devices to free up (0: refuse at once)
    admin: bool  # an admin's refusal says more (which servers hold what)


async def engine_claims(call: Docker, hub_id: str, inventory: Inventory, *, max_age: float = 0) -> dict[str, Holder]:
    """UUID -> holder for every running container on the engine.

    This hub's containers hold what their labels say; any other running container (another
    hub's, a ``docker run --gpus``) what its DeviceRequests name. A container's requests
    never change, so each other container is inspected once, when first seen. An allocation
    reads the engine now (`max_age` 0); the spawn form may show what was read up to `max_age`
    seconds ago, so a burst of form views costs one listing.
    """
    seen_at, seen = resources.engine_claims.get(hub_id, (0.0, {}))
    if max_age > 0 and time.monotonic() - seen_at <= max_age:
        return dict(seen)
    read_at = time.monotonic()
    running = await call("containers")
    others = [c for c in running if (c.get("Labels") or {}).get(labels.HUB) != hub_id]
    for c in others:
        if c["Id"] not in resources.foreign:
            try:
                resources.foreign[c["Id"]] = await call("inspect_container", c["Id"])
            except docker.errors.NotFound:
                continue
    ids = {c["Id"] for c in others}
    for gone in set(resources.foreign) - ids:
        del resources.foreign[gone]
    claims = foreign_claims([resources.foreign[i] for i in ids if i in resources.foreign], inventory)
    claims.update(claims_from_containers(running, hub_id=hub_id))
    resources.engine_claims[hub_id] = (read_at, claims)
    return dict(claims)


async def claim_devices(
    ask: Ask, *, call: Docker, hub_id: str, read_inventory: Callable[[], Awaitable[Inventory]],
    say: Callable[[str], None], log: Any, name: str,
) -> Grant:
    """Choose devices for `ask` and note them as its pending claim; raise NoDevices when there are none.

    NVML is read outside the lock: a hung NVML then holds up no other spawn (each waits at most
    ``nvml_timeout``), and the hardware's state does not depend on the claims.
    """
    waited_since = time.monotonic()
    deadline = waited_since + ask.wait_seconds
    while True:
        try:
            inventory = await read_inventory()
        except NVMLTimeout as e:
            raise NoDevices(503, str(e)) from None
        async with resources.lock:
            claims = resources.book.merged(await engine_claims(call, hub_id, inventory))
            over_quota = quota_refusal(ask.request, claims, holder=ask.holder, quota=ask.quota)
            if over_quota:
                raise NoDevices(403, over_quota)
            result = allocate(ask.request, inventory, claims, holder=ask.holder,
                              busy_memory_threshold=ask.busy_memory_threshold)
            if isinstance(result, Grant):
                resources.book.reserve(ask.record_id, ask.holder, result.uuids)
                return result
        log.info("No devices for %s: %s", name, result.message(admin=True))
        remaining = deadline - time.monotonic()
        if not result.can_wait or remaining <= 0:
            raise NoDevices(503, result.message(admin=ask.admin))
        say(f"Waiting for a free GPU ({time.monotonic() - waited_since:.0f} s of "
            f"{deadline - waited_since:.0f} s): {result.message()}")
        await asyncio.sleep(min(WAIT_POLL_SECONDS, remaining))
