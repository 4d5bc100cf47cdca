"""The NVML inventory, read through pynvml's real code from the simulated driver library."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

import simnvml
from gpuspawner import nvml
from gpuspawner.devices import GiB, Inventory


@pytest.fixture
def spec(tmp_path: Path) -> Iterator[Path]:
    path = simnvml.write_spec(tmp_path / "gpus.json", [])
    simnvml.install(path)
    yield path
    simnvml.uninstall()


def test_several_gpus_by_uuid_with_their_details(spec: Path) -> None:
    simnvml.write_spec(spec, [
        simnvml.gpu(0, utilization=37, memory_used=2 * GiB),
        simnvml.gpu(1, name="NVIDIA H100 80GB HBM3"),
    ])
    inventory = nvml.read_inventory()
    assert inventory.problem is None
    assert (inventory.driver_version, inventory.cuda_driver_version) == ("550.54.15", "12.4")
    first, second = inventory.devices
    assert first.uuid == simnvml.gpu(0)["uuid"]
    assert (first.index, first.name, first.utilization) == (0, "NVIDIA A100-SXM4-80GB", 37)
    assert (first.memory_total, first.memory_used) == (80 * GiB, 2 * GiB)
    assert first.pci_bus_id == "00000000:10:00.0"
    assert second.name == "NVIDIA H100 80GB HBM3"
    assert all(d.healthy and not d.is_mig for d in inventory.devices)


def test_each_gpu_says_its_brand_and_compute_capability_as_the_container_toolkit_compares_them(spec: Path) -> None:
    import pynvml

    simnvml.write_spec(spec, [
        simnvml.gpu(0), simnvml.gpu(1, name="Tesla V100-SXM2-32GB", brand=pynvml.NVML_BRAND_TESLA, compute_capability="7.0"),
        simnvml.gpu(2, mig=[simnvml.mig_device(2, 0)], compute_capability="9.0"),
    ])
    found = [(d.brand, d.compute_capability) for d in nvml.read_inventory().devices]
    assert found == [("nvidia", "8.0"), ("tesla", "7.0"), ("nvidia", "9.0"), ("nvidia", "9.0")]


def test_mig_devices_are_listed_with_profile_and_parent_and_no_utilization(spec: Path) -> None:
    simnvml.write_spec(spec, [
        simnvml.gpu(0, mig=[simnvml.mig_device(0, 0), simnvml.mig_device(0, 1, profile="3g.40gb", memory_gib=40)]),
    ])
    parent, small, large = nvml.read_inventory().devices
    assert parent.mig_enabled and parent.utilization is None  # NVML: NOT_SUPPORTED under MIG
    assert (small.uuid, small.mig_profile, small.memory_total) == (simnvml.mig_device(0, 0)["uuid"], "1g.10gb", 10 * GiB)
    assert (large.mig_profile, large.parent_uuid) == ("3g.40gb", parent.uuid)
    assert small.model == "NVIDIA A100-SXM4-80GB"


def test_compute_processes_are_seen(spec: Path) -> None:
    simnvml.write_spec(spec, [simnvml.gpu(0, processes=[{"pid": 4242, "used_memory": 3 * GiB}])])
    (device,) = nvml.read_inventory().devices
    assert [(p.pid, p.used_memory) for p in device.processes] == [(4242, 3 * GiB)]


def test_a_lost_gpu_is_unhealthy_and_the_others_still_read(spec: Path) -> None:
    simnvml.write_spec(spec, [simnvml.gpu(0), simnvml.gpu(1, lost=True), simnvml.gpu(2)])
    inventory = nvml.read_inventory()
    healthy = [d.uuid for d in inventory.devices if d.healthy]
    assert healthy == [simnvml.gpu(0)["uuid"], simnvml.gpu(2)["uuid"]]
    (lost,) = [d for d in inventory.devices if not d.healthy]
    assert lost.index == 1 and "GPU is lost" in lost.problem


def test_topology_levels_between_whole_gpus(spec: Path) -> None:
    simnvml.write_spec(spec, [simnvml.gpu(i) for i in range(5)])  # switches {0,1},{2,3}; nodes {0..3},{4}
    inventory = nvml.read_inventory()
    uuid = [simnvml.gpu(i)["uuid"] for i in range(5)]
    assert inventory.distance(uuid[0], uuid[1]) == 10
    assert inventory.distance(uuid[0], uuid[2]) == 40
    assert inventory.distance(uuid[0], uuid[4]) == 50


def test_a_host_whose_driver_is_not_loaded_has_an_empty_inventory_and_says_why(spec: Path) -> None:
    simnvml.write_spec(spec, [], no_driver=True)
    inventory = nvml.read_inventory()
    assert inventory.devices == ()
    assert inventory.problem == "no NVIDIA driver is usable on this host (NVML: Driver Not Loaded)"


def test_a_host_without_the_nvml_library_has_an_empty_inventory_and_says_why() -> None:
    simnvml.uninstall()
    try:
        import pynvml

        pynvml.nvmlInit()
        pytest.skip("this host has a real NVIDIA driver")
    except pynvml.NVMLError:
        pass
    inventory = nvml.read_inventory()
    assert inventory.devices == ()
    assert inventory.problem == "no NVIDIA driver is usable on this host (NVML: NVML Shared Library Not Found)"


def test_inventory_follows_changes_to_the_host(spec: Path) -> None:
    simnvml.write_spec(spec, [simnvml.gpu(0)])
    assert len(nvml.read_inventory().devices) == 1
    simnvml.write_spec(spec, [simnvml.gpu(0), simnvml.gpu(1)])
    assert len(nvml.read_inventory().devices) == 2


# --- The event-loop side: off-loop reads, cache, one read for a burst ---------------------------


class CountingReader:
    def __init__(self) -> None:
        self.calls = 0
        self.threads: set[str] = set()

    def __call__(self) -> Inventory:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        return Inventory(driver_version=str(self.calls))


async def test_a_burst_of_callers_shares_one_read_off_the_event_loop() -> None:
    reader = CountingReader()
    inventory = nvml.NVMLInventory(cache_seconds=60, reader=reader)
    results = await asyncio.gather(*(inventory.get() for _ in range(50)))
    assert reader.calls == 1
    assert {r.driver_version for r in results} == {"1"}
    assert reader.threads == {"gpuspawner-nvml"}


async def test_cache_expires_after_the_configured_seconds() -> None:
    now = [100.0]
    reader = CountingReader()
    inventory = nvml.NVMLInventory(cache_seconds=2, reader=reader, clock=lambda: now[0])
    await inventory.get()
    now[0] += 1.5
    await inventory.get()
    assert reader.calls == 1
    now[0] += 1
    assert (await inventory.get()).driver_version == "2"


async def test_max_age_zero_always_reads_anew() -> None:
    reader = CountingReader()
    inventory = nvml.NVMLInventory(cache_seconds=60, reader=reader)
    await inventory.get()
    await inventory.get(max_age=0)
    assert reader.calls == 2


async def test_the_missing_driver_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    inventory = nvml.NVMLInventory(cache_seconds=0, reader=lambda: Inventory(problem="no driver"))
    for _ in range(5):
        await inventory.get()
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "GPUs unavailable, serving CPU-only servers: no driver"
    ]


# --- A hung driver: a bounded wait, one hung thread, recovery ------------------------------------

T = TypeVar("T")
GUARD_SECONDS = 5  # far beyond any bound below: these tests fail, never hang, on unbounded code


async def guarded(call: Awaitable[T]) -> T:
    return await asyncio.wait_for(call, GUARD_SECONDS)


class DelegatingReader:
    """The real reader, counted."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> Inventory:
        self.calls += 1
        return nvml.read_inventory()


