"""What `nvidia-smi -q -x` says about the host's GPUs, as plain data (test code: the real-GPU check).

nvidia-smi is the driver's own report, so tests/test_real_gpu.py holds gpuspawner's NVML reading
against it. :func:`parse` is pure: XML text in, dataclasses out, no subprocess. Sizes stay in MiB,
the unit nvidia-smi prints; "N/A" and absent fields read as None. :func:`disagreements` compares
such a log with an :class:`~gpuspawner.devices.Inventory`, also purely.

The elements read (DTD nvsmi_device_v11/v12): ``nvidia_smi_log/{driver_version,cuda_version}``
and per ``gpu`` (attribute ``id``, the PCI bus id): ``uuid``, ``product_name``,
``fb_memory_usage/{total,reserved}``, ``mig_mode/current_mig``, ``mig_devices/mig_device``
(``index``, ``gpu_instance_id``, ``compute_instance_id``, ``fb_memory_usage/total``, ``uuid`` on
drivers that print it) and ``processes/process_info`` (``pid``, ``type``, ``gpu_instance_id``,
``compute_instance_id``, ``used_memory``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from gpuspawner.devices import Device, Inventory, MiB


@dataclass(frozen=True)
class SmiProcess:
    pid: int
    type: str  # "C" compute, "G" graphics, "C+G" both
    gpu_instance_id: int | None = None  # set for a process on a MIG device
    compute_instance_id: int | None = None
    used_memory_mib: int | None = None

    @property
    def is_compute(self) -> bool:
        """What NVML's nvmlDeviceGetComputeRunningProcesses lists: C and C+G."""
        return "C" in self.type.split("+")


@dataclass(frozen=True)
class SmiMigDevice:
    index: int
    gpu_instance_id: int | None
    compute_instance_id: int | None
    memory_total_mib: int | None
    uuid: str | None = None  # most drivers leave it out of the XML; `nvidia-smi -L` has it


@dataclass(frozen=True)
class SmiGpu:
    pci_bus_id: str
    uuid: str
    product_name: str
    memory_total_mib: int | None
    memory_reserved_mib: int  # what the driver keeps for itself (printed since R510; 0 where absent)
    mig_mode: str | None  # "Enabled", "Disabled", or None where the board has no MIG ("N/A")
    mig_devices: tuple[SmiMigDevice, ...] = ()
    processes: tuple[SmiProcess, ...] = ()

    @property
    def mig_enabled(self) -> bool:
        return self.mig_mode == "Enabled"

    @property
    def compute_pids(self) -> frozenset[int]:
        return frozenset(p.pid for p in self.processes if p.is_compute)


@dataclass(frozen=True)
class SmiLog:
    driver_version: str | None
    cuda_version: str | None
    gpus: tuple[SmiGpu, ...]

    def by_uuid(self) -> dict[str, SmiGpu]:
        return {g.uuid: g for g in self.gpus}


def parse(xml: str | bytes) -> SmiLog:
    """The log `nvidia-smi -q -x` printed. Raises ValueError if it is not such a log."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ValueError(f"not XML: {e}") from e
    if root.tag != "nvidia_smi_log":
        raise ValueError(f"not an nvidia-smi log: the root element is <{root.tag}>")
    return SmiLog(
        driver_version=_text(root, "driver_version"),
        cuda_version=_text(root, "cuda_version"),
        gpus=tuple(_gpu(g) for g in root.findall("gpu")),
    )


def _gpu(gpu: ET.Element) -> SmiGpu:
    return SmiGpu(
        pci_bus_id=gpu.get("id", ""),
        uuid=_text(gpu, "uuid") or "",
        product_name=_text(gpu, "product_name") or "",
        memory_total_mib=_mib(_text(gpu, "fb_memory_usage/total")),
        memory_reserved_mib=_mib(_text(gpu, "fb_memory_usage/reserved")) or 0,
        mig_mode=_text(gpu, "mig_mode/current_mig"),
        mig_devices=tuple(sorted((_mig_device(m) for m in gpu.findall("mig_devices/mig_device")), key=lambda m: m.index)),
        processes=tuple(_process(p) for p in gpu.findall("processes/process_info")),
    )


def _mig_device(mig: ET.Element) -> SmiMigDevice:
    return SmiMigDevice(
        index=_int(_text(mig, "index")) or 0,
        gpu_instance_id=_int(_text(mig, "gpu_instance_id")),
        compute_instance_id=_int(_text(mig, "compute_instance_id")),
        memory_total_mib=_mib(_text(mig, "fb_memory_usage/total")),
        uuid=_text(mig, "uuid"),
    )


def _process(process: ET.Element) -> SmiProcess:
    pid = _int(_text(process, "pid"))
    if pid is None:
        raise ValueError("a <process_info> without a <pid>")
    return SmiProcess(
        pid=pid,
        type=_text(process, "type") or "",
        gpu_instance_id=_int(_text(process, "gpu_instance_id")),
        compute_instance_id=_int(_text(process, "compute_instance_id")),
        used_memory_mib=_mib(_text(process, "used_memory")),
    )


def _text(element: ET.Element, path: str) -> str | None:
    """The element's stripped text; None where it is absent, empty or "N/A"."""
    found = element.find(path)
    text = (found.text or "").strip() if found is not None else ""
    return None if text in ("", "N/A") else text


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _mib(text: str | None) -> int | None:
    """ "81559 MiB" -> 81559."""
    if text is None:
        return None
    number, _, unit = text.partition(" ")
    if unit.strip() != "MiB":
        raise ValueError(f"a size in {unit.strip() or 'no unit'}, not MiB: {text!r}")
    return int(number)


