"""A simulated NVIDIA driver library, for hosts without a GPU.

It stands in for ``libnvidia-ml.so.1`` and nothing else: ``install(spec_path)`` hands pynvml
(NVIDIA's nvidia-ml-py, unchanged) a library object whose functions are C callbacks with
the NVML signatures. Every pynvml call gpuspawner makes runs pynvml's own code (argument
marshalling through ctypes, struct layouts, error codes turned into NVMLError_* exceptions)
exactly as against the real driver; only the answers come from a JSON file:

    {
      "driver_version": "550.54.15", "cuda_version": 12040,
      "no_driver": false,                       # true: nvmlInit fails with DRIVER_NOT_LOADED
      "hang": false,                            # true: every call blocks, like a hung driver
      "gpus": [{
        "uuid": "GPU-…", "name": "NVIDIA A100-SXM4-80GB",
        "memory_total": 85899345920, "memory_used": 0, "utilization": 0,
        "pci_bus_id": "00000000:07:00.0",
        "numa_node": 0, "pcie_switch": 0,       # topology: same switch -> SINGLE, same node -> NODE
        "processes": [{"pid": 4242, "used_memory": 1073741824}],
        "lost": false,                          # true: every query answers GPU_IS_LOST
        "brand": 14, "compute_capability": "8.0",  # nvmlBrandType_t (14: NVML_BRAND_NVIDIA), major.minor
        "mig": [{"uuid": "MIG-…", "profile": "1g.10gb", "memory_total": …, "memory_used": 0}]
      }]
    }

A GPU with a "mig" list is in MIG mode. The file is read again whenever it changes, so a
test (or a test's hub in another process) sees GPUs get busy, freed or lost as it edits it.

``"hang": true`` makes every call (nvmlInit included) block until the file no longer says so,
as a driver stuck in the kernel does; calls look again every 50 ms. A call gives up after
``HANG_LIMIT_SECONDS`` with NVML_ERROR_TIMEOUT, so a forgotten hang cannot stall a test run
for ever. ``hung_calls()`` says how many calls of this process are blocked now.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
from ctypes import CFUNCTYPE, c_char, c_int, c_uint, c_void_p
from pathlib import Path
from typing import Any

import pynvml

SUCCESS = pynvml.NVML_SUCCESS

_lock = threading.RLock()

HANG_POLL_SECONDS = 0.05
HANG_LIMIT_SECONDS = 120.0
_hung = 0  # calls of this process blocked in a hang now


class _Spec:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.mtime: tuple[int, int, int] | None = None
        self.data: dict[str, Any] = {}
        self.handles: dict[int, tuple[int, int | None]] = {}  # address -> (gpu, mig slot or None)
        self._buffers: dict[tuple[int, int | None], ctypes.Array[c_char]] = {}
        self.initialized = False

    def current(self) -> dict[str, Any]:
        st = os.stat(self.path)
        mtime = (st.st_ino, st.st_mtime_ns, st.st_size)  # write_spec replaces the file: a new inode
        if mtime != self.mtime:
            self.data = json.loads(self.path.read_text())
            self.mtime = mtime
        return self.data

    def handle(self, gpu: int, slot: int | None) -> int:
        key = (gpu, slot)
        if key not in self._buffers:
            self._buffers[key] = ctypes.create_string_buffer(8)  # a stable, unique address
            self.handles[ctypes.addressof(self._buffers[key])] = key
        return ctypes.addressof(self._buffers[key])

    def device(self, handle: int | None) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """(gpu, mig device or None) for a handle; None for a handle we never gave out."""
        if handle is None or handle not in self.handles:
            return None
        gpu_index, slot = self.handles[handle]
        gpus = self.current()["gpus"]
        if gpu_index >= len(gpus):
            return None
        gpu = gpus[gpu_index]
        if slot is None:
            return gpu, None
        migs = gpu.get("mig") or []
        return (gpu, migs[slot]) if slot < len(migs) else None


_spec: _Spec | None = None
_error_strings: dict[int, ctypes.Array[c_char]] = {}


def _write_str(buf: int | None, length: int, text: str) -> int:
    data = text.encode()
    if buf is None or len(data) + 1 > length:
        return pynvml.NVML_ERROR_INSUFFICIENT_SIZE
    ctypes.memmove(buf, data + b"\0", len(data) + 1)
    return SUCCESS


def _set(ptr: int | None, ctype: Any, value: Any) -> int:
    if ptr is None:
        return pynvml.NVML_ERROR_INVALID_ARGUMENT
    ctype.from_address(ptr).value = value
    return SUCCESS


def hung_calls() -> int:
    """How many simulated NVML calls of this process are blocked by ``"hang": true`` now."""
    with _lock:
        return _hung


def _wait_while_hung() -> bool:
    """Block while the spec says ``"hang": true``; False if the hang outlasted HANG_LIMIT_SECONDS.

    The lock is held only to look at the spec, so other threads (and uninstall) go on.
    """
    global _hung
    give_up = time.monotonic() + HANG_LIMIT_SECONDS
    counted = False
    try:
        while True:
            with _lock:
                if _spec is None or not _spec.current().get("hang"):
                    return True
                if not counted:
                    _hung, counted = _hung + 1, True
            if time.monotonic() >= give_up:
                return False
            time.sleep(HANG_POLL_SECONDS)
    finally:
        if counted:
            with _lock:
                _hung -= 1


def _guarded(prototype: Any, needs_init: bool = True, hangs: bool = True) -> Any:
    """Wrap a simulated NVML function: the hang, init check, the file's lock, C signature."""

    def wrap(fn: Any) -> Any:
        def call(*args: Any) -> Any:
            if hangs and not _wait_while_hung():
                return pynvml.NVML_ERROR_TIMEOUT
            with _lock:
                if _spec is None:  # uninstalled while this call hung
                    return pynvml.NVML_ERROR_UNINITIALIZED
                if needs_init and not _spec.initialized:
                    return pynvml.NVML_ERROR_UNINITIALIZED
                return fn(_spec, *args)

        return prototype(call)

    return wrap


