"""The hub's sampler: every ``gpu_sample_seconds`` it reads its GPUs, counts GPU time, and gives
GPUs back from servers past their time limits.

Each round reads every GPU's utilisation through NVML (in a thread, off the event loop) and:

- publishes :class:`gpuspawner.readings.Readings` (devices, holders, servers' idle time and time
  left), which :mod:`gpuspawner.metrics` shows to Prometheus;
- counts each GPU server's GPU-seconds since the last round, and the idle part of them
  (:func:`gpuspawner.readings.account`), for the metrics and for its audit record;
- carries each server's idle clock forward (:func:`gpuspawner.limits.idle_since`) and judges it
  (:func:`gpuspawner.limits.judge`): a server near its limit gets a warning its user sees on the
  home page (:func:`page_notices`); one past it is stopped through JupyterHub's own stop path, so
  its record says why, its GPUs are freed and the next spawn in the GPU queue is served.

The idle clocks and idle GPU-seconds are kept in ``gpuspawner-clocks.json`` in the hub's data
folder, by audit record, and the runtime clock in each server's state (when it started): a hub
restart picks them up where they were instead of starting them from zero.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import metrics
from .allocation import Holder
from .devices import Inventory
from .hubconfig import Clocks, clocks_path, load_clocks, save_clocks
from .hubwide import resources
from .limits import idle_since, judge
from .nvml import NVMLTimeout
from .readings import Readings, ServerReading, account, device_readings, held_share

if TYPE_CHECKING:
    from .spawner import GPUSpawner

HUB_TEMPLATES = str(Path(__file__).parent / "templates" / "hub")  # JupyterHub's home page with the notices


async def keep_time(caretaker: GPUSpawner, log: Any) -> None:
    """Sample, count and judge the hub's servers every ``gpu_sample_seconds``, for the life of the hub."""
    path = clocks_path()
    clocks = await asyncio.to_thread(load_clocks, path)
    resources.idle_clocks.update(clocks.idle_since)
    resources.gpu_idle_seconds.update(clocks.idle_gpu_seconds)
    while True:
        try:
            await check_limits(caretaker, log, path)
        except Exception:
            log.exception("gpuspawner could not sample its GPUs or check its servers' time limits")
        await asyncio.sleep(caretaker.gpu_sample_seconds)


def _running(sp: GPUSpawner) -> bool:
    """A server whose container runs and whose spawn has ended: one the sampler counts and judges."""
    return bool((sp.gpu_devices or sp.limits.any) and sp.started_at and sp.ready and not sp._spawning
                and sp.audit_record_id)


async def check_limits(caretaker: GPUSpawner, log: Any, path: Path | None = None) -> None:
    """One round: sample, publish the readings, count GPU time, carry the idle clocks, warn, stop."""
    try:
        inventory: Inventory | None = await caretaker.nvml_reader().get()
    except NVMLTimeout as e:  # no sample this round: the idle clocks stand still, runtime limits still hold
        log.warning("No GPU sample this round: %s", e)
        inventory = None
    now = time.time()
    utilization = {d.uuid: d.utilization for d in inventory.devices} if inventory is not None else None
    spawners = list(resources.spawners.values())
    live = {sp.audit_record_id for sp in spawners if sp.audit_record_id}
    clocks = {record: since for record, since in resources.idle_clocks.items() if record in live}
    servers = []
    for sp in [sp for sp in spawners if _running(sp)]:
        record = sp.audit_record_id
        sampled = utilization is not None and bool(sp.gpu_devices) and all(
            utilization.get(u) is not None for u in sp.gpu_devices)
        idle = resources.idle_clocks.get(record) if utilization is None else idle_since(
            resources.idle_clocks.get(record), [utilization.get(u) for u in sp.gpu_devices],
            threshold=sp.limits.idle_threshold, now=now)
        if idle is None:
            clocks.pop(record, None)
        else:
            clocks[record] = idle
        if sp.gpu_devices:
            count_gpu_time(sp, now=now, idle=idle is not None, sampled=sampled, inventory=inventory)
        verdict = judge(sp.limits, started=sp.started_at, idle_from=idle, now=now)
        servers.append(ServerReading(sp.user.name, sp.name or "", None if idle is None else now - idle, verdict.time_left))
        if verdict.action == "warn" and sp.limit_notice != verdict.reason:
            log.info("Warned %s: %s", sp._log_name, verdict.reason)
        sp.limit_notice = verdict.reason if verdict.action == "warn" else ""
        if verdict.action == "stop":
            log.warning("Stopping %s: %s", sp._log_name, verdict.reason)
            resources.last_stops[(sp.user.name, sp.name or "")] = verdict.reason
            sp.stop_reason = verdict.reason
            resources.keep(sp.user.stop(sp.name))  # JupyterHub's own stop: proxy, state, record, GPUs
            clocks.pop(record, None)
    resources.idle_clocks = clocks
    for gone in set(resources.accounted) - live:
        del resources.accounted[gone]
    resources.gpu_idle_seconds = {r: s for r, s in resources.gpu_idle_seconds.items() if r in live}
    if inventory is not None:
        publish(inventory, spawners, servers, now=now, busy_memory_threshold=caretaker.busy_memory_threshold)
    if path is not None:
        await asyncio.to_thread(save_clocks, path, Clocks(dict(clocks), dict(resources.gpu_idle_seconds)))