@pytest.fixture
def hung(spec: Path) -> Iterator[Path]:
    """A host whose driver hangs; un-hung (and its hung calls ended) when the test is over."""
    simnvml.write_spec(spec, [simnvml.gpu(0)], hang=True)
    yield spec
    unhang(spec)
    deadline = time.monotonic() + GUARD_SECONDS
    while simnvml.hung_calls() and time.monotonic() < deadline:
        time.sleep(0.01)


def unhang(spec: Path) -> None:
    simnvml.write_spec(spec, [simnvml.gpu(0)])


async def until_it_answers(inventory: nvml.NVMLInventory) -> Inventory:
    while True:
        try:
            return await inventory.get()
        except nvml.NVMLTimeout:
            await asyncio.sleep(0.02)


def nvml_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gpuspawner-nvml")]


async def test_a_hung_read_times_out_within_the_bound_with_a_sentence(hung: Path) -> None:
    inventory = nvml.NVMLInventory(cache_seconds=60, timeout=0.25)
    started = time.monotonic()
    with pytest.raises(nvml.NVMLTimeout) as raised:
        await guarded(inventory.get())
    assert 0.25 <= time.monotonic() - started < 1.5
    assert str(raised.value) == (
        "NVML did not answer within 0.25 s (the driver may be hung); GPU servers cannot start until it does."
    )


