"""gpuspawner's Prometheus series, on the hub's own ``/hub/metrics`` (prometheus_client's default registry).

JupyterHub serves its registry at ``/hub/metrics``; with ``authenticate_prometheus`` (the
default) a scraper needs a token with the ``read:metrics`` scope. Importing this module adds
gpuspawner's series to it:

- ``gpuspawner_device_info{uuid,node,index,model,mig_profile,parent_uuid}`` (1 per device; ``node``: the
  swarm node's host name, empty on one host),
  ``gpuspawner_device_utilization_ratio{uuid}``, ``gpuspawner_device_memory_used_bytes{uuid}``,
  ``gpuspawner_device_memory_total_bytes{uuid}``: every device NVML lists, by UUID, so they join
  with NVIDIA's DCGM exporter's series by UUID.
- ``gpuspawner_device_holder{uuid,user,server,profile}`` (1 per device a server holds) and
  ``gpuspawner_device_state{uuid,state}`` (1, for its state now).
- ``gpuspawner_devices{model,state}``: how many devices of each model are free, held, busy
  (outside the hub) or unhealthy.
- ``gpuspawner_queue_length{profile}``: spawns waiting in the GPU queue.
- ``gpuspawner_server_idle_seconds{user,server}``, ``gpuspawner_server_time_left_seconds{user,server}``.
- ``gpuspawner_sample_timestamp_seconds``: when the hub last read NVML.
- ``gpuspawner_spawn_duration_seconds{profile,outcome}`` (histogram; outcome started, failed or
  refused), ``gpuspawner_spawn_refusals_total{reason}``, ``gpuspawner_gpu_seconds_total{user,profile}``
  and ``gpuspawner_gpu_idle_seconds_total{user,profile}`` (GPU-seconds held, and held idle).

A scrape reads only what the hub's sampler (:mod:`gpuspawner.reclaim`) last put in
``resources.readings`` and the queue in memory: no NVML, Docker or database call on the event loop.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .hubwide import resources
from .readings import state_counts

SPAWN_DURATION = Histogram(
    "gpuspawner_spawn_duration_seconds",
    "Seconds from a spawn's request to its container running (started), or to its failure or refusal",
    ["profile", "outcome"],
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, float("inf")),
)
REFUSALS = Counter(
    "gpuspawner_spawn_refusals",
    "Spawns refused: no_devices (none free in time), over_quota, nvml_timeout, forbidden_profile, bad_options, "
    "audit_log (the audit log was rolled back or rewritten, so the hub writes no records), cuda_requirement (the "
    "image's CUDA requirements are more than the NVIDIA driver supports)",
    ["reason"],
)
GPU_SECONDS = Counter(
    "gpuspawner_gpu_seconds", "GPU-seconds held by servers (a MIG slice counts its share of its GPU)", ["user", "profile"],
)
GPU_IDLE_SECONDS = Counter(
    "gpuspawner_gpu_idle_seconds",
    "GPU-seconds held by servers whose GPUs were under the idle threshold at the hub's samples", ["user", "profile"],
)


class GPUCollector(Collector):
    """The hub's devices, holders, queue and servers, from the latest readings, at each scrape."""

    def collect(self) -> Iterator[Metric]:
        readings = resources.readings
        info = GaugeMetricFamily("gpuspawner_device_info", "A device NVML lists, or a swarm node advertises (1)",
                                 labels=["uuid", "node", "index", "model", "mig_profile", "parent_uuid"])
        utilization = GaugeMetricFamily("gpuspawner_device_utilization_ratio",
                                        "The device's utilisation at the hub's last sample (0-1)", labels=["uuid"])
        used = GaugeMetricFamily("gpuspawner_device_memory_used_bytes", "Device memory in use", labels=["uuid"])
        total = GaugeMetricFamily("gpuspawner_device_memory_total_bytes", "Device memory", labels=["uuid"])
        holder = GaugeMetricFamily("gpuspawner_device_holder", "A device held by a server of this hub (1)",
                                   labels=["uuid", "user", "server", "profile"])
        device_state = GaugeMetricFamily("gpuspawner_device_state",
                                  "A device's state (1): free, held, busy (outside the hub), unhealthy, or mig (a GPU "
                                  "in MIG mode, handed out by its MIG devices)", labels=["uuid", "state"])
        for d in readings.devices:
            info.add_metric([d.uuid, d.node, str(d.index), d.model, d.mig_profile, d.parent_uuid], 1)
            device_state.add_metric([d.uuid, d.state], 1)
            if d.utilization is not None:
                utilization.add_metric([d.uuid], d.utilization / 100)
            used.add_metric([d.uuid], d.memory_used)
            total.add_metric([d.uuid], d.memory_total)
            if d.state == "held":
                holder.add_metric([d.uuid, d.user, d.server, d.profile], 1)
        yield from (info, utilization, used, total, holder, device_state)

        states = GaugeMetricFamily("gpuspawner_devices", "Devices by model and state (free, held, busy, unhealthy)",
                                   labels=["model", "state"])
        for (model, state), n in sorted(state_counts(readings.devices).items()):
            states.add_metric([model, state], n)
        yield states

        queue = GaugeMetricFamily("gpuspawner_queue_length", "Spawns waiting in the GPU queue, by profile",
                                  labels=["profile"])
        for profile, n in sorted(Tally(w.profile for w in list(resources.waiters.values())).items()):
            queue.add_metric([profile], n)
        yield queue

        idle = GaugeMetricFamily("gpuspawner_server_idle_seconds", "How long a server's GPUs have been idle",
                                 labels=["user", "server"])
        left = GaugeMetricFamily("gpuspawner_server_time_left_seconds",
                                 "Time left before the sooner of a server's time limits stops it", labels=["user", "server"])
        for s in readings.servers:
            if s.idle_seconds is not None:
                idle.add_metric([s.user, s.server], s.idle_seconds)
            if s.time_left is not None:
                left.add_metric([s.user, s.server], s.time_left)
        yield from (idle, left)
        writable = GaugeMetricFamily(
            "gpuspawner_audit_log_writable",
            "1 while the hub writes to its audit log; 0 once it refuses to, because the log was rolled back or rewritten "
            "behind its back or its head file is unreadable (no server starts until an admin has looked)",
            labels=["store"])
        head = GaugeMetricFamily("gpuspawner_audit_log_head_entry", "The newest entry of the audit log this hub wrote or checked",
                                 labels=["store"])
        for store in list(resources.stores.values()):
            writable.add_metric([store.where], 0 if store.refusal else 1)
            head.add_metric([store.where], store.head.n)
        yield from (writable, head)
        if readings.taken_at:
            yield GaugeMetricFamily("gpuspawner_sample_timestamp_seconds", "When the hub last read NVML (Unix time)",
                                    value=readings.taken_at)


def metric_names() -> set[str]:
    """Every series name gpuspawner exposes, as a scrape shows it (``_total``, ``_bucket``…)."""
    names = {family.name for family in COLLECTOR.collect()} | {"gpuspawner_sample_timestamp_seconds"}
    suffixes = {"histogram": ("_bucket", "_sum", "_count", "_created"), "counter": ("_total", "_created")}
    for metric in (SPAWN_DURATION, REFUSALS, GPU_SECONDS, GPU_IDLE_SECONDS):
        for family in metric.describe():
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


COLLECTOR = GPUCollector()
REGISTRY.register(COLLECTOR)
