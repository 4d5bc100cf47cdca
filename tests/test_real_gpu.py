"""The real-GPU check: gpuspawner against NVIDIA's real driver (the whole file skips where there is none).

Run it on a GPU machine with ``make gpu-check`` (or ``python -m pytest tests/test_real_gpu.py -s -v``).
It proves, on that host:

1. gpuspawner's NVML reading matches the driver's own report, ``nvidia-smi -q -x``: the GPUs by
   UUID, their models, total memory, MIG mode and MIG devices, and compute processes;
2. a process holding GPU memory (PyTorch, in a subprocess) makes that GPU busy, and the allocator
   skips it, and frees it again when the process ends;
3. with Docker and the NVIDIA Container Toolkit, a container given one UUID through gpuspawner's
   DeviceRequests sees exactly that device, and an image asking for a newer CUDA than the driver's
   is refused by the toolkit at start.

Each part skips with its reason where its prerequisites are missing (no PyTorch, no Docker, no
toolkit, no free GPU). At the end it prints a summary to paste into an issue. PyTorch is looked for
in this interpreter, then ``$GPUSPAWNER_TORCH_PYTHON``, then every ``python3`` on PATH; the container
image is ``$GPUSPAWNER_GPU_CHECK_IMAGE`` or a local nvidia/cuda, ubuntu or debian image (nothing is
pulled). With ``GPUSPAWNER_REQUIRE_GPU=1`` (``make gpu-check`` sets it) a host without a driver
fails the run instead of skipping it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import platform
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import docker
import pynvml
import pytest

import nvidia_smi
from gpuspawner import cli, cudareq, injection, nvml
from gpuspawner.allocation import GPURequest, Grant, Holder, Refusal, Status, allocate, device_status
from gpuspawner.devices import Device, GiB, Inventory, format_bytes
from testbed import docker_problem, wait_for


def _no_gpu_reason() -> str | None:
    """None where a real NVIDIA driver answers and sees a GPU; else why the check cannot run."""
    if type(pynvml.nvmlLib).__name__ == "_SimulatedLibrary":
        return "the simulated NVML is installed in this process: run tests/test_real_gpu.py on its own"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return f"needs a real NVIDIA GPU, and no NVIDIA driver answers on this host (NVML: {e})"
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()  # as found: gpuspawner.nvml initialises on its own
    return None if count else "needs a real NVIDIA GPU, and the NVIDIA driver answers but sees none"


_reason = _no_gpu_reason()
if _reason and os.environ.get("GPUSPAWNER_REQUIRE_GPU", "") not in ("", "0", "false", "no"):
    pytest.fail(f"{_reason} (GPUSPAWNER_REQUIRE_GPU=1: the real-GPU check must run)", pytrace=False)
if _reason:
    pytest.skip(_reason, allow_module_level=True)

BUSY = 1 * GiB  # busy_memory_threshold for the checks: a CUDA context alone stays under it
HOG = 2 * GiB  # what the PyTorch process holds


# --- The summary to paste -------------------------------------------------------------------------


class Summary:
    """One line per check (PASS, SKIP or FAIL, and what it found), printed after the last test."""

    def __init__(self) -> None:
        self.facts: list[str] = []
        self.lines: list[str] = []

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[list[str]]:
        """Record the check's outcome; the test appends what it found to the list it is given."""
        found: list[str] = []
        try:
            yield found
        except pytest.skip.Exception as e:
            self.lines.append(f"SKIP  {name}: {e.msg}")
            raise
        except BaseException as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.lines.append(f"FAIL  {name}: {first}")
            raise
        self.lines.append(f"PASS  {name}" + (": " + "; ".join(found) if found else ""))

    def text(self) -> str:
        rule = "=" * 24
        return "\n".join([f"{rule} gpu-check summary (paste this) {rule}", *self.facts, *self.lines, "=" * (len(rule) * 2 + 32)])