def _device_call(prototype: Any, *, lost_answers: bool = False) -> Any:
    """A per-device function: resolves the handle; a lost GPU answers GPU_IS_LOST."""

    def wrap(fn: Any) -> Any:
        @_guarded(prototype)
        def call(spec: _Spec, handle: int | None, *args: Any) -> int:
            found = spec.device(handle)
            if found is None:
                return pynvml.NVML_ERROR_INVALID_ARGUMENT
            gpu, mig = found
            if gpu.get("lost") and not lost_answers:
                return pynvml.NVML_ERROR_GPU_IS_LOST
            return int(fn(spec, gpu, mig, *args))

        return call

    return wrap


H = c_void_p  # an nvmlDevice_t, by value
P = c_void_p  # any out-pointer


@_guarded(CFUNCTYPE(c_int, c_uint), needs_init=False)
def nvmlInitWithFlags(spec: _Spec, flags: int) -> int:
    if spec.current().get("no_driver"):
        return pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    spec.initialized = True
    return SUCCESS


@_guarded(CFUNCTYPE(c_int))
def nvmlShutdown(spec: _Spec) -> int:
    spec.initialized = False
    return SUCCESS


@_guarded(CFUNCTYPE(c_void_p, c_int), needs_init=False, hangs=False)  # returns a pointer, not a code
def nvmlErrorString(spec: _Spec, code: int) -> int:
    if code not in _error_strings:
        _error_strings[code] = ctypes.create_string_buffer(f"simulated NVML error {code}".encode())
    return ctypes.addressof(_error_strings[code])


@_guarded(CFUNCTYPE(c_int, P, c_uint))
def nvmlSystemGetDriverVersion(spec: _Spec, buf: int, length: int) -> int:
    return _write_str(buf, length, spec.current().get("driver_version", "550.54.15"))


@_guarded(CFUNCTYPE(c_int, P))
def nvmlSystemGetCudaDriverVersion(spec: _Spec, out: int) -> int:
    return _set(out, c_int, int(spec.current().get("cuda_version", 12040)))


@_guarded(CFUNCTYPE(c_int, P))
def nvmlDeviceGetCount_v2(spec: _Spec, out: int) -> int:
    return _set(out, c_uint, len(spec.current()["gpus"]))


@_guarded(CFUNCTYPE(c_int, c_uint, P))
def nvmlDeviceGetHandleByIndex_v2(spec: _Spec, index: int, out: int) -> int:
    if index >= len(spec.current()["gpus"]):
        return pynvml.NVML_ERROR_INVALID_ARGUMENT
    return _set(out, c_void_p, spec.handle(index, None))


@_device_call(CFUNCTYPE(c_int, H, P, c_uint))
def nvmlDeviceGetUUID(spec: _Spec, gpu: dict, mig: dict | None, buf: int, length: int) -> int:
    return _write_str(buf, length, (mig or gpu)["uuid"])


