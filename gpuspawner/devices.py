"""What the host's GPUs look like: the inventory NVML reports, as plain data.

Everything is keyed by UUID (``GPU-…`` for whole GPUs, ``MIG-…`` for MIG devices): NVML
handles and indices can change across reboots and driver reloads, UUIDs do not.

Pure code: no pynvml, docker or jupyterhub imports. :mod:`gpuspawner.nvml` fills these in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

GiB = 1024**3
MiB = 1024**2

# NVML's topology levels (nvmlGpuTopologyLevel_t): how far apart two GPUs sit on the PCIe tree.
TOPOLOGY_INTERNAL = 0  # the same board
TOPOLOGY_SINGLE = 10  # one PCIe switch between them
TOPOLOGY_MULTIPLE = 20  # several PCIe switches, no host bridge
TOPOLOGY_HOSTBRIDGE = 30  # the same host bridge
TOPOLOGY_NODE = 40  # the same NUMA node
TOPOLOGY_SYSTEM = 50  # across NUMA nodes (SMP interconnect)


@dataclass(frozen=True)
class Process:
    """A compute process running on a device."""

    pid: int
    used_memory: int | None  # bytes; None where the driver cannot tell


@dataclass(frozen=True)
class Device:
    """One allocatable unit: a whole GPU, or one MIG device of a GPU in MIG mode.

    A GPU whose queries fail is listed with ``healthy=False`` and ``problem`` saying why;
    its UUID may then be unknown (""), and it is never allocated.
    """

    uuid: str
    index: int  # NVML index of the GPU (of the parent GPU, for a MIG device)
    name: str  # model, e.g. "NVIDIA A100-SXM4-80GB"
    memory_total: int  # bytes
    memory_used: int  # bytes
    utilization: int | None = None  # percent; None where NVML does not support it (MIG)
    pci_bus_id: str = ""
    processes: tuple[Process, ...] = ()
    healthy: bool = True
    problem: str = ""
    mig_enabled: bool = False  # a GPU in MIG mode: handed out only by its MIG devices
    parent_uuid: str | None = None  # set for MIG devices
    mig_profile: str | None = None  # e.g. "1g.10gb", for MIG devices
    node: str = ""  # the Docker Swarm node that has it ("" for the hub's own host); one server's devices share a node
    brand: str | None = None  # as NVIDIA's container toolkit names it ("nvidia", "tesla", …); None where unknown
    compute_capability: str | None = None  # "8.0"; None where unknown

    @property
    def is_mig(self) -> bool:
        return self.parent_uuid is not None

    @property
    def model(self) -> str:
        """The GPU model without the MIG suffix, e.g. "NVIDIA A100-SXM4-80GB"."""
        return self.name.split(" MIG ")[0] if self.is_mig else self.name

    @property
    def order_key(self) -> tuple[str, int, str]:
        """The stable order devices are considered in: PCI bus id, then UUID."""
        return (self.pci_bus_id.lower(), self.index, self.uuid)


@dataclass(frozen=True)
class Inventory:
    """All devices of the host at one moment, with the driver's versions.

    ``problem`` is set when NVML could not be used at all (no driver, say): the inventory is
    then empty and the hub serves CPU-only servers.
    """

    devices: tuple[Device, ...] = ()
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # e.g. "12.4"
    topology: Mapping[frozenset[str], int] = field(default_factory=dict)
    problem: str | None = None

    def by_uuid(self) -> dict[str, Device]:
        return {d.uuid: d for d in self.devices if d.uuid}

    def distance(self, a: str, b: str) -> int:
        """NVML topology level between two GPUs; unknown pairs count as farthest."""
        return self.topology.get(frozenset((a, b)), TOPOLOGY_SYSTEM)


def cuda_version_string(version: int) -> str:
    """NVML's CUDA driver version integer (12040) as people write it ("12.4")."""
    return f"{version // 1000}.{version % 1000 // 10}"


def mig_profile_from_name(name: str) -> str | None:
    """The MIG profile from a MIG device's name: "NVIDIA A100-SXM4-40GB MIG 1g.5gb" -> "1g.5gb"."""
    _, sep, profile = name.partition(" MIG ")
    return profile.strip() or None if sep else None


def format_bytes(n: int) -> str:
    """Bytes for people: GiB from 1 GiB up, else MiB."""
    if n >= GiB:
        value = n / GiB
        return f"{value:.0f} GiB" if value == int(value) else f"{value:.1f} GiB"
    return f"{n / MiB:.0f} MiB"