@pytest.fixture(scope="module")
def summary() -> Iterator[Summary]:
    report = Summary()
    inventory = nvml.read_inventory()
    report.facts.append(
        f"host {platform.node()}: driver {inventory.driver_version}, CUDA {inventory.cuda_driver_version}, "
        f"{sum(1 for d in inventory.devices if not d.is_mig)} GPUs, {sum(1 for d in inventory.devices if d.is_mig)} MIG devices"
    )
    for d in inventory.devices:
        kind = "MIG" if d.is_mig else ("GPU, MIG mode" if d.mig_enabled else "GPU")
        report.facts.append(f"  {d.uuid or '(no uuid)'}  {d.name}  {format_bytes(d.memory_total)}  [{kind}]")
    yield report
    print("\n" + report.text())


@pytest.fixture
def real_nvml() -> None:
    if pynvml.nvmlLib is not None and type(pynvml.nvmlLib).__name__ == "_SimulatedLibrary":
        pytest.skip("the simulated NVML is installed in this process: run tests/test_real_gpu.py on its own")


# --- 1. The inventory, and nvidia-smi's word on it ------------------------------------------------


def test_real_inventory(real_nvml: None, summary: Summary) -> None:
    with summary.check("NVML inventory") as found:
        inventory = nvml.read_inventory()
        print()
        print(cli.format_table(cli.device_rows(inventory, {}, busy_memory_threshold=BUSY), inventory, "(no hub)"))
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
            found.append(f"one GPU would go to {result.uuids[0]}")
            assert result.devices[0] in free
        else:
            assert isinstance(result, Refusal), result
            found.append(f"no whole GPU free: {result.message(admin=True)}")
            unhealthy = sum(1 for d in whole if not (d.healthy and d.uuid))
            assert (result.free, result.held, result.busy, result.unhealthy) == (0, 0, len(whole) - unhealthy, unhealthy)
            expected = "No free GPU for this server" if whole else "No GPU on this host matches"
            assert result.message().startswith(expected), result.message()
        print(found[-1])


def _nvidia_smi() -> str:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        pytest.skip("nvidia-smi is not on PATH (it comes with NVIDIA's driver packages, e.g. nvidia-utils)")
    return binary


def read_smi() -> nvidia_smi.SmiLog:
    out = subprocess.run([_nvidia_smi(), "-q", "-x"], capture_output=True, text=True, timeout=120, check=True)
    return nvidia_smi.parse(out.stdout)


def _pids(inventory: Inventory) -> dict[str, frozenset[int]]:
    return {d.uuid: frozenset(p.pid for p in d.processes) for d in inventory.devices}


def agreeing_reads(tries: int = 5) -> tuple[Inventory, nvidia_smi.SmiLog, list[str]]:
    """NVML, nvidia-smi, NVML again: the first round whose processes stood still across nvidia-smi's read
    (processes come and go between two reads), with their disagreements."""
    for _ in range(tries):
        before = nvml.read_inventory()
        log = read_smi()
        after = nvml.read_inventory()
        if _pids(before) == _pids(after):
            return after, log, nvidia_smi.disagreements(after, log)
        time.sleep(1)
    return after, log, nvidia_smi.disagreements(after, log)


def test_nvml_agrees_with_nvidia_smi(real_nvml: None, summary: Summary) -> None:
    with summary.check("NVML matches nvidia-smi -q -x") as found:
        inventory, log, problems = agreeing_reads()
        assert problems == [], "gpuspawner's NVML reading and nvidia-smi disagree:\n" + "\n".join(problems)
        gpus = log.gpus
        found.append(
            f"{len(gpus)} GPUs ({', '.join(sorted({g.product_name for g in gpus}))}), "
            f"{sum(len(g.mig_devices) for g in gpus)} MIG devices, "
            f"{sum(len(g.compute_pids) for g in gpus)} compute processes; total memory within rounding "
            f"(nvidia-smi's reserved: {', '.join(f'{g.memory_reserved_mib} MiB' for g in gpus)})"
        )
        print(found[-1])