def count_gpu_time(sp: GPUSpawner, *, now: float, idle: bool, sampled: bool = False,
                   inventory: Inventory | None = None) -> None:
    """Count the GPU-seconds `sp` held since they were last counted (since its start, for a server this
    hub process started; else since the hub first saw it): in the metrics, and the idle part for its record."""
    record = sp.audit_record_id
    since = resources.accounted.get(record) or (sp.started_at if sp._started_here else now)
    resources.accounted[record] = now
    known = inventory.devices if inventory is not None else resources.readings.devices
    spent = account(held_share(sp.gpu_devices, {d.uuid: d.mig_profile for d in known}), since=since, now=now, idle=idle)
    labels = (sp.user.name, sp.profile_slug)
    metrics.GPU_SECONDS.labels(*labels).inc(spent.gpu_seconds)
    metrics.GPU_IDLE_SECONDS.labels(*labels).inc(spent.idle_gpu_seconds)
    if sampled or record in resources.gpu_idle_seconds:
        resources.gpu_idle_seconds[record] = resources.gpu_idle_seconds.get(record, 0.0) + spent.idle_gpu_seconds


def count_until_stop(sp: GPUSpawner) -> None:
    """A server stops: count its GPU time since the last round, idle if its idle clock runs."""
    if sp.gpu_devices and sp.audit_record_id and sp.started_at:
        count_gpu_time(sp, now=time.time(), idle=sp.audit_record_id in resources.idle_clocks)


def publish(inventory: Inventory, spawners: list[GPUSpawner], servers: list[ServerReading], *, now: float,
            busy_memory_threshold: int) -> None:
    """The round's readings, for the metrics: devices held by the hub's servers and pending spawns, and by
    other containers as the engine was last read (a device another container holds is busy outside)."""
    claims: dict[str, Holder] = {}
    for _, seen in resources.engine_claims.values():
        claims.update((uuid, holder) for uuid, holder in seen.items() if not holder.user)
    profiles = {}
    for sp in spawners:
        claims.update((uuid, sp.holder) for uuid in sp.gpu_devices)
        profiles[sp.holder] = sp.profile_slug
    claims = resources.book.merged(claims)
    resources.readings = Readings(
        taken_at=now, problem=inventory.problem or "", servers=tuple(servers),
        devices=device_readings(inventory, claims, profiles, busy_memory_threshold=busy_memory_threshold,
                                node_names={n.id: n.hostname for n in resources.swarm_nodes[1] or ()}),
    )


def page_notices(user: Any) -> list[dict[str, str]]:
    """What the hub's pages tell `user` of their servers' time limits: a warning before a stop, and
    why the hub stopped one. For ``c.JupyterHub.template_vars = {"gpuspawner_notices": page_notices}``."""
    notices = []
    for (name, server), sp in list(resources.spawners.items()):
        if name == getattr(user, "name", None) and sp.limit_notice:
            notices.append({"server": server, "kind": "warning", "text": sp.limit_notice})
    for (name, server), reason in list(resources.last_stops.items()):
        running = resources.spawners.get((name, server))
        if name == getattr(user, "name", None) and not (running is not None and running.active):
            notices.append({"server": server, "kind": "stopped", "text": reason})
    return notices
