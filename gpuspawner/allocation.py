"""Which devices a server gets: the allocation decision, as pure code.

``allocate()`` takes a request, the inventory and the claims (which device is held by which
server of this hub) and returns a :class:`Grant` or a :class:`Refusal` whose message says,
in words, why nothing fits. The same inputs always give the same answer.

A device is free when it is healthy, not held by another server of this hub, and not busy
outside the hub (no compute processes, memory used below a threshold). A GPU in MIG mode is
never handed out whole, only its MIG devices are.

Choice among free devices: a request for 2 or more GPUs prefers GPUs close together in the
PCIe topology NVML reports (the smallest sum of pairwise topology levels, like the Kubernetes
device plugin's best-effort policy), then the stable order of PCI bus id and UUID. One GPU
or one MIG device is the first free one in that order.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .devices import Device, Inventory, format_bytes


@dataclass(frozen=True)
class GPURequest:
    """What a server asks for: ``count`` whole GPUs, or one MIG device of ``mig_profile``.

    ``model`` is a regular expression searched (case-insensitively) in the GPU model name, for
    example ``"A100|H100"``; ``min_memory`` is the least memory per device, in bytes.
    """

    count: int = 0
    mig_profile: str | None = None
    model: str | None = None
    min_memory: int = 0

    @property
    def wants_gpu(self) -> bool:
        return self.count > 0 or self.mig_profile is not None

    @property
    def device_count(self) -> int:
        return 1 if self.mig_profile else self.count

    def describe(self) -> str:
        """The request in words: "2 × A100|H100 ≥ 40 GiB", "1 × MIG 1g.10gb", "no GPU"."""
        if not self.wants_gpu:
            return "no GPU"
        what = f"MIG {self.mig_profile}" if self.mig_profile else (self.model or "any GPU")
        if self.mig_profile and self.model:
            what = f"{self.model} {what}"
        text = f"{self.device_count} × {what}"
        if self.min_memory:
            text += f" ≥ {format_bytes(self.min_memory)}"
        return text

    def matches(self, device: Device) -> bool:
        """Whether the device is of the kind asked for (free or not)."""
        # parent_uuid rather than is_mig: this runs for every device of a swarm at every look
        if self.mig_profile is not None:
            if device.parent_uuid is None or device.mig_profile != self.mig_profile:
                return False
        elif device.parent_uuid is not None or device.mig_enabled:
            return False
        if device.memory_total < self.min_memory:
            return False
        return not self.model or _model_matches(self.model, device.model)


@functools.lru_cache(maxsize=1024)
def _model_matches(pattern: str, model: str) -> bool:
    """Whether a request's model pattern is found in a model name, case-insensitively. Remembered: a swarm
    asks it of every one of its hundreds of devices at each look, for a handful of distinct pairs."""
    return re.search(pattern, model, re.IGNORECASE) is not None


@dataclass(frozen=True, order=True)
class Holder:
    """Who holds devices: a server of this hub, or (``user`` empty) another container on the engine."""

    user: str
    server: str = ""

    def __str__(self) -> str:
        if not self.user:
            return self.server
        return f"{self.user}/{self.server}" if self.server else self.user


class Status(enum.Enum):
    FREE = "free"
    HELD = "held"  # by a server of this hub
    BUSY = "busy"  # used outside the hub
    UNHEALTHY = "unhealthy"


def device_status(device: Device, claims: Mapping[str, Holder], *, busy_memory_threshold: int) -> Status:
    """Where one device stands. Claims come first: a held device also shows its holder's processes."""
    if not device.healthy or not device.uuid:
        return Status.UNHEALTHY
    if device.uuid in claims:
        return Status.HELD
    if device.processes or device.memory_used > busy_memory_threshold:
        return Status.BUSY
    return Status.FREE


@dataclass(frozen=True)
class Grant:
    devices: tuple[Device, ...]

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(d.uuid for d in self.devices)