# --- 2. A process holding memory makes its GPU busy -----------------------------------------------


def _torch_python() -> tuple[str, str]:
    """An interpreter that has PyTorch with CUDA, and its torch version; skips where none has."""
    on_path = [os.path.join(d, "python3") for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    candidates = [sys.executable, os.environ.get("GPUSPAWNER_TORCH_PYTHON", ""), *(p for p in on_path if os.access(p, os.X_OK))]
    for python in dict.fromkeys(c for c in candidates if c):
        probe = subprocess.run(
            [python, "-c", "import torch; print(torch.__version__, torch.cuda.is_available())"],
            capture_output=True, text=True, timeout=300,
        )
        version, _, cuda = probe.stdout.strip().partition(" ")
        if probe.returncode == 0 and cuda == "True":
            return python, version
    pytest.skip(
        "needs PyTorch with CUDA, and none of these interpreters has it: "
        + ", ".join(dict.fromkeys(c for c in candidates if c))
        + " (pip install torch, or set GPUSPAWNER_TORCH_PYTHON)"
    )


HOG_SCRIPT = f"""
import sys, torch
block = torch.empty({HOG}, dtype=torch.uint8, device="cuda:0")
block.fill_(1)
torch.cuda.synchronize()
print("holding", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def memory_hog(python: str, uuid: str) -> Iterator[subprocess.Popen[str]]:
    """A process holding HOG bytes on the device `uuid` (and only that one), until the block ends."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=uuid, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    hog = subprocess.Popen([python, "-c", HOG_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert hog.stdout is not None and hog.stdin is not None
        ready, _, _ = select.select([hog.stdout], [], [], 180)
        line = hog.stdout.readline() if ready else ""
        assert line.strip() == "holding", f"the PyTorch process did not take {format_bytes(HOG)} on {uuid} (exit code {hog.poll()})"
        yield hog
    finally:
        if hog.stdin:
            hog.stdin.close()
        try:
            hog.wait(timeout=30)
        except subprocess.TimeoutExpired:
            hog.kill()
            hog.wait()


def _device(uuid: str) -> Device:
    return nvml.read_inventory().by_uuid()[uuid]


def _busy(uuid: str) -> Device | None:
    device = _device(uuid)
    return device if device_status(device, {}, busy_memory_threshold=BUSY) is Status.BUSY else None


def _first_free_gpu() -> Device:
    result = allocate(GPURequest(count=1), nvml.read_inventory(), {}, holder=Holder("probe"), busy_memory_threshold=BUSY)
    if isinstance(result, Refusal):
        pytest.skip(f"needs a free whole GPU to load, and there is none: {result.message(admin=True)}")
    return result.devices[0]


def test_a_process_holding_memory_makes_its_gpu_busy_and_the_allocator_skips_it(real_nvml: None, summary: Summary) -> None:
    with summary.check("busy GPU skipped by allocate()") as found:
        python, torch_version = _torch_python()
        target = _first_free_gpu()
        with memory_hog(python, target.uuid) as hog:
            busy = wait_for(lambda: _busy(target.uuid), timeout=60, what=f"NVML to show {target.uuid} busy")
            pids = {p.pid for p in busy.processes}
            # The pid is the host's where this test shares the host's pid namespace (not in a container).
            assert hog.pid in pids or busy.memory_used >= target.memory_used + HOG, (pids, busy.memory_used)
            if hog.pid in pids:
                assert hog.pid in read_smi().by_uuid()[target.uuid].compute_pids, "nvidia-smi does not list the process"
            result = allocate(GPURequest(count=1), nvml.read_inventory(), {}, holder=Holder("probe"), busy_memory_threshold=BUSY)
            assert target.uuid not in getattr(result, "uuids", ()), f"allocate() chose the busy {target.uuid}"
            if isinstance(result, Refusal):
                assert result.busy >= 1, result
            chose = f"allocate() chose {result.uuids[0]}" if isinstance(result, Grant) else f"allocate() refused: {result.message()}"
            found.append(
                f"torch {torch_version} pid {hog.pid} holding {format_bytes(HOG)} on {target.uuid} "
                f"(NVML: {format_bytes(busy.memory_used)} used, pids {sorted(pids)}); {chose}"
            )
        wait_for(
            lambda: device_status(_device(target.uuid), {}, busy_memory_threshold=BUSY) is Status.FREE,
            timeout=60, what=f"{target.uuid} to be free again after the process ended",
        )
        again = allocate(GPURequest(count=1), nvml.read_inventory(), {}, holder=Holder("probe"), busy_memory_threshold=BUSY)
        assert isinstance(again, Grant) and again.uuids == (target.uuid,), again
        found.append("free again once it ended")
        print("; ".join(found))


# --- 3. Containers: exactly the granted device; a too-new CUDA refused ---------------------------


@functools.cache
def _engine_or_reason() -> docker.APIClient | str:
    problem = docker_problem()
    if problem is not None:
        return f"needs Docker with the NVIDIA Container Toolkit: {problem}"
    if shutil.which("nvidia-container-cli") is None:
        return ("needs the NVIDIA Container Toolkit, and nvidia-container-cli is not on PATH "
                "(install nvidia-container-toolkit and restart dockerd)")
    return docker.APIClient(version="auto", timeout=120)


def engine() -> docker.APIClient:
    """The Docker engine, where it has NVIDIA's toolkit; skips (inside a check, so the summary says why) elsewhere."""
    found = _engine_or_reason()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def _base_image(api: docker.APIClient) -> str:
    wanted = os.environ.get("GPUSPAWNER_GPU_CHECK_IMAGE")
    if wanted:
        return wanted
    tags: list[str] = [t for image in api.images() for t in image.get("RepoTags") or () if not t.startswith("<none>")]
    for prefix in ("nvidia/cuda:", "ubuntu:", "debian:", "gpuspawner/debian-base:"):
        for tag in tags:
            if tag.startswith(prefix):
                return tag
    pytest.skip("needs a local image with glibc (nvidia/cuda, ubuntu or debian; nothing is pulled): set GPUSPAWNER_GPU_CHECK_IMAGE")


def run_with_device(api: docker.APIClient, image: str, uuid: str, *, environment: dict[str, str] | None = None) -> str:
    """`nvidia-smi -L` in a container of `image` given `uuid` the way GPUSpawner gives it; its output.

    Raises docker.errors.APIError where the engine (or the toolkit's hook) refuses to start it.
    """
    env = {**injection.gpu_environment((uuid,)), "NVIDIA_DRIVER_CAPABILITIES": "utility", **(environment or {})}
    kwargs = injection.with_devices(
        {"image": image, "command": ["nvidia-smi", "-L"], "environment": env, "host_config": {},
         "labels": {"gpuspawner.test": "real-gpu"}},
        granted=(uuid,), mode="nvidia",
    )
    container = api.create_container(**kwargs)
    try:
        api.start(container)
        status = api.wait(container, timeout=120)
        output: str = api.logs(container).decode()
        assert status["StatusCode"] == 0, f"nvidia-smi -L exited {status['StatusCode']} in {image}: {output}"
        return output
    finally:
        api.remove_container(container, force=True)


def _listed(output: str) -> set[str]:
    return set(re.findall(r"UUID: ((?:GPU|MIG)-[0-9a-fA-F-]+)\)", output))


def _one_device() -> Device:
    """A healthy device to hand a container: a whole GPU not in MIG mode, else a MIG device."""
    devices = [d for d in nvml.read_inventory().devices if d.healthy and d.uuid]
    whole = [d for d in devices if not d.is_mig and not d.mig_enabled]
    candidates = whole or [d for d in devices if d.is_mig]
    if not candidates:
        pytest.skip("needs a healthy GPU or MIG device to hand a container, and there is none")
    return candidates[0]


def test_a_container_sees_exactly_its_granted_device(real_nvml: None, summary: Summary) -> None:
    with summary.check("container sees exactly its UUID") as found:
        api = engine()
        image = _base_image(api)
        device = _one_device()
        output = run_with_device(api, image, device.uuid)
        print(output)
        expected = {device.uuid, device.parent_uuid} if device.parent_uuid else {device.uuid}
        assert _listed(output) == expected, f"the container given {device.uuid} sees:\n{output}"
        others = len(nvml.read_inventory().by_uuid()) - len(expected)
        found.append(f"{device.uuid} in {image} (nvidia-smi -L lists it alone; {others} other devices on the host)")


def _too_new_cuda(inventory: Inventory) -> str:
    major = int((inventory.cuda_driver_version or "0").split(".")[0])
    return f"{major + 1}.0"


@contextlib.contextmanager
def image_requiring(api: docker.APIClient, base: str, cuda: str) -> Iterator[str]:
    """An image built on `base` whose NVIDIA_REQUIRE_CUDA asks for `cuda` or newer (removed afterwards)."""
    tag = f"gpuspawner-test/cuda-requirement:{cuda}"
    dockerfile = f'FROM {base}\nENV NVIDIA_REQUIRE_CUDA="cuda>={cuda}"\n'
    for chunk in api.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, decode=True):
        assert "error" not in chunk, f"building {tag} from {base}: {chunk['error']}"
    try:
        yield tag
    finally:
        api.remove_image(tag, force=True)