@_device_call(CFUNCTYPE(c_int, H, P, c_uint))
def nvmlDeviceGetName(spec: _Spec, gpu: dict, mig: dict | None, buf: int, length: int) -> int:
    name = gpu["name"] + (f" MIG {mig['profile']}" if mig else "")
    return _write_str(buf, length, name)


@_device_call(CFUNCTYPE(c_int, H, P))
def nvmlDeviceGetIndex(spec: _Spec, gpu: dict, mig: dict | None, out: int) -> int:
    return _set(out, c_uint, spec.current()["gpus"].index(gpu))


@_device_call(CFUNCTYPE(c_int, H, P))
def nvmlDeviceGetMemoryInfo(spec: _Spec, gpu: dict, mig: dict | None, out: int) -> int:
    src = mig or gpu
    memory = pynvml.c_nvmlMemory_t.from_address(out)
    memory.total = int(src["memory_total"])
    memory.used = int(src.get("memory_used", 0))
    memory.free = memory.total - memory.used
    return SUCCESS


@_device_call(CFUNCTYPE(c_int, H, P))
def nvmlDeviceGetUtilizationRates(spec: _Spec, gpu: dict, mig: dict | None, out: int) -> int:
    if mig is not None or gpu.get("mig") is not None:
        return pynvml.NVML_ERROR_NOT_SUPPORTED  # as on real hardware in MIG mode
    util = pynvml.c_nvmlUtilization_t.from_address(out)
    util.gpu = int(gpu.get("utilization", 0))
    util.memory = 0
    return SUCCESS


@_device_call(CFUNCTYPE(c_int, H, P))
def nvmlDeviceGetPciInfo_v3(spec: _Spec, gpu: dict, mig: dict | None, out: int) -> int:
    info = pynvml.nvmlPciInfo_t.from_address(out)
    info.busId = gpu["pci_bus_id"].encode()
    info.busIdLegacy = gpu["pci_bus_id"].encode()[:15]
    return SUCCESS


@_device_call(CFUNCTYPE(c_int, H, P, P))
def nvmlDeviceGetComputeRunningProcesses_v3(spec: _Spec, gpu: dict, mig: dict | None, count: int, infos: int | None) -> int:
    procs = (mig or gpu).get("processes", [])
    capacity = c_uint.from_address(count)
    if infos is None or capacity.value < len(procs):
        capacity.value = len(procs)
        return pynvml.NVML_ERROR_INSUFFICIENT_SIZE if procs else SUCCESS
    array = (pynvml.c_nvmlProcessInfo_v3_t * len(procs)).from_address(infos) if procs else []
    for slot, proc in zip(array, procs, strict=True):
        slot.pid = int(proc["pid"])
        slot.usedGpuMemory = int(proc.get("used_memory", 0))
    capacity.value = len(procs)
    return SUCCESS


@_device_call(CFUNCTYPE(c_int, H, P))
def nvmlDeviceGetBrand(spec: _Spec, gpu: dict, mig: dict | None, out: int) -> int:
    return _set(out, c_uint, int(gpu.get("brand", pynvml.NVML_BRAND_NVIDIA)))  # a MIG device is its GPU's brand


@_device_call(CFUNCTYPE(c_int, H, P, P))
def nvmlDeviceGetCudaComputeCapability(spec: _Spec, gpu: dict, mig: dict | None, major: int, minor: int) -> int:
    first, _, second = str(gpu.get("compute_capability", "8.0")).partition(".")
    _set(major, c_int, int(first))
    return _set(minor, c_int, int(second or 0))


@_device_call(CFUNCTYPE(c_int, H, P, P))
def nvmlDeviceGetMigMode(spec: _Spec, gpu: dict, mig: dict | None, current: int, pending: int) -> int:
    mode = 1 if gpu.get("mig") is not None else 0
    _set(current, c_uint, mode)
    return _set(pending, c_uint, mode)


@_device_call(CFUNCTYPE(c_int, H, P))
def nvmlDeviceGetMaxMigDeviceCount(spec: _Spec, gpu: dict, mig: dict | None, out: int) -> int:
    return _set(out, c_uint, 7 if gpu.get("mig") is not None else 0)


@_device_call(CFUNCTYPE(c_int, H, c_uint, P))
def nvmlDeviceGetMigDeviceHandleByIndex(spec: _Spec, gpu: dict, mig: dict | None, slot: int, out: int) -> int:
    if mig is not None:
        return pynvml.NVML_ERROR_INVALID_ARGUMENT
    if slot >= len(gpu.get("mig") or []):
        return pynvml.NVML_ERROR_NOT_FOUND
    return _set(out, c_void_p, spec.handle(spec.current()["gpus"].index(gpu), slot))