@dataclass(frozen=True)
class Refusal:
    """Why a request cannot be met now, counted over the devices of the kind asked for."""

    request: GPURequest
    free: int = 0
    held: int = 0
    busy: int = 0
    unhealthy: int = 0
    holders: tuple[Holder, ...] = ()
    problem: str | None = None  # the inventory could not be read at all
    host_models: tuple[str, ...] = ()  # what the host has, when nothing matches
    healthy_on_one_node: int | None = None  # the most healthy matching devices on one node (None: not counted)

    @property
    def matching(self) -> int:
        return self.free + self.held + self.busy + self.unhealthy

    @property
    def can_wait(self) -> bool:
        """Whether waiting could help: devices of this kind exist, enough of them, and are only taken."""
        return self.problem is None and self.matching - self.unhealthy >= self.request.device_count

    def message(self, *, admin: bool = False) -> str:
        """A sentence for the user. Other users' names appear for admins only."""
        needs = f"needs {self.request.describe()}"
        if self.problem:
            return f"No GPU available: {needs}, and {self.problem}."
        if self.matching == 0:
            have = ", ".join(self.host_models) or "no GPU"
            return f"No GPU on this host matches: {needs}; this host has {have}."
        text = (
            f"No free GPU for this server: {needs}; {self.free} free, "
            f"{self.held} held by other servers, {self.busy} busy outside the hub, "
            f"{self.unhealthy} unhealthy."
        )
        healthy = self.matching - self.unhealthy if self.healthy_on_one_node is None else self.healthy_on_one_node
        if healthy < self.request.device_count:
            text += (" This host never has that many healthy devices of this kind." if self.healthy_on_one_node is None
                     or healthy == self.matching - self.unhealthy else
                     " No node has that many healthy devices of this kind: one server's devices are on one node.")
        else:
            text += " Try again when a server stops."
        if admin and self.holders:
            text += " Held by: " + ", ".join(str(h) for h in self.holders) + "."
        return text


def allocate(
    request: GPURequest,
    inventory: Inventory,
    claims: Mapping[str, Holder],
    *,
    holder: Holder,
    busy_memory_threshold: int,
) -> Grant | Refusal:
    """Choose devices for `holder`'s server, or say why none fit.

    Devices `holder` itself holds count as free for it: its earlier container is replaced.
    """
    if not request.wants_gpu:
        return Grant(devices=())
    others = _others(claims, holder)
    matching = sorted((d for d in inventory.devices if request.matches(d)), key=lambda d: d.order_key)
    by_status: dict[Status, list[Device]] = {s: [] for s in Status}
    for device in matching:
        by_status[device_status(device, others, busy_memory_threshold=busy_memory_threshold)].append(device)
    free = by_status[Status.FREE]

    on_one_node = _one_node(free, request.device_count)
    if inventory.problem is None and on_one_node:
        return Grant(devices=_closest(on_one_node, request.device_count, inventory))

    held_by = sorted({others[d.uuid] for d in by_status[Status.HELD]})
    return Refusal(
        request=request,
        free=len(free),
        held=len(by_status[Status.HELD]),
        busy=len(by_status[Status.BUSY]),
        unhealthy=len(by_status[Status.UNHEALTHY]),
        holders=tuple(held_by),
        problem=inventory.problem,
        host_models=_host_models(inventory.devices),
        healthy_on_one_node=most_on_one_node(d for d in matching if d.healthy and d.uuid),
    )


def _others(claims: Mapping[str, Holder], holder: Holder) -> dict[str, Holder]:
    """The claims of everyone but `holder`. The user names are compared first: most claims are other
    users', and a string comparison costs a fraction of the dataclass's (a swarm has hundreds of claims)."""
    return {uuid: h for uuid, h in claims.items() if h.user != holder.user or h != holder}


def _one_node(free: Sequence[Device], count: int) -> list[Device]:
    """The free devices of the node a server of `count` devices goes to: all of them on one host; on a
    swarm, the node with the fewest free devices that has enough (a node with many is kept for the big
    requests). Empty when no node has `count`."""
    by_node: dict[str, list[Device]] = {}
    for d in free:
        by_node.setdefault(d.node, []).append(d)
    fitting = [devices for devices in by_node.values() if len(devices) >= count]
    return min(fitting, key=lambda devices: (len(devices), devices[0].node)) if fitting else []


def most_on_one_node(devices: Iterable[Device]) -> int:
    """The most of `devices` on any one node (all of them, on one host)."""
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.node] = counts.get(d.node, 0) + 1
    return max(counts.values(), default=0)