def test_an_image_needing_a_newer_cuda_is_refused(real_nvml: None, summary: Summary) -> None:
    with summary.check("too-new CUDA image refused") as found, contextlib.ExitStack() as stack:
        api = engine()
        inventory = nvml.read_inventory()
        wanted = _too_new_cuda(inventory)
        image = stack.enter_context(image_requiring(api, _base_image(api), wanted))
        device = _one_device()
        try:
            started = run_with_device(api, image, device.uuid)
        except docker.errors.APIError as e:
            message = str(e)
        else:
            pytest.fail(f"a container of {image} (NVIDIA_REQUIRE_CUDA=cuda>={wanted}) started on a driver with CUDA "
                        f"{inventory.cuda_driver_version}: the toolkit's requirement check is off (NVIDIA_DISABLE_REQUIRE "
                        f"in the engine's environment, or CDI mode?). It printed: {started}")
        assert "unsatisfied condition" in message and f"cuda>={wanted}" in message.replace(" ", ""), message
        # The same image asking for the driver's own CUDA starts: it is the version that was refused.
        allowed = run_with_device(api, image, device.uuid, environment={"NVIDIA_REQUIRE_CUDA": f"cuda>={inventory.cuda_driver_version}"})
        assert device.uuid in _listed(allowed), allowed
        found.append(
            f"NVIDIA_REQUIRE_CUDA cuda>={wanted} against the driver's CUDA {inventory.cuda_driver_version}: "
            f"docker start fails with 'unsatisfied condition'; cuda>={inventory.cuda_driver_version} starts"
        )
        # gpuspawner's own judgement, before any start, agrees with the toolkit's on both.
        host = cudareq.Host(driver=inventory.driver_version, cuda=inventory.cuda_driver_version)
        env = api.inspect_image(image)["Config"]["Env"] or []
        refusal = cudareq.judge(cudareq.image_requirements(cudareq.environment_of(env)), host, image=image)
        assert not refusal.met and f"cuda>={wanted}" in refusal.requirement, refusal
        overridden = cudareq.environment_of(env, {"NVIDIA_REQUIRE_CUDA": f"cuda>={inventory.cuda_driver_version}"})
        assert cudareq.judge(cudareq.image_requirements(overridden), host, image=image).met
        found.append(f"gpuspawner.cudareq agrees: {refusal.reason}")
        print("; ".join(found))
