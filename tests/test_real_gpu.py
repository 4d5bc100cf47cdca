"""The inventory of a real NVIDIA GPU, read through the real driver (skipped where there is none).

Run it on a GPU machine with:  python -m pytest tests/test_real_gpu.py -s
"""

import re

import pytest

from gpuspawner import cli, nvml
from gpuspawner.allocation import Grant, GPURequest, Holder, allocate


@pytest.fixture
def real_nvml() -> None:
    import pynvml

    if pynvml.nvmlLib is not None and type(pynvml.nvmlLib).__name__ == "_SimulatedLibrary":
        pytest.skip("the simulated NVML is installed in this process")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"no NVIDIA driver on this host ({e})")


def test_real_inventory(real_nvml: None) -> None:
    import pynvml

    inventory = nvml.read_inventory()
    print()
    print(cli.format_table(cli.device_rows(inventory, {}, busy_memory_threshold=1 << 30), inventory, "(no hub)"))
    assert inventory.problem is None
    assert re.fullmatch(r"\d+\.\d+(\.\d+)*", inventory.driver_version or "")
    assert re.fullmatch(r"\d+\.\d+", inventory.cuda_driver_version or "")
    gpus = [d for d in inventory.devices if not d.is_mig]
    assert len(gpus) == pynvml.nvmlDeviceGetCount()
    for d in inventory.devices:
        if d.healthy:
            assert re.match(r"^(GPU|MIG)-[0-9a-f-]+$", d.uuid), d.uuid
            assert d.memory_total > 0 and 0 <= d.memory_used <= d.memory_total
            assert d.pci_bus_id
    result = allocate(GPURequest(count=1), inventory, {}, holder=Holder("probe"), busy_memory_threshold=1 << 40)
    if isinstance(result, Grant):
        print("one GPU would go to:", result.uuids)
        assert result.devices[0].healthy and not result.devices[0].mig_enabled
    else:
        print("no whole GPU free:", result.message(admin=True))
