"""The one path to NVML: reading the host's GPUs into an :class:`~gpuspawner.devices.Inventory`.

Uses ``import pynvml`` from NVIDIA's nvidia-ml-py. ``read_inventory()`` blocks (NVML calls
talk to the driver); :class:`NVMLInventory` runs it in a thread of its own, caches the
answer for a few seconds and shares one read among callers that ask at the same moment, so
a burst of spawns and form views neither blocks the hub's event loop nor hammers NVML.

Failures are sorted like this:

- no NVML at all (no driver, library not found): an empty inventory whose ``problem`` says
  so, one warning in the log, and a hub that keeps serving CPU-only servers;
- a GPU whose queries fail (lost, fallen off the bus): listed as unhealthy, never allocated;
- a query NVML does not support for a device (utilization under MIG, topology on some
  boards): that field is left empty.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pynvml

from .devices import Device, Inventory, Process, cuda_version_string, mig_profile_from_name

log = logging.getLogger(__name__)

_init_lock = threading.Lock()
_initialized = False


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ensure_init() -> None:
    """nvmlInit once per process; a failed init is tried again on the next read."""
    global _initialized
    with _init_lock:
        if not _initialized:
            pynvml.nvmlInit()
            _initialized = True


def _optional(call: Callable[[], Any]) -> Any:
    """A query some devices do not support: None instead of an error."""
    try:
        return call()
    except pynvml.NVMLError_NotSupported:
        return None


def _processes(handle: Any) -> tuple[Process, ...]:
    procs = _optional(lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(handle)) or []
    return tuple(Process(pid=int(p.pid), used_memory=p.usedGpuMemory) for p in procs)


def _read_mig_devices(parent: Device, handle: Any) -> list[Device]:
    devices = []
    for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except pynvml.NVMLError_NotFound:
            continue  # an empty slot: no MIG device configured there
        name = _text(pynvml.nvmlDeviceGetName(mig))
        memory = pynvml.nvmlDeviceGetMemoryInfo(mig)
        devices.append(
            Device(
                uuid=_text(pynvml.nvmlDeviceGetUUID(mig)),
                index=parent.index,
                name=name,
                memory_total=int(memory.total),
                memory_used=int(memory.used),
                pci_bus_id=parent.pci_bus_id,
                processes=_processes(mig),
                parent_uuid=parent.uuid,
                mig_profile=mig_profile_from_name(name),
            )
        )
    return devices


def _read_gpu(index: int, handle: Any) -> list[Device]:
    """One GPU and, in MIG mode, its MIG devices. Raises NVMLError if the GPU does not answer."""
    uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
    try:
        mig_mode = _optional(lambda: pynvml.nvmlDeviceGetMigMode(handle))
        mig_enabled = bool(mig_mode and mig_mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        utilization = _optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
        gpu = Device(
            uuid=uuid,
            index=index,
            name=_text(pynvml.nvmlDeviceGetName(handle)),
            memory_total=int(memory.total),
            memory_used=int(memory.used),
            utilization=None if utilization is None else int(utilization.gpu),
            pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
            processes=_processes(handle),
            mig_enabled=mig_enabled,
        )
        return [gpu, *(_read_mig_devices(gpu, handle) if mig_enabled else [])]
    except pynvml.NVMLError as e:
        raise _GpuFailed(uuid, e) from e


class _GpuFailed(Exception):
    def __init__(self, uuid: str, error: pynvml.NVMLError) -> None:
        super().__init__(str(error))
        self.uuid = uuid


def _topology(handles: dict[str, Any]) -> dict[frozenset[str], int]:
    levels: dict[frozenset[str], int] = {}
    for (a, ha), (b, hb) in itertools.combinations(handles.items(), 2):
        try:
            levels[frozenset((a, b))] = int(pynvml.nvmlDeviceGetTopologyCommonAncestor(ha, hb))
        except pynvml.NVMLError:
            continue  # unknown pairs count as farthest
    return levels


def read_inventory() -> Inventory:
    """Read every GPU now. Blocking: call it from a worker thread, never the event loop."""
    global _initialized
    try:
        return _read_inventory()
    except pynvml.NVMLError_Uninitialized:
        # The library was shut down or reloaded under us: initialise again, once.
        with _init_lock:
            _initialized = False
        return _read_inventory()


def _read_inventory() -> Inventory:
    try:
        _ensure_init()
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = cuda_version_string(int(pynvml.nvmlSystemGetCudaDriverVersion_v2()))
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError_Uninitialized:
        raise
    except pynvml.NVMLError as e:
        return Inventory(problem=f"no NVIDIA driver is usable on this host (NVML: {e})")

    devices: list[Device] = []
    whole_gpus: dict[str, Any] = {}
    for index in range(count):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            read = _read_gpu(index, handle)
        except (pynvml.NVMLError, _GpuFailed) as e:
            uuid = e.uuid if isinstance(e, _GpuFailed) else ""
            devices.append(
                Device(uuid=uuid, index=index, name="unknown", memory_total=0, memory_used=0,
                       healthy=False, problem=f"NVML: {e}")
            )
            continue
        devices.extend(read)
        if not read[0].mig_enabled:
            whole_gpus[read[0].uuid] = handle
    return Inventory(
        devices=tuple(devices),
        driver_version=driver,
        cuda_driver_version=cuda,
        topology=_topology(whole_gpus),
    )


class NVMLInventory:
    """The inventory for the hub's event loop: off-loop reads, a short cache, one read at a time.

    ``cache_seconds`` is how old an answer may be before NVML is asked again; callers that
    need the truth now (the allocation step) pass ``max_age=0``.
    """

    def __init__(
        self,
        *,
        cache_seconds: float,
        reader: Callable[[], Inventory] = read_inventory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache_seconds = cache_seconds
        self._reader = reader
        self._clock = clock
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gpuspawner-nvml")
        self._cached: tuple[float, Inventory] | None = None
        self._inflight: asyncio.Future[Inventory] | None = None
        self._last_problem: str | None = None

    async def get(self, *, max_age: float | None = None) -> Inventory:
        max_age = self.cache_seconds if max_age is None else max_age
        started = self._clock()
        if self._cached and started - self._cached[0] <= max_age:
            return self._cached[1]
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._read(started))
        inflight = self._inflight
        inventory = await asyncio.shield(inflight)
        if self._cached and self._cached[0] < started and max_age == 0:
            # That read began before we asked; the truth-now caller needs a fresh one.
            return await self.get(max_age=0)
        return inventory

    async def _read(self, started: float) -> Inventory:
        try:
            inventory = await asyncio.get_running_loop().run_in_executor(self._executor, self._reader)
        finally:
            self._inflight = None
        self._cached = (started, inventory)
        if inventory.problem != self._last_problem:
            if inventory.problem:
                log.warning("GPUs unavailable, serving CPU-only servers: %s", inventory.problem)
            elif self._last_problem:
                log.info("NVML answers again: %d devices", len(inventory.devices))
            self._last_problem = inventory.problem
        return inventory
