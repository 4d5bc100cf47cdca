"""What the hub last saw of its GPUs and servers, as plain data: what its metrics and pages show.

Each round of the hub's sampler (:mod:`gpuspawner.reclaim`) reads NVML once and turns it, with
the claims the hub knows of (its servers' devices, pending spawns, other containers), into
:class:`Readings`: every device's state and holder, and each GPU server's idle time and time
left. :mod:`gpuspawner.metrics` exposes the latest readings to Prometheus without any I/O.

It also holds the arithmetic of GPU time: :func:`held_share` (how much of a GPU a server's
devices are) and :func:`account` (GPU-seconds between two samples).

Pure code: no docker, pynvml, jupyterhub or database imports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .allocation import Holder, Status, device_status
from .audit import RecordedDevice
from .devices import Device, Inventory
from .usage import gpu_share

STATES = ("free", "held", "busy", "unhealthy")  # what gpuspawner_devices counts, per model


@dataclass(frozen=True)
class DeviceReading:
    """One device at the last sample: what it is, how busy, and who holds it."""

    uuid: str
    index: int
    model: str  # "NVIDIA A100-SXM4-80GB", or "NVIDIA A100-SXM4-80GB MIG 1g.10gb" for a MIG device
    mig_profile: str
    parent_uuid: str
    utilization: int | None  # percent; None where NVML has none (MIG devices)
    memory_used: int
    memory_total: int
    state: str  # one of STATES; "mig" for a GPU in MIG mode (its MIG devices are counted instead)
    user: str = ""  # the holder, for a device held by a server of this hub
    server: str = ""
    profile: str = ""
    node: str = ""  # the host name of the swarm node that has it; "" for the hub's own host


@dataclass(frozen=True)
class ServerReading:
    """One GPU server of the hub at the last sample."""

    user: str
    server: str
    idle_seconds: float | None  # how long its GPUs have been idle; None while busy or unsampled
    time_left: float | None  # until the sooner of its time limits stops it; None without limits


@dataclass(frozen=True)
class Readings:
    """The hub's latest sample. ``taken_at`` 0: none yet. ``problem``: why NVML gave no devices."""

    taken_at: float = 0.0
    devices: tuple[DeviceReading, ...] = ()
    servers: tuple[ServerReading, ...] = ()
    problem: str = ""


def model_of(device: Device) -> str:
    """The kind of device, as counted and shown: NVML's name, which for a MIG device is already
    "<GPU model> MIG <profile>"; the profile is added where a driver's name lacks it."""
    if device.is_mig and device.mig_profile and " MIG " not in device.name:
        return f"{device.name} MIG {device.mig_profile}"
    return device.name


def device_readings(
    inventory: Inventory, claims: Mapping[str, Holder], profiles: Mapping[Holder, str], *, busy_memory_threshold: int,
    node_names: Mapping[str, str] | None = None,
) -> tuple[DeviceReading, ...]:
    """Every device of `inventory` with its state, as ``gpuspawner gpus`` decides it (a device another
    container holds, a holder with no user, is busy outside the hub), its holder's profile, and its node
    by host name (`node_names`: a swarm's node ids to host names)."""
    found = []
    for d in inventory.devices:
        holder = claims.get(d.uuid)
        status = device_status(d, claims, busy_memory_threshold=busy_memory_threshold)
        state = "mig" if d.mig_enabled else status.value
        if status is Status.HELD and holder is not None and not holder.user:
            state, holder = Status.BUSY.value, None  # another hub's or a `docker run --gpus` container
        if status is not Status.HELD:
            holder = None
        found.append(DeviceReading(
            uuid=d.uuid, index=d.index, model=model_of(d), mig_profile=d.mig_profile or "", parent_uuid=d.parent_uuid or "",
            utilization=d.utilization, memory_used=d.memory_used, memory_total=d.memory_total, state=state,
            user=holder.user if holder else "", server=holder.server if holder else "",
            profile=profiles.get(holder, "") if holder else "", node=(node_names or {}).get(d.node, d.node),
        ))
    return tuple(found)


def state_counts(devices: Iterable[DeviceReading]) -> dict[tuple[str, str], int]:
    """(model, state) -> how many devices; every state of every model present, so a count that drops
    to 0 reads 0 rather than vanishing. GPUs in MIG mode are left out: their MIG devices count."""
    counts: dict[tuple[str, str], int] = {}
    for d in devices:
        if d.state == "mig":
            continue
        for state in STATES:
            counts.setdefault((d.model, state), 0)
        counts[(d.model, d.state)] += 1
    return counts


def held_share(uuids: Sequence[str], mig_profiles: Mapping[str, str | None]) -> float:
    """How much GPU a server's devices are: 1 per whole GPU, g/7 per MIG device of g compute slices
    (as :func:`gpuspawner.usage.gpu_share`). `mig_profiles`: UUID -> MIG profile ("" or None for a
    whole GPU); a device not in it counts as a whole GPU."""
    return sum(gpu_share(RecordedDevice(uuid, "", 0, mig_profile=mig_profiles.get(uuid) or None)) for uuid in uuids)


@dataclass(frozen=True)
class Accounted:
    """GPU time between two samples of one server: held, and the part of it idle."""

    gpu_seconds: float
    idle_gpu_seconds: float


def account(share: float, *, since: float, now: float, idle: bool) -> Accounted:
    """GPU-seconds a server holding `share` GPUs held from `since` to `now`; all idle when its GPUs
    were idle at this sample (the hub sees utilisation only at its samples)."""
    held = max(0.0, now - since) * share
    return Accounted(held, held if idle else 0.0)
