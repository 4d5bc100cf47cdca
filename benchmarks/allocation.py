"""How long one allocation decision takes on a big host: 64 devices, 100 claims; with a GPU queue of
200 waiters; and one round of the time-limit sampler over 64 GPUs.

    python benchmarks/allocation.py [--repeat 200]

Measures the pure decision (gpuspawner.allocation.allocate) and the whole in-hub step that
precedes it on every spawn: rebuilding the claim table from 100 containers' labels, merging
pending claims, deciding. Then one look at a queue of 200 waiters (gpuspawner.gpuqueue.serve, as
each waiter runs it when a GPU frees up), and one sampler round: reading 64 GPUs through NVML
(the simulated library of the tests, through the same pynvml calls; in a thread in the hub) and
judging 64 servers' limits. Prints medians and 95th percentiles in milliseconds.
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

    queue_and_sampler(inventory, args.repeat)


def queue_and_sampler(inventory: Inventory, repeat: int) -> None:
    import json
    import sys
    import tempfile
    from pathlib import Path

    from gpuspawner.gpuqueue import Waiter, serve
    from gpuspawner.limits import Limits, idle_since, judge

    held = {d.uuid: Holder(f"holder{i}") for i, d in enumerate(inventory.devices)}
    line = [Waiter(id=f"w{i:03d}", holder=Holder(f"waiter{i:03d}"), request=GPURequest(count=1 + i % 4), joined=i)
            for i in range(200)]
    print(f"\n{'GPU queue, 200 waiters (1-4 GPUs each)':<44}{'median':>10}{'p95':>10}")
    for label, claims in (("all 64 held", held), ("one freed", dict(list(held.items())[1:])),
                          ("eight freed", dict(list(held.items())[8:]))):
        def look(claims: dict[str, Holder] = claims) -> object:
            return serve(line, inventory, claims, busy_memory_threshold=GiB, explain="w199")

        med, p95 = measure(look, repeat)
        print(f"{'  one look, ' + label:<44}{med:>7.3f} ms{p95:>7.3f} ms")

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import simnvml
    from gpuspawner.nvml import read_inventory

    with tempfile.TemporaryDirectory() as tmp:
        spec = simnvml.write_spec(Path(tmp) / "gpus.json", [simnvml.gpu(i, utilization=i % 7) for i in range(64)])
        simnvml.install(spec)
        limits = Limits(max_runtime=8 * 3600, idle_timeout=7200)
        clocks: dict[str, float] = {}

        def sample_round() -> object:
            found = read_inventory()
            now = time.time()
            for d in found.devices:
                clocks[d.uuid] = idle_since(clocks.get(d.uuid), [d.utilization], threshold=5, now=now) or 0.0
                judge(limits, started=now - 3600, idle_from=clocks[d.uuid] or None, now=now)
            return json.dumps(clocks)

        med, p95 = measure(sample_round, max(10, repeat // 10))
        print(f"{'sampler round, 64 GPUs (NVML read + judging)':<44}{med:>7.3f} ms{p95:>7.3f} ms  (in a thread, off the event loop)")


if __name__ == "__main__":
    main()
