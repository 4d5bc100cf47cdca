"""How long one allocation decision takes on a big host: 64 devices, 100 claims.

    python benchmarks/allocation.py [--repeat 200]

Measures the pure decision (gpuspawner.allocation.allocate) and the whole in-hub step that
precedes it on every spawn: rebuilding the claim table from 100 containers' labels, merging
pending claims, deciding. Prints medians and 95th percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

from gpuspawner import labels
from gpuspawner.allocation import GPURequest, Grant, Holder, allocate
from gpuspawner.claims import ClaimBook, claims_from_containers
from gpuspawner.devices import Device, GiB, Inventory


def host(n_gpus: int = 64) -> Inventory:
    """64 GPUs: 8 NUMA nodes of 8, PCIe switches of 2, full topology matrix."""
    devices = tuple(
        Device(uuid=f"GPU-{i:04d}", index=i, name="NVIDIA H100 80GB HBM3", memory_total=80 * GiB,
               memory_used=0, pci_bus_id=f"00000000:{i:02X}:00.0")
        for i in range(n_gpus)
    )
    topology = {}
    for a in range(n_gpus):
        for b in range(a + 1, n_gpus):
            level = 10 if a // 2 == b // 2 else 40 if a // 8 == b // 8 else 50
            topology[frozenset((f"GPU-{a:04d}", f"GPU-{b:04d}"))] = level
    return Inventory(devices=devices, driver_version="550.54.15", cuda_driver_version="12.4", topology=topology)


def containers(n: int, n_gpus: int) -> list[dict]:
    """n running containers of this hub, each holding one device: 56 of the host's GPUs (8 stay
    free, scattered), the others MIG devices this inventory no longer lists (stale labels)."""
    out = []
    for i in range(n):
        devices = (f"GPU-{(i * 3) % n_gpus:04d}",) if i < n_gpus - 8 else (f"MIG-gone-{i:04d}",)
        identity = labels.ServerIdentity(hub_id="hub-bench", user=f"user{i:03d}")
        out.append({"State": "running", "Labels": labels.server_labels(identity, version="bench", devices=devices)})
    return out


def measure(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()

    inventory = host(64)
    listed = containers(100, 64)
    claims = claims_from_containers(listed, hub_id="hub-bench")
    book = ClaimBook()
    me = Holder("newcomer")

    print(f"python {platform.python_version()} on {platform.machine()}, {platform.processor() or 'cpu'}")
    print(f"host: {len(inventory.devices)} GPUs, {len(inventory.topology)} topology pairs; "
          f"{len(listed)} containers holding {len(claims)} claims, 8 GPUs free")
    print(f"{'request':<28}{'decision median':>18}{'p95':>10}{'full step median':>20}{'p95':>10}")
    for request in (GPURequest(count=n) for n in (1, 2, 4, 8, 16)):
        # Each closure binds this iteration's request (a default is evaluated once, at definition).
        def decide(request: GPURequest = request) -> object:
            return allocate(request, inventory, book.merged(claims), holder=me, busy_memory_threshold=GiB)

        def full_step(request: GPURequest = request) -> object:
            table = book.merged(claims_from_containers(listed, hub_id="hub-bench"))
            return allocate(request, inventory, table, holder=me, busy_memory_threshold=GiB)

        d_med, d_p95 = measure(decide, args.repeat)
        f_med, f_p95 = measure(full_step, args.repeat)
        outcome = "granted" if isinstance(decide(), Grant) else "refused"
        print(f"{request.describe() + ' (' + outcome + ')':<28}{d_med:>15.3f} ms{d_p95:>7.3f} ms{f_med:>17.3f} ms{f_p95:>7.3f} ms")


if __name__ == "__main__":
    main()
