"""The queue for scarce GPUs: who is served next, and each waiter's place in line, as pure code.

The policy, in plain words: **first come, first served, and nobody is overtaken for the devices
they wait for.** Waiters are considered in the order they joined. Each one is served as soon as
the devices it asks for are free and not kept for someone ahead of it. A waiter that cannot be
served yet keeps the free devices it could use (up to as many as it needs), so a request for
2 × A100 is never starved by a stream of 1 × A100 requests behind it: the first A100 that frees
up waits for it. Waiters for other kinds of device (a MIG slice, an H100) are served past it.
Quotas still hold: a waiter whose user has meanwhile reached their GPU quota is refused.

:func:`serve` takes the waiters, the inventory and the claims, and says who gets which devices
now, who is refused, and each remaining waiter's place in line among those waiting for the
same kind of device. The same inputs always give the same answer.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from .allocation import (
    GPURequest,
    Grant,
    Holder,
    Refusal,
    Status,
    allocate,
    device_status,
    most_on_one_node,
    quota_refusal,
)
from .devices import Inventory

KEPT = Holder(user="", server="kept for a server waiting ahead in the GPU queue")


@dataclass(frozen=True)
class Waiter:
    """A spawn waiting for devices: its id (its audit record), who asks, for what, since when."""

    id: str
    holder: Holder
    request: GPURequest
    joined: float  # seconds, any clock the caller uses for every waiter
    quota: int | None = None  # the most GPUs the user may hold (None: no limit)
    profile: str = ""  # the profile it was started with ("" without profiles)


@dataclass(frozen=True)
class Turn:
    """What one look at the queue decides."""

    grants: Mapping[str, Grant] = field(default_factory=dict)  # waiter id -> the devices it gets now
    refused: Mapping[str, str] = field(default_factory=dict)  # waiter id -> why this host can never serve it
    over_quota: Mapping[str, str] = field(default_factory=dict)  # waiter id -> why its user may hold no more
    places: Mapping[str, int] = field(default_factory=dict)  # still waiting: id -> 1 for first in line, 2 …
    lacking: Refusal | None = None  # what the waiter asked about (`explain`) still lacks, counting kept devices


def serve(
    waiters: Sequence[Waiter], inventory: Inventory, claims: Mapping[str, Holder], *, busy_memory_threshold: int,
    explain: str | None = None,
) -> Turn:
    """Serve `waiters` in the order they joined (see the module's docstring for the policy).

    Cheap for a long line: the free devices are found once, and the allocation itself runs only
    for a waiter enough of them can serve. `explain` names a waiter whose refusal is worked out
    in words (:attr:`Turn.lacking`).
    """
    taken = dict(claims)
    free = [d for d in inventory.devices if device_status(d, taken, busy_memory_threshold=busy_memory_threshold) is Status.FREE]
    grants: dict[str, Grant] = {}
    refused: dict[str, str] = {}
    over_quota: dict[str, str] = {}
    waiting: set[str] = set()
    lacking = None
    healthy: dict[GPURequest, int] = {}  # kind of request -> healthy devices of that kind on the host
    for w in in_line(waiters):
        if w.quota is not None:
            quota_reached = quota_refusal(w.request, taken, holder=w.holder, quota=w.quota)
            if quota_reached:
                over_quota[w.id] = quota_reached
                continue
        usable = [d for d in free if d.uuid not in taken and w.request.matches(d)]
        if len(usable) >= w.request.device_count:
            result = allocate(w.request, inventory, taken, holder=w.holder, busy_memory_threshold=busy_memory_threshold)
            if isinstance(result, Grant):
                grants[w.id] = result
                taken.update((u, w.holder) for u in result.uuids)
                continue
        if w.request not in healthy:
            healthy[w.request] = most_on_one_node(d for d in inventory.devices if d.healthy and d.uuid and w.request.matches(d))
        if inventory.problem is not None or healthy[w.request] < w.request.device_count:
            refused[w.id] = _refusal(w, inventory, taken, busy_memory_threshold).message()
            continue
        if w.id == explain:
            lacking = _refusal(w, inventory, taken, busy_memory_threshold)
        waiting.add(w.id)
        # what it could use is kept for it: nobody behind overtakes it for these devices
        taken.update((d.uuid, KEPT) for d in usable[: w.request.device_count])
    return Turn(grants=grants, refused=refused, over_quota=over_quota, places=places(waiters, waiting), lacking=lacking)


def _refusal(w: Waiter, inventory: Inventory, taken: Mapping[str, Holder], busy_memory_threshold: int) -> Refusal:
    result = allocate(w.request, inventory, taken, holder=w.holder, busy_memory_threshold=busy_memory_threshold)
    return result if isinstance(result, Refusal) else Refusal(request=w.request)


def in_line(waiters: Sequence[Waiter]) -> list[Waiter]:
    """The waiters in the order they are served: who joined first, then by id (stable)."""
    return sorted(waiters, key=lambda w: (w.joined, w.id))


def places(waiters: Sequence[Waiter], still_waiting: Collection[str]) -> dict[str, int]:
    """Each waiter's place among those still waiting for the same kind of device (1: next)."""
    counts: dict[GPURequest, int] = {}
    result = {}
    for w in in_line(waiters):
        if w.id in still_waiting:
            kind = kind_of(w.request)
            counts[kind] = counts.get(kind, 0) + 1
            result[w.id] = counts[kind]
    return result


def queue_lengths(waiters: Sequence[Waiter]) -> dict[GPURequest, int]:
    """How many wait for each kind of device (the spawn form shows it per profile)."""
    counts: dict[GPURequest, int] = {}
    for w in waiters:
        counts[kind_of(w.request)] = counts.get(kind_of(w.request), 0) + 1
    return counts


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th … 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def kind_of(request: GPURequest) -> GPURequest:
    """Requests that compete for the same devices count as one line (the number asked for aside)."""
    return GPURequest(count=1 if request.count else 0, mig_profile=request.mig_profile, model=request.model,
                      min_memory=request.min_memory)