async def test_callers_during_a_hang_share_the_one_hung_read(hung: Path) -> None:
    reader = DelegatingReader()
    inventory = nvml.NVMLInventory(cache_seconds=60, timeout=0.25, reader=reader)
    results = await guarded(asyncio.gather(*(inventory.get() for _ in range(20)), return_exceptions=True))
    assert all(isinstance(r, nvml.NVMLTimeout) for r in results)
    started = time.monotonic()
    with pytest.raises(nvml.NVMLTimeout):  # asked while the hung read is still out: no new wait
        await guarded(inventory.get())
    assert time.monotonic() - started < 0.2  # a fresh wait would take the whole 0.25 s
    assert (reader.calls, simnvml.hung_calls(), len(nvml_threads())) == (1, 1, 1)


async def test_once_nvml_answers_again_get_returns_the_inventory_and_caches_it(hung: Path) -> None:
    reader = DelegatingReader()
    inventory = nvml.NVMLInventory(cache_seconds=60, timeout=0.25, reader=reader)
    with pytest.raises(nvml.NVMLTimeout):
        await guarded(inventory.get())
    unhang(hung)
    answer = await guarded(until_it_answers(inventory))
    assert [d.uuid for d in answer.devices] == [simnvml.gpu(0)["uuid"]]
    assert (await guarded(inventory.get())) is answer
    assert reader.calls == 1  # the hung read's answer filled the cache


async def test_a_hang_is_logged_once_and_the_recovery_once(hung: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=nvml.__name__)
    inventory = nvml.NVMLInventory(cache_seconds=0, timeout=0.2)
    for _ in range(3):
        with pytest.raises(nvml.NVMLTimeout):
            await guarded(inventory.get())
    unhang(hung)
    await guarded(until_it_answers(inventory))
    await guarded(inventory.get())
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == nvml.__name__]
    assert logged[0] == (
        "WARNING",
        "NVML has not answered for 0.2 s (the driver may be hung): GPU servers cannot start until it does; "
        "CPU-only servers still start.",
    )
    assert [level for level, _ in logged] == ["WARNING", "INFO"]
    assert logged[1][1].startswith("NVML answers again after ") and logged[1][1].endswith(" s: 1 devices")


def test_a_hung_driver_does_not_keep_the_hub_from_exiting(tmp_path: Path) -> None:
    script = tmp_path / "hub.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio
        import simnvml
        from gpuspawner import nvml

        simnvml.install(simnvml.write_spec({str(tmp_path / "gpus.json")!r}, [simnvml.gpu(0)], hang=True))

        async def main():
            try:
                await asyncio.wait_for(nvml.NVMLInventory(cache_seconds=2, timeout=0.2).get(), 2)
            except nvml.NVMLTimeout:
                print("timed out")

        asyncio.run(main())
    """))
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent)]))
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "timed out\n"), done.stderr
    assert time.monotonic() - started < 15
