"""Handing a server its GPUs: what the engine's containers hold, and the wait for free devices.

:func:`engine_claims` reads which devices every running container on the engine holds; and
:func:`claim_devices` reads NVML, decides under the hub's lock (one decision at a time, by
:func:`gpuspawner.allocation.allocate`) and notes a pending claim, waiting for devices to free
up where ``GPUSpawner.gpu_wait_timeout`` allows. Refusals are :class:`NoDevices`, with the HTTP
status the spawner answers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import docker.errors

from . import labels
from .allocation import GPURequest, Grant, Holder, Refusal
from .claims import claims_from_containers, foreign_claims, gpu_readers, own_container_ids
from .devices import Inventory
from .gpuqueue import Waiter, ordinal, serve
from .hubwide import resources
from .limits import format_duration
from .nvml import NVMLTimeout

WAIT_POLL_SECONDS = 2.0

Docker = Callable[..., Awaitable[Any]]  # GPUSpawner.docker: one docker-py call off the event loop


class NoDevices(Exception):
    """A spawn gets no devices: `status` 403 (over quota) or 503 (none free, NVML silent); `reason`
    names the refusal in the metrics: over_quota, no_devices or nvml_timeout."""

    def __init__(self, status: int, message: str, reason: str = "no_devices") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


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
    profile: str = ""  # the profile chosen ("" without profiles)


async def engine_claims(call: Docker, hub_id: str, inventory: Inventory, *, max_age: float = 0) -> dict[str, Holder]:
    """UUID -> holder for every running container on the engine.

    This hub's containers hold what their labels say; any other running container (another
    hub's, a ``docker run --gpus``) what its DeviceRequests name, except the hub's own container
    and the gpuspawner services beside it, which only read the GPUs (:func:`gpuspawner.claims.gpu_readers`).
    A container's requests never change, so each other container is inspected once, when first seen.
    """

    async def read() -> dict[str, Holder]:
        running = await call("containers")
        readers = gpu_readers(running, own_ids=where_the_hub_runs())
        others = [c for c in running if (c.get("Labels") or {}).get(labels.HUB) != hub_id and c["Id"] not in readers]
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
        return claims

    return await remembered_claims(hub_id, read, max_age=max_age)


def where_the_hub_runs() -> tuple[str, ...]:
    """What may name the container this hub process runs in (:func:`gpuspawner.claims.own_container_ids`),
    read from /proc once per process; empty where /proc cannot tell."""
    if resources.own_container_ids is None:
        resources.own_container_ids = own_container_ids(
            mountinfo=_proc_text("/proc/self/mountinfo"), cgroup=_proc_text("/proc/self/cgroup"),
            hostname=os.uname().nodename,
        )
    return resources.own_container_ids


def _proc_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:  # no /proc (not Linux), or one that hides it
        return ""


async def remembered_claims(hub_id: str, read: Callable[[], Awaitable[dict[str, Holder]]], *, max_age: float) -> dict[str, Holder]:
    """The claims `read` finds now, kept as the engine's (or swarm's) last read for the hub's metrics (what
    another container holds is busy outside the hub). An allocation reads now (`max_age` 0); the spawn form
    may show what was read up to `max_age` seconds ago, so a burst of form views costs one listing."""
    seen_at, seen = resources.engine_claims.get(hub_id, (0.0, {}))
    if max_age > 0 and time.monotonic() - seen_at <= max_age:
        return dict(seen)
    read_at = time.monotonic()
    claims = await read()
    resources.engine_claims[hub_id] = (read_at, claims)
    return dict(claims)


async def claim_devices(
    ask: Ask, *, read_inventory: Callable[[], Awaitable[Inventory]],
    read_claims: Callable[[Inventory], Awaitable[dict[str, Holder]]], say: Callable[[str], None], log: Any, name: str,
) -> Grant:
    """Devices for `ask`, noted as its pending claim; NoDevices when there are none. `read_inventory`
    gives the devices (NVML, or a swarm's nodes), `read_claims` who holds which now (the engine's
    containers, or the swarm's tasks).

    Where spawns may wait (``gpu_wait_timeout``), the spawn joins the hub's GPU queue and is
    served in its turn (:func:`gpuspawner.gpuqueue.serve`): it looks again whenever a server's
    container starts or ends, a waiter leaves, or every few seconds (NVML may change), and says
    its place in line. Leaving (served, refused, cancelled, timed out) frees its place at once.
    NVML is read outside the lock: a hung NVML then holds up no other spawn (each waits at most
    ``nvml_timeout``), and the hardware's state does not depend on the claims.
    """
    me = Waiter(id=ask.record_id, holder=ask.holder, request=ask.request, joined=time.monotonic(), quota=ask.quota,
                profile=ask.profile)
    deadline = me.joined + ask.wait_seconds
    resources.waiters[me.id] = me
    try:
        while True:
            try:
                inventory = await read_inventory()
            except NVMLTimeout as e:
                raise NoDevices(503, str(e), "nvml_timeout") from None
            async with resources.lock:
                claims = resources.book.merged(await read_claims(inventory))
                # the whole line is looked at (a spawn that may not wait too): those ahead keep their turn
                line = list(resources.waiters.values())
                turn = serve(line, inventory, claims, busy_memory_threshold=ask.busy_memory_threshold, explain=me.id)
                if me.id in turn.grants:
                    grant = turn.grants[me.id]
                    resources.book.reserve(me.id, me.holder, grant.uuids)
                    return grant
            if me.id in turn.over_quota:
                raise NoDevices(403, turn.over_quota[me.id], "over_quota")
            if me.id in turn.refused:
                raise NoDevices(503, turn.refused[me.id])
            lacking = turn.lacking or Refusal(request=ask.request)
            log.info("No devices for %s: %s", name, lacking.message(admin=True))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waited = f" (waited {ask.wait_seconds:.0f} s in line)" if ask.wait_seconds > 0 else ""
                raise NoDevices(503, lacking.message(admin=ask.admin) + waited)
            place = turn.places[me.id]
            say(f"Waiting for {ask.request.describe()}: {ordinal(place)} in line "
                f"({time.monotonic() - me.joined:.0f} s of {ask.wait_seconds:.0f} s). {lacking.message()}"
                + soonest_end(ask.request, inventory, claims))
            await resources.queue_moved(min(WAIT_POLL_SECONDS, remaining))
    finally:
        del resources.waiters[me.id]
        resources.wake_waiters()


def soonest_end(request: GPURequest, inventory: Inventory, claims: Mapping[str, Holder]) -> str:
    """When the first time limit among the servers holding devices of the kind asked for ends, in words."""
    kinds = {d.uuid for d in inventory.devices if request.matches(d)}
    now, ends = time.time(), []
    for holder in {h for u, h in claims.items() if u in kinds}:
        sp = resources.spawners.get((holder.user, holder.server))
        if sp is not None and sp.limits.max_runtime is not None and sp.started_at:
            ends.append(sp.started_at + sp.limits.max_runtime - now)
    if not ends:
        return ""
    return f" The soonest time limit of the servers holding them ends in {format_duration(max(0.0, min(ends)))}."