def _closest(free: Sequence[Device], count: int, inventory: Inventory) -> tuple[Device, ...]:
    """`count` devices from `free` (in stable order) with the smallest sum of pairwise distances.

    Greedy from each seed: add the device nearest to those chosen so far. Exact for the usual
    trees of PCIe switches and NUMA nodes, and O(n² · count) rather than combinatorial.
    """
    if count == 1 or not inventory.topology:
        return tuple(free[:count])
    best: tuple[int, list[int]] | None = None
    for seed in range(len(free)):
        chosen = [seed]
        # to_chosen[i]: sum of distances from free[i] to every device chosen so far
        to_chosen = [inventory.distance(free[seed].uuid, d.uuid) for d in free]
        score = 0
        while len(chosen) < count:
            nxt = min((i for i in range(len(free)) if i not in chosen), key=lambda i: (to_chosen[i], i))
            score += to_chosen[nxt]
            chosen.append(nxt)
            for i, d in enumerate(free):
                to_chosen[i] += inventory.distance(free[nxt].uuid, d.uuid)
        candidate = (score, sorted(chosen))
        if best is None or candidate < best:
            best = candidate
    assert best is not None
    return tuple(free[i] for i in best[1])


def _host_models(devices: Sequence[Device]) -> tuple[str, ...]:
    """The host's devices in words, e.g. ("4 × NVIDIA H100 80GB HBM3", "2 × MIG 1g.10gb")."""
    counts: dict[str, int] = {}
    for d in devices:
        if d.mig_enabled:
            continue
        key = f"MIG {d.mig_profile} on {d.model}" if d.is_mig else d.name
        counts[key] = counts.get(key, 0) + 1
    return tuple(f"{n} × {name}" for name, n in counts.items())


# --- What the spawn form shows, and the per-user quota -------------------------------------------


@dataclass(frozen=True)
class Availability:
    """Whether a request could start now, in a few words for the spawn form."""

    startable: bool
    text: str


def availability(
    request: GPURequest,
    inventory: Inventory,
    claims: Mapping[str, Holder],
    *,
    holder: Holder,
    busy_memory_threshold: int,
) -> Availability:
    """E.g. "3 of 4 NVIDIA H100 80GB HBM3 free", "none free", "no NVIDIA driver on this host"."""
    if not request.wants_gpu:
        return Availability(True, "no GPU needed")
    if inventory.problem:
        return Availability(False, "no NVIDIA driver on this host")
    result = allocate(request, inventory, claims, holder=holder, busy_memory_threshold=busy_memory_threshold)
    matching = [d for d in inventory.devices if request.matches(d) and d.healthy]
    models = {d.name if not d.is_mig else f"MIG {d.mig_profile}" for d in matching}
    label = models.pop() if len(models) == 1 else "GPUs"
    if isinstance(result, Grant):
        others = _others(claims, holder)  # once, not per device: a swarm has hundreds
        free = sum(1 for d in matching if device_status(d, others, busy_memory_threshold=busy_memory_threshold) is Status.FREE)
        return Availability(True, f"{free} of {len(matching)} {label} free")
    if not matching:
        return Availability(False, "no matching GPU on this host")
    if result.free == 0:
        return Availability(False, f"none free ({len(matching)} × {label}, all in use)")
    return Availability(False, f"{result.free} of {len(matching)} {label} free, needs {request.device_count}")


def quota_for(groups: Sequence[str], *, default: int | None, per_group: Mapping[str, int]) -> int | None:
    """A user's GPU quota: the largest of their groups' values, else the default (None: no quota)."""
    values = [per_group[g] for g in groups if g in per_group]
    return max(values) if values else default


def quota_refusal(
    request: GPURequest, claims: Mapping[str, Holder], *, holder: Holder, quota: int | None
) -> str | None:
    """Why this spawn would take the user past their GPU quota, or None if it would not.

    Devices held by the user's other servers count, one per GPU or MIG device; the server being
    started does not count its own earlier devices.
    """
    if quota is None or not request.wants_gpu:
        return None
    others = [h for h in claims.values() if h.user == holder.user and h != holder]
    if len(others) + request.device_count <= quota:
        return None
    servers = sorted({h.server or "(default server)" for h in others})
    held = f"{len(others)} held by your other servers ({', '.join(servers)})" if others else "none held now"
    return (
        f"GPU quota reached: you may hold {quota} GPU{'s' if quota != 1 else ''} across your servers; "
        f"{held}, and this server needs {request.device_count}. "
        "Stop another server or choose a profile with fewer GPUs."
    )
