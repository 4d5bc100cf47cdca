"""What a Prometheus scrape of the hub costs on a big host: 64 GPUs (8 of them split into 7 MIG slices
each) and 100 GPU servers of 100 users, with 20 spawns waiting in the GPU queue.

    python benchmarks/metrics.py [--repeat 200]

JupyterHub answers ``/hub/metrics`` on its event loop with ``generate_latest(REGISTRY)``, so the
time a scrape takes is time no other request of the hub is served. This measures, in one run:

- the scrape with JupyterHub's own series only (gpuspawner's collector taken out), the baseline;
- the same scrape with gpuspawner's series (devices, holders, counts, queue, servers, the spawn
  histogram, GPU-seconds per user), and the ratio of the two medians;
- the sampler's work on the event loop each round (turning one NVML sample and the hub's claims into
  the readings a scrape shows; the NVML read itself runs in a thread and is measured in
  benchmarks/allocation.py).

Prints medians and 95th percentiles in milliseconds, and the size of each scrape.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import jupyterhub.metrics  # noqa: F401  (JupyterHub's own series, as in the hub)
from allocation import measure  # benchmarks/ is on sys.path when a benchmark runs
from prometheus_client import REGISTRY, generate_latest

from gpuspawner import metrics
from gpuspawner.allocation import GPURequest, Holder
from gpuspawner.devices import Device, GiB, Inventory
from gpuspawner.gpuqueue import Waiter
from gpuspawner.hubwide import resources
from gpuspawner.readings import Readings, ServerReading, device_readings

PROFILES = ("1xh100", "2xh100", "mig-1g", "mig-3g")


def host() -> Inventory:
    """56 whole H100s and 8 in MIG mode, each with seven 1g.10gb slices: 64 GPUs, 120 devices."""
    devices = []
    for i in range(64):
        uuid = f"GPU-{i:04d}"
        mig = i >= 56
        devices.append(Device(uuid=uuid, index=i, name="NVIDIA H100 80GB HBM3", memory_total=80 * GiB,
                              memory_used=0, utilization=None if mig else i % 100, mig_enabled=mig))
        if mig:
            devices.extend(Device(uuid=f"MIG-{i:04d}-{s}", index=i, name="NVIDIA H100 80GB HBM3", memory_total=10 * GiB,
                                  memory_used=0, parent_uuid=uuid, mig_profile="1g.10gb") for s in range(7))
    return Inventory(devices=tuple(devices), driver_version="550.54.15", cuda_driver_version="12.4")


def hub_state(inventory: Inventory) -> tuple[dict[str, Holder], dict[Holder, str], list[ServerReading]]:
    """100 servers: 50 holding one whole GPU, 50 one MIG slice; their profiles, idle times and limits."""
    whole = [d.uuid for d in inventory.devices if not d.is_mig and not d.mig_enabled]
    slices = [d.uuid for d in inventory.devices if d.is_mig]
    claims, profiles, servers = {}, {}, []
    for n in range(100):
        holder = Holder(f"user{n:03d}", "" if n % 3 else "train")
        claims[whole[n] if n < 50 else slices[n - 50]] = holder
        profiles[holder] = PROFILES[n % 4]
        servers.append(ServerReading(holder.user, holder.server, idle_seconds=float(n * 10) if n % 2 else None,
                                     time_left=float(3600 - n)))
    return claims, profiles, servers


def populate(inventory: Inventory) -> Callable[[], object]:
    """Fill the hub's readings, queue and counters as a busy hub's would be; the sampler's step to time."""
    claims, profiles, servers = hub_state(inventory)
    for n in range(20):
        resources.waiters[f"w{n}"] = Waiter(id=f"w{n}", holder=Holder(f"waiting{n}"), request=GPURequest(count=1),
                                            joined=float(n), profile=PROFILES[n % 4])
    for n, (holder, profile) in enumerate(profiles.items()):
        metrics.GPU_SECONDS.labels(holder.user, profile).inc(3600 * n)
        metrics.GPU_IDLE_SECONDS.labels(holder.user, profile).inc(600 * n)
        metrics.SPAWN_DURATION.labels(profile, ("started", "failed", "refused")[n % 3]).observe(n % 40)
    for reason in ("no_devices", "over_quota", "nvml_timeout", "forbidden_profile", "bad_options"):
        metrics.REFUSALS.labels(reason).inc()

    def publish() -> None:
        resources.readings = Readings(taken_at=time.time(), servers=tuple(servers), devices=device_readings(
            inventory, claims, profiles, busy_memory_threshold=512 * 1024**2))

    publish()
    return publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=200, help="scrapes per measurement (default 200)")
    args = parser.parse_args()
    inventory = host()
    publish = populate(inventory)

    REGISTRY.unregister(metrics.COLLECTOR)
    for metric in (metrics.SPAWN_DURATION, metrics.REFUSALS, metrics.GPU_SECONDS, metrics.GPU_IDLE_SECONDS):
        REGISTRY.unregister(metric)
    base_size = len(generate_latest(REGISTRY))
    base = measure(lambda: generate_latest(REGISTRY), args.repeat)
    REGISTRY.register(metrics.COLLECTOR)
    for metric in (metrics.SPAWN_DURATION, metrics.REFUSALS, metrics.GPU_SECONDS, metrics.GPU_IDLE_SECONDS):
        REGISTRY.register(metric)
    full_size = len(generate_latest(REGISTRY))
    full = measure(lambda: generate_latest(REGISTRY), args.repeat)
    sampler = measure(publish, args.repeat)

    devices = len(inventory.devices)
    print(f"host: {platform.processor() or platform.machine()}, Python {platform.python_version()}; "
          f"64 GPUs ({devices} devices), 100 GPU servers, 20 spawns waiting; {args.repeat} runs each")
    print(f"{'':44} {'median ms':>10} {'p95 ms':>8} {'bytes':>8}")
    print(f"{'scrape, JupyterHub series only':44} {base[0]:10.3f} {base[1]:8.3f} {base_size:8d}")
    print(f"{'scrape, with gpuspawner series':44} {full[0]:10.3f} {full[1]:8.3f} {full_size:8d}")
    print(f"{'sampler: readings from one sample':44} {sampler[0]:10.3f} {sampler[1]:8.3f}")
    print(f"scrape ratio (with / without gpuspawner): {full[0] / base[0]:.2f}; "
          f"gpuspawner's part: {full[0] - base[0]:.3f} ms per scrape on the hub's event loop")


if __name__ == "__main__":
    main()
