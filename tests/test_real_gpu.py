"""The inventory of a real NVIDIA GPU, read through the real driver (skipped where there is none).

Run it on a GPU machine with:  python -m pytest tests/test_real_gpu.py -s
"""

import re

import pytest

from gpuspawner import cli, nvml
from gpuspawner.allocation import GPURequest, Grant, Holder, Refusal, allocate


@pytest.fixture
def real_nvml() -> None:
    import pynvml

    if pynvml.nvmlLib is not None and type(pynvml.nvmlLib).__name__ == "_SimulatedLibrary":
        pytest.skip("the simulated NVML is installed in this process: run tests/test_real_gpu.py on its own")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"needs a real NVIDIA GPU, and no NVIDIA driver answers on this host ({e})")


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
    # With no claims and a threshold no GPU's memory reaches, a whole GPU is free unless it is in
    # MIG mode, unhealthy or running compute processes: worked out here, then asked of allocate().
    whole = [d for d in gpus if not d.mig_enabled]
    free = [d for d in whole if d.healthy and d.uuid and not d.processes]
    result = allocate(GPURequest(count=1), inventory, {}, holder=Holder("probe"), busy_memory_threshold=1 << 40)
    if free:
        assert isinstance(result, Grant), result.message(admin=True)
        print("one GPU would go to:", result.uuids)
        assert result.devices[0] in free
    else:
        assert isinstance(result, Refusal), result
        print("no whole GPU free:", result.message(admin=True))
        unhealthy = sum(1 for d in whole if not (d.healthy and d.uuid))
        assert (result.free, result.held, result.busy, result.unhealthy) == (0, 0, len(whole) - unhealthy, unhealthy)
        expected = "No free GPU for this server" if whole else "No GPU on this host matches"
        assert result.message().startswith(expected), result.message()