@_device_call(CFUNCTYPE(c_int, H, P))
def nvmlDeviceIsMigDeviceHandle(spec: _Spec, gpu: dict, mig: dict | None, out: int) -> int:
    return _set(out, c_uint, int(mig is not None))


@_device_call(CFUNCTYPE(c_int, H, P))
def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(spec: _Spec, gpu: dict, mig: dict | None, out: int) -> int:
    if mig is None:
        return pynvml.NVML_ERROR_INVALID_ARGUMENT
    return _set(out, c_void_p, spec.handle(spec.current()["gpus"].index(gpu), None))


@_guarded(CFUNCTYPE(c_int, H, H, P))
def nvmlDeviceGetTopologyCommonAncestor(spec: _Spec, h1: int, h2: int, out: int) -> int:
    a, b = spec.device(h1), spec.device(h2)
    if a is None or b is None or a[1] is not None or b[1] is not None:
        return pynvml.NVML_ERROR_INVALID_ARGUMENT
    (ga, _), (gb, _) = a, b
    if ga.get("lost") or gb.get("lost"):
        return pynvml.NVML_ERROR_GPU_IS_LOST
    if "pcie_switch" not in ga or "pcie_switch" not in gb:
        return pynvml.NVML_ERROR_NOT_SUPPORTED
    if ga is gb:
        level = pynvml.NVML_TOPOLOGY_INTERNAL
    elif ga.get("numa_node") != gb.get("numa_node"):
        level = pynvml.NVML_TOPOLOGY_SYSTEM
    elif ga["pcie_switch"] == gb["pcie_switch"]:
        level = pynvml.NVML_TOPOLOGY_SINGLE
    else:
        level = pynvml.NVML_TOPOLOGY_NODE
    return _set(out, c_int, level)


_FUNCTIONS = {
    name: obj
    for name, obj in dict(globals()).items()
    if name.startswith("nvml") and hasattr(obj, "argtypes")
}
_FUNCTIONS["nvmlSystemGetCudaDriverVersion_v2"] = nvmlSystemGetCudaDriverVersion


class _SimulatedLibrary:
    """What ``CDLL("libnvidia-ml.so.1")`` would be: attributes are the library's functions."""

    def __init__(self) -> None:
        for name, fn in _FUNCTIONS.items():
            setattr(self, name, fn)


def install(spec_path: str | os.PathLike[str]) -> None:
    """Make pynvml talk to the simulated library answering from `spec_path`."""
    global _spec
    with _lock:
        _spec = _Spec(Path(spec_path))
        with pynvml.libLoadLock:
            pynvml.nvmlLib = _SimulatedLibrary()
            pynvml._nvmlGetFunctionPointer_cache.clear()


def uninstall() -> None:
    """Back to the real library (which, on a host without a driver, is not found)."""
    global _spec
    with _lock:
        _spec = None
        with pynvml.libLoadLock:
            pynvml.nvmlLib = None
            pynvml._nvmlGetFunctionPointer_cache.clear()


# --- Making specs -------------------------------------------------------------------------

GiB = 1024**3


def gpu(n: int, *, name: str = "NVIDIA A100-SXM4-80GB", memory_gib: int = 80, **extra: Any) -> dict[str, Any]:
    """A GPU entry with a UUID and bus id derived from n; `extra` overrides any field."""
    entry: dict[str, Any] = {
        "uuid": f"GPU-{n:08x}-0000-4000-8000-{n:012x}",
        "name": name,
        "memory_total": memory_gib * GiB,
        "memory_used": 0,
        "utilization": 0,
        "pci_bus_id": f"00000000:{0x10 + n:02X}:00.0",
        "numa_node": n // 4,
        "pcie_switch": n // 2,
        "processes": [],
    }
    entry.update(extra)
    return entry


def mig_device(gpu_n: int, slot: int, *, profile: str = "1g.10gb", memory_gib: int = 10) -> dict[str, Any]:
    return {
        "uuid": f"MIG-{gpu_n:08x}-{slot:04x}-4000-8000-{slot:012x}",
        "profile": profile,
        "memory_total": memory_gib * GiB,
        "memory_used": 0,
        "processes": [],
    }


def write_spec(path: str | os.PathLike[str], gpus: list[dict[str, Any]], **extra: Any) -> Path:
    """Write a spec file atomically (a reader never sees half a file)."""
    path = Path(path)
    data = {"driver_version": "550.54.15", "cuda_version": 12040, "gpus": gpus, **extra}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path