# --- Holding gpuspawner's NVML reading against it --------------------------------------------


def disagreements(inventory: Inventory, log: SmiLog) -> list[str]:
    """Where gpuspawner's inventory and nvidia-smi's log differ, one sentence each ([] when they agree).

    Compared: driver and CUDA versions; the whole GPUs by UUID; for each, its product name, total
    memory, MIG mode, MIG devices (count, memory, UUIDs where printed) and compute processes (pids,
    those of its MIG devices included). Memory used and utilisation move from one read to the next
    and are not compared.
    """
    problems = []
    if (inventory.driver_version, inventory.cuda_driver_version) != (log.driver_version, log.cuda_version):
        problems.append(
            f"versions: NVML says driver {inventory.driver_version}, CUDA {inventory.cuda_driver_version}; "
            f"nvidia-smi says driver {log.driver_version}, CUDA {log.cuda_version}"
        )
    gpus = {d.uuid: d for d in inventory.devices if not d.is_mig and d.uuid}
    smi = log.by_uuid()
    for uuid in sorted(gpus.keys() - smi.keys()):
        problems.append(f"{uuid}: NVML lists it, nvidia-smi does not")
    for uuid in sorted(smi.keys() - gpus.keys()):
        problems.append(f"{uuid}: nvidia-smi lists it, NVML does not")
    for uuid in sorted(gpus.keys() & smi.keys()):
        migs = [d for d in inventory.devices if d.parent_uuid == uuid]
        problems += [f"{uuid}: {p}" for p in _gpu_disagreements(gpus[uuid], migs, smi[uuid])]
    return problems


def _gpu_disagreements(gpu: Device, migs: list[Device], smi: SmiGpu) -> list[str]:
    problems = []
    if gpu.name != smi.product_name:
        problems.append(f"NVML names it {gpu.name!r}, nvidia-smi {smi.product_name!r}")
    memory = _memory_disagreement(gpu.memory_total, smi.memory_total_mib, reserved_mib=smi.memory_reserved_mib)
    if memory:
        problems.append(f"total memory: {memory}")
    if gpu.mig_enabled != smi.mig_enabled:
        problems.append(f"MIG mode: NVML says {'on' if gpu.mig_enabled else 'off'}, nvidia-smi says {smi.mig_mode or 'N/A'}")
    problems += _mig_disagreements(migs, smi.mig_devices)
    nvml_pids = {p.pid for d in (gpu, *migs) for p in d.processes}
    if nvml_pids != smi.compute_pids:
        problems.append(f"compute processes: NVML has pids {sorted(nvml_pids)}, nvidia-smi {sorted(smi.compute_pids)}")
    return problems


def _mig_disagreements(migs: list[Device], smi: tuple[SmiMigDevice, ...]) -> list[str]:
    """NVML reads MIG devices by slot and nvidia-smi prints them by index: the same order."""
    if len(migs) != len(smi):
        return [f"NVML has {len(migs)} MIG devices, nvidia-smi {len(smi)}"]
    problems = []
    for mig, printed in zip(migs, smi, strict=True):
        memory = _memory_disagreement(mig.memory_total, printed.memory_total_mib, reserved_mib=0)
        if memory:
            problems.append(f"MIG device {printed.index} ({mig.uuid}) total memory: {memory}")
    printed_uuids = {m.uuid for m in smi if m.uuid}
    for uuid in sorted(printed_uuids - {m.uuid for m in migs}):
        problems.append(f"nvidia-smi prints MIG device {uuid}, NVML does not list it")
    return problems


def _memory_disagreement(nvml_bytes: int, smi_mib: int | None, *, reserved_mib: int) -> str | None:
    """None where the two totals agree, else how they differ.

    nvidia-smi prints whole MiB, NVML counts bytes: one MiB of rounding. Drivers since R510 also
    print the memory they reserve for themselves; on the drivers we know, nvidia-smi's total and
    NVML's (v1) total both include it, but a driver that counts it on one side only is off by
    exactly that much, which is not a disagreement about the GPU. Anything more is.
    """
    if smi_mib is None:
        return "nvidia-smi prints none"
    off = abs(nvml_bytes - smi_mib * MiB)
    if off < (reserved_mib + 1) * MiB:
        return None
    return f"NVML {nvml_bytes} bytes ({nvml_bytes / MiB:.1f} MiB), nvidia-smi {smi_mib} MiB (reserved {reserved_mib} MiB)"
