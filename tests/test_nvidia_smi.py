"""tests/nvidia_smi.py: reading `nvidia-smi -q -x`, and holding gpuspawner's inventory against it.

The sample, tests/data/nvidia-smi-q.xml, is shaped like a real R550 log: an H100 with a compute
process, an A100 in MIG mode with two MIG devices (printed out of index order, one running a
process), and an RTX A6000 with a display (a graphics and a compute+graphics process).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import nvidia_smi
from gpuspawner.devices import Device, Inventory, MiB, Process

SAMPLE = Path(__file__).parent / "data" / "nvidia-smi-q.xml"
H100 = "GPU-5b4b8ea0-6c1e-2f0a-9a7e-0d3b8c1f2a41"
A100 = "GPU-9d1a3c52-04f7-7e21-8b3c-51a8e2d0c6f9"
A6000 = "GPU-e0f7c2d4-8a19-3b6e-f215-7c4d9a0b3e18"
MIG_SMALL = "MIG-1f0c7a9e-6d52-5b8e-a1c4-3e9f0b27d6a8"
MIG_LARGE = "MIG-7a2e4c19-b803-5f6d-9e1a-c4d80f3b2e57"


@pytest.fixture(scope="module")
def log() -> nvidia_smi.SmiLog:
    return nvidia_smi.parse(SAMPLE.read_bytes())


def test_the_driver_and_cuda_versions(log: nvidia_smi.SmiLog) -> None:
    assert (log.driver_version, log.cuda_version) == ("550.54.15", "12.4")


@pytest.mark.parametrize(
    ("uuid", "product", "bus_id", "total", "reserved", "mig_mode", "mig_enabled"),
    [
        (H100, "NVIDIA H100 80GB HBM3", "00000000:18:00.0", 81559, 329, "Disabled", False),
        (A100, "NVIDIA A100-SXM4-40GB", "00000000:3B:00.0", 40960, 571, "Enabled", True),
        (A6000, "NVIDIA RTX A6000", "00000000:AF:00.0", 49140, 506, None, False),
    ],
    ids=["h100", "a100-in-mig-mode", "a6000-no-mig"],
)
def test_each_gpu_in_mib(
    log: nvidia_smi.SmiLog, uuid: str, product: str, bus_id: str, total: int, reserved: int, mig_mode: str | None,
    mig_enabled: bool,
) -> None:
    gpu = log.by_uuid()[uuid]
    assert (gpu.product_name, gpu.pci_bus_id, gpu.memory_total_mib, gpu.memory_reserved_mib) == (product, bus_id, total, reserved)
    assert (gpu.mig_mode, gpu.mig_enabled) == (mig_mode, mig_enabled)


def test_the_gpus_in_the_order_printed(log: nvidia_smi.SmiLog) -> None:
    assert [g.uuid for g in log.gpus] == [H100, A100, A6000]


def test_mig_devices_in_index_order_with_their_instances_and_memory(log: nvidia_smi.SmiLog) -> None:
    assert log.by_uuid()[A100].mig_devices == (
        nvidia_smi.SmiMigDevice(index=0, gpu_instance_id=7, compute_instance_id=0, memory_total_mib=4864),
        nvidia_smi.SmiMigDevice(index=1, gpu_instance_id=2, compute_instance_id=0, memory_total_mib=19968),
    )
    assert log.by_uuid()[H100].mig_devices == ()  # "None" as the element's text


@pytest.mark.parametrize(
    ("uuid", "pids"),
    [(H100, {48213}), (A100, {51877}), (A6000, {39090})],
    ids=["compute", "on-a-mig-device", "graphics-left-out"],
)
def test_compute_processes_are_c_and_c_plus_g(log: nvidia_smi.SmiLog, uuid: str, pids: set[int]) -> None:
    assert log.by_uuid()[uuid].compute_pids == pids


def test_a_process_on_a_mig_device_names_its_instances(log: nvidia_smi.SmiLog) -> None:
    (process,) = log.by_uuid()[A100].processes
    assert process == nvidia_smi.SmiProcess(pid=51877, type="C", gpu_instance_id=2, compute_instance_id=0, used_memory_mib=1030)


def test_absent_and_not_applicable_fields_read_as_none() -> None:
    log = nvidia_smi.parse(
        "<nvidia_smi_log><gpu id='00000000:01:00.0'><uuid>GPU-x</uuid><fb_memory_usage><total>N/A</total>"
        "</fb_memory_usage><processes></processes></gpu></nvidia_smi_log>"
    )
    assert log.driver_version is None
    (gpu,) = log.gpus
    assert (gpu.product_name, gpu.memory_total_mib, gpu.memory_reserved_mib, gpu.mig_mode) == ("", None, 0, None)
    assert (gpu.mig_devices, gpu.processes) == ((), ())


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("No devices were found", "not XML"),
        ("<html><body/></html>", "root element is <html>"),
        ("<nvidia_smi_log><gpu><fb_memory_usage><total>80 GB</total></fb_memory_usage></gpu></nvidia_smi_log>", "in GB, not MiB"),
        ("<nvidia_smi_log><gpu><processes><process_info><type>C</type></process_info></processes></gpu></nvidia_smi_log>", "without a <pid>"),
    ],
    ids=["not-xml", "another-document", "another-unit", "process-without-pid"],
)
def test_what_is_not_an_nvidia_smi_log_is_refused(xml: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nvidia_smi.parse(xml)


# --- Holding an inventory against the log ------------------------------------------------------


def matching_inventory() -> Inventory:
    """What gpuspawner.nvml would read on the host the sample was printed on."""
    a100 = Device(uuid=A100, index=1, name="NVIDIA A100-SXM4-40GB", memory_total=40960 * MiB, memory_used=0,
                  pci_bus_id="00000000:3B:00.0", mig_enabled=True)
    return Inventory(
        devices=(
            Device(uuid=H100, index=0, name="NVIDIA H100 80GB HBM3", memory_total=81559 * MiB + 123, memory_used=0,
                   pci_bus_id="00000000:18:00.0", processes=(Process(pid=48213, used_memory=2806 * MiB),)),
            a100,
            Device(uuid=MIG_SMALL, index=1, name="NVIDIA A100-SXM4-40GB MIG 1g.5gb", memory_total=4864 * MiB,
                   memory_used=0, parent_uuid=A100, mig_profile="1g.5gb"),
            Device(uuid=MIG_LARGE, index=1, name="NVIDIA A100-SXM4-40GB MIG 3g.20gb", memory_total=19968 * MiB,
                   memory_used=0, parent_uuid=A100, mig_profile="3g.20gb", processes=(Process(pid=51877, used_memory=None),)),
            Device(uuid=A6000, index=2, name="NVIDIA RTX A6000", memory_total=49140 * MiB, memory_used=0,
                   pci_bus_id="00000000:AF:00.0", processes=(Process(pid=39090, used_memory=None),)),
        ),
        driver_version="550.54.15",
        cuda_driver_version="12.4",
    )


def test_an_inventory_read_on_that_host_agrees(log: nvidia_smi.SmiLog) -> None:
    assert nvidia_smi.disagreements(matching_inventory(), log) == []


def _change(uuid: str, **changes: Any) -> Callable[[Inventory], Inventory]:
    def change(inventory: Inventory) -> Inventory:
        devices = tuple(dataclasses.replace(d, **changes) if d.uuid == uuid else d for d in inventory.devices)
        return dataclasses.replace(inventory, devices=devices)

    return change


def _drop(uuid: str) -> Callable[[Inventory], Inventory]:
    return lambda inv: dataclasses.replace(inv, devices=tuple(d for d in inv.devices if d.uuid != uuid))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda inv: dataclasses.replace(inv, cuda_driver_version="12.2"), "versions: NVML says driver 550.54.15, CUDA 12.2; nvidia-smi says driver 550.54.15, CUDA 12.4"),
        (_drop(A6000), f"{A6000}: nvidia-smi lists it, NVML does not"),
        (_change(H100, name="NVIDIA H100 PCIe"), f"{H100}: NVML names it 'NVIDIA H100 PCIe', nvidia-smi 'NVIDIA H100 80GB HBM3'"),
        (_change(H100, memory_total=81559 * MiB + 329 * MiB), None),  # the reserved memory counted on one side only
        (_change(H100, memory_total=(81559 + 330) * MiB), f"{H100}: total memory: NVML {(81559 + 330) * MiB} bytes (81889.0 MiB), nvidia-smi 81559 MiB (reserved 329 MiB)"),
        (_change(A100, mig_enabled=False), f"{A100}: MIG mode: NVML says off, nvidia-smi says Enabled"),
        (_drop(MIG_SMALL), f"{A100}: NVML has 1 MIG devices, nvidia-smi 2"),
        (_change(MIG_SMALL, memory_total=9856 * MiB), f"{A100}: MIG device 0 ({MIG_SMALL}) total memory: NVML {9856 * MiB} bytes (9856.0 MiB), nvidia-smi 4864 MiB (reserved 0 MiB)"),
        (_change(MIG_LARGE, processes=()), f"{A100}: compute processes: NVML has pids [], nvidia-smi [51877]"),
        (_change(A6000, processes=(Process(pid=39090, used_memory=None), Process(pid=2211, used_memory=None))), f"{A6000}: compute processes: NVML has pids [2211, 39090], nvidia-smi [39090]"),
    ],
    ids=["cuda-version", "gpu-missing", "product-name", "reserved-memory-allowed", "memory-beyond-reserved", "mig-mode",
         "mig-device-missing", "mig-memory", "process-missing", "graphics-process-as-compute"],
)
def test_each_disagreement_in_one_sentence(
    log: nvidia_smi.SmiLog, change: Callable[[Inventory], Inventory], expected: str | None
) -> None:
    assert nvidia_smi.disagreements(change(matching_inventory()), log) == ([expected] if expected else [])


def test_mig_uuids_are_checked_where_the_driver_prints_them(log: nvidia_smi.SmiLog) -> None:
    a100 = log.by_uuid()[A100]
    printed = (dataclasses.replace(a100.mig_devices[0], uuid=MIG_SMALL), dataclasses.replace(a100.mig_devices[1], uuid="MIG-other"))
    changed = dataclasses.replace(log, gpus=tuple(dataclasses.replace(g, mig_devices=printed) if g is a100 else g for g in log.gpus))
    assert nvidia_smi.disagreements(matching_inventory(), changed) == [f"{A100}: nvidia-smi prints MIG device MIG-other, NVML does not list it"]
