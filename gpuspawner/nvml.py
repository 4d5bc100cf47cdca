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
  boards): that field is left empty;
- a driver that does not answer (hung): :class:`NVMLTimeout` after ``timeout`` seconds, one
  warning in the log, and no new read until the hung one returns; servers without GPUs never
  ask NVML, so they still start.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pynvml

from .cudareq import brand_name
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


def _fact(call: Callable[[], Any]) -> Any:
    """A fact only some drivers report (an older NVML lacks the function): None instead of an error."""
    try:
        return call()
    except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound):
        return None


def _kind(handle: Any) -> tuple[str | None, str | None]:
    """A GPU's brand and compute capability, as ``brand=`` and ``arch=`` requirements compare them."""
    brand = _fact(lambda: pynvml.nvmlDeviceGetBrand(handle))
    capability = _fact(lambda: pynvml.nvmlDeviceGetCudaComputeCapability(handle))
    return (None if brand is None else brand_name(int(brand)),
            None if capability is None else f"{capability[0]}.{capability[1]}")


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
                brand=parent.brand,
                compute_capability=parent.compute_capability,
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
        brand, capability = _kind(handle)
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
            brand=brand,
            compute_capability=capability,
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


class NVMLTimeout(Exception):
    """NVML did not answer within :attr:`NVMLInventory.timeout`; the read goes on in its thread."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"NVML did not answer within {seconds:g} s (the driver may be hung); "
            "GPU servers cannot start until it does."
        )
        self.seconds = seconds


class NVMLInventory:
    """The inventory for the hub's event loop: off-loop reads, a short cache, one read at a time.

    ``cache_seconds`` (``GPUSpawner.nvml_cache_seconds``) is how old an answer may be before
    NVML is asked again, and every caller in gpuspawner (the allocation, the spawn form, the
    devices noted in the audit record) takes :meth:`get`'s default: an answer up to that
    old. Which GPUs are held is not in the answer: the allocation reads that fresh each time,
    from the containers' labels on the Docker engine and the pending claims. A cached answer
    can only miss what changed on the hardware since (a process started outside the hub, a GPU
    lost). ``max_age=0`` asks for an answer begun after the call; only the tests pass it.

    ``timeout`` bounds every read: a read that has not answered ``timeout`` seconds after it
    began is taken for a hung driver, and :meth:`get` raises :class:`NVMLTimeout` to everyone
    waiting on it and, at once, to everyone who asks while it is still out. A call into a hung
    driver cannot be stopped, so that read keeps its thread; no other read starts until it
    returns, and its answer then fills the cache as usual. The thread is a daemon, so a hung
    driver never keeps the hub from exiting.
    """

    def __init__(
        self,
        *,
        cache_seconds: float,
        timeout: float = 10.0,
        reader: Callable[[], Inventory] = read_inventory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self._reader = reader
        self._clock = clock
        self._cached: tuple[float, Inventory] | None = None
        self._inflight: asyncio.Task[Inventory] | None = None
        self._deadline = 0.0  # event-loop time by which the read in flight must answer
        self._hung_since: float | None = None  # loop time the overdue read began, once logged
        self._last_problem: str | None = None

    async def get(self, *, max_age: float | None = None) -> Inventory:
        """The inventory, at most `max_age` (default ``cache_seconds``) seconds old.

        Raises :class:`NVMLTimeout` when NVML has not answered within ``timeout`` seconds.
        """
        until = asyncio.get_running_loop().time() + self.timeout
        return await self._get(self.cache_seconds if max_age is None else max_age, until)

    async def _get(self, max_age: float, until: float) -> Inventory:
        loop = asyncio.get_running_loop()
        started = self._clock()
        if self._cached and started - self._cached[0] <= max_age:
            return self._cached[1]
        if self._inflight is None:
            self._deadline = loop.time() + self.timeout
            self._inflight = asyncio.ensure_future(self._read(started))
            self._inflight.add_done_callback(_retrieve)
        inflight = self._inflight
        remaining = min(self._deadline, until) - loop.time()
        if remaining > 0:
            # asyncio.wait neither cancels the read on timeout nor when this caller is cancelled.
            await asyncio.wait({inflight}, timeout=remaining)
        if not inflight.done():
            self._note_hung()
            raise NVMLTimeout(self.timeout)
        inventory = inflight.result()
        if self._cached and self._cached[0] < started and max_age == 0:
            # That read began before we asked; the truth-now caller needs a fresh one.
            return await self._get(0, until)
        return inventory

    def _note_hung(self) -> None:
        if self._hung_since is None:
            self._hung_since = self._deadline - self.timeout
            log.warning(
                "NVML has not answered for %g s (the driver may be hung): GPU servers cannot start "
                "until it does; CPU-only servers still start.",
                self.timeout,
            )

    async def _read(self, started: float) -> Inventory:
        try:
            inventory = await _in_daemon_thread(self._reader)
        finally:
            self._inflight = None
        self._cached = (started, inventory)
        if self._hung_since is not None:
            waited = asyncio.get_running_loop().time() - self._hung_since
            log.info("NVML answers again after %.0f s: %d devices", waited, len(inventory.devices))
            self._hung_since = None
        if inventory.problem != self._last_problem:
            if inventory.problem:
                log.warning("GPUs unavailable, serving CPU-only servers: %s", inventory.problem)
            elif self._last_problem:
                log.info("NVML answers again: %d devices", len(inventory.devices))
            self._last_problem = inventory.problem
        return inventory


def _retrieve(task: asyncio.Task[Inventory]) -> None:
    """Mark a failed read's error as seen: its waiters may all have timed out and left."""
    if not task.cancelled():
        task.exception()


async def _in_daemon_thread(reader: Callable[[], Inventory]) -> Inventory:
    """`reader()` in a thread of its own that never holds up interpreter exit.

    An executor's threads are joined when the interpreter exits, so one stuck in a hung
    driver would keep the hub from stopping; single-flight reads mean one thread at a time.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Inventory] = loop.create_future()

    def settle(result: Inventory | None, error: BaseException | None) -> None:
        if future.done():  # the waiting task was cancelled, e.g. at loop shutdown
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert result is not None
            future.set_result(result)

    def run() -> None:
        try:
            result, error = reader(), None
        except BaseException as e:  # handed to the event loop, which raises it to the callers
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the event loop has closed: nobody is waiting any more

    threading.Thread(target=run, name="gpuspawner-nvml", daemon=True).start()
    return await future
